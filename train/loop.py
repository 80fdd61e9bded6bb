"""A whole training run: set-up, the resumable loop, logs, samples and the final export.

OUTPUT/ receives checkpoints/ (Orbax), metrics.jsonl (one line per logged step: step, loss, lr,
grad_norm, images_per_s), loss.png, samples/step-NNNNNN-K.png (fixed seeds, every sample_every steps and
at the end), config.json, and final/ (see `train.export`). Running the same command again resumes from
the latest checkpoint; a finished run only re-exports.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sdjax import files, sharding
from sdjax.compile_cache import enable_default_cache
from sdjax.errors import one_line
from sdjax.nn.vae import posterior_sample
from train import data as data_lib
from train import export, loader, model, plots, run_folder
from train.checkpoint import Checkpoints
from train.config import TrainConfig, to_json
from train.step import compile_step, init_state, learning_rate_schedule, make_optimizer, shardings_of

log = logging.getLogger("train")


def _to_host(tree):
    """A pytree of (possibly multi-process) global arrays -> numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def _is_main() -> bool:
    return jax.process_index() == 0


class Progress:
    """A one-line progress bar with ETA on a terminal (process 0), else a line every ~5% of the run."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start = total, start
        self.enabled = enabled and _is_main()
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.every = max(1, total // 20)

    def update(self, step: int, loss: float, lr: float) -> None:
        if not self.enabled:
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
        width = 24
        filled = int(width * step / self.total)
        line = (
            f"step {step}/{self.total} [{'#' * filled}{'.' * (width - filled)}] loss {loss:.4f} lr {lr:.2e} "
            f"{rate:.2f} it/s ETA {eta_text}"
        )
        if self.tty:
            print("\r" + line, end="\n" if step == self.total else "", file=sys.stderr, flush=True)
        elif step % self.every == 0 or step == self.total:
            print(line, file=sys.stderr, flush=True)


def _class_examples(setup: model.Setup, output: Path) -> list[data_lib.Example]:
    """DreamBooth prior-preservation images: class_data's, topped up with images sdjax draws from
    class_prompt with the starting model (written to class_data, or OUTPUT/class_images)."""
    cfg = setup.config
    db = cfg.dreambooth
    if cfg.mode != "dreambooth":
        return []
    if not db.class_prompt:
        raise model.SetupError("dreambooth needs --class-prompt (e.g. 'a photo of a dog') for prior preservation")
    folder = Path(db.class_data).expanduser() if db.class_data else output / "class_images"
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in data_lib.IMAGE_SUFFIXES)
    missing = db.num_class_images - len(have)
    if missing > 0 and _is_main():
        from sdjax import images as image_io

        log.info("drawing %d class images of %r with sdjax", missing, db.class_prompt)
        batch = 4
        for start in range(0, missing, batch):
            n = min(batch, missing - start)
            seeds = [cfg.seed + 1_000_000 + len(have) + start + k for k in range(n)]
            drawn = setup.pipe.generate(
                [db.class_prompt] * n,
                num_inference_steps=db.class_sample_steps,
                seed=seeds,
                height=cfg.images.resolution,
                width=cfg.images.resolution,
                mesh=None,
            )
            for k, image in enumerate(drawn):
                image_io.save_png(folder / f"class-{len(have) + start + k:05d}.png", image, db.class_prompt)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("class images")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in data_lib.IMAGE_SUFFIXES)
    return [data_lib.Example(p, db.class_prompt) for p in files[: db.num_class_images]]


def _read_metrics(path: Path, upto: int) -> list[dict]:
    """The metrics rows up to step `upto` (a line cut short by a killed run is dropped)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and r.get("step", upto + 1) <= upto]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    files.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def _sample_controls(cfg: TrainConfig, examples) -> list:
    """Mode controlnet: the condition image (PIL, read once per run) of each sample prompt
    (controlnet_sample_images, one for all or one per prompt; default: those of the first training
    images, in the data set's order)."""
    from sdjax import images as image_io

    prompts = cfg.outputs.sample_prompts
    given = [Path(p).expanduser() for p in cfg.controlnet.sample_images]
    for path in given:
        if not path.is_file():
            raise model.SetupError(f"controlnet sample image {path} does not exist")
    if len(given) == 1:
        given = given * len(prompts)
    paths = given or [examples[k % len(examples)].condition for k in range(len(prompts))]
    return [image_io.open_image(path, "controlnet sample image") for path in paths]


