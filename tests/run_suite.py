"""Runs the test suite one file per pytest process, `--jobs` files at a time (the Makefile's `make test`).

A fresh process per file keeps a long run from accumulating compiled XLA programs (a single long-lived
process crashed in XLA after ~900 compiles), and files run heaviest first so two jobs end together. All
processes share one persistent compilation cache (SDJAX_TEST_SESSION_CACHE), removed at the end. Each
file's output is printed when it ends, then a table of files, outcomes and seconds; the exit status is
non-zero if any file failed.

    python tests/run_suite.py [--jobs 2] [FILES ...] [-- PYTEST ARGS]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# Seconds each file took in the last measured default run (2 jobs, 676 s in all on 2026-12-02); files not
# listed count as 30 s.
MEASURED_SECONDS = {
    "test_generate.py": 325,
    "test_train.py": 320,
    "test_demo.py": 125,
    "test_schedulers.py": 100,
    "test_sharding.py": 100,
    "test_models.py": 85,
    "test_sample.py": 70,
    "test_single_file.py": 55,
    "test_bench.py": 40,
    "test_lora.py": 35,
}


def run_file(path: Path, pytest_args: list[str], env: dict) -> tuple[Path, int, float, str]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(path), *pytest_args]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return path, done.returncode, time.perf_counter() - started, done.stdout


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="tests/run_suite.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="pytest processes at a time (default 2)")
    p.add_argument("files", nargs="*", help="test files (default: every tests/test_*.py)")
    args = p.parse_args(ours)
    files = [Path(f).resolve() for f in args.files] or sorted(TESTS.glob("test_*.py"))
    files.sort(key=lambda f: -MEASURED_SECONDS.get(f.name, 30))

    cache = tempfile.mkdtemp(prefix="sdjax-test-xla-")
    env = {**os.environ, "SDJAX_TEST_SESSION_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    results = []
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_file, f, pytest_args, env) for f in files]
            for future in as_completed(futures):
                path, code, seconds, output = future.result()
                results.append((path, code, seconds))
                print(f"==== {path.name} ({seconds:.0f} s) ====\n{output.rstrip()}", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    # pytest exit code 5: nothing collected (e.g. every test of the file deselected by -m).
    failed = [p.name for p, code, _ in results if code not in (0, 5)]
    print("\n==== summary ====")
    for path, code, seconds in sorted(results, key=lambda r: -r[2]):
        outcome = "ok" if code in (0, 5) else f"FAILED (exit {code})"
        print(f"{path.name:28s} {seconds:7.0f} s  {outcome}")
    print(f"{len(results)} files in {time.perf_counter() - started:.0f} s; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
