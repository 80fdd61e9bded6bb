"""Test-session set-up: no hub access, no writes to the user's compilation cache, the reference helpers
importable as `reference`, and fast compiles.

Compiled programs are shared through a persistent compilation cache private to the test run (a temporary
directory that every subprocess a test starts, and every pytest process of tests/run_suite.py, uses
through SDJAX_CACHE_DIR, removed at the end): the tiny test models have the same architecture across test
files, so many programs are compiled once per run instead of once per process. Tests of the cache itself
pass their own directory.

XLA compile time dominates this suite (a tiny pipeline's program compiles for far longer than it runs, and
much faster at LLVM optimisation level 0: README.md, "Tests"), so tests compile with XLA's backend
optimisation level 0 (`--xla_backend_optimization_level=0`, which also reaches the subprocesses the tests
start). Parity tolerances and bit-identity checks are unaffected: run with `SDJAX_TEST_XLA_OPT=full`
to test under the default optimisation instead (as `make test-slow` does).
"""

import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests run on the CPU; libtpu (in the test extra, to compile for TPU topologies without a TPU) would
# otherwise look for TPU chips when JAX starts. Compiling for a topology works with this set.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The first process (pytest itself, or tests/run_suite.py) makes the directory; the processes it starts inherit it.
_OWNS_CACHE = "SDJAX_TEST_SESSION_CACHE" not in os.environ
if _OWNS_CACHE:
    os.environ["SDJAX_TEST_SESSION_CACHE"] = tempfile.mkdtemp(prefix="sdjax-test-xla-")
os.environ["SDJAX_CACHE_DIR"] = os.environ["SDJAX_TEST_SESSION_CACHE"]
if os.environ.get("SDJAX_TEST_XLA_OPT", "fast") != "full":
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sdjax.compile_cache import enable_compilation_cache  # noqa: E402

enable_compilation_cache(os.environ["SDJAX_CACHE_DIR"])


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's compiled programs after each test module: a long session otherwise accumulates
    thousands of executables (and the memory of their code)."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


def pytest_sessionfinish(session, exitstatus):
    if _OWNS_CACHE:
        shutil.rmtree(os.environ["SDJAX_TEST_SESSION_CACHE"], ignore_errors=True)
