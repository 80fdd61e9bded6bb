"""One measurement process per framework: the same model folder, prompt and initial latents through sdjax and
through diffusers (PyTorch). Each worker prints one JSON object (seconds, bytes, FLOPs) and saves its image.

Times are wall-clock seconds of one call after a warm-up call (`inner` calls: their median); JAX results
are waited for with `block_until_ready`. Peak RSS is the process's VmHWM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPT = "a photo of an astronaut riding a horse on the moon, highly detailed"
NEGATIVE = "blurry, low quality"
GUIDANCE = 7.5


@dataclass(frozen=True)
class Job:
    model: str
    height: int
    width: int
    batch: int  # images; one UNet CFG step runs 2 * batch rows
    steps: int
    scheduler: str
    dtype: str
    inner: int
    image_out: str
    cache_dir: str | None = None
    controlnet: str | None = None  # a ControlNet folder: every image and the extra "control step" use it


def control_image(job: Job) -> np.ndarray:
    """The shared condition image, uint8 (H, W, 3): sparse white strokes on black, like an edge map."""
    rng = np.random.default_rng(99)
    edges = (rng.random((job.height // 8, job.width // 8)) < 0.15).repeat(8, 0).repeat(8, 1)
    return np.repeat(edges[..., None] * np.uint8(255), 3, axis=-1)


def peak_rss() -> int:
    """Bytes: the high-water mark of this process's resident set (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def latents(job: Job) -> np.ndarray:
    """The shared initial noise, NHWC float32 (B, H/f, W/f, C): f and C are the model's VAE's downscale
    factor (8 for every SD model) and latent channels."""
    from sdjax.nn.config_utils import read_json
    from sdjax.nn.vae import VAEConfig

    vae = VAEConfig.from_dict(read_json(Path(job.model) / "vae" / "config.json"))
    shape = (job.batch, job.height // vae.downscale, job.width // vae.downscale, vae.latent_channels)
    return np.random.default_rng(1234).standard_normal(shape).astype(np.float32)


def _timed(fn, inner: int) -> float:
    """Median seconds of `inner` calls of `fn` after a warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(inner):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_rate(dtype: str, n: int = 2048) -> float:
    """FLOP/s of an n x n x n matrix multiply in `dtype` through XLA on the default device, accumulated as
    sdjax's layers accumulate (float32 for half precision: `sdjax.nn.kernels.matmul`)."""
    import jax.numpy as jnp

    from sdjax import xla_options
    from sdjax.nn.kernels import matmul

    a = jnp.ones((n, n), dtype)
    f = xla_options.jit(matmul)
    f(a, a).block_until_ready()
    seconds = _timed(lambda: f(a, a).block_until_ready(), 5)
    return 2 * n**3 / seconds


def run_jax(job: Job) -> dict:
    """Compiles the four programs (text encoder, one UNet CFG step, VAE decode, the whole image) against the
    model's shapes before its weights are read (`load_pipeline(weights=False)`: the compiler's memory and
    the weights are never resident together), then loads the weights and times each program."""
    import jax
    import jax.numpy as jnp

    import sdjax
    from sdjax import xla_options
    from sdjax.compile_cache import enable_compilation_cache
    from sdjax.generate import compile_generate, place_inputs
    from sdjax.memory import release_free_memory
    from sdjax.request import prepare

    enable_compilation_cache(job.cache_dir or "off")
    out: dict = {"framework": "sdjax", "device": jax.devices()[0].device_kind, "devices": jax.device_count()}
    shapes = sdjax.load_pipeline(job.model, dtype=job.dtype, weights=False)
    noise = latents(job)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))  # noqa: E731

    text_fn, text_inputs = text_program(shapes, job.batch)
    programs = {}  # compiled executables, each freed after its measurement
    out["text_compile_s"], programs["text"] = _compile(text_fn, text_params(shapes.params), *text_inputs)

    rows = 2 * job.batch
    context = sds((rows, text_inputs[0].shape[1], shapes.unet.config.context_dims()[0]), shapes.dtype)
    x = sds((rows, *noise.shape[1:]), shapes.dtype)
    t = jnp.full((rows,), 500.0, jnp.float32)
    added = added_conditioning(shapes, rows, job)  # SDXL's pooled embedding and time ids, else {}
    step_fn = xla_options.jit(lambda p, x, t, c, a: shapes.unet.apply({"params": p}, x, t, c, **a))
    out["unet_compile_s"], programs["unet"] = _compile(step_fn, shapes.params["unet"], x, t, context, added)
    cost = programs["unet"].cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out["unet_flops"] = float(cost.get("flops", 0.0)) if cost else 0.0
    control = None
    if job.controlnet:
        control = abstract_controlnet(job.controlnet, job.dtype)
        cond = sds((rows, job.height, job.width, 3), jnp.float32)
        control_fn = xla_options.jit(functools.partial(controlled_unet_step, shapes.unet, control.module))
        out["control_compile_s"], programs["control"] = _compile(
            control_fn, shapes.params["unet"], control.params, x, t, context, cond
        )

    z = sds(noise.shape, shapes.dtype)
    decode_fn = xla_options.jit(lambda p, z: shapes.vae.apply({"params": p}, z, method="decode"))
    out["vae_compile_s"], programs["vae"] = _compile(decode_fn, shapes.params["vae"], z)

    prompts = [PROMPT] * job.batch
    settings = dict(num_inference_steps=job.steps, guidance_scale=GUIDANCE, scheduler=job.scheduler)
    settings.update(height=job.height, width=job.width, latents=noise, mesh=None)
    if control is not None:
        settings.update(controlnet=control, control_image=control_image(job))
    plan, inputs = prepare(shapes, prompts, NEGATIVE, **settings)
    # the ControlNet's parameters are inputs of the program: shapes to compile, its weights to run
    inputs = place_inputs(dataclasses.replace(inputs, control_params=None), None)
    abstract_inputs = dataclasses.replace(inputs, control_params=(control.params,) if control else None)
    start = time.perf_counter()
    programs["image"] = compile_generate(shapes, plan, abstract_inputs, params=shapes.params)
    out["image_compile_s"] = time.perf_counter() - start
    del text_fn, step_fn, decode_fn
    jax.clear_caches()  # the tracing caches of the programs above; the executables stay valid
    release_free_memory()

    start = time.perf_counter()
    pipe = sdjax.load_pipeline(job.model, dtype=job.dtype)
    jax.block_until_ready(pipe.params)
    out["load_s"] = time.perf_counter() - start

    te, unet, vae = text_params(pipe.params), pipe.params["unet"], pipe.params["vae"]
    embedded = jax.block_until_ready(programs["text"](te, *text_inputs)).astype(pipe.dtype)
    out["text_s"] = _timed(lambda: jax.block_until_ready(programs["text"](te, *text_inputs)), job.inner)
    _free(programs, "text")
    x = jnp.asarray(np.concatenate([noise, noise]), pipe.dtype)
    added = jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), added)
    step = lambda: programs["unet"](unet, x, t, embedded, added).block_until_ready()  # noqa: E731
    out["unet_step_s"] = _timed(step, job.inner)
    _free(programs, "unet")
    if control is not None:
        net = sdjax.load_controlnet(job.controlnet, dtype=job.dtype)
        inputs = dataclasses.replace(inputs, control_params=(net.params,))
        cond = jnp.asarray(np.repeat(control_image(job)[None] / 255.0, 2 * job.batch, axis=0), jnp.float32)
        step = lambda: programs["control"](unet, net.params, x, t, embedded, cond)  # noqa: E731
        out["control_step_s"] = _timed(lambda: jax.block_until_ready(step()), job.inner)
        _free(programs, "control")
    z = jnp.asarray(noise / pipe.vae.config.scaling_factor, pipe.dtype)
    out["vae_decode_s"] = _timed(lambda: programs["vae"](vae, z).block_until_ready(), job.inner)
    _free(programs, "vae")

    start = time.perf_counter()
    images = np.asarray(jax.block_until_ready(programs["image"](pipe.params, inputs).images))
    out["image_s"] = time.perf_counter() - start
    out["images_per_s"] = job.batch / out["image_s"]
    np.save(job.image_out, images)
    _free(programs, "image")
    out["gemm_flops_per_s"] = gemm_rate(job.dtype)
    out["peak_rss"] = peak_rss()
    return out