def _samples(setup: model.Setup, trainable_host, output: Path, step: int, controls=()) -> None:
    """OUTPUT/samples/step-NNNNNN-K.png of the sample prompts (with `controls`, their condition images, in
    mode controlnet), and with several prompts all of them side by side in OUTPUT/samples/step-NNNNNN.png.
    Samples that come out NaN/Inf are reported and not written (a warning: they must not end the run,
    whose weights are finite)."""
    cfg = setup.config
    outputs = cfg.outputs
    if not outputs.sample_prompts or not _is_main() or cfg.mode == "vae":
        return
    from sdjax import images as image_io
    from sdjax.generate import NonFiniteImageError

    control = {}
    if cfg.mode == "controlnet":
        pipe = setup.pipe
        control = {"controlnet": model.trained_controlnet(setup, trainable_host), "control_image": list(controls)}
    else:
        pipe = model.trained_pipeline(setup, trainable_host)
    try:
        images = pipe.generate(
            list(outputs.sample_prompts),
            num_inference_steps=outputs.sample_steps,
            seed=outputs.sample_seed,
            height=cfg.images.resolution,
            width=cfg.images.resolution,
            mesh=None,
            **control,
        )
    except NonFiniteImageError as err:
        log.warning("samples of step %d not written: %s", step, err)
        return
    folder = output / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image_io.save_png(folder / f"step-{step:06d}-{k}.png", image, outputs.sample_prompts[k])
    if len(images) > 1:  # one image to look at per step: the prompts in order, a row of them
        prompts = " | ".join(outputs.sample_prompts)
        image_io.save_png(folder / f"step-{step:06d}.png", image_io.grid(np.asarray(images), len(images)), prompts)


