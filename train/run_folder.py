"""The output folder of a run: what it holds, and whether this run may write into it.

Decided before anything is written, so that no finished work is overwritten and no refused run leaves a
trace (a config.json of settings it never used):

  nothing of a run                    start at step 0
  a checkpoint with the same settings resume from it (when its step reached --steps and final/ is missing:
                                      export only; when final/ exists: nothing to do)
  a checkpoint with other settings    refused (with --overwrite: its files are deleted, start at step 0)
  a run's files but no checkpoint     refused (with --overwrite: deleted, start at step 0), unless they
                                      are this same run's (same config.json, no final/), killed before its
                                      first checkpoint: start at step 0

"The same settings" are those that shape the train state or the data order (`STATE_KEYS`). A resumed run
that trains past an earlier final/ (more --steps) keeps that one as final-step-NNNNNN/ (which --overwrite
leaves alone too).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from sdjax import files

# what a run writes into its output folder (class_images/ is data, kept)
RUN_FILES = ("final", "checkpoints", "metrics.jsonl", "loss.png", "config.json", "samples")

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
    "buckets",
    "controlnet_embedding_channels",
)


class OutputFolderError(ValueError):
    """An output folder this run may not write into, with a one-line reason and what to do."""


@dataclasses.dataclass(frozen=True)
class Start:
    """How a run starts: `action` "train" (from `step`'s checkpoint, or from scratch when None), "export"
    (the checkpoint at `step` is the result: only export it) or "done" (final/ is there: nothing to do)."""

    action: str
    step: int | None = None
    clear: bool = False  # delete the earlier run's files first (--overwrite)


def open_output(text: str | None) -> Path:
    """The output folder (created if missing), or a one-line error when it cannot be one."""
    if not text:
        raise OutputFolderError("no output folder given: pass --output DIR")
    output = Path(text).expanduser()
    if output.exists() and not output.is_dir():
        raise OutputFolderError(f"--output {output} is a file, not a folder: pass a folder (it is created if missing)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputFolderError(f"cannot create the output folder {output}: {err.strerror or err}") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"cannot write into the output folder {output} (permission denied): pass another --output"
        )
    return output


def changed_settings(saved: dict, config_json: dict) -> list[str]:
    """The STATE_KEYS on which a checkpoint's flat config and this run's differ, as "key: old -> new"."""
    changed = [k for k in STATE_KEYS if k in saved and json.dumps(saved[k]) != json.dumps(config_json.get(k))]
    return [f"{k}: {saved[k]!r} -> {config_json.get(k)!r}" for k in changed]


def decide(output: Path, latest: int | None, saved_config: dict | None, config_json: dict, *, overwrite: bool) -> Start:
    """How this run starts in `output` (see the module doc), given the latest complete checkpoint's step
    and its saved flat config. Raises OutputFolderError when the folder must not be touched; with
    `overwrite`, starts over with `clear` set instead (the caller deletes them: `clear_run_files`)."""
    steps = config_json["steps"]
    present = [name for name in RUN_FILES if (output / name).exists() and name != "checkpoints"]
    final = output / "final"
    if latest is None:
        if not present:
            return Start("train")
        if "final" not in present and _recorded_config(output) == json.loads(json.dumps(config_json)):
            return Start("train", None, clear=True)  # this very run, killed before its first checkpoint
        return _start_over(output, overwrite, f"holds an earlier run's files ({', '.join(present)}) and no checkpoint")
    changed = changed_settings(saved_config or {}, config_json)
    if changed:
        return _start_over(output, overwrite, f"holds a checkpoint written with other settings ({', '.join(changed)})")
    if latest > steps:
        return _start_over(output, overwrite, f"holds a checkpoint of step {latest}, past --steps {steps}")
    if latest == steps:
        if final.exists():
            if overwrite:
                return _start_over(output, overwrite, "")
            return Start("done", latest)
        return Start("export", latest)
    return Start("train", latest)


def _recorded_config(output: Path) -> dict | None:
    """The flat config an earlier run recorded in OUTPUT/config.json, or None."""
    try:
        return json.loads((output / "config.json").read_text())
    except (OSError, ValueError):
        return None


def keep_earlier_final(output: Path, step: int) -> Path | None:
    """Renames an existing final/ (the result of `step` steps) to final-step-NNNNNN/ (or a free variant),
    before a resumed run that trains further replaces it; returns the new name."""
    final = output / "final"
    if not final.exists():
        return None
    kept = files.fresh_path(output / f"final-step-{step:06d}")
    os.replace(final, kept)
    return kept


def _start_over(output: Path, overwrite: bool, reason: str) -> Start:
    if not overwrite:
        raise OutputFolderError(
            f"{output} {reason}: pass --overwrite true to delete them and start over, or a new --output"
        )
    return Start("train", None, clear=True)


def clear_run_files(output: Path) -> None:
    """Deletes what a run writes into `output` (RUN_FILES and leftover temporaries)."""
    for name in RUN_FILES:
        path = output / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    files.remove_temporaries(output)
