"""Handing freed heap memory back to the operating system.

XLA:CPU compiles with LLVM and reads weights through many medium-sized buffers, all from malloc. glibc
keeps freed memory in its arenas (one per thread that allocated), so the resident set keeps what a compile
or a load once needed, and the peaks of later phases stack on top. `release_free_memory` (glibc's
`malloc_trim(0)`) returns the free pages of every arena; sdjax calls it after loading a model, after
compiling a generation program and after each generation call (what it saves on SD 1.5: README.md,
"Memory"). A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Returns the free memory of the C heap to the OS (glibc `malloc_trim(0)`; cheap next to a compile)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def device_memory_bytes(device=None) -> int | None:
    """The memory one device can hold, in bytes: its allocator's limit on GPUs/TPUs, the machine's
    physical memory on the CPU; None when unknown."""
    import os

    import jax

    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        return stats.get("bytes_limit")
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
