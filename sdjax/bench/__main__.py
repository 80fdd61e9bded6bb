"""sdjax against PyTorch diffusers: the same weights and initial latents, side by side, in one table.

    python -m sdjax.bench --arch sd15 --height 512 --width 512 --steps 20 --against torch --json out.json

Each repeat runs one sdjax process and one PyTorch process (interleaved, so drift hits both alike); the
table shows medians with [min, max] over the repeats. sdjax's compile times are reported cold (the first
process, an empty persistent cache) and warm (later processes, the cache filled by the first). The UNet's
FLOPs per CFG step come from XLA's cost analysis; with the GEMM rate measured on the same device they give
the FLOP floor of a step. Device-agnostic: on a GPU/TPU host the sdjax side runs on the accelerator.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sdjax import files
from sdjax.bench.workers import Job

TIMES = ("load_s", "text_s", "unet_step_s", "control_step_s", "vae_decode_s", "image_s", "images_per_s", "peak_rss")
COMPILES = ("text_compile_s", "unet_compile_s", "control_compile_s", "vae_compile_s", "image_compile_s")


def parse_args(argv=None) -> argparse.Namespace:
    from sdjax.bench.models import ARCHS
    from sdjax.schedulers import NAMES

    p = argparse.ArgumentParser(prog="python -m sdjax.bench", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group()
    source.add_argument("--arch", choices=list(ARCHS), default=None, help="random weights of a real architecture")
    source.add_argument("--model", default=None, help="a diffusers-format folder")
    p.add_argument("--height", type=int, default=512)
    p.add_argument("--width", type=int, default=512)
    p.add_argument(
        "--batch",
        type=_batches,
        default=[1],
        help="images (one UNet CFG step runs 2x this batch); with --target a list of per-chip batches, e.g. 1,2,4",
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--scheduler", choices=NAMES, default="euler")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--against", choices=["torch"], default=None, help="also run PyTorch diffusers")
    p.add_argument(
        "--controlnet",
        nargs="?",
        const="random",
        default=None,
        metavar="PATH",
        help="draw with a ControlNet (a diffusers ControlNet folder; without PATH: random weights of the "
        "ControlNet of the model's UNet) and time the ControlNet + UNet step beside the plain UNet step",
    )
    p.add_argument("--repeats", type=int, default=3, help="processes per framework (default 3)")
    p.add_argument("--inner", type=int, default=1, help="timed calls per component per process (median)")
    p.add_argument("--json", default=None, help="write every number to this file")
    p.add_argument("--plot", default=None, help="write a bar chart (PNG) to this file")
    p.add_argument(
        "--target",
        default=None,
        help="compile for an accelerator instead of running: tpu:GENERATION:TOPOLOGY, e.g. tpu:v5e:2x2 "
        "(deviceless; needs libtpu, pip install -e '.[tpu-aot]')",
    )
    p.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.height % 8 or args.width % 8:
        p.error("--height and --width must be multiples of 8")
    if args.repeats < 1 or args.inner < 1 or min(args.batch) < 1 or args.steps < 1:
        p.error("--repeats, --inner, --batch and --steps must be >= 1")
    if args.target is None and len(args.batch) > 1:
        p.error("several batches (--batch 1,2,4) need --target")
    return args


def _batches(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes integers separated by commas, got {text!r}") from None


def _target(args) -> int:
    """--target: the deviceless compile report (sdjax.bench.target) instead of a timed run."""
    import sdjax
    from sdjax import targets
    from sdjax.bench import target
    from sdjax.testing import abstract_pipeline

    # libtpu's environment before anything starts JAX's backends (else libtpu logs host-discovery errors)
    targets.topology_devices(*targets.parse_target(args.target))
    if args.model:
        pipe = sdjax.load_pipeline(args.model, dtype=args.dtype, weights=False)
    else:
        pipe = abstract_pipeline(args.arch or "sd15", dtype=args.dtype)
    controlnet = None
    if args.controlnet:
        from sdjax.bench.models import controlnet_config
        from sdjax.bench.workers import abstract_controlnet

        random = args.controlnet == "random"
        source = controlnet_config(pipe) if random else _controlnet_folder(args)
        controlnet = abstract_controlnet(source, args.dtype)
    result = target.report(
        pipe,
        controlnet=controlnet,
        target=args.target,
        batches=args.batch,
        height=args.height,
        width=args.width,
        steps=args.steps,
        scheduler=args.scheduler,
    )
    print(target.table(result))
    if args.json:
        files.write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


def _controlnet_folder(args) -> str | None:
    """--controlnet: the folder given, or the cached random ControlNet of the model's UNet."""
    from sdjax.bench.models import cache_dir, controlnet_folder, random_controlnet_folder

    if args.controlnet is None:
        return None
    if args.controlnet != "random":
        if not (Path(args.controlnet) / "config.json").is_file():
            raise ValueError(f"--controlnet {args.controlnet} is not a diffusers ControlNet folder (no config.json)")
        return args.controlnet
    if args.model:
        name = Path(args.model).resolve().name
        return str(random_controlnet_folder(args.model, cache_dir() / f"{name}-controlnet"))
    return str(controlnet_folder(args.arch or "sd15"))


