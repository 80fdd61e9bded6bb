"""Orbax checkpoints of the train state: every K steps (written in the background), the last few kept, and
the latest one restored when the same command runs again.

A checkpoint `OUTPUT/checkpoints/<step>/` holds the state pytree (step, params, optimizer state, EMA, PRNG
key; each process writes its own shards) and a JSON item with the data position and the run config.
Orbax writes into a temporary directory and renames it when complete, so a run killed in the middle of a
save leaves the previous checkpoint as the latest. The partial one is removed before the manager starts
(`remove_partial`), so a later save of the same step never meets its remains.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Saving and restoring the train state under `directory`."""

    def __init__(self, directory: str | Path, *, keep: int, asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        if jax.process_index() == 0:
            remove_partial(self.directory)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("checkpoints: partial saves removed")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        """The steps of the complete checkpoints, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def meta(self, step: int) -> dict:
        """The JSON item (data position, run config) of checkpoint `step`, without reading the state."""
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def save(self, step: int, state: Any, meta: dict) -> None:
        """Starts writing a checkpoint of `state` at `step` (returns once the arrays are copied off the
        devices; the files are written in the background)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """(state, meta) of checkpoint `step`, the state placed like `like` (arrays or ShapeDtypeStructs
        with shardings)."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like
        )
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def remove_partial(directory: Path) -> list[Path]:
    """Removes the temporary folders of saves that a killed process left under `directory` (Orbax's
    `*.orbax-checkpoint-tmp*`); returns them."""
    found = sorted(directory.glob("*.orbax-checkpoint-tmp*")) if directory.is_dir() else []
    for path in found:
        shutil.rmtree(path, ignore_errors=True)
    return found
