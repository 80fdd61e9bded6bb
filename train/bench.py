"""Training-step benchmark: seconds per optimizer step and peak RSS of a full UNet fine-tune.

    python -m train.bench --arch sd15 --resolution 256 --batch-size 1 --steps 3 \
        --dtype float32,bfloat16 --remat none,full [--json F]

Each (dtype, remat) pair runs in its own process on random weights of the real architecture (configs
shipped with sdjax): the update of `train.step` (AdamW, clipping, no EMA) on cached VAE latents, so the
step is the UNet's forward + backward + the text encoder's forward. It prints compile time, the median step
time over --steps steps after one warm-up step, and the process's peak RSS (VmHWM). Informational: nothing
here is a test.
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


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def worker(arch: str, resolution: int, batch: int, steps: int, dtype: str, remat: str) -> dict:
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
        mode="full",
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
        latent = resolution // 8
        rng = np.random.default_rng(0)
        batch_arrays = {
            "moments": rng.standard_normal((1, batch, latent, latent, 8)).astype(np.float32) * 0.5,
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
        "compile_s": compile_s,
        "step_s": statistics.median(times[1:]),
        "step_s_all": times,
        "loss": float(metrics["loss"]),
        "peak_rss": _peak_rss(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd15", help="sd15, sd21, sd21-base or tiny")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--dtype", default="float32,bfloat16")
    p.add_argument("--remat", default="none,full")
    p.add_argument("--json", default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.arch, args.resolution, args.batch_size, args.steps, args.dtype, args.remat)))
        return 0
    rows = []
    for dtype, remat in itertools.product(args.dtype.split(","), args.remat.split(",")):
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
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            rows.append({"dtype": dtype, "remat": remat, "error": tail})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        if "error" in row:
            print(f"{dtype:9s} remat={remat:5s} failed: {row['error']}", flush=True)
        else:
            print(
                f"{dtype:9s} remat={remat:5s} compile {row['compile_s']:6.1f} s  step {row['step_s']:7.2f} s  "
                f"peak RSS {row['peak_rss'] / 2**30:5.1f} GiB",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
