"""tests/run_suite.py's file order: the last run's seconds, untimed files first by size, the light files'
shared processes, and a missing or corrupt timings file read as no timings (no pytest processes are started
here)."""

from __future__ import annotations

import json

from run_suite import SHARED_PROCESSES, TESTS, last_seconds, order, processes, record_seconds


def _files(tmp_path, sizes: dict[str, int]):
    files = []
    for name, size in sizes.items():
        (tmp_path / name).write_text("x" * size)
        files.append(tmp_path / name)
    return files


def test_order_untimed_by_size_then_timed_by_seconds(tmp_path):
    files = _files(tmp_path, {"test_a.py": 10, "test_b.py": 300, "test_c.py": 20, "test_d.py": 200, "test_e.py": 5})
    seconds = {"test_a.py": 4.0, "test_c.py": 90.0, "test_e.py": 30.0}
    names = [f.name for f in order(files, seconds)]
    assert names == ["test_b.py", "test_d.py", "test_c.py", "test_e.py", "test_a.py"]
    assert [f.name for f in order(files, {})] == ["test_b.py", "test_d.py", "test_c.py", "test_a.py", "test_e.py"]


def test_grouped_files_share_a_process_where_the_first_of_them_stands(tmp_path):
    files = [tmp_path / n for n in ["test_a.py", "test_b.py", "test_c.py", "test_d.py", "test_e.py"]]
    groups = (("test_d.py", "test_b.py", "test_x.py"), ("test_e.py",))
    units = [[f.name for f in unit] for unit in processes(files, groups)]
    assert units == [["test_a.py"], ["test_b.py", "test_d.py"], ["test_c.py"], ["test_e.py"]]
    assert [[f.name for f in u] for u in processes(files[2:], groups)] == [["test_c.py"], ["test_d.py"], ["test_e.py"]]


def test_the_shared_processes_name_existing_files_once():
    names = [name for group in SHARED_PROCESSES for name in group]
    assert len(names) == len(set(names))
    assert [n for n in names if not (TESTS / n).is_file()] == []


def test_timings_round_trip_per_pytest_arguments_and_merge(tmp_path):
    path = tmp_path / "durations.json"
    assert last_seconds(path, "") == {}  # a fresh clone
    record_seconds(path, "", {"test_a.py": 12.34, "test_b.py": 3.0})
    record_seconds(path, "-m slow", {"test_a.py": 600.0})
    record_seconds(path, "", {"test_b.py": 5.0})  # a run of one file keeps the others' times
    assert last_seconds(path, "") == {"test_a.py": 12.3, "test_b.py": 5.0}
    assert last_seconds(path, "-m slow") == {"test_a.py": 600.0}
    assert last_seconds(path, "-x") == {}


def test_a_corrupt_timings_file_reads_as_none_and_is_replaced(tmp_path):
    path = tmp_path / "durations.json"
    for text in ["{not json", "[1, 2]", json.dumps({"": [1]}), json.dumps({"": {"test_a.py": "slow"}})]:
        path.write_text(text)
        assert last_seconds(path, "") == {}
    record_seconds(path, "", {"test_b.py": 1.0})
    assert last_seconds(path, "") == {"test_b.py": 1.0}
