"""One measurement process per framework: the same model folder, prompt and initial latents through sdjax and
through diffusers (PyTorch). Each worker prints one JSON object (seconds, bytes, FLOPs) and saves its image.

Times are wall-clock seconds of one call after a warm-up call (`inner` calls: their median); JAX results
are waited for with `block_until_ready`. Peak RSS is the process's VmHWM.
"""

from __future__ import annotations

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


def peak_rss() -> int:
    """Bytes: the high-water mark of this process's resident set (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def latents(job: Job) -> np.ndarray:
    """The shared initial noise, NHWC float32 (B, H/8, W/8, 4)."""
    rng = np.random.default_rng(1234)
    return rng.standard_normal((job.batch, job.height // 8, job.width // 8, 4)).astype(np.float32)


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
    """FLOP/s of an n x n x n matrix multiply in `dtype` through XLA on the default device."""
    import jax.numpy as jnp

    from sdjax import xla_options

    a = jnp.ones((n, n), dtype)
    f = xla_options.jit(lambda a, b: a @ b)
    f(a, a).block_until_ready()
    seconds = _timed(lambda: f(a, a).block_until_ready(), 5)
    return 2 * n**3 / seconds


def run_jax(job: Job) -> dict:
    import jax
    import jax.numpy as jnp

    import sdjax
    from sdjax import xla_options
    from sdjax.compile_cache import enable_compilation_cache
    from sdjax.generate import compile_generate, place_inputs, prepare
    from sdjax.prompts import encode_prompt_windows, tokenize_prompts

    enable_compilation_cache(job.cache_dir or "off")
    out: dict = {"framework": "sdjax", "device": jax.devices()[0].device_kind, "devices": jax.device_count()}
    start = time.perf_counter()
    pipe = sdjax.load_pipeline(job.model, dtype=job.dtype)
    jax.block_until_ready(pipe.params)
    out["load_s"] = time.perf_counter() - start
    noise = latents(job)

    ids, weights = tokenize_prompts(pipe.tokenizer, [PROMPT] * job.batch, [NEGATIVE] * job.batch)
    text = xla_options.jit(lambda p, i, w: encode_prompt_windows(pipe.text_encoder, p, i, w))
    context = _component(out, "text", text, (pipe.params["text_encoder"], ids, weights), job.inner)

    x = jnp.asarray(np.concatenate([noise, noise]), pipe.dtype)
    t = jnp.full((2 * job.batch,), 500.0, jnp.float32)
    step = xla_options.jit(lambda p, x, t, c: pipe.unet.apply({"params": p}, x, t, c))
    args = (pipe.params["unet"], x, t, context.astype(pipe.dtype))
    _component(out, "unet", step, args, job.inner, timed_key="unet_step_s", flops_key="unet_flops")

    z = jnp.asarray(noise / pipe.vae.config.scaling_factor, pipe.dtype)
    decode = xla_options.jit(lambda p, z: pipe.vae.apply({"params": p}, z, method="decode"))
    _component(out, "vae", decode, (pipe.params["vae"], z), job.inner, timed_key="vae_decode_s")

    plan, inputs = prepare(
        pipe,
        [PROMPT] * job.batch,
        NEGATIVE,
        num_inference_steps=job.steps,
        guidance_scale=GUIDANCE,
        scheduler=job.scheduler,
        height=job.height,
        width=job.width,
        latents=noise,
        mesh=None,
    )
    inputs = place_inputs(inputs, None)
    start = time.perf_counter()
    program = compile_generate(pipe, plan, inputs)
    out["image_compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
    images = np.asarray(jax.block_until_ready(program(pipe.params, inputs)))
    out["image_s"] = time.perf_counter() - start
    out["images_per_s"] = job.batch / out["image_s"]
    np.save(job.image_out, images)
    out["gemm_flops_per_s"] = gemm_rate(job.dtype)
    out["peak_rss"] = peak_rss()
    return out


def _component(out: dict, name: str, fn, args, inner: int, timed_key=None, flops_key=None):
    """Compiles jitted `fn` for `args` (out[name_compile_s]), times it (out[timed_key or name_s]), records its
    FLOPs (XLA cost analysis) under `flops_key`; returns one output. The program is freed before the next
    phase (a user runs one generation program, not four) and so is the heap memory it left."""
    import jax

    from sdjax.memory import release_free_memory

    def measure():  # the executable lives only in here
        out[f"{name}_compile_s"], compiled = _compile(fn, *args)
        if flops_key:
            cost = compiled.cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            out[flops_key] = float(cost.get("flops", 0.0)) if cost else 0.0
        out[timed_key or f"{name}_s"] = _timed(lambda: compiled(*args).block_until_ready(), inner)
        return jax.block_until_ready(compiled(*args))  # done before the next phase starts

    result = measure()
    release_free_memory()
    return result


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

    from sdjax.schedulers import SCHEDULERS

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[job.dtype]
    out: dict = {"framework": "pytorch", "device": "cpu", "threads": torch.get_num_threads()}
    start = time.perf_counter()
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        job.model, torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
    )
    family, options = SCHEDULERS[job.scheduler]
    pipe.scheduler = getattr(diffusers, family.diffusers_class).from_config(pipe.scheduler.config, **options)
    pipe.set_progress_bar_config(disable=True)
    out["load_s"] = time.perf_counter() - start
    noise = torch.from_numpy(latents(job).transpose(0, 3, 1, 2).copy())

    with torch.inference_mode():
        prompts, negatives = [PROMPT] * job.batch, [NEGATIVE] * job.batch
        encode = lambda: pipe.encode_prompt(prompts, "cpu", 1, True, negatives)  # noqa: E731
        out["text_s"] = _timed(encode, job.inner)
        positive, negative = encode()
        context = torch.cat([negative, positive])
        x = torch.cat([noise, noise]).to(torch_dtype)
        t = torch.full((2 * job.batch,), 500.0)
        out["unet_step_s"] = _timed(lambda: pipe.unet(x, t, encoder_hidden_states=context).sample, job.inner)
        z = (noise / pipe.vae.config.scaling_factor).to(torch_dtype)
        out["vae_decode_s"] = _timed(lambda: pipe.vae.decode(z).sample, job.inner)
        start = time.perf_counter()
        result = pipe(
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