def text_program(shapes, batch: int):
    """(jitted text encoding: (text params, *inputs) -> context (2B, L, D), its token inputs): the prompt and
    negative prompt of `batch` images through the text encoder, or SDXL's two (states side by side)."""
    import jax

    from sdjax import xla_options
    from sdjax.prompts import encode_prompt_windows, encode_sdxl_prompt_windows, tokenize_prompts

    prompts, negatives = [PROMPT] * batch, [NEGATIVE] * batch
    ids, weights = tokenize_prompts(shapes.tokenizer, prompts, negatives)
    if not shapes.is_sdxl:
        return xla_options.jit(lambda p, i, w: encode_prompt_windows(shapes.text_encoder, p, i, w)), (ids, weights)
    ids_2, weights_2 = tokenize_prompts(shapes.tokenizer_2, prompts, negatives)

    def encode(p, i, w, i2, w2):
        first, _ = encode_sdxl_prompt_windows(shapes.text_encoder, p["text_encoder"], i, w)
        second, _ = encode_sdxl_prompt_windows(shapes.text_encoder_2, p["text_encoder_2"], i2, w2)
        return jax.numpy.concatenate([first, second.astype(first.dtype)], axis=-1)

    return xla_options.jit(encode), (ids, weights, ids_2, weights_2)