def _run_worker(framework: str, job: Job) -> dict:
    # Both frameworks' workers get glibc's transparent huge pages for large allocations: fewer page faults
    # on XLA's per-call buffers (the gain: README.md, "Benchmark against PyTorch"); PyTorch's step is
    # unchanged by it.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    argv = [sys.executable, "-m", "sdjax.bench", "--worker", framework, "--job", json.dumps(asdict(job))]
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH-RESULT "):
            return json.loads(line.removeprefix("BENCH-RESULT "))
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"the {framework} worker failed (exit {done.returncode}): {tail}")


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def run(args) -> dict:
    from sdjax.bench.models import model_folder

    model = args.model or str(model_folder(args.arch or "sd15"))
    controlnet = _controlnet_folder(args)
    work = Path(tempfile.mkdtemp(prefix="sdjax-bench-"))
    frameworks = ["jax"] + (["torch"] if args.against else [])
    runs: dict[str, list[dict]] = {f: [] for f in frameworks}
    for repeat in range(args.repeats):
        for framework in frameworks:
            job = Job(
                model=model,
                height=args.height,
                width=args.width,
                batch=args.batch[0],
                steps=args.steps,
                scheduler=args.scheduler,
                dtype=args.dtype,
                inner=args.inner,
                image_out=str(work / f"{framework}-{repeat}.npy"),
                cache_dir=str(work / "xla-cache"),
                controlnet=controlnet,
            )
            print(f"[{repeat + 1}/{args.repeats}] {framework} ...", file=sys.stderr, flush=True)
            runs[framework].append(_run_worker(framework, job))
    report = {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "job")}, "model": model}
    for framework, results in runs.items():
        report[framework] = {k: _summary([r[k] for r in results]) for k in TIMES if k in results[0]}
    jax_runs = runs["jax"]
    report["jax"]["compile_cold"] = {k: jax_runs[0][k] for k in COMPILES if k in jax_runs[0]}
    if len(jax_runs) > 1:
        compiled = [k for k in COMPILES if k in jax_runs[0]]
        report["jax"]["compile_warm"] = {k: statistics.median(r[k] for r in jax_runs[1:]) for k in compiled}
    if controlnet:
        report["controlnet"] = controlnet
        report["control_cost"] = {
            f: report[f]["control_step_s"]["median"] / report[f]["unet_step_s"]["median"] for f in frameworks
        }
    flops = jax_runs[0]["unet_flops"]
    rate = statistics.median(r["gemm_flops_per_s"] for r in jax_runs)
    step = report["jax"]["unet_step_s"]["median"]
    report["floor"] = {
        "unet_flops": flops,
        "gemm_flops_per_s": rate,
        "floor_s": flops / rate,
        "ratio": step * rate / flops,
    }
    report["device"] = jax_runs[0]["device"]
    if args.against:
        ours, theirs = np.load(work / "jax-0.npy").astype(int), np.load(work / "torch-0.npy").astype(int)
        diff = np.abs(ours - theirs)
        report["pixel_difference"] = {"max": int(diff.max()), "mean": float(diff.mean())}
    return report


