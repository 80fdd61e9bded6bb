"""A generation request: its options declared once (`GenerateOptions`), validated on the host and turned
into the compile-time `Plan` and the traced `Inputs` of `sdjax.generate`'s program.

`prepare` reads the request concern by concern: the prompts (negative prompts broadcast by
`sdjax.prompts.prompt_pairs`, tokenized into 77-token windows), the scheduler and step counts, the size and
mode (txt2img, img2img, inpainting) with the init images and masks, the seeds, padding rows and the mesh,
and the unmerged LoRAs. Images are NHWC uint8 at the edges, [-1, 1] floats inside.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh

from sdjax import images as image_io
from sdjax import prompt_editing, schedulers, sdxl
from sdjax.convert.lora import lora_adapter
from sdjax.generate import Inputs, Plan
from sdjax.memory import device_memory_bytes
from sdjax.nn.lora import COMPONENTS as LORA_COMPONENTS
from sdjax.nn.lora import component_scales
from sdjax.options import GenerateOptions, default_max_steps, finite_number
from sdjax.prompts import prompt_pairs, tokenize_batch
from sdjax.schedulers.loop import img2img_start_step
from sdjax.sharding import make_mesh


def resolve_mesh(mesh) -> Mesh | None:
    """A mesh option -> a Mesh or None: "all" is every device on "data" (None on a single device), a
    string a spec such as "data=2,fsdp=4"."""
    if isinstance(mesh, str):
        if mesh == "all":
            return make_mesh() if jax.device_count() > 1 else None
        return make_mesh(mesh)
    return mesh


# ---------------------------------------------------------------------------------------------- concerns


def _scheduler(pipe, scheduler):
    """The Scheduler of a request: a name, a Scheduler, or None for the model's own config."""
    if isinstance(scheduler, str):
        return schedulers.from_name(scheduler, pipe.scheduler_config)
    if scheduler is None:
        return schedulers.from_diffusers_config(pipe.scheduler_config)
    if not isinstance(scheduler, schedulers.Scheduler):
        raise TypeError(f"scheduler must be a name ({', '.join(schedulers.NAMES)}) or a Scheduler, got {scheduler!r}")
    return scheduler


def _prompt_rows(pipe, prompt, negative_prompt, opts: GenerateOptions, min_windows: int, min_texts: int = 1) -> dict:
    """Each image's [negative, positive] conditioning texts, tokenized: {"ids", "weights"} (B, 2, T, W*77),
    for SDXL also the second tokenizer's {"ids_2", "weights_2"} (of `prompt_2`), all with the same window
    count W. T is the stack of distinct texts that A1111's prompt editing and alternation give one row
    over the steps (`sdjax.prompt_editing`; 1 without them), and "text_steps" int32 (B, 2, max_steps)
    which of them each step uses (None when T is 1). Also the prompts per image under "prompts". T is at
    least `min_texts` (rounded up as `prompt_editing.stack_size` rounds)."""
    per_prompt = int(opts.num_images_per_prompt)
    prompts, negatives = prompt_pairs(prompt, negative_prompt)
    prompts = [p for p in prompts for _ in range(per_prompt)]
    negatives = [p for p in negatives for _ in range(per_prompt)]
    columns = [(negatives, prompts)]
    # an SDXL refiner has the second encoder only, which reads the prompt (not prompt_2), as diffusers
    first = (pipe.tokenizer, pipe.text_encoder) if pipe.text_encoder else (pipe.tokenizer_2, pipe.text_encoder_2)
    tokenizers = [(*first, "")]
    if pipe.is_sdxl and pipe.text_encoder is not None:
        columns.append(sdxl.second_prompts(prompts, negatives, opts, per_prompt))
        tokenizers.append((pipe.tokenizer_2, pipe.text_encoder_2, "_2"))
    batch = len(prompts)
    sources = [tuple(column[half][b] for column in columns) for b in range(batch) for half in (0, 1)]
    texts, index = prompt_editing.text_table(sources, opts.steps, opts.padded_steps)
    stack = prompt_editing.stack_size(max(min_texts, *(len(t) for t in texts)))
    texts = [t + [t[0]] * (stack - len(t)) for t in texts]
    rows = {"prompts": prompts, "text_steps": None}
    if stack > 1:
        rows["text_steps"] = np.asarray(index, np.int32).reshape(batch, 2, -1)
    windows = min_windows
    for _ in range(2):  # a second pass pads the first tokenizer's rows to the second's window count
        for e, (tokenizer, encoder, suffix) in enumerate(tokenizers):
            flat = [entry[e] for row in texts for entry in row]
            ids, weights = tokenize_batch(tokenizer, flat, min_windows=windows)
            rows["ids" + suffix], rows["weights" + suffix] = (x.reshape(batch, 2, stack, -1) for x in (ids, weights))
            found = ids.shape[1] // encoder.config.max_position_embeddings
            if found > windows and e > 0:
                windows = found
                break
            windows = found
        else:
            break
    rows["windows"] = windows
    return rows