def text_params(params: dict):
    """The text encoder parameters `text_program` takes: the encoder's, or SDXL's two."""
    if "text_encoder_2" in params:
        return {k: params[k] for k in ("text_encoder", "text_encoder_2")}
    return params["text_encoder"]


def added_conditioning(shapes, rows: int, job: Job) -> dict:
    """SDXL's added UNet inputs for `rows` rows (pooled text embedding, time ids of the image size), or {}."""
    import jax.numpy as jnp

    if not shapes.is_sdxl:
        return {}
    ids = jnp.asarray([[job.height, job.width, 0, 0, job.height, job.width]] * rows, jnp.float32)
    width = shapes.text_encoder_2.config.projection_dim
    return {"text_embeds_BD": jnp.zeros((rows, width), shapes.dtype), "time_ids_BN": ids}


def controlled_unet_step(unet, controlnet, unet_params, control_params, x, t, context, cond):
    """One UNet call with a ControlNet's residuals added (what a controlled sampler step costs)."""
    down, mid = controlnet.apply({"params": control_params}, x, t, context, cond)
    return unet.apply({"params": unet_params}, x, t, context, down_residuals=down, mid_residual=mid)


def abstract_controlnet(config, dtype: str):
    """A sdjax.ControlNet of `config` (a ControlNetConfig, or a ControlNet folder whose config.json to read)
    whose parameters are shapes: enough to compile its programs, no weights read."""
    import sdjax
    from sdjax.convert.diffusers_folder import params_as_shapes
    from sdjax.nn.config_utils import resolve_dtype
    from sdjax.nn.controlnet import ControlNetConfig, ControlNetModel

    if not isinstance(config, ControlNetConfig):
        return sdjax.load_controlnet(Path(config), dtype, weights=False)
    module = ControlNetModel(config, dtype=resolve_dtype(dtype))
    return sdjax.ControlNet(module, params_as_shapes(module, module.dtype))


def _free(programs: dict, name: str) -> None:
    """Drops a measured executable and hands the freed memory back (a user runs one program at a time)."""
    from sdjax.memory import release_free_memory

    del programs[name]
    release_free_memory()


def _compile(fn, *args):
    """(seconds, executable) of compiling jitted `fn` for `args`; freed compiler memory is handed back."""
    from sdjax.memory import release_free_memory

    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    seconds = time.perf_counter() - start
    release_free_memory()
    return seconds, compiled


