"""Process-wide settings that sdjax's command-line programs (`sample.py`, `python -m train`) make when they
start. The library never makes them on import: a program that imports sdjax keeps its own settings.
"""

from __future__ import annotations

import gc

# Allocations (less deallocations) between young collections, then young collections per middle one, then
# middle ones per full one (Python's defaults: 700, 10, 10).
GC_THRESHOLDS = (50_000, 20, 10)


def tune_garbage_collector() -> None:
    """Sets Python's cyclic garbage collector to run far less often than its defaults.

    Tracing a JAX program creates millions of short-lived Python objects (tracers, equations, pytrees).
    With the default thresholds the collector runs every 700 of them and again and again walks the
    program traced so far, which cost ~5% of a training run's start-up and ~9% of the training parity
    tests (figures: README.md, "Tests"). Reference counting still frees everything that is not in a
    cycle at once; cycles wait for the rarer collections."""
    gc.set_threshold(*GC_THRESHOLDS)