def _images_per_prompt(source, count: int, what: str) -> list:
    """PIL images from one image (path, PIL image, uint8 (H, W[, C]) array) or a list of them / a uint8
    (N, H, W, C) array, one per prompt (N = count); all of one size."""
    if isinstance(source, np.ndarray) and source.ndim == 4:
        source = list(source)
    if not isinstance(source, list | tuple):
        return [image_io.open_image(source, what)]
    if len(source) not in (1, count):
        raise ValueError(f"{len(source)} {what}s for {count} prompts: pass one, or one per prompt")
    opened = [image_io.open_image(item, what) for item in source]
    sizes = {img.size for img in opened}
    if len(sizes) > 1:
        raise ValueError(f"the {what}s have different sizes {sorted(sizes)}: resize them to one size")
    return opened


def _rows_per_image(arrays: list, per_prompt: int, batch: int) -> np.ndarray:
    """(B, H, W, C) rows from (1, H, W, C) arrays: the one array for every image, or each prompt's array
    repeated per_prompt times."""
    if len(arrays) == 1:
        return np.array(np.broadcast_to(arrays[0], (batch, *arrays[0].shape[1:])))
    return np.repeat(np.concatenate(arrays), per_prompt, axis=0)


@dataclasses.dataclass(frozen=True)
class _Canvas:
    """Size and mode of a request, with its init images and masks as rows."""

    height: int
    width: int
    mode: str
    image: np.ndarray | None = None  # (B, H, W, 3) in [-1, 1]
    mask: np.ndarray | None = None  # (B, H, W, 1), 1 = repaint
    latents: np.ndarray | None = None  # (B, h, w, C): the init image given as latents


def _is_latents(pipe, image) -> bool:
    """Whether an `image` option holds latents: a float (B, h, w, latent_channels) array."""
    shape, dtype = getattr(image, "shape", None), getattr(image, "dtype", None)
    return (
        shape is not None
        and len(shape) == 4
        and shape[-1] == pipe.vae.config.latent_channels
        and np.issubdtype(np.dtype(dtype), np.floating)
    )


