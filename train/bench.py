"""Training-step benchmark: seconds per optimizer step and peak RSS of a full UNet fine-tune.

    python -m train.bench --arch sd15 --resolution 256 --batch-size 1 --steps 3 \
        --dtype float32,bfloat16 --remat none,full [--json F]

With --target tpu:GENERATION:TOPOLOGY it compiles the shipped run configs' step for a TPU instead
(deviceless, `target_report`): `--target tpu:v5e:16x16 --mesh fsdp=-1 --remat full --mode full,lora`.

Each (dtype, remat) pair runs in its own process on random weights of the real architecture (configs
shipped with sdjax): the update of `train.step` (AdamW, clipping, no EMA) on cached VAE latents, so the
step is the UNet's forward + backward + the text encoder's forward. It prints compile time, the median step
time over --steps steps after one warm-up step, the process's peak RSS (VmHWM) and XLA's temporary buffers
of the step (the activations kept for the backward pass, what remat trades for recomputation).
Informational: nothing here is a test.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(arch: str, resolution: int, batch: int, steps: int, dtype: str, remat: str, mode: str = "full") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sdjax import sharding
    from sdjax.testing import random_pipeline
    from train import model
    from train.config import Images, Optim, TrainConfig
    from train.step import compile_step, init_state, make_optimizer, shardings_of

    config = TrainConfig(
        model=f"random:{arch}",
        mode=mode,
        dtype=dtype,
        remat=remat,
        optim=Optim(batch_size=batch, learning_rate=1e-5),
        images=Images(resolution=resolution, cache_latents=True),
    )
    setup = model.make_setup(config, random_pipeline(arch))
    mesh = sharding.make_mesh(None)
    optimizer = make_optimizer(config.optim)
    trainable, frozen = model.split_params(setup, jax.random.key(0))
    key_data = jax.random.key_data(jax.random.key(0))
    init = lambda t: init_state(t, key_data, optimizer=optimizer, ema=False)
    state_shardings = shardings_of(jax.eval_shape(init, trainable), mesh)
    frozen_shardings = shardings_of(frozen, mesh)
    with jax.set_mesh(mesh):
        placed = jax.tree.map(jax.device_put, trainable, shardings_of(trainable, mesh))
        del trainable
        state = jax.jit(init, out_shardings=state_shardings, donate_argnums=0)(placed)
        del placed
        frozen = jax.tree.map(jax.device_put, frozen, frozen_shardings)
        # drop the host copy of the weights
        setup = dataclasses.replace(setup, pipe=dataclasses.replace(setup.pipe, params={}))
        vae = setup.pipe.vae.config
        latent, moments = resolution // vae.downscale, 2 * vae.latent_channels  # the VAE's mean and log-variance
        rng = np.random.default_rng(0)
        batch_arrays = {
            "moments": rng.standard_normal((1, batch, latent, latent, moments)).astype(np.float32) * 0.5,
            "ids": rng.integers(0, 49407, (1, batch, 77)).astype(np.int32),
            "row": np.arange(batch, dtype=np.int32)[None],
            "weight": np.ones((1, batch), np.float32),
            "count": np.ones((1, batch), np.float32),
        }
        batch_arrays = {k: jnp.asarray(v) for k, v in batch_arrays.items()}
        t0 = time.perf_counter()
        step = compile_step(setup, optimizer, state_shardings, frozen_shardings, batch_arrays, mesh)
        compiled = step.lower(state, frozen, batch_arrays).compile()
        compile_s = time.perf_counter() - t0
        memory = compiled.memory_analysis()  # XLA's buffers: temp holds the activations remat trades away
        times = []
        for _ in range(steps + 1):
            t = time.perf_counter()
            state, metrics = compiled(state, frozen, batch_arrays)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    return {
        "arch": arch,
        "resolution": resolution,
        "batch": batch,
        "dtype": dtype,
        "remat": remat,
        "mode": mode,
        "compile_s": compile_s,
        "step_s": statistics.median(times[1:]),
        "step_s_all": times,
        "loss": float(metrics["loss"]),
        "peak_rss": _peak_rss(),
        "temp_bytes": getattr(memory, "temp_size_in_bytes", 0) if memory is not None else 0,
    }


def target_report(
    target: str, arch: str, resolution: int, batch: int, modes: list[str], mesh_spec: str | None, remat: str | None
) -> list[dict]:
    """Deviceless: the shipped run configs' update step (configs/sd15_{mode}.py, SDXL: sdxl_{mode}.py: bf16
    compute, float32 master weights, their grad_accum and EMA) compiled for every chip of a TPU topology over a
    ("data", "fsdp") mesh, `batch` images per chip per micro-batch; parameters as shapes (no weights).
    Per mode: compile time, per-chip FLOPs, bytes, time (`sdjax.targets`) and memory, and whether it fits."""
    import functools

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from sdjax import sharding, targets
    from sdjax.testing import abstract_pipeline
    from train import model
    from train.config import load_config_file
    from train.step import batch_shardings, init_state, make_optimizer, shardings_of, train_step

    generation, topology = targets.parse_target(target)
    chip = targets.CHIPS[generation]
    devices = targets.topology_devices(generation, topology)
    mesh = sharding.make_mesh(mesh_spec, devices)
    pipe = abstract_pipeline(arch)
    rows = []
    for mode in modes:
        family = "sdxl" if pipe.is_sdxl else "sd15"
        config = load_config_file(str(CONFIGS / f"{family}_{mode}.py")).replace(
            model=f"random:{arch}", batch_size=batch * len(devices), resolution=resolution
        )
        if remat is not None:
            config = config.replace(remat=remat)
        setup = model.make_setup(config, pipe)
        optimizer = make_optimizer(config.optim)
        trainable, frozen = model.split_params(setup, jax.random.key(0))
        key_data = jax.random.key_data(jax.random.key(0))
        init = functools.partial(init_state, key_data=key_data, optimizer=optimizer, ema=config.optim.ema_decay > 0)
        state = jax.eval_shape(init, trainable)
        accum, global_batch = config.optim.grad_accum, config.optim.batch_size
        batch_arrays = {
            "pixels": jax.ShapeDtypeStruct((accum, global_batch, resolution, resolution, 3), jnp.float32),
            **_text_inputs(setup, (accum, global_batch)),
            "row": jax.ShapeDtypeStruct((accum, global_batch), jnp.int32),
            "weight": jax.ShapeDtypeStruct((accum, global_batch), jnp.float32),
            "count": jax.ShapeDtypeStruct((accum, global_batch), jnp.float32),
        }
        if pipe.is_sdxl:  # each row's time ids
            batch_arrays["time_ids"] = jax.ShapeDtypeStruct((accum, global_batch, 6), jnp.float32)
        shardings = (shardings_of(state, mesh), shardings_of(frozen, mesh), batch_shardings(batch_arrays, mesh))
        args = [
            jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, where)
            for tree, where in zip((state, frozen, batch_arrays), shardings, strict=True)
        ]
        replicated = NamedSharding(mesh, PartitionSpec())
        step = jax.jit(
            functools.partial(train_step, setup=setup, optimizer=optimizer),
            in_shardings=shardings,
            out_shardings=(shardings[0], {"loss": replicated, "grad_norm": replicated, "skipped": replicated}),
            donate_argnums=(0,),
        )
        with jax.set_mesh(mesh):
            row = targets.analyse(step.lower(*args), chip)
        row.update(mode=mode, target=target, mesh=dict(mesh.shape), batch_per_chip=batch, grad_accum=accum)
        row["fits"] = row["total_bytes"] <= chip.hbm_bytes
        row["images_per_s_chip"] = batch * accum / row["time_s"]
        rows.append(row)
        print(
            f"{mode:5s} {target} mesh {dict(mesh.shape)}: compile {row['compile_s']:.0f} s, "
            f"{row['flops'] / 1e12:.2f} TFLOP and {row['bytes_accessed'] / 1e9:.2f} GB per chip, "
            f"{row['time_s'] * 1e3:.1f} ms (cost model {_ms(row['optimal_seconds'])}, roofline "
            f"{row['roofline_s'] * 1e3:.1f}), {row['images_per_s_chip']:.1f} images/s per chip, memory "
            f"{row['total_bytes'] / 2**30:.2f} GiB (temp {row['temp_bytes'] / 2**30:.2f}): "
            f"{'fits' if row['fits'] else 'does NOT fit'} in {chip.hbm_bytes / 2**30:.0f} GiB",
            flush=True,
        )
    return rows


def _text_inputs(setup, lead: tuple[int, ...]) -> dict:
    """The batch's text arrays (shapes and dtypes) with `lead` axes: token ids ("ids", SDXL "ids_2"), or
    with cache_text_embeddings the encodings the step reads instead ("context", SDXL "text_embeds")."""
    import functools

    import jax
    import jax.numpy as jnp

    from train.objective import encode_text

    ids = jax.ShapeDtypeStruct((*lead, 77), jnp.int32)
    sdxl = setup.text_encoder_2 is not None
    if not setup.config.images.cache_text_embeddings:
        return {"ids": ids, "ids_2": ids} if sdxl else {"ids": ids}
    params = {k: setup.pipe.params[k] for k in ("text_encoder", "text_encoder_2") if k in setup.pipe.params}
    rows = jax.ShapeDtypeStruct((1, 77), jnp.int32)
    encoded = jax.eval_shape(functools.partial(encode_text, setup), params, rows, rows if sdxl else None)
    context, pooled = (None if x is None else jax.ShapeDtypeStruct((*lead, *x.shape[1:]), x.dtype) for x in encoded)
    return {"context": context, "text_embeds": pooled} if sdxl else {"context": context}


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}" if seconds > 0 else "none"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd15", help="sd15, sd21, sd21-base, sdxl, tiny, micro or tiny-sdxl")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--remat", default="none,full")
    p.add_argument("--json", default=None)
    p.add_argument("--target", default=None, help="compile for a TPU topology instead (tpu:v5e:2x2); needs libtpu")
    p.add_argument(
        "--mode",
        default=None,
        help="full and/or lora (default: full; with --target: configs/sd15_{mode}.py, full,lora)",
    )
    p.add_argument("--mesh", default=None, help="with --target: e.g. fsdp=4 or data=16,fsdp=16 (default: data)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.target:
        rows = target_report(
            args.target,
            args.arch,
            args.resolution,
            args.batch_size,
            (args.mode or "full,lora").split(","),
            args.mesh,
            None if "," in args.remat else args.remat,  # default: the run config's own (full)
        )
        if args.json:
            from sdjax import files

            files.write_text(args.json, json.dumps(rows, indent=2) + "\n")
        return 0
    if args.worker:
        row = worker(args.arch, args.resolution, args.batch_size, args.steps, args.dtype, args.remat, args.mode)
        print(json.dumps(row))
        return 0
    rows = []
    modes = (args.mode or "full").split(",")
    for mode, dtype, remat in itertools.product(modes, args.dtype.split(","), args.remat.split(",")):
        cmd = [
            sys.executable,
            "-m",
            "train.bench",
            "--worker",
            "--arch",
            args.arch,
            "--resolution",
            str(args.resolution),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--dtype",
            dtype,
            "--remat",
            remat,
            "--mode",
            mode,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            rows.append({"mode": mode, "dtype": dtype, "remat": remat, "error": tail})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        if "error" in row:
            print(f"{mode:4s} {dtype:9s} remat={remat:8s} failed: {row['error']}", flush=True)
        else:
            print(
                f"{mode:4s} {dtype:9s} remat={remat:8s} compile {row['compile_s']:6.1f} s  "
                f"step {row['step_s']:7.2f} s  peak RSS {row['peak_rss'] / 2**30:5.1f} GiB  "
                f"XLA temp {row['temp_bytes'] / 2**30:5.2f} GiB",
                flush=True,
            )
    if args.json:
        from sdjax import files

        files.write_text(args.json, json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
