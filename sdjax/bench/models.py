"""The benchmark's models: random-weight pipelines of the real architectures (`sdjax.testing`), saved once
as diffusers folders under the cache directory (`$SDJAX_BENCH_DIR`, default ~/.cache/sdjax/bench) so that
both frameworks load the same files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from sdjax.testing import ARCHS, random_pipeline

__all__ = ["ARCHS", "cache_dir", "model_folder"]


def cache_dir() -> Path:
    return Path(os.environ.get("SDJAX_BENCH_DIR") or Path.home() / ".cache" / "sdjax" / "bench").expanduser()


def model_folder(arch: str) -> Path:
    """The cached diffusers folder of `arch`, built on first use (written to a temporary name, then renamed)."""
    target = cache_dir() / arch
    if (target / "model_index.json").is_file():
        return target
    tmp = target.with_name(f".{arch}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    random_pipeline(arch).save_pretrained(tmp)
    tmp.rename(target)
    return target