def _cell(x: dict | None, scale: float) -> str:
    if x is None:
        return f"{'-':>28}"
    return f"{x['median'] / scale:>11.3f} [{x['min'] / scale:.3f}, {x['max'] / scale:.3f}]".rjust(28)


def table(report: dict) -> str:
    """The report as text; peak_rss in GiB, times in seconds."""
    s = report["settings"]
    control = ", with a ControlNet" if "controlnet" in report else ""
    lines = [
        f"sdjax vs PyTorch: {report['model']}{control}, {s['width']}x{s['height']}, batch {s['batch']}, "
        f"{s['steps']} steps {s['scheduler']}, {s['dtype']}, {s['repeats']} repeats, device {report['device']}",
        f"{'':22}{'sdjax':>28}{'pytorch':>28}{'sdjax/pytorch':>15}",
    ]
    torch_side = report.get("torch", {})
    for key in TIMES:
        ours = report["jax"].get(key)
        theirs = torch_side.get(key)
        if ours is None and theirs is None:
            continue
        scale = 2**30 if key == "peak_rss" else 1
        cell = functools.partial(_cell, scale=scale)
        ratio = f"{ours['median'] / theirs['median']:>15.2f}" if ours and theirs else f"{'-':>15}"
        lines.append(f"{key:22}{cell(ours)}{cell(theirs)}{ratio}")
    cold = report["jax"]["compile_cold"]
    warm = report["jax"].get("compile_warm", {})
    for key in COMPILES:
        if key not in cold:
            continue
        w = f", warm {warm[key]:.2f} s" if key in warm else ""
        lines.append(f"{key:22} cold {cold[key]:.2f} s{w}")
    floor = report["floor"]
    lines.append(
        f"UNet CFG step: {floor['unet_flops'] / 1e12:.3f} TFLOP (XLA cost analysis); "
        f"GEMM {floor['gemm_flops_per_s'] / 1e9:.0f} GFLOP/s measured; "
        f"floor {floor['floor_s']:.2f} s; step / floor = {floor['ratio']:.2f}"
    )
    if "control_cost" in report:
        costs = ", ".join(f"{'sdjax' if f == 'jax' else 'pytorch'} {r:.2f}x" for f, r in report["control_cost"].items())
        lines.append(f"ControlNet + UNet step / UNet step: {costs} ({report['controlnet']})")
    if "pixel_difference" in report:
        d = report["pixel_difference"]
        lines.append(f"image difference sdjax vs pytorch (uint8): max {d['max']}, mean {d['mean']:.3f}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """A bar chart of the median component times (PIL: no plotting dependency)."""
    from PIL import Image, ImageDraw

    keys = ["text_s", "unet_step_s", "vae_decode_s", "image_s"]
    sides = [("sdjax", report["jax"], (66, 133, 244))]
    if "torch" in report:
        sides.append(("pytorch", report["torch"], (238, 76, 44)))
    top = max(side[k]["median"] for _, side, _ in sides for k in keys)
    width, height, margin = 720, 360, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    slot = (width - 2 * margin) / len(keys)
    bar = slot / (len(sides) + 1)
    for i, key in enumerate(keys):
        x0 = margin + i * slot
        draw.text((x0, height - margin + 8), key, fill="black")
        for j, (_, side, colour) in enumerate(sides):
            value = side[key]["median"]
            h = (height - 2 * margin) * value / top
            left = x0 + j * bar
            draw.rectangle([left, height - margin - h, left + bar * 0.9, height - margin], fill=colour)
            draw.text((left, height - margin - h - 12), f"{value:.2f}s", fill="black")
    for j, (name, _, colour) in enumerate(sides):
        draw.rectangle([margin + j * 90, 10, margin + j * 90 + 12, 22], fill=colour)
        draw.text((margin + j * 90 + 16, 10), name, fill="black")
    image.save(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        from sdjax.bench.workers import main as worker_main

        worker_main(args.worker, args.job)
        return 0
    try:
        if args.target:
            return _target(args)
        report = run(args)
    except (RuntimeError, ValueError, OSError) as err:
        print(f"sdjax.bench: error: {err}", file=sys.stderr)
        return 2
    print(table(report))
    if args.json:
        files.write_text(args.json, json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
