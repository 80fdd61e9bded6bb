"""sdjax command line: prompts in, PNG files out.

    python sample.py "an emoji of red apple"                  # the bundled 64x64 demo model
    python sample.py "a photo of an astronaut riding a horse" --model PATH [options]
    python sample.py --prompts-file prompts.txt --model PATH -n 4 --out outputs/

Each image is written as OUT/{index:05d}-{seed}.png with A1111's `parameters` text chunk; a batch of
several images also gets a grid. Image k of a run uses seed + k; a single prompt's images are numbered
after the highest index already in OUT. With --prompts-file (one prompt per line; blank lines and lines
starting with # are skipped) image k is prompt k, the prompts run in batches of -n, and a rerun skips the
images already written, so a killed job resumes where it stopped and ends with exactly the same files;
an image already there that records another prompt or other settings is an error (--overwrite redraws
it). Nothing else is ever overwritten: a grid whose name is taken gets a fresh one. An image that comes
out NaN/Inf is reported, not saved. Errors print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

PROG = "sample.py"
SIZE_HELP = "pixels, a multiple of the VAE factor (8; the demo model: 4); default: the model's size"


class _OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit status 2), like every other error of sample.py."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from sdjax.schedulers import NAMES

    p = _OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", nargs="?", help="the prompt (A1111 emphasis, BREAK and <lora:name:w> tags allowed)")
    p.add_argument(
        "--model",
        default=None,
        help="a diffusers-format folder or a single-file .safetensors (default: the bundled 64x64 emoji demo model)",
    )
    p.add_argument("--config", default=None, help="single files: a diffusers folder deciding the architecture")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None)
    p.add_argument("--vae", default=None, help="a VAE file (LDM .safetensors) or diffusers VAE folder to use")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="merge a LoRA (repeatable)")
    p.add_argument("--lora-dir", default=None, help="folder searched for the prompts' <lora:name:w> tags")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE", help="textual inversion (repeatable)")
    p.add_argument("--negative-prompt", default="", help="negative prompt for every image")
    p.add_argument("--prompt-2", default=None, help="SDXL: the second text encoder's prompt (default: the prompt)")
    p.add_argument("--negative-prompt-2", default=None, help="SDXL: the second encoder's negative prompt")
    for flag, what in (("original-size", "original size"), ("target-size", "target size"), ("crop", "crop top-left")):
        p.add_argument(
            f"--{flag}",
            type=_pair,
            default=None,
            metavar="HxW" if flag != "crop" else "TOPxLEFT",
            help=f"SDXL micro-conditioning: the {what} told to the UNet",
        )
    p.add_argument("--aesthetic-score", type=float, default=6.0, help="SDXL refiner micro-conditioning (default 6)")
    p.add_argument("--steps", type=int, default=30, help="inference steps (default 30)")
    p.add_argument(
        "--scheduler",
        default=None,
        help=f'one of {", ".join(NAMES)}, or A1111\'s name ("DPM++ 2M Karras", "Euler a", any case; default: '
        "the model's own)",
    )
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default 7.5; SDXL 5)")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="diffusers' guidance_rescale (default 0)")
    p.add_argument("--clip-skip", type=int, default=None, help="diffusers' clip_skip (1 = A1111 'Clip skip: 2')")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    p.add_argument("--height", type=int, default=None, help=SIZE_HELP)
    p.add_argument("--width", type=int, default=None, help=SIZE_HELP)
    p.add_argument("-n", "--batch-size", type=int, default=1, help="images per batch (default 1)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="images per UNet call (default: 1 on the CPU, batch-invariant; a device's whole batch on GPUs/TPUs)",
    )
    p.add_argument("--vae-tiling", action="store_true", help="decode in tiles (bounded memory for large images)")
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="parameter and compute dtype (default: float32 on the CPU, the parity mode; bfloat16 on GPUs/TPUs)",
    )
    p.add_argument("--init-image", default=None, help="img2img / inpainting start image")
    p.add_argument("--strength", type=float, default=0.8, help="img2img denoising strength in [0, 1]")
    p.add_argument("--mask", default=None, help="inpainting mask (white = repaint), the init image's size")
    p.add_argument(
        "--controlnet", action="append", default=[], metavar="PATH", help="a ControlNet folder or file (repeatable)"
    )
    p.add_argument("--control-image", action="append", default=[], metavar="IMG", help="one per --controlnet")
    p.add_argument(
        "--preprocess",
        action="append",
        default=[],
        metavar="NAME",
        help="turn --control-image into the condition: canny, scribble, tile, gray or none (once, or per ControlNet)",
    )
    p.add_argument(
        "--control-resize",
        action="append",
        default=[],
        choices=["crop", "resize", "pad"],
        help="fit --control-image to the output size as A1111: crop (Crop and Resize, default), resize (Just "
        "Resize: stretched, as diffusers) or pad (Resize and Fill); before --preprocess (once, or per ControlNet)",
    )
    p.add_argument("--control-scale", action="append", type=float, default=[], help="conditioning scale (default 1)")
    p.add_argument("--control-start", action="append", type=float, default=[], help="fraction of the steps (default 0)")
    p.add_argument("--control-end", action="append", type=float, default=[], help="fraction of the steps (default 1)")
    p.add_argument(
        "--guess-mode", action="store_true", help="diffusers' guess mode (A1111: ControlNet is more important)"
    )
    p.add_argument("--prompts-file", default=None, help="a text file with one prompt per line")
    p.add_argument("--out", default="outputs", help="output folder (default: outputs)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="--prompts-file: redraw images in OUT that record another prompt or other settings",
    )
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=8 or data=2,fsdp=4 (default: every device)")
    p.add_argument("--coordinator", default=None, help="multi-host: HOST:PORT of process 0")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    p.add_argument("--cache-dir", default="default", help="persistent XLA compilation cache, or 'off'")
    p.add_argument("--no-progress", action="store_true", help="no progress messages on stderr")
    p.add_argument(
        "--no-step-counter",
        action="store_true",
        help="no per-step counter on a terminal (the counter is a host callback, which keeps the program out "
        "of the persistent compilation cache)",
    )
    args = p.parse_args(argv)
    if (args.prompt is None) == (args.prompts_file is None):
        p.error("give either a prompt or --prompts-file")
    if args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.mask and not args.init_image:
        p.error("--mask needs --init-image")
    n = len(args.controlnet)
    if len(args.control_image) != n:
        p.error(f"{len(args.control_image)} --control-image for {n} --controlnet: give one per ControlNet")
    for name in ("preprocess", "control_resize", "control_scale", "control_start", "control_end"):
        given = getattr(args, name)
        if len(given) not in (0, 1, n) or (given and not n):
            p.error(
                f"--{name.replace('_', '-')} given {len(given)} times for {n} --controlnet: once, or per ControlNet"
            )
    return args


def check_inputs(args) -> None:
    """Reads the --lora arguments into `args.loras` [(path, scale)], checks that every input file exists and
    that every safetensors LoRA file has a readable header, before anything is loaded or compiled (a typo or a
    broken download costs no compile)."""
    args.loras = [parse_lora_arg(arg) for arg in args.lora]
    if args.preprocess:
        from sdjax.control_images import PREPROCESSORS

        known = ["none", *PREPROCESSORS]
        for name in args.preprocess:
            if name not in known:
                raise ValueError(f"unknown --preprocess {name!r}; choose one of {', '.join(known)}")
    named = [("LoRA file", path) for path, _ in args.loras] + [("embedding", Path(e)) for e in args.embedding]
    named += [("VAE", Path(args.vae))] if args.vae else []
    named += [("init image", Path(args.init_image))] if args.init_image else []
    named += [("mask", Path(args.mask))] if args.mask else []
    named += [("ControlNet", Path(c)) for c in args.controlnet] + [
        ("control image", Path(c)) for c in args.control_image
    ]
    for what, path in named:
        if not path.expanduser().exists():
            raise FileNotFoundError(f"{what} {path} does not exist")
    from sdjax.convert.tensor_files import SafetensorsFile, is_torch_pickle

    for path in (p.expanduser() for p, _ in args.loras):  # a garbled file costs no compile either
        if path.is_file() and not is_torch_pickle(path):  # pickles have no header: read at load
            SafetensorsFile(path)  # reads and checks the header only


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a prompts file (UTF-8 text) that do not start with '#'."""
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"prompts file {file} is a folder: give a text file, one prompt per line")
    if not file.is_file():
        raise FileNotFoundError(f"prompts file {file} does not exist")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"prompts file {file} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): "
            "save it as UTF-8 text, one prompt per line"
        ) from None
    if "\0" in text:
        raise ValueError(f"prompts file {file} holds NUL bytes (a binary file?): give a text file, one prompt per line")
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ValueError(f"prompts file {file} holds no prompt")
    return prompts


