"""Reading ahead: the host arrays of optimizer steps start..stop, in order, while the device trains.

A step's arrays depend only on the step number (`train.data.Batches.step`: positions from the seed, this
process's rows, its own augmentation draws), so reading can be spread over processes without changing a
single value: `workers` = 0 reads in one background thread (enough when the step takes longer than
decoding its images); N > 0 reads with grain (`grain.MapDataset.range(start, stop).map(step)`) in N worker
processes, each decoding whole steps, handed back in step order. Resuming at step k starts the range at k:
the data position of a checkpoint is its step.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterator

Step = dict  # {name: numpy array (grad_accum, local rows, ...)}


def _threaded(read: Callable[[int], Step], start: int, stop: int) -> Iterator[Step]:
    """Steps start..stop-1, each read in a background thread while the previous one is consumed."""
    if start >= stop:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(read, start)
        for step in range(start, stop):
            ready = pending.result()
            if step + 1 < stop:
                pending = pool.submit(read, step + 1)
            yield ready


def steps(read: Callable[[int], Step], start: int, stop: int, workers: int = 0, buffer: int = 2) -> Iterator[Step]:
    """The arrays of steps start..stop-1 in order, read ahead by a thread (workers 0) or by `workers`
    grain worker processes holding up to `buffer` steps each. `read` must pickle (with workers)."""
    if workers < 0:
        raise ValueError(f"loader_workers must be >= 0, got {workers}")
    if workers == 0 or start >= stop:
        yield from _threaded(read, start, stop)
        return
    try:
        import grain
    except ImportError:
        raise ValueError("loader_workers > 0 reads with grain: pip install grain (or sdjax[train])") from None

    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside absl.app they stay at their defaults
        flags.FLAGS.mark_as_parsed()
    dataset = grain.MapDataset.range(start, stop).map(read).to_iter_dataset()
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=buffer)
    yield from dataset.mp_prefetch(options)
