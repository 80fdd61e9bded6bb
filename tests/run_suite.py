"""Runs the test suite one file per pytest process, `--jobs` processes at a time (the Makefile's `make test`).

A fresh process per file keeps a long run from accumulating compiled XLA programs (a single long-lived
process crashed in XLA, see the README's "Tests"), and files run heaviest first so that two jobs end
together. The light files of each group in SHARED_PROCESSES share one process instead: a process spends
seconds of CPU importing JAX, torch and diffusers before its first test. "Heaviest" is what the last run
took: each run records its seconds per file in the git-ignored tests/.durations.json (a shared process's
seconds split evenly among its files), one table per set of pytest arguments (so `-m slow` timings do not
order the default run). Files without a recorded time run first, the largest first: file size stands in
for time (a fresh clone has no timings). All processes share one persistent compilation cache
(SDJAX_TEST_SESSION_CACHE), removed at the end. Each process's output is printed when it ends, then a
table of files, outcomes and seconds; the exit status is non-zero if any process failed.

    python tests/run_suite.py [--jobs 2] [FILES ...] [-- PYTEST ARGS]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DURATIONS = TESTS / ".durations.json"
# Light files (each well under a minute of the default run) that share one pytest process per group: none
# starts JAX with options of its own (XLA_OPTIMISATION, or environment read before JAX starts).
SHARED_PROCESSES = (
    (
        "test_tokenizer.py",
        "test_full_size.py",
        "test_control_images.py",
        "test_images.py",
        "test_architecture.py",
        "test_run_suite.py",
        "test_attention.py",
    ),
    ("test_textual_inversion.py", "test_diffusers_scheduler_cases.py", "test_weight_files.py"),
    ("test_prompts.py", "test_k_diffusion_samplers.py"),
    ("test_lora.py", "test_layers.py"),
)


def _read_durations(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def last_seconds(path: Path, key: str) -> dict[str, float]:
    """Seconds per test file name recorded in `path` for the pytest arguments `key`; {} when there are none
    (no file yet, an unreadable one, or other arguments)."""
    entry = _read_durations(path).get(key)
    if not isinstance(entry, dict):
        return {}
    return {name: float(s) for name, s in entry.items() if isinstance(s, int | float)}


def record_seconds(path: Path, key: str, seconds: dict[str, float]) -> None:
    """Merges `seconds` (per file name) into the table of `key` in `path`; files not run keep their time."""
    table = _read_durations(path)
    table[key] = {**last_seconds(path, key), **{name: round(s, 1) for name, s in seconds.items()}}
    partial = path.with_name(path.name + ".tmp")
    try:
        partial.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        os.replace(partial, path)  # a run killed while writing leaves the previous table
    except OSError as e:
        print(f"timings not recorded: {e}", file=sys.stderr)


def order(files: list[Path], seconds: dict[str, float]) -> list[Path]:
    """`files` heaviest first: those without a time in `seconds` (file name -> seconds) first, largest file
    first, then the timed ones, longest first."""

    def key(f: Path):
        size = f.stat().st_size if f.is_file() else 0  # a missing file is pytest's to report
        return (f.name in seconds, -seconds.get(f.name, 0.0), -size, f.name)

    return sorted(files, key=key)


def processes(files: list[Path], groups=SHARED_PROCESSES) -> list[list[Path]]:
    """`files` (in order) as the file lists of pytest processes: the files of one group of `groups` (file
    names) together, where the first of them stands, every other file alone."""
    group_of = {name: i for i, group in enumerate(groups) for name in group}
    units, unit_of_group = [], {}
    for f in files:
        group = group_of.get(f.name)
        if group is None:
            units.append([f])
        elif group in unit_of_group:
            unit_of_group[group].append(f)
        else:
            unit_of_group[group] = [f]
            units.append(unit_of_group[group])
    return units


def run_files(paths: list[Path], pytest_args: list[str], env: dict) -> tuple[list[Path], int, float, str]:
    started = time.perf_counter()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, paths), *pytest_args]
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return paths, done.returncode, time.perf_counter() - started, done.stdout


def _name(paths: list[Path]) -> str:
    return " + ".join(p.name for p in paths)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    ours = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="tests/run_suite.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2, help="pytest processes at a time (default 2)")
    p.add_argument("files", nargs="*", help="test files (default: every tests/test_*.py)")
    args = p.parse_args(ours)
    files = [Path(f).resolve() for f in args.files] or sorted(TESTS.glob("test_*.py"))
    key = " ".join(pytest_args)
    units = processes(order(files, last_seconds(DURATIONS, key)))

    cache = tempfile.mkdtemp(prefix="sdjax-test-xla-")
    env = {**os.environ, "SDJAX_TEST_SESSION_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    results = []
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_files, unit, pytest_args, env) for unit in units]
            for future in as_completed(futures):
                paths, code, seconds, output = future.result()
                results.append((paths, code, seconds))
                print(f"==== {_name(paths)} ({seconds:.0f} s) ====\n{output.rstrip()}", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        record_seconds(DURATIONS, key, {p.name: s / len(paths) for paths, _, s in results for p in paths})
    # pytest exit code 5: nothing collected (e.g. every test of the file deselected by -m).
    failed = [_name(paths) for paths, code, _ in results if code not in (0, 5)]
    print("\n==== summary ====")
    for paths, code, seconds in sorted(results, key=lambda r: -r[2]):
        outcome = "ok" if code in (0, 5) else f"FAILED (exit {code})"
        print(f"{_name(paths):28s} {seconds:7.0f} s  {outcome}")
    files_run = sum(len(paths) for paths, _, _ in results)
    print(
        f"{files_run} files in {len(results)} processes in {time.perf_counter() - started:.0f} s; "
        f"failed: {', '.join(failed) or 'none'}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
