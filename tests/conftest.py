"""Test-session set-up: no hub access, no writes to the user's compilation cache, and the reference helpers
importable as `reference`."""

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SDJAX_CACHE_DIR", "off")  # tests that use the persistent cache pass their own directory
sys.path.insert(0, str(Path(__file__).resolve().parent))