class Progress:
    """One-line status messages on stderr (a terminal shows the step counter updating in place)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tty = sys.stderr.isatty()

    def say(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)

    def step(self, done: int, total: int) -> None:
        if self.enabled and self.tty:
            end = "\n" if done >= total else ""
            print(f"\r  step {done}/{total}", end=end, file=sys.stderr, flush=True)


def model_dtype(args) -> str:
    """--dtype, else float32 on the CPU (the parity mode) and bfloat16 on GPUs/TPUs."""
    import jax

    return args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")


def _pair(text: str) -> tuple[int, int]:
    """ "1024x768" -> (1024, 768) (for SDXL's sizes: height x width; crop: top x left)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected two integers such as 1024x1024, got {text!r}")
    return int(parts[0]), int(parts[1])


def model_shapes(args):
    """The pipeline of --model (with --vae and --embedding) with its parameters as shapes, when the program
    can be compiled before the weights are read: every model, VAE and --controlnet a diffusers folder (or
    the demo model) or a `.safetensors` file. None when one is a `.ckpt`/`.pth` pickle (no header to read
    the shapes from: it is loaded first)."""
    import sdjax
    from sdjax.convert.tensor_files import is_torch_pickle

    files = [Path(p).expanduser() for p in (args.model, args.vae, *args.controlnet) if p is not None]
    if any(f.is_file() and is_torch_pickle(f) for f in files):
        return None
    shapes = sdjax.load_pipeline(
        args.model,
        dtype=model_dtype(args),
        config=args.config,
        prediction_type=args.prediction_type,
        vae=args.vae,
        weights=False,
    )
    for path in args.embedding:  # small files: read twice, here for the text encoder's grown shapes
        shapes = shapes.load_textual_inversion(path)
    return shapes


def load_model(args, progress: Progress):
    """The pipeline of --model with --vae, --embedding and --lora applied."""
    import sdjax

    started = time.perf_counter()
    dtype = model_dtype(args)
    progress.say(f"loading {args.model or 'the bundled demo model'} ({dtype})")
    pipe = sdjax.load_pipeline(
        args.model, dtype=dtype, config=args.config, prediction_type=args.prediction_type, vae=args.vae
    )
    for path in args.embedding:
        pipe = pipe.load_textual_inversion(path)
    for path, scale in args.loras:
        pipe = pipe.load_lora(path, scale)
    progress.say(f"loaded in {time.perf_counter() - started:.1f} s")
    return pipe


def _per_net(values: list, n: int, default) -> list:
    """A repeatable option's values, one per ControlNet (given once: for all; never: the default)."""
    return values * n if len(values) == 1 else (values or [default] * n)


# --control-resize -> A1111's name of the resize mode (its PNG "Resize Mode" field)
RESIZE_MODES = {"crop": "Crop and Resize", "resize": "Just Resize", "pad": "Resize and Fill"}


def load_controlnets(args, dtype: str, progress: Progress, weights: bool = True) -> list:
    """The --controlnet nets in `dtype`; `weights=False`: their parameters as shapes (a folder's config.json
    or a `.safetensors` file's header), to compile against before the weights are read."""
    import sdjax

    nets = []
    for path in args.controlnet:
        if weights:
            progress.say(f"loading ControlNet {path}")
        nets.append(sdjax.load_controlnet(path, dtype=dtype, weights=weights))
    return nets


def load_controls(args, nets: list, size: tuple[int, int]) -> dict:
    """The ControlNet options of `generate` from --control-image/--control-resize/--preprocess/--control-*
    for `nets` (`load_controlnets`; empty without --controlnet): the ControlNets, their condition images
    (fitted to `size`, the (width, height) drawn, then preprocessed) and settings."""
    if not args.controlnet:
        return {}
    from sdjax import control_images
    from sdjax import images as image_io

    n = len(args.controlnet)
    conditions = []
    for image, fit, method in zip(
        args.control_image,
        _per_net(args.control_resize, n, "crop"),
        _per_net(args.preprocess, n, "none"),
        strict=True,
    ):
        fitted = control_images.fit_to_size(image_io.open_image(image, "control image"), *size, mode=fit)
        conditions.append(fitted if method == "none" else control_images.preprocess(method, fitted))
    return dict(
        controlnet=nets,
        control_image=conditions,
        controlnet_conditioning_scale=_per_net(args.control_scale, n, 1.0),
        control_guidance_start=_per_net(args.control_start, n, 0.0),
        control_guidance_end=_per_net(args.control_end, n, 1.0),
        guess_mode=args.guess_mode,
    )


def control_parameters(args) -> dict[str, str]:
    """The PNG `parameters` fields of the ControlNets, as A1111's ControlNet extension writes them."""
    n = len(args.controlnet)
    fields = {}
    for i, (path, method, fit, scale, start, end) in enumerate(
        zip(
            args.controlnet,
            _per_net(args.preprocess, n, "none"),
            _per_net(args.control_resize, n, "crop"),
            _per_net(args.control_scale, n, 1.0),
            _per_net(args.control_start, n, 0.0),
            _per_net(args.control_end, n, 1.0),
            strict=True,
        )
    ):
        mode = "ControlNet is more important" if args.guess_mode else "Balanced"
        model = Path(path).name.removesuffix(".safetensors").removesuffix(".pth")
        fields[f"ControlNet {i}"] = (
            f'"Module: {method}, Model: {model}, Weight: {scale:g}, Resize Mode: {RESIZE_MODES[fit]}, '
            f'Guidance Start: {start:g}, Guidance End: {end:g}, Control Mode: {mode}"'
        )
    return fields


def parse_lora_arg(arg: str) -> tuple[Path, float]:
    """`--lora FILE[:SCALE]` -> (path, scale); the scale is 1 without a suffix (the text after the last ':'
    is a suffix unless it holds a path separator), and a file whose own name holds a colon is taken whole
    when it exists. A suffix that is not a finite number is an error."""
    whole = Path(arg).expanduser()
    head, sep, tail = arg.rpartition(":")
    if not sep or not head or whole.exists() or "/" in tail or "\\" in tail:  # no suffix (C:/x is a path)
        return whole, 1.0
    try:
        scale = float(tail)
    except ValueError:
        raise ValueError(
            f"--lora {arg}: the scale {tail!r} after the last ':' is not a number (FILE[:SCALE])"
        ) from None
    if not math.isfinite(scale):
        raise ValueError(f"--lora {arg}: the scale must be a finite number, got {tail!r}")
    return Path(head).expanduser(), scale


def output_paths(out: Path, seeds: list[int], resume: bool) -> list[Path]:
    """OUT/{index:05d}-{seed}.png. With `resume` (--prompts-file) index k is prompt k, so a rerun finds the
    images already drawn; otherwise numbering continues after the highest index in OUT (as A1111)."""
    first = 0
    if not resume:
        taken = [int(p.name[:5]) for p in out.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
        first = max(taken, default=-1) + 1
    return [out / f"{first + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_inputs(args)
    from sdjax.process import tune_garbage_collector

    tune_garbage_collector()
    import jax
    import numpy as np

    from sdjax import files, sharding
    from sdjax.compile_cache import enable_compilation_cache
    from sdjax.convert.lora import find_lora
    from sdjax.generate import NonFiniteImageError, compile_generate, place_inputs, place_params
    from sdjax.prompts import parse_lora_tags
    from sdjax.request import default_guidance, prepare, text_shape

    multi = sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    host, hosts = jax.process_index(), jax.process_count()
    progress = Progress(not args.no_progress and host == 0)
    enable_compilation_cache(args.cache_dir)
    started = time.perf_counter()
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: pass a folder (it is created if missing)")
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write into the output folder {out} (permission denied): pass another --out")

    if args.prompts_file:
        prompts = read_prompts(args.prompts_file)
    else:
        prompts = [args.prompt] * args.batch_size
    tagged = [parse_lora_tags(p) for p in prompts]  # (prompt without <lora:...> tags, tags)
    if any(tags for _, tags in tagged) and not args.lora_dir:
        raise ValueError("the prompt has <lora:name:weight> tags: pass --lora-dir DIR (the folder of LoRA files)")
    if multi and len({tuple(tags) for _, tags in tagged}) > 1:
        raise ValueError("multi-host runs need the same <lora:...> tags in every prompt (the weights are shared)")
    mesh = sharding.make_mesh(args.mesh) if args.mesh or jax.device_count() > 1 else None
    # On one device the program is compiled from the configs alone, before the weights are read, so that the
    # compiler's memory and the weights are never resident together.
    shapes = model_shapes(args) if mesh is None else None
    base = shapes or load_model(args, progress)
    if mesh is not None:
        base = base.on_mesh(mesh)
        progress.say(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices, {hosts} process(es)")

    files.remove_temporaries(out)  # images a killed run left half-written
    seeds = [args.seed + i for i in range(len(prompts))]
    paths = output_paths(out, seeds, resume=bool(args.prompts_file))
    if multi and not args.prompts_file:  # every host numbers from the same first index
        first = int(_host_max(int(paths[0].name[:5])))
        paths = [out / f"{first + i:05d}-{seed}.png" for i, seed in enumerate(seeds)]
    own = sharding.host_share(range(len(prompts)))  # this host's images: every hosts-th one
    model_name = Path(args.model).resolve().name if args.model else "sdjax-demo"
    sampler = sampler_name(base, args.scheduler)
    if args.guidance is None:  # recorded in the PNGs as the value used
        args.guidance = default_guidance(base)
    describe = functools.partial(image_parameters, args, prompts, seeds, model_name, sampler)
    done = [i for i in own if paths[i].exists()]
    size = planned_size(base, args)  # (width, height) drawn: for resuming and for fitting control images
    if args.prompts_file:  # resume by content: an image there must be the one this command would draw
        done = [i for i in done if not _redraw(paths[i], describe(i, size), args.overwrite)]
    skipped = set(done)
    todo = [i for i in own if i not in skipped]
    if done:
        progress.say(f"{len(done)} of {len(own)} images already in {out}: skipping them")
    rows = -(-args.batch_size // hosts)  # this host's rows per batch
    rows = min(rows, len(todo)) if not multi else rows
    # every prompt as long as the longest, every prompt-edit stack as deep as the deepest (of the whole job,
    # on every process): one program for the whole job
    windows, texts = text_shape(base, [p for p, _ in tagged], args.negative_prompt or None, **generate_options(args))
    step_counter = progress.step if progress.tty and not args.no_step_counter else None
    chunks = batches(todo, max(rows, 1), key=lambda i: tagged[i][1])
    steps = int(_host_max(len(chunks))) if multi else len(chunks)
    if steps == 0:
        return 0
    dtype = model_dtype(args)
    controls = load_controls(args, load_controlnets(args, dtype, progress, weights=shapes is None), size)
    compiled = None
    failed: list[Path] = []  # images that came out non-finite (not written)
    merged = {(): base}  # LoRA tag set -> pipeline with those LoRAs merged (parameters only: no recompile)

    def request(pipe, rows_prompts, chunk):
        return prepare(
            pipe,
            rows_prompts,
            args.negative_prompt or None,  # none: SDXL's zero embeddings (A1111, diffusers); SD 1/2: ""
            seed=[seeds[i] for i in chunk] or [seeds[0]],
            pad_to=rows,  # a short last batch runs in the same program, drawing only its own images
            min_windows=windows,
            min_texts=texts,
            mesh=mesh,
            **generate_options(args),
            **controls,
        )

    def compile_for(pipe, plan, inputs, params):
        tick = time.perf_counter()
        progress.say(f"compiling ({plan.batch} x {plan.width}x{plan.height}, {plan.mode})")
        program = compile_generate(pipe, plan, inputs, on_step=step_counter, params=params)
        progress.say(f"compiled in {time.perf_counter() - tick:.1f} s")
        return program

    for step in range(steps):
        chunk = chunks[step] if step < len(chunks) else []  # a host out of work still joins the collective
        rows_prompts = [tagged[i][0] for i in chunk] or [tagged[0][0]]
        if shapes is not None:  # the first program from the shapes, then the weights
            plan, inputs = request(shapes, rows_prompts, chunk)
            compiled = compile_for(shapes, plan, place_inputs(inputs, None), shapes.params)
            base, shapes = load_model(args, progress), None
            merged = {(): base}
            if controls:
                controls = {**controls, "controlnet": load_controlnets(args, dtype, progress)}
        tags = tuple(tagged[chunk[0] if chunk else 0][1])
        if tags not in merged:
            pipe = base
            for tag in tags:
                pipe = pipe.load_lora(find_lora(tag.name, args.lora_dir), tag.scale)
            merged = {(): base, tags: pipe}
        pipe = merged[tags]
        plan, inputs = request(pipe, rows_prompts, chunk)
        if not chunk:
            inputs = dataclasses.replace(inputs, valid=np.zeros_like(inputs.valid))
        params = place_params(pipe.params, mesh)
        inputs = place_inputs(inputs, mesh)
        if compiled is None or compiled.plan != plan:
            compiled = compile_for(pipe, plan, inputs, params)
        tick = time.perf_counter()
        if chunk:
            progress.say(f"sampling images {paths[chunk[0]].name} .. {paths[chunk[-1]].name}")
        drawn = compiled(params, inputs)
        result, finite = jax.device_get(drawn) if mesh is None else jax.tree.map(sharding.local_rows, drawn)
        progress.say(f"sampled batch {step + 1}/{steps} in {time.perf_counter() - tick:.1f} s")
        failed += write_images(args, chunk, result, finite, plan, paths, describe, out, multi)
    if failed:
        names = ", ".join(p.name for p in failed)
        raise NonFiniteImageError(
            f"{len(failed)} image(s) came out NaN/Inf and were not saved ({names}): the model's weights hold "
            "non-finite values, or a float16 model overflowed: try --dtype float32 or bfloat16"
        )
    progress.say(f"wrote {len(todo)} image(s) to {out} in {time.perf_counter() - started:.1f} s")
    return 0


def sampler_name(pipe, scheduler: str | None) -> str:
    """A1111's name of the sampler a run uses (`--scheduler`, or the model's own), for the PNG parameters."""
    from sdjax import schedulers

    try:
        if scheduler:
            return schedulers.a1111_name(schedulers.from_name(scheduler, pipe.scheduler_config))
        return schedulers.a1111_name(schedulers.from_diffusers_config(pipe.scheduler_config))
    except ValueError:  # refused later, with its own message, where the scheduler is built
        return scheduler or pipe.scheduler_config.get("_class_name", "default")


def image_parameters(args, prompts, seeds, model_name, sampler, i: int, size: tuple[int, int]) -> str:
    """The A1111 `parameters` text of image i, (width, height) `size`."""
    from sdjax import images as image_io

    extra = {}
    if args.init_image:
        extra["Denoising strength"] = args.strength
    if args.clip_skip:
        extra["Clip skip"] = args.clip_skip + 1
    extra.update(control_parameters(args))
    for name, value in sdxl_options(args).items():  # recorded so that resuming compares them
        text = "x".join(map(str, value)) if isinstance(value, tuple) else str(value)
        extra[SDXL_FIELDS[name]] = json.dumps(text) if any(c in text for c in ',:\n"') else text  # A1111's quoting
    return image_io.a1111_parameters(
        prompts[i],
        args.negative_prompt,
        steps=args.steps,
        sampler=sampler,
        guidance=args.guidance,
        seed=seeds[i],
        width=size[0],
        height=size[1],
        model=model_name,
        extra=extra,
    )


def generate_options(args) -> dict:
    """The `generate` options this command sets for every image (seeds, mesh and ControlNets aside)."""
    return dict(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        scheduler=args.scheduler,
        height=args.height,
        width=args.width,
        image=args.init_image,
        strength=args.strength,
        mask_image=args.mask,
        guidance_rescale=args.guidance_rescale,
        clip_skip=args.clip_skip,
        micro_batch_size=args.micro_batch,
        vae_tiling=args.vae_tiling,
        **sdxl_options(args),
    )


# PNG `parameters` names of the SDXL options (A1111 records none of them; Size is the target size there)
SDXL_FIELDS = {
    "prompt_2": "Prompt 2",
    "negative_prompt_2": "Negative prompt 2",
    "original_size": "Original size",
    "target_size": "Target size",
    "crops_coords_top_left": "Crop top-left",
    "aesthetic_score": "Aesthetic score",
}


def sdxl_options(args) -> dict:
    """The SDXL `generate` options given on the command line (none by default: other models refuse them)."""
    given = dict(
        prompt_2=args.prompt_2,
        negative_prompt_2=args.negative_prompt_2,
        original_size=args.original_size,
        target_size=args.target_size,
        crops_coords_top_left=args.crop,
    )
    given = {k: v for k, v in given.items() if v is not None}
    if args.aesthetic_score != 6.0:
        given["aesthetic_score"] = args.aesthetic_score
    return given


def planned_size(pipe, args) -> tuple[int, int]:
    """The (width, height) this command draws at (--height/--width, else the init image's or the model's
    size), from the request alone (no compile)."""
    from sdjax.request import prepare

    plan, _ = prepare(pipe, [""], mesh=None, **generate_options(args))
    return plan.width, plan.height


def _redraw(path: Path, expected: str, overwrite: bool) -> bool:
    """Whether the image at `path` (of a --prompts-file run) must be drawn again: False when it records
    exactly `expected`; True with `overwrite` otherwise; an error naming the image without it."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            recorded = img.info.get("parameters")
    except OSError:
        recorded = None
    if recorded == expected:
        return False
    if overwrite:
        return True
    what = "no readable parameters" if recorded is None else f"{recorded.splitlines()[0][:60]!r} with other settings"
    raise FileExistsError(
        f"{path} records {what}, not this command's image: the prompts file or the settings changed since it "
        "was drawn; pass --overwrite to redraw such images, or a new --out"
    )


def write_images(args, chunk, result, finite, plan, paths, describe, out, multi) -> list[Path]:
    """The PNGs of one batch (A1111 parameters in each) and, for a single prompt's batch, its grid under a
    free name; images that came out non-finite are not written: their paths are returned."""
    from sdjax import files
    from sdjax import images as image_io

    failed = []
    for row, i in enumerate(chunk):
        if not finite[row]:
            failed.append(paths[i])
            continue
        image_io.save_png(paths[i], result[row], describe(i, (plan.width, plan.height)))
    if len(chunk) > 1 and not args.prompts_file and not multi and not failed:
        grid = files.fresh_path(out / f"grid-{paths[chunk[0]].stem}.png")
        image_io.save_png(grid, image_io.grid(result[: len(chunk)]))
    return failed


def _host_max(value: int) -> int:
    """The largest `value` over all processes."""
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.process_allgather(np.asarray([value])).max())


def batches(items: list[int], size: int, key) -> list[list[int]]:
    """Consecutive runs of `items` with equal key(item), cut into batches of at most `size`."""
    out: list[list[int]] = []
    for item in items:
        if out and len(out[-1]) < size and key(out[-1][0]) == key(item):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def cli(argv: list[str] | None = None) -> int:
    """main() with every expected failure reduced to one line on stderr and exit status 2."""
    from sdjax.errors import one_line

    try:
        return main(argv)
    except (ValueError, OSError) as err:  # bad input: missing/corrupt files, bad sizes, unknown names
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
