"""Orbax checkpoints of the train state: every K steps (written in the background), the last few kept, and
the latest one restored when the same command runs again.

A checkpoint `OUTPUT/checkpoints/<step>/` holds the state pytree (step, params, optimizer state, EMA, PRNG
key; each process writes its own shards) and a JSON item with the data position and the run config.
Orbax writes into a temporary directory and renames it when complete, so a run killed in the middle of a
save leaves the previous checkpoint as the latest (the partial one is ignored and cleaned up).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpoints:
    """Saving and restoring the train state under `directory`."""

    def __init__(self, directory: str | Path, *, keep: int, asynchronous: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

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


# the settings (flat names of train.config) that shape the train state or the data order
STATE_KEYS = (
    "mode",
    "batch_size",
    "grad_accum",
    "seed",
    "lora_rank",
    "lora_targets",
    "lora_text_encoder",
    "num_vectors",
    "train_text_encoder",
    "ema_decay",
    "resolution",
)


def check_compatible(meta: dict, config_json: dict) -> None:
    """Refuses to resume a checkpoint written by a run with different STATE_KEYS settings (a clear message
    instead of a silently different run). Both configs are flat (`train.config.to_json`), as config.json
    has always been, so checkpoints written before the config's fields were grouped compare too."""
    saved = meta.get("config", {})
    changed = [k for k in STATE_KEYS if k in saved and json.dumps(saved[k]) != json.dumps(config_json.get(k))]
    if changed:
        diffs = ", ".join(f"{k}: {saved[k]!r} -> {config_json.get(k)!r}" for k in changed)
        raise ValueError(
            f"the checkpoint in this output folder was written with other settings ({diffs}); "
            "use a new --output or the original settings"
        )