def _latent_canvas(pipe, options: GenerateOptions, count: int, batch: int) -> _Canvas:
    """img2img from latents (B, h, w, C): one for every image, one per prompt or one per image."""
    latents = np.asarray(options.image, np.float32)
    if options.mask_image is not None:
        raise ValueError("image= holds latents: inpainting (mask_image) needs a picture as the init image")
    if not np.isfinite(latents).all():
        raise ValueError(f"the init latents hold {int((~np.isfinite(latents)).sum())} NaN/Inf values")
    n = latents.shape[0]
    if n not in (1, count, batch):
        raise ValueError(
            f"{n} init latents for {count} prompts x {batch // count} images: give 1, one per prompt or one per image"
        )
    rows = np.repeat(latents, batch // n, axis=0) if n != batch else latents
    factor = pipe.vae_scale_factor
    height, width = rows.shape[1] * factor, rows.shape[2] * factor
    if (options.height or height, options.width or width) != (height, width):
        raise ValueError(
            f"the init latents are {rows.shape[2]}x{rows.shape[1]} ({width}x{height} pixels) but height x width is "
            f"{options.height}x{options.width}: leave them out"
        )
    _check_fits(pipe, height, width, options.vae_tiling)
    return _Canvas(height, width, "img2img", latents=rows)


def _canvas(pipe, options: GenerateOptions, count: int, batch: int) -> _Canvas:
    """The image size (the init image's by default, else the model's) and the mode; init images and
    masks resized to it, one row per image."""
    factor = pipe.vae_scale_factor
    height, width = options.height, options.width
    if options.denoising_start is not None and options.image is None:
        raise ValueError("denoising_start continues from an init image: pass image=... (pixels or latents)")
    if options.denoising_start is not None and options.mask_image is not None:
        raise ValueError("denoising_start is not supported with inpainting (mask_image) yet")
    if options.image is not None and _is_latents(pipe, options.image):
        return _latent_canvas(pipe, options, count, batch)
    inits = None
    if options.image is not None:
        inits = _images_per_prompt(options.image, count, "init image")
        if height is None and width is None:
            if inits[0].width < factor or inits[0].height < factor:
                raise ValueError(
                    f"init image is {inits[0].width}x{inits[0].height} pixels, below the minimum {factor}x{factor}: "
                    "pass a larger image, or height and width to resize it to"
                )
            width, height = (inits[0].width // factor) * factor, (inits[0].height // factor) * factor
    sample = (pipe.unet.config.sample_size or 64) * factor
    height = sample if height is None else int(height)
    width = sample if width is None else int(width)
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(f"height and width must be positive multiples of {factor}, got {height}x{width}")
    _check_fits(pipe, height, width, options.vae_tiling)
    kept = int(options.steps * float(options.strength))
    if options.mask_image is None and pipe.unet.config.in_channels != pipe.vae.config.latent_channels:
        raise ValueError(
            f"this UNet takes {pipe.unet.config.in_channels} input channels (an inpainting model): "
            "pass image and mask_image"
        )
    if inits is None:
        return _Canvas(height, width, "txt2img")
    if kept < 1:
        raise ValueError(f"strength {options.strength} leaves no denoising step out of {options.steps}; raise it")
    per_prompt = int(options.num_images_per_prompt)
    image = _rows_per_image([image_io.image_to_array(img, height, width) for img in inits], per_prompt, batch)
    if options.mask_image is None:
        return _Canvas(height, width, "img2img", image)
    masks = _images_per_prompt(options.mask_image, count, "mask")
    if masks[0].size != inits[0].size:
        got, want = f"{masks[0].width}x{masks[0].height}", f"{inits[0].width}x{inits[0].height}"
        raise ValueError(f"mask is {got} but the init image is {want}")
    mask = _rows_per_image([image_io.mask_to_array(m, height, width) for m in masks], per_prompt, batch)
    return _Canvas(height, width, "inpaint", image, mask)


@dataclasses.dataclass(frozen=True)
class _Controls:
    """The ControlNets of a request: modules (static), parameters, per-image condition rows (B, n, H, W, 3)
    and per-ControlNet scale, start and end (f32 (n,))."""

    modules: tuple = ()
    params: tuple | None = None
    images: np.ndarray | None = None
    scale: np.ndarray | None = None
    start: np.ndarray | None = None
    end: np.ndarray | None = None
    guess_mode: bool = False


def _per_controlnet(name: str, value, n: int) -> np.ndarray:
    """A float option given once or once per ControlNet -> f32 (n,), finite; a one-line error otherwise."""
    values = list(value) if isinstance(value, list | tuple) else [value] * n
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values for {n} ControlNets: give one, or one per ControlNet")
    return np.asarray([finite_number(name, v) for v in values], np.float32)


def check_controlnet(pipe, module, index: int) -> None:
    """Refuses a ControlNet whose encoder does not fit the pipeline's UNet, naming both sides."""
    cfg, unet = module.config, pipe.unet.config
    what = f"ControlNet {index}"
    width, context = cfg.unet_config().context_dims()[0], unet.context_dims()[0]
    if width != context:
        raise ValueError(
            f"{what} takes text states of width {width} but the model's UNet uses {context} "
            "(an SD 1.x ControlNet on an SD 2.x model, or the reverse)"
        )
    if tuple(cfg.block_out_channels) != tuple(unet.block_out_channels) or cfg.unet_config().layers() != unet.layers():
        raise ValueError(
            f"{what} has blocks {list(cfg.block_out_channels)} x {list(cfg.unet_config().layers())} layers but the "
            f"UNet has {list(unet.block_out_channels)} x {list(unet.layers())}: it is not a ControlNet of this model"
        )
    factor = cfg.condition_downscale
    if factor != pipe.vae_scale_factor:
        raise ValueError(
            f"{what} reads condition images at {factor}x the latent size but the VAE's factor is "
            f"{pipe.vae_scale_factor}"
        )


def _controls(pipe, opts: GenerateOptions, count: int, batch: int, canvas: _Canvas) -> _Controls:
    """The ControlNets of a request, checked against the pipeline and each other (see `GenerateOptions`)."""
    if opts.controlnet is None:
        if opts.control_image is not None:
            raise ValueError("control_image needs a ControlNet: pass controlnet=sdjax.load_controlnet(...)")
        return _Controls()
    nets = list(opts.controlnet) if isinstance(opts.controlnet, list | tuple) else [opts.controlnet]
    for i, net in enumerate(nets):
        if not hasattr(net, "module") or not hasattr(net.module, "config") or not hasattr(net, "params"):
            raise TypeError(
                f"controlnet {i} must be a sdjax.ControlNet (sdjax.load_controlnet), got {type(net).__name__}"
            )
        check_controlnet(pipe, net.module, i)
    if opts.control_image is None:
        raise ValueError(f"{len(nets)} ControlNet(s) need control_image: one condition image per ControlNet")
    images = opts.control_image
    if len(nets) == 1:
        images = [images]  # one ControlNet: its image, or a list of one per prompt
    elif not isinstance(images, list | tuple) or len(images) != len(nets):
        got = len(images) if isinstance(images, list | tuple) else 1
        raise ValueError(f"{got} control images for {len(nets)} ControlNets: give one per ControlNet")
    per_prompt = int(opts.num_images_per_prompt)
    rows = []
    for image in images:
        opened = _images_per_prompt(image, count, "control image")
        arrays = [image_io.control_image_to_array(img, canvas.height, canvas.width) for img in opened]
        rows.append(_rows_per_image(arrays, per_prompt, batch))
    n = len(nets)
    scale = _per_controlnet("controlnet_conditioning_scale", opts.controlnet_conditioning_scale, n)
    start = _per_controlnet("control_guidance_start", opts.control_guidance_start, n)
    end = _per_controlnet("control_guidance_end", opts.control_guidance_end, n)
    for c in range(n):
        if not 0.0 <= start[c] < end[c] <= 1.0:
            raise ValueError(
                f"ControlNet {c}: control_guidance_start {start[c]:g} must be below control_guidance_end "
                f"{end[c]:g}, both in [0, 1]"
            )
    guess = bool(opts.guess_mode) or bool(nets[0].module.config.global_pool_conditions)
    return _Controls(
        modules=tuple(net.module for net in nets),
        params=tuple(net.params for net in nets),
        images=np.stack(rows, axis=1),
        scale=scale,
        start=start,
        end=end,
        guess_mode=guess,
    )


def _bytes_per_pixel(pipe, tiled: bool) -> float:
    """A lower bound of the memory one image needs per output pixel, in bytes: the two largest full-size
    activations of the VAE decoder (its last block's input and output channels at full size; with tiling
    only the latents and the image), and two UNet activations of its first width per latent pixel."""
    itemsize = np.dtype(pipe.dtype).itemsize
    factor = pipe.vae_scale_factor
    unet = 2 * pipe.unet.config.block_out_channels[0] * itemsize / factor**2
    if tiled:
        return unet + 2 * 3 * 4
    decoder = pipe.vae.config.block_out_channels
    return unet + 2 * max(decoder[:2]) * itemsize


def _check_fits(pipe, height: int, width: int, tiled: bool) -> None:
    """Refuses, before anything is compiled, an image size whose lower-bound memory (`_bytes_per_pixel`)
    exceeds one device's memory; the error names the largest square size that may fit."""
    available = device_memory_bytes()
    if not available:
        return
    per_pixel = _bytes_per_pixel(pipe, tiled)
    needed = per_pixel * height * width
    if needed <= available:
        return
    step = 64
    side = int((available / per_pixel) ** 0.5) // step * step
    hint = "" if tiled else ", or pass vae_tiling=True (--vae-tiling)"
    raise ValueError(
        f"{width}x{height} needs at least {needed / 2**30:,.1f} GiB for one image, more than the "
        f"{available / 2**30:.1f} GiB of a device here: the largest square size that may fit is about "
        f"{side}x{side}{hint}"
    )


def _noise_rows(pipe, latents, batch: int, canvas: _Canvas) -> np.ndarray | None:
    """The caller's initial noise (B, h, w, C) float32, shape-checked, or None."""
    if latents is None:
        return None
    factor = pipe.vae_scale_factor
    shape = (batch, canvas.height // factor, canvas.width // factor, pipe.vae.config.latent_channels)
    noise = np.asarray(latents, np.float32)
    if noise.shape != shape:
        raise ValueError(f"latents must have shape {shape} (NHWC), got {noise.shape}")
    if not np.isfinite(noise).all():
        raise ValueError(f"latents hold {int((~np.isfinite(noise)).sum())} NaN/Inf values: pass finite noise")
    return noise


def _seed_rows(seed, batch: int) -> np.ndarray:
    """uint32 (B,) seeds: seed + k for image k, or the given one per image. Seeds are 32-bit: one outside
    [0, 2**32) is an error (it would silently draw the image of another seed)."""
    if isinstance(seed, int | np.integer) and not isinstance(seed, bool):
        seeds = [int(seed) + k for k in range(batch)]
    else:
        seeds = list(np.atleast_1d(np.asarray(seed, object)))
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} images")
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or not 0 <= int(value) < 2**32:
            hint = (
                " (there is no random seed -1: pick one)" if isinstance(value, int | np.integer) and value < 0 else ""
            )
            raise ValueError(
                f"seeds are integers in [0, {2**32 - 1}] (image k of a run uses seed + k), got {value!r}{hint}"
            )
    return np.asarray([int(v) for v in seeds], np.uint32)


def _row_count(batch: int, pad_to: int | None, mesh: Mesh | None) -> int:
    """This process's rows: at least `pad_to`, a multiple of its devices on a mesh."""
    rows = max(batch, int(pad_to or 0))
    if mesh is not None:  # every device of this process gets the same number of rows
        devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        rows = -(-rows // devices) * devices
    return rows


def _pad_rows(rows: dict[str, np.ndarray | None], count: int) -> dict[str, np.ndarray | None]:
    """Per-image arrays padded to `count` rows with copies of the last row (None stays None)."""

    def padded(x):
        pad = count - x.shape[0]
        return x if pad == 0 else np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])

    return {k: None if v is None else padded(v) for k, v in rows.items()}


def _micro_batch(requested: int | None, rows: int, mesh: Mesh | None) -> int:
    """Images per UNet call: as requested, else 1 on the CPU (batch-invariant images) and every row of a
    device on GPUs and TPUs (their throughput grows with the batch); at most a device's rows."""
    devices = 1 if mesh is None else sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    per_device = max(1, rows // devices)
    if requested is None:
        requested = 1 if jax.default_backend() == "cpu" else per_device
    return min(int(requested), rows)


def _adapters(pipe, loras):
    """[(LoRA file or adapter pytree, scale), ...] -> (adapters, {"unet": (n,), "text_encoder": (n,)});
    a scale is a float or {"unet": a, "text_encoder": b}."""
    if not loras:
        return None, None
    adapters, scales = [], {part: [] for part in LORA_COMPONENTS}
    for entry in loras:
        if not isinstance(entry, tuple | list) or len(entry) != 2:
            raise ValueError("loras must be a list of (LoRA file or adapter, scale) pairs")
        source, scale = entry
        adapters.append(source if isinstance(source, dict) else lora_adapter(pipe, source))
        for part, value in component_scales(scale).items():
            scales[part].append(value)
    adapters = tuple(jax.tree.map(np.asarray, a) for a in adapters)
    return adapters, {part: np.asarray(values, np.float32) for part, values in scales.items()}


# ---------------------------------------------------------------------------------------------- prepare


def _check_scheduler_run(scheduler, opts: GenerateOptions) -> None:
    """One-line errors for step counts and starts a scheduler cannot run: LCM/TCD above their distilled
    step count; PNDM's PRK warm-up below 4 steps (diffusers raises) or starting late (img2img, inpainting
    with strength < 1, denoising_start), as its Runge-Kutta warm-up needs the whole schedule."""
    if isinstance(scheduler, schedulers.LCM | schedulers.TCD) and opts.steps > scheduler.original_inference_steps:
        name = type(scheduler).__name__
        raise ValueError(
            f"{name} takes at most original_inference_steps={scheduler.original_inference_steps} steps, got "
            f"num_inference_steps={opts.steps}: {name} models and LoRAs sample in 2-8 steps"
        )
    if not isinstance(scheduler, schedulers.PNDM) or scheduler.skip_prk_steps:
        return
    if opts.steps < 4:
        raise ValueError(f"pndm_prk needs at least 4 steps (3 Runge-Kutta warm-up steps, then PLMS), got {opts.steps}")
    starts_late = opts.denoising_start is not None or img2img_start_step(opts.steps, float(opts.strength))
    if opts.image is not None and starts_late:
        raise ValueError(
            "pndm_prk cannot start part-way (img2img, strength < 1, denoising_start): its Runge-Kutta warm-up "
            "needs the whole schedule; use pndm (PLMS) instead"
        )


def text_shape(pipe, prompt, negative_prompt=None, **options) -> tuple[int, int]:
    """(77-token windows, stack of texts per row) that `prepare` gives these prompts together: the longest
    prompt's windows (of either SDXL tokenizer) and the most distinct texts that prompt editing and
    alternation give one row over `num_inference_steps`. A job that draws its prompts in several batches,
    or on several processes, passes them to every `prepare` as `min_windows`/`min_texts`, so that every
    batch runs one program (and every process the same one)."""
    opts = GenerateOptions.from_kwargs({**options, "num_images_per_prompt": 1})
    rows = _prompt_rows(pipe, prompt, negative_prompt, opts, 1)
    return rows["windows"], rows["ids"].shape[2]


def prepare(
    pipe,
    prompt,
    negative_prompt=None,
    *,
    pad_to: int | None = None,
    min_windows: int = 1,
    min_texts: int = 1,
    **options,
) -> tuple[Plan, Inputs]:
    """Validates a generation request and turns it into (static plan, this process's inputs as numpy
    arrays: `sdjax.generate.place_inputs` makes them global). `options` are `GenerateOptions`' fields.

    `pad_to` >= B pads the per-image inputs to that many rows, not drawn (`Inputs.valid`): a short last
    batch of a job then reuses the full batch's compiled program without drawing extra images. With a
    mesh, the rows are padded to a multiple of this process's devices, and `plan.batch` counts the rows
    of all processes (each passes the same number).
    `min_windows` pads the prompts to at least that many 77-token windows (a job whose prompts have
    different lengths then compiles once); `min_texts` the stack of prompt-edit texts likewise (both from
    `text_shape` of the whole job).
    """
    opts = GenerateOptions.from_kwargs(options)
    per_prompt = int(opts.num_images_per_prompt)
    _check_sdxl_options(pipe, opts)
    prompt_rows = _prompt_rows(pipe, prompt, negative_prompt, opts, min_windows, min_texts)
    batch = len(prompt_rows["prompts"])
    count = batch // per_prompt
    scheduler = _scheduler(pipe, opts.scheduler)
    _check_scheduler_run(scheduler, opts)
    canvas = _canvas(pipe, opts, count, batch)
    controls = _controls(pipe, opts, count, batch, canvas)
    mesh = resolve_mesh(opts.mesh)
    rows = _row_count(batch, pad_to, mesh)
    time_ids = sdxl.time_id_rows(pipe, opts, canvas.height, canvas.width, batch) if pipe.is_sdxl else None
    per_image = {
        "ids": prompt_rows["ids"],
        "weights": prompt_rows["weights"],
        "ids_2": prompt_rows.get("ids_2"),
        "weights_2": prompt_rows.get("weights_2"),
        "text_steps": prompt_rows["text_steps"],
        "time_ids": time_ids,
        "seeds": _seed_rows(opts.seed, batch),
        "valid": np.ones(batch, bool),
        "noise": _noise_rows(pipe, opts.latents, batch, canvas),
        "image": canvas.image,
        "mask": canvas.mask,
        "image_latents": canvas.latents,
        "control_image": controls.images,
    }
    per_image = _pad_rows(per_image, rows)
    per_image["valid"][batch:] = False
    guidance = np.float32(default_guidance(pipe) if opts.guidance_scale is None else opts.guidance_scale)
    plan = Plan(
        scheduler=scheduler,
        batch=rows * (1 if mesh is None else jax.process_count()),
        height=canvas.height,
        width=canvas.width,
        windows=prompt_rows["windows"],
        texts=prompt_rows["ids"].shape[2],
        guided=bool(guidance > 1),
        max_steps=opts.padded_steps,
        mode=canvas.mode,
        clip_skip=None if opts.clip_skip is None else int(opts.clip_skip),
        noise_given=opts.latents is not None,
        micro_batch=_micro_batch(opts.micro_batch_size, rows, mesh),
        vae_tiling=bool(opts.vae_tiling),
        mesh=mesh,
        controlnets=controls.modules,
        guess_mode=controls.guess_mode,
        output=opts.output_type,
    )
    adapters, adapter_scales = _adapters(pipe, opts.loras)
    inputs = Inputs(
        **per_image,
        adapters=adapters,
        adapter_scales=adapter_scales,
        guidance=guidance,
        guidance_rescale=np.float32(opts.guidance_rescale),
        num_steps=np.int32(opts.steps),
        strength=np.float32(opts.strength),
        control_params=controls.params,
        control_scale=controls.scale,
        control_start=controls.start,
        control_end=controls.end,
        start_cutoff=np.int32(_cutoff(scheduler, opts.denoising_start, -1)),
        end_cutoff=np.int32(_cutoff(scheduler, opts.denoising_end, 0)),
        zero_negative=np.bool_(negative_prompt is None and pipe.force_zeros_for_empty_prompt) if pipe.is_sdxl else None,
    )
    return plan, inputs


def _cutoff(scheduler, fraction, default: int) -> int:
    """diffusers' discrete timestep cutoff of denoising_start/end: round(T - fraction * T), T the training
    schedule's length; `default` when the option is not given."""
    if fraction is None:
        return default
    total = scheduler.schedule.num_train_timesteps
    return int(round(total - float(fraction) * total))


def default_guidance(pipe) -> float:
    """The guidance scale of a request that names none: diffusers' pipeline default (SDXL 5.0, else 7.5)."""
    return 5.0 if pipe.is_sdxl else 7.5


def _check_sdxl_options(pipe, opts: GenerateOptions) -> None:
    """Refuses SDXL-only options on other models, naming them, and a refiner without an init image."""
    if pipe.is_sdxl:
        if pipe.requires_aesthetics_score and opts.image is None:
            raise ValueError(
                "this SDXL refiner (requires_aesthetics_score) refines images: pass image=... (an init image, or "
                "the base model's output); use an SDXL base model for text-to-image"
            )
        return
    defaults = GenerateOptions()
    given = [name for name in sdxl.OPTIONS if getattr(opts, name) != getattr(defaults, name)]
    if given:
        raise ValueError(f"{', '.join(given)}: SDXL options, but this model is not an SDXL model")


__all__ = [
    "GenerateOptions",
    "check_controlnet",
    "default_guidance",
    "default_max_steps",
    "prepare",
    "resolve_mesh",
]  # options re-exported
