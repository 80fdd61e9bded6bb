"""A whole training run: set-up, the resumable loop, logs, samples and the final export.

OUTPUT/ receives checkpoints/ (Orbax), metrics.jsonl (one line per logged step: step, loss, lr,
grad_norm, images_per_s), loss.png, samples/step-NNNNNN-K.png (fixed seeds, every sample_every steps and
at the end), config.json, and final/ (see `train.export`). Running the same command again resumes from
the latest checkpoint; a finished run only re-exports.
"""

from __future__ import annotations

import concurrent.futures
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

from sdjax import sharding
from sdjax.compile_cache import enable_default_cache
from sdjax.nn.vae import posterior_sample
from train import data as data_lib
from train import export, model, plots
from train.checkpoint import Checkpoints, check_compatible
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
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _write_metrics(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _samples(setup: model.Setup, trainable_host, output: Path, step: int) -> None:
    cfg = setup.config
    outputs = cfg.outputs
    if not outputs.sample_prompts or not _is_main() or cfg.mode == "vae":
        return
    from sdjax import images as image_io

    pipe = model.trained_pipeline(setup, trainable_host)
    images = pipe.generate(
        list(outputs.sample_prompts),
        num_inference_steps=outputs.sample_steps,
        seed=outputs.sample_seed,
        height=cfg.images.resolution,
        width=cfg.images.resolution,
        mesh=None,
    )
    folder = output / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        image_io.save_png(folder / f"step-{step:06d}-{k}.png", image, outputs.sample_prompts[k])


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


def run(cfg: TrainConfig) -> Path:
    """Trains as `cfg` says (resuming from OUTPUT's latest checkpoint) and exports; returns OUTPUT/final."""
    if not cfg.output:
        raise model.SetupError("no output folder given: pass --output DIR")
    if not cfg.data:
        raise model.SetupError("no data given: pass --data DIR (images with metadata.jsonl or .txt captions)")
    output = Path(cfg.output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    enable_default_cache()  # a resumed run reuses the compiled step (SDJAX_CACHE_DIR moves or disables it)
    optim, images, outputs = cfg.optim, cfg.images, cfg.outputs
    need_captions = not (images.instance_prompt or cfg.mode == "vae")
    examples = data_lib.scan_folder(cfg.data, skip_bad=images.skip_bad_images, need_captions=need_captions)
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
    if _is_main():
        (output / "config.json").write_text(json.dumps(to_json(cfg), indent=2) + "\n")
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

    checkpoints = Checkpoints(output / "checkpoints", keep=outputs.keep_checkpoints)
    latest = checkpoints.latest_step()
    meta_base = {"config": to_json(cfg)}
    with jax.set_mesh(mesh):
        if latest is None:
            trainable_placed = jax.tree.map(jax.device_put, trainable, shardings_of(trainable, mesh))
            state = jax.jit(init, out_shardings=state_shardings)(trainable_placed)
            start = 0
        else:
            like = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
            )
            state, meta = checkpoints.restore(latest, like)
            check_compatible(meta, meta_base["config"])
            start = int(jax.device_get(state["step"]))
            log.info("resuming from the checkpoint of step %d", start)
        del trainable

        metrics_path = output / "metrics.jsonl"
        history = _read_metrics(metrics_path, start)
        if _is_main():
            _write_metrics(metrics_path, history)

        local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        encode = images.cache_latents and start < optim.steps
        cache = data_lib.encode_latent_cache(setup, examples) if encode else None
        batches = data_lib.Batches(setup, examples, class_examples, local_devices, cache)
        schedule = learning_rate_schedule(optim)
        step_fn = None
        progress = Progress(optim.steps, start, outputs.progress)
        images_per_step = optim.batch_size * optim.grad_accum
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(batches.step, start) if start < optim.steps else None
            t_last = time.perf_counter()
            for step in range(start, optim.steps):
                host = pending.result()
                pending = pool.submit(batches.step, step + 1) if step + 1 < optim.steps else None
                batch = data_lib.global_batch(host, mesh)
                if step_fn is None:
                    step_fn = compile_step(setup, optimizer, state_shardings, frozen_shardings, batch, mesh)
                state, metrics = step_fn(state, frozen, batch)
                done = step + 1
                if done % outputs.log_every == 0 or done == optim.steps:
                    values = jax.device_get(metrics)
                    now = time.perf_counter()
                    row = {
                        "step": done,
                        "loss": float(values["loss"]),
                        "lr": float(schedule(step)),
                        "grad_norm": float(values["grad_norm"]),
                        "images_per_s": images_per_step * outputs.log_every / max(now - t_last, 1e-9),
                    }
                    t_last = now
                    history.append(row)
                    if _is_main():
                        with metrics_path.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                    progress.update(done, row["loss"], row["lr"])
                if done % outputs.checkpoint_every == 0 or done == optim.steps:
                    checkpoints.save(done, state, {**meta_base, "data_position": done * images_per_step})
                    if _is_main():
                        plots.loss_curve(history, output / "loss.png")
                if outputs.sample_every and done % outputs.sample_every == 0 and done != optim.steps:
                    _samples(setup, _to_host(_sample_params(state)), output, done)
        checkpoints.close()
        final_params = _to_host(_sample_params(state))
    if _is_main():
        plots.loss_curve(history, output / "loss.png")
        if cfg.mode == "vae":
            factor = calibrate_scaling_factor(setup, final_params["vae"], examples)
            vae = setup.pipe.vae.clone(config=dataclasses.replace(setup.pipe.vae.config, scaling_factor=factor))
            setup = dataclasses.replace(setup, pipe=dataclasses.replace(setup.pipe, vae=vae))
            log.info("VAE scaling factor %.5g", factor)
        export.export_final(setup, final_params, output / "final")
        _samples(setup, final_params, output, optim.steps)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("export")
    return output / "final"


def _sample_params(state):
    """The parameters to sample and export: the EMA when the run keeps one."""
    return state["ema"] if state["ema"] is not None else state["params"]
