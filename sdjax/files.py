"""Writing output files so that a killed process never leaves a half-written one, and never overwrites one.

Every file sdjax and train/ write for users goes through here: text and bytes via a temporary sibling and a
rename (`write_text`, `write_bytes`, `replacing`), whole folders (a diffusers export) via a temporary
sibling folder renamed into place (`folder_replacing`), and names that are free (`fresh_path`) where an
existing file must be kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_MARK = ".sdjax-tmp"  # in the names of temporaries, so a later run can recognise and remove its leftovers


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_MARK}")


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; on success it is renamed to `path` (atomic on one
    file system), on failure removed. Readers see the old file or the whole new one, never a part."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` atomically (see `replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes UTF-8 `text` to `path` atomically (see `replacing`)."""
    return write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def folder_replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a fresh temporary folder beside `path`; on success it takes the place of `path` (an existing
    `path` is removed only after the new folder is complete), on failure it is removed. A process killed
    while writing leaves the old folder (or none) plus a temporary that `remove_temporaries` clears."""
    path = Path(path)
    tmp = _temporary_sibling(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = None
        if path.exists():
            old = _temporary_sibling(path)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Removes what a killed process left in `folder` from `replacing`/`folder_replacing`; returns them."""
    found = sorted(Path(folder).glob(f".*{TEMP_MARK}"))
    for leftover in found:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return found


def fresh_path(path: str | os.PathLike) -> Path:
    """`path` if nothing exists there, else the first free `stem-1.suffix`, `stem-2.suffix`, ... beside it."""
    path = Path(path)
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate
