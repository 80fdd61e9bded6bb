"""Test-session set-up: no hub access, no writes to the user's compilation cache, the reference helpers
importable as `reference`, fast compiles, and the CPU's kernels alone traced (below).

Compiled programs are shared through a persistent compilation cache private to the test run (a temporary
directory that every subprocess a test starts, and every pytest process of tests/run_suite.py, uses
through SDJAX_CACHE_DIR, removed at the end): the tiny test models have the same architecture across test
files, so many programs are compiled once per run instead of once per process. Tests of the cache itself
pass their own directory.

XLA compile time dominates this suite (a tiny pipeline's program compiles for far longer than it runs, and
much faster at LLVM optimisation level 0: README.md, "Tests"), so tests compile with XLA's backend
optimisation level 0 (`--xla_backend_optimization_level=0`), with XLA:CPU's older fusion emitters
(`--xla_cpu_use_fusion_emitters=false`: each fusion skips the MLIR pipeline) and with each program's LLVM
module compiled whole (`--xla_cpu_parallel_codegen_split_count=1`: the suite keeps every core busy already,
so splitting it for parallel code generation only adds work); README.md, "Tests". The flags also reach the
subprocesses the tests start. Parity tolerances are unaffected. The older emitters round a few values of a
program differently from another program of other batch shapes, so a test that compares two different
programs bit for bit (an image drawn in a batch and alone) is marked `fusion_emitters`: sdjax's programs
compile with XLA's default emitters, as users' do, for its duration (sdjax.xla_options). Run with
`SDJAX_TEST_XLA_OPT=full` to test under XLA's defaults throughout instead (as `make test-slow` does). A
test module whose programs run far longer than they compile says `XLA_OPTIMISATION = "full"`: a pytest
process whose tests all come from such modules compiles with XLA's default optimisation
(tests/test_demo.py: 114 s -> 77 s).
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
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
_FAST_COMPILES = os.environ.get("SDJAX_TEST_XLA_OPT", "fast") != "full"
if _FAST_COMPILES:
    _FAST_FLAGS = (
        "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
        " --xla_cpu_parallel_codegen_split_count=1"
    )
    os.environ["XLA_FLAGS"] = f"{_XLA_FLAGS} {_FAST_FLAGS}".strip()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sdjax.compile_cache import enable_compilation_cache  # noqa: E402
from sdjax.process import tune_garbage_collector  # noqa: E402
from sdjax.targets import KERNEL_PLATFORMS_ENV  # noqa: E402

# The compiler option that gives one program XLA:CPU's default fusion emitters despite the session's flags.
FUSION_EMITTERS = {"xla_cpu_use_fusion_emitters": True}

# Programs are traced with the CPU's kernels only (sdjax.nn.kernels.by_platform): tracing every TPU kernel
# into every CPU program cost 3-17% of a test's time (README "Tests"). A module that lowers for other
# platforms (jax.export, TPU topologies) says `KERNEL_PLATFORMS = "all"`.
_KERNEL_PLATFORMS = os.environ.setdefault(KERNEL_PLATFORMS_ENV, "cpu")

enable_compilation_cache(os.environ["SDJAX_CACHE_DIR"])
tune_garbage_collector()  # as sample.py and python -m train do (the tests trace many programs)


def pytest_collection_finish(session):
    """XLA's default optimisation when every collected test asks for it (`XLA_OPTIMISATION = "full"` in its
    module), unless a module already started JAX's backends while it was imported (level 0 stays then)."""
    from jax._src import xla_bridge

    modules = {item.module for item in session.items}
    if modules and all(getattr(m, "XLA_OPTIMISATION", "fast") == "full" for m in modules):
        if not xla_bridge.backends_are_initialized():
            os.environ["XLA_FLAGS"] = _XLA_FLAGS


@pytest.fixture(autouse=True, scope="module")
def _kernel_platforms(request):
    """$SDJAX_KERNEL_PLATFORMS unset (every platform's kernels traced) for the tests of a module that says
    `KERNEL_PLATFORMS = "all"`, and for the processes they start."""
    if getattr(request.module, "KERNEL_PLATFORMS", None) != "all":
        yield
        return
    os.environ.pop(KERNEL_PLATFORMS_ENV, None)
    try:
        yield
    finally:
        os.environ[KERNEL_PLATFORMS_ENV] = _KERNEL_PLATFORMS


@pytest.fixture(autouse=True)
def _users_fusion_emitters(request, monkeypatch):
    """For a test marked `fusion_emitters`: sdjax's programs (those built with `sdjax.xla_options`) compile
    with XLA:CPU's default fusion emitters, which the session's XLA_FLAGS turn off. A per-program compiler
    option overrides the flag; `generate.program` is rebuilt with it, and again after the test."""
    if not _FAST_COMPILES or request.node.get_closest_marker("fusion_emitters") is None:
        yield
        return
    from sdjax import generate, xla_options

    monkeypatch.setitem(xla_options._OPTIONS, "cpu", {**xla_options._OPTIONS["cpu"], **FUSION_EMITTERS})
    generate.program.cache_clear()
    yield
    generate.program.cache_clear()


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