def run_torch(job: Job) -> dict:
    import diffusers
    import torch
    from PIL import Image

    from sdjax.schedulers import SCHEDULERS

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[job.dtype]
    out: dict = {"framework": "pytorch", "device": "cpu", "threads": torch.get_num_threads()}
    start = time.perf_counter()
    sdxl = json.loads((Path(job.model) / "model_index.json").read_text())["_class_name"].startswith("StableDiffusionXL")
    extra, pipeline_class = dict(safety_checker=None, requires_safety_checker=False), diffusers.StableDiffusionPipeline
    if sdxl:
        extra, pipeline_class = dict(add_watermarker=False), diffusers.StableDiffusionXLPipeline
    if job.controlnet:
        extra["controlnet"] = diffusers.ControlNetModel.from_pretrained(job.controlnet, torch_dtype=torch_dtype)
        pipeline_class = diffusers.StableDiffusionControlNetPipeline
    pipe = pipeline_class.from_pretrained(job.model, torch_dtype=torch_dtype, **extra)
    family, options = SCHEDULERS[job.scheduler]
    pipe.scheduler = getattr(diffusers, family.diffusers_class).from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    out["load_s"] = time.perf_counter() - start
    noise = torch.from_numpy(latents(job).transpose(0, 3, 1, 2).copy())

    with torch.inference_mode():
        prompts, negatives = [PROMPT] * job.batch, [NEGATIVE] * job.batch
        if sdxl:
            encode = lambda: pipe.encode_prompt(prompts, None, "cpu", 1, True, negatives)  # noqa: E731
        else:
            encode = lambda: pipe.encode_prompt(prompts, "cpu", 1, True, negatives)  # noqa: E731
        out["text_s"] = _timed(encode, job.inner)
        encoded = encode()
        context = torch.cat([encoded[1], encoded[0]])
        x = torch.cat([noise, noise]).to(torch_dtype)
        rows = 2 * job.batch
        t = torch.full((rows,), 500.0)
        added = {}
        if sdxl:
            ids = torch.tensor([[job.height, job.width, 0, 0, job.height, job.width]] * rows, dtype=torch_dtype)
            pooled = torch.ones((rows, pipe.text_encoder_2.config.projection_dim), dtype=torch_dtype)
            added = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        step = lambda: pipe.unet(x, t, encoder_hidden_states=context, **added).sample  # noqa: E731
        out["unet_step_s"] = _timed(step, job.inner)
        if job.controlnet:
            cond = torch.from_numpy(control_image(job).transpose(2, 0, 1)[None] / 255.0).to(torch_dtype)
            cond = cond.repeat(2 * job.batch, 1, 1, 1)

            def controlled():
                down, mid = pipe.controlnet(x, t, context, cond, return_dict=False)
                residuals = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
                return pipe.unet(x, t, encoder_hidden_states=context, **residuals).sample

            out["control_step_s"] = _timed(controlled, job.inner)
        z = (noise / pipe.vae.config.scaling_factor).to(torch_dtype)
        out["vae_decode_s"] = _timed(lambda: pipe.vae.decode(z).sample, job.inner)
        start = time.perf_counter()
        condition = {"image": Image.fromarray(control_image(job))} if job.controlnet else {}
        result = pipe(
            **condition,
            prompt=prompts,
            negative_prompt=negatives,
            num_inference_steps=job.steps,
            guidance_scale=GUIDANCE,
            height=job.height,
            width=job.width,
            latents=noise.to(torch_dtype),
            output_type="np",
        )
        out["image_s"] = time.perf_counter() - start
    out["images_per_s"] = job.batch / out["image_s"]
    np.save(job.image_out, (np.asarray(result.images, np.float32) * 255).round().astype(np.uint8))
    out["peak_rss"] = peak_rss()
    return out


def main(framework: str, job_json: str) -> None:
    job = Job(**json.loads(job_json))
    result = run_jax(job) if framework == "jax" else run_torch(job)
    print("BENCH-RESULT " + json.dumps(result), flush=True)