def calibrate_scaling_factor(setup: model.Setup, vae_params, examples, count: int = 256) -> float:
    """1 / std of the trained VAE's posterior samples over (up to) `count` images, rounded to 5 digits:
    how SD's 0.18215 was chosen, so the UNet sees latents of unit variance."""
    vae = setup.pipe.vae
    cfg = setup.config
    picked = examples[:: max(1, len(examples) // count)][:count]
    pixels = np.stack([data_lib.load_image(e.path, cfg.images.resolution, None, False) for e in picked])
    mean, logvar = jax.jit(lambda p, x: vae.apply({"params": p}, x, method="encode"))(vae_params, pixels)
    noise = jax.random.normal(jax.random.key(cfg.seed), mean.shape)
    std = float(jnp.std(posterior_sample(mean, logvar, noise)))
    return float(f"{1.0 / std:.5g}")


# with nan_policy "skip", a run still stops after this many skipped updates in a row
MAX_SKIPPED_IN_A_ROW = 10


class TrainingStopped(ValueError):
    """Training stopped because its numbers stopped being finite; the checkpoints hold the last good state."""


def run(cfg: TrainConfig) -> Path:
    """Trains as `cfg` says (resuming from OUTPUT's latest checkpoint) and exports; returns OUTPUT/final.
    Nothing is written into OUTPUT before the run is known to be allowed there (`train.run_folder`)."""
    if not cfg.data:
        raise model.SetupError("no data given: pass --data DIR (images with metadata.jsonl or .txt captions)")
    output = run_folder.open_output(cfg.output)
    optim, images, outputs = cfg.optim, cfg.images, cfg.outputs
    config_json = to_json(cfg)
    checkpoints = None
    if (output / "checkpoints").is_dir():
        checkpoints = Checkpoints(output / "checkpoints", keep=outputs.keep_checkpoints)
    latest = checkpoints.latest_step() if checkpoints else None
    saved = checkpoints.meta(latest).get("config", {}) if latest is not None else None
    start_plan = run_folder.decide(output, latest, saved, config_json, overwrite=outputs.overwrite)
    if start_plan.action == "done":
        log.info("this run is finished (checkpoint of step %d, final/ written): nothing to do", latest)
        return output / "final"

    enable_default_cache()  # a resumed run reuses the compiled step (SDJAX_CACHE_DIR moves or disables it)
    need_captions = not (images.instance_prompt or cfg.mode == "vae")
    condition_column = cfg.controlnet.conditioning_column if cfg.mode == "controlnet" else None
    examples = data_lib.scan_folder(
        cfg.data, skip_bad=images.skip_bad_images, need_captions=need_captions, condition_column=condition_column
    )
    controls = _sample_controls(cfg, examples) if cfg.mode == "controlnet" else []
    if cfg.mode == "textual_inversion":
        token = cfg.inversion.placeholder_token
        captions = [images.instance_prompt or e.caption for e in examples]
        if not any(token in c for c in captions):
            raise model.SetupError(
                f"no caption contains the placeholder token {token!r}: set --instance-prompt "
                f"'a photo of {token}' or write it into the captions"
            )

    mesh = sharding.make_mesh(cfg.parallel.mesh)
    pipe = model.load_start(cfg)
    setup = model.make_setup(cfg, pipe)
    # the run is allowed here and its inputs are good: from now on it writes into OUTPUT
    if _is_main():
        if start_plan.clear:
            log.info("--overwrite: deleting the earlier run's files in %s", output)
            if checkpoints is not None:
                checkpoints.close()
                checkpoints = None
            run_folder.clear_run_files(output)
        files.remove_temporaries(output)
        if start_plan.action == "train" and start_plan.step is not None:
            kept = run_folder.keep_earlier_final(output, start_plan.step)
            if kept is not None:
                log.info("the result of step %d is kept as %s", start_plan.step, kept.name)
        files.write_text(output / "config.json", json.dumps(config_json, indent=2) + "\n")
    _sync("output folder ready")
    if checkpoints is None or start_plan.clear:
        checkpoints = Checkpoints(output / "checkpoints", keep=outputs.keep_checkpoints)
    class_examples = _class_examples(setup, output)
    optimizer = make_optimizer(optim)
    base_key = jax.random.key(cfg.seed)
    key_data = jax.random.key_data(base_key)

    trainable, frozen = model.split_params(setup, jax.random.fold_in(base_key, 7))
    init = lambda t: init_state(t, key_data, optimizer=optimizer, ema=optim.ema_decay > 0)
    abstract = jax.eval_shape(init, trainable)
    state_shardings = shardings_of(abstract, mesh)
    frozen_shardings = shardings_of(frozen, mesh)
    frozen = jax.tree.map(jax.device_put, frozen, frozen_shardings)

    meta_base = {"config": config_json}
    with jax.set_mesh(mesh):
        if start_plan.step is None:
            trainable_placed = jax.tree.map(jax.device_put, trainable, shardings_of(trainable, mesh))
            state = jax.jit(init, out_shardings=state_shardings)(trainable_placed)
            start = 0
        else:
            like = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
            )
            state = _restore_latest_readable(checkpoints, start_plan.step, like)
            start = int(jax.device_get(state["step"]))
            log.info("resuming from the checkpoint of step %d", start)
        del trainable
        try:
            fixed = _LoopInputs(
                setup, output, checkpoints, frozen, examples, class_examples, optimizer, state_shardings,
                frozen_shardings, mesh, meta_base, controls,
            )  # fmt: skip
            state = _train(fixed, state, start)
        finally:
            checkpoints.close()  # in-flight saves (all of finite states) complete, also when training stopped
        final_params = _to_host(_sample_params(state))
    if _is_main():
        if cfg.mode == "vae":
            factor = calibrate_scaling_factor(setup, final_params["vae"], examples)
            vae = setup.pipe.vae.clone(config=dataclasses.replace(setup.pipe.vae.config, scaling_factor=factor))
            setup = dataclasses.replace(setup, pipe=dataclasses.replace(setup.pipe, vae=vae))
            log.info("VAE scaling factor %.5g", factor)
        with files.folder_replacing(output / "final") as folder:  # final/ appears whole, or not at all
            export.export_final(setup, final_params, folder)
        _samples(setup, final_params, output, optim.steps, controls)
    _sync("export")
    return output / "final"


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _restore_latest_readable(checkpoints: Checkpoints, step: int, like):
    """The state of checkpoint `step`, or of the newest older one that can be read (a damaged one is
    reported and skipped: a disk that filled up or a copy cut short must not end the run)."""
    for candidate in [s for s in checkpoints.steps() if s <= step]:
        try:
            state, _ = checkpoints.restore(candidate, like)
            return state
        except Exception as err:  # noqa: BLE001 - any failure to read a checkpoint means: try the one before
            log.warning("checkpoint %d cannot be read (%s); trying the one before", candidate, one_line(err))
    raise run_folder.OutputFolderError(
        f"no checkpoint in {checkpoints.directory} can be read: pass --overwrite true to start over, or a new --output"
    )


@dataclasses.dataclass(frozen=True)
class _LoopInputs:
    """What the update loop works with besides the state: the model set-up, the output folder and its
    checkpoints, the frozen parameters, the data, the optimizer, the placements and the checkpoint meta."""

    setup: model.Setup
    output: Path
    checkpoints: Checkpoints
    frozen: dict
    examples: list
    class_examples: list
    optimizer: object
    state_shardings: object
    frozen_shardings: object
    mesh: object
    meta: dict
    controls: list  # mode controlnet: the condition image of each sample prompt


def _train(fixed: _LoopInputs, state, start: int):
    """The update loop from step `start` to the configured steps: metrics, checkpoints, periodic samples and
    the non-finite policy. Returns the final state."""
    setup, output, checkpoints, mesh = fixed.setup, fixed.output, fixed.checkpoints, fixed.mesh
    cfg = setup.config
    optim, outputs = cfg.optim, cfg.outputs
    metrics_path = output / "metrics.jsonl"
    history = _read_metrics(metrics_path, start)
    if _is_main():
        _write_metrics(metrics_path, history)
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    encode = cfg.images.cache_latents and start < optim.steps
    cache = data_lib.encode_latent_cache(setup, fixed.examples) if encode else None
    text_cache = None
    if cfg.images.cache_text_embeddings and start < optim.steps:
        texts = data_lib.run_texts(cfg, fixed.examples, fixed.class_examples)
        text_cache = data_lib.encode_text_cache(setup, texts)
    batches = data_lib.Batches(setup, fixed.examples, fixed.class_examples, local_devices, cache, text_cache)
    schedule = learning_rate_schedule(optim)
    step_fn = None
    progress = Progress(optim.steps, start, outputs.progress)
    images_per_step = optim.batch_size * optim.grad_accum
    last_checkpoint = checkpoints.latest_step() or 0
    unchecked: list[tuple[int, dict]] = []  # (step, metrics on the device) not yet looked at
    skipped_in_a_row = 0
    t_last = (time.perf_counter(), start)  # (time, step) of the last logged row
    read_ahead = loader.steps(batches.step, start, optim.steps, cfg.images.loader_workers)
    for step, host in zip(range(start, optim.steps), read_ahead, strict=True):
        batch = data_lib.global_batch(host, mesh)
        if step_fn is None:
            step_fn = compile_step(setup, fixed.optimizer, fixed.state_shardings, fixed.frozen_shardings, batch, mesh)
        state, metrics = step_fn(state, fixed.frozen, batch)
        done = step + 1
        unchecked.append((done, metrics))
        checkpoint_now = done % outputs.checkpoint_every == 0 or done == optim.steps
        sample_now = outputs.sample_every and done % outputs.sample_every == 0 and done != optim.steps
        # Metrics leave the device one step late: the step just dispatched keeps the device busy while
        # the host reads the ones before it. Before a checkpoint or a sample every update so far is
        # looked at, so that a non-finite one never reaches them.
        look_at_all = checkpoint_now or sample_now
        ready = unchecked if look_at_all else unchecked[:-1]
        if not look_at_all and not any(at % outputs.log_every == 0 for at, _ in ready):
            continue
        for at, values in jax.device_get(ready):  # one transfer
            if not values["skipped"]:
                skipped_in_a_row = 0
            else:
                skipped_in_a_row += 1
                _on_non_finite(cfg, at, values, skipped_in_a_row, last_checkpoint)
            if at % outputs.log_every == 0 or at == optim.steps:
                now = time.perf_counter()
                row = {
                    "step": at,
                    "loss": float(values["loss"]),
                    "lr": float(schedule(at - 1)),
                    "grad_norm": float(values["grad_norm"]),
                    "images_per_s": images_per_step * (at - t_last[1]) / max(now - t_last[0], 1e-9),
                }
                if values["skipped"]:
                    row["skipped"] = True
                t_last = (now, at)
                history.append(row)
                if _is_main():
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                progress.update(at, row["loss"], row["lr"])
        del unchecked[: len(ready)]
        if checkpoint_now:
            checkpoints.save(done, state, {**fixed.meta, "data_position": done * images_per_step})
            last_checkpoint = done
            if _is_main():
                plots.loss_curve(history, output / "loss.png")
        if sample_now:
            _samples(setup, _to_host(_sample_params(state)), output, done, fixed.controls)
    if _is_main():
        plots.loss_curve(history, output / "loss.png")
    return state


def _on_non_finite(cfg: TrainConfig, step: int, values: dict, in_a_row: int, last_checkpoint: int) -> None:
    """What a skipped (non-finite) update at `step` does: with nan_policy "stop", or after
    MAX_SKIPPED_IN_A_ROW in a row, stops the run (TrainingStopped); else a warning."""
    numbers = f"loss {float(values['loss'])}, gradient norm {float(values['grad_norm'])}"
    if cfg.optim.nan_policy == "skip" and in_a_row < MAX_SKIPPED_IN_A_ROW:
        log.warning("step %d: %s: update skipped (--nan-policy skip)", step, numbers)
        return
    why = "is not finite" if in_a_row == 1 else f"was not finite {in_a_row} times in a row"
    raise TrainingStopped(
        f"training stopped at step {step}: the update {why} ({numbers}) and was not applied; the checkpoints "
        f"(latest: step {last_checkpoint}) hold finite weights: resume with a lower --learning-rate or "
        "--max-grad-norm, or pass --nan-policy skip"
    )


def _sample_params(state):
    """The parameters to sample and export: the EMA when the run keeps one."""
    return state["ema"] if state["ema"] is not None else state["params"]
