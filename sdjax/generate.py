"""The compiled text-to-image / img2img / inpainting program: text encoding, the whole denoising loop and
the VAE decode in one `jax.jit`; its compile-time `Plan` and traced `Inputs` (made from a request by
`sdjax.request.prepare`), compilation ahead of time, and placement on a mesh.

Static (one compile per value): the modules, the scheduler, batch size, micro-batch size, image size, the
number of 77-token prompt windows, `max_steps`, the mode, clip skip, and whether initial noise is given. Traced (no
recompile): prompts (token ids and emphasis weights), seeds, guidance scale, guidance rescale, step
count, strength, the init image and mask, and every parameter array.

Randomness: image k of a call draws everything (initial noise, VAE posterior samples, stochastic sampler
noise) from `jax.random.key(seeds[k])` alone, so it does not depend on the batch it is part of.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from sdjax.compile_cache import enable_default_cache
from sdjax.keys import normal_rows, seed_keys, split_rows
from sdjax.memory import release_free_memory
from sdjax.nn.lora import apply_adapters
from sdjax.nn.vae import decode_tiled, encode_sample
from sdjax.prompts import encode_prompt_windows, encode_sdxl_prompt_windows
from sdjax.schedulers import Scheduler, loop
from sdjax.sharding import BATCH_AXES, global_batch, local_rows, shard_params
from sdjax.xla_options import compiler_options

MODES = ("txt2img", "img2img", "inpaint")


class Drawn(NamedTuple):
    """What a generation program returns: the images and, per image, whether its pixels were finite."""

    images: jax.Array  # uint8 (B, H, W, 3)
    finite: jax.Array  # bool (B,)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The compile-time shape of a generation call. `batch` is the global number of rows (all processes)."""

    scheduler: Scheduler
    batch: int
    height: int  # pixels
    width: int
    windows: int  # 77-token prompt windows
    max_steps: int
    mode: str = "txt2img"
    clip_skip: int | None = None
    noise_given: bool = False
    micro_batch: int = 1  # images per UNet call; 1 makes every image independent of the batch, bit for bit
    vae_tiling: bool = False  # decode in overlapping tiles (diffusers' enable_tiling): bounded memory
    mesh: Mesh | None = None  # the batch is split over its ("data", "fsdp") devices; None: one device
    on_step: Callable[[int, int], None] | None = None  # host progress callback (calls done, total)
    controlnets: tuple = ()  # ControlNetModel modules (their parameters and inputs are traced)
    guess_mode: bool = False  # diffusers' guess_mode (ControlNet on the conditional half only)
    output: str = "image"  # or "latent": the latents where sampling stopped, not decoded
    texts: int = 1  # texts per [negative, positive] row (A1111 prompt editing): above 1, each call picks one
    guided: bool = True  # classifier-free guidance (guidance_scale > 1); False: the conditional half only

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The traced inputs of one call (a pytree).

    ids, weights: (B, 2, T, windows*77) token ids / emphasis weights of each image's [negative, positive]
      texts: T = `plan.texts` of them per row, the distinct texts prompt editing gives the row over the
      steps (`sdjax.prompt_editing`; T = 1 without edits).
    text_steps: int32 (B, 2, max_steps): which of the T texts each sampler step uses (T > 1), else None.
    seeds: uint32 (B,), one per image.
    valid: bool (B,): rows to draw; the others are padding (their images are left 0, at no cost when a
      whole group of `plan.micro_batch` rows is padding).
    guidance, guidance_rescale, strength: f32[]; num_steps: i32[].
    noise: (B, h, w, C) standard normal initial latents (used when `plan.noise_given`), else None.
    image: (B, H, W, 3) init image in [-1, 1] (img2img, inpaint), else None.
    mask: (B, H, W, 1) 0/1, 1 = repaint (inpaint), else None.
    adapters, adapter_scales: unmerged LoRAs (`sdjax.nn.lora` adapter pytrees) and their scales
      {"unet": (n,), "text_encoder": (n,)}, applied inside the program (another LoRA of the same shapes or
      another scale does not recompile), else None.
    ids_2, weights_2: SDXL: (B, 2, T, windows*77) the second tokenizer's, else None.
    time_ids: SDXL: float32 (B, 2, N) each image's [negative, positive] micro-conditioning, else None.
    zero_negative: SDXL: bool[], True for zero unconditional embeddings (no negative prompt, on a model
      with `force_zeros_for_empty_prompt`), else None.
    image_latents: (B, h, w, C) the init image given as latents (img2img), else None.
    start_cutoff, end_cutoff: i32[] diffusers' discrete timestep cutoffs of denoising_start (-1: none,
      start from `strength`) and denoising_end (0: run to the end).
    control_image: (B, n, H, W, 3) condition images in [0, 1], one per ControlNet of `plan.controlnets`;
    control_params: their parameters (a tuple); control_scale, control_start, control_end: f32 (n,)
      conditioning scales and the fractions of the model calls where each acts ([start, end)); else None.
    """

    ids: jax.Array
    weights: jax.Array
    seeds: jax.Array
    guidance: jax.Array
    guidance_rescale: jax.Array
    num_steps: jax.Array
    strength: jax.Array
    valid: jax.Array
    noise: jax.Array | None = None
    image: jax.Array | None = None
    mask: jax.Array | None = None
    adapters: tuple | None = None
    adapter_scales: dict[str, jax.Array] | None = None
    control_image: jax.Array | None = None
    control_params: tuple | None = None
    control_scale: jax.Array | None = None
    control_start: jax.Array | None = None
    control_end: jax.Array | None = None
    ids_2: jax.Array | None = None
    weights_2: jax.Array | None = None
    time_ids: jax.Array | None = None
    zero_negative: jax.Array | None = None
    image_latents: jax.Array | None = None
    start_cutoff: jax.Array | None = None
    end_cutoff: jax.Array | None = None
    text_steps: jax.Array | None = None


jax.tree_util.register_dataclass(
    Inputs,
    data_fields=[f.name for f in dataclasses.fields(Inputs)],
    meta_fields=[],
)
_PER_IMAGE = (
    "ids",
    "weights",
    "seeds",
    "valid",
    "noise",
    "image",
    "mask",
    "control_image",
    "ids_2",
    "weights_2",
    "time_ids",
    "image_latents",
    "text_steps",
)
_SHARED = (
    "guidance",
    "guidance_rescale",
    "num_steps",
    "strength",
    "control_scale",
    "control_start",
    "control_end",
    "zero_negative",
    "start_cutoff",
    "end_cutoff",
)


def rescale_guidance(cfg_BHWC, text_BHWC, rescale):
    """diffusers' `rescale_noise_cfg` (Lin et al. 2023, section 3.4): blend the guided prediction with a
    copy rescaled to the conditional prediction's per-sample standard deviation (unbiased std)."""
    axes = tuple(range(1, cfg_BHWC.ndim))
    std_text = jnp.std(text_BHWC, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(cfg_BHWC, axis=axes, keepdims=True, ddof=1)
    return rescale * (cfg_BHWC * (std_text / std_cfg)) + (1 - rescale) * cfg_BHWC


def _control_residuals(control, x_2BHWC, t, context_2BLD, call, guided: bool = True):
    """The summed down and mid residuals of every ControlNet for the [uncond; cond] UNet call (the
    conditional rows alone when not `guided`), as diffusers' ControlNet pipelines: each scaled by its
    conditioning scale while this call's fraction of the run lies in its [start, end] (diffusers'
    controlnet_keep); in guess mode with guidance computed on the conditional half only and zero for the
    unconditional one."""
    modules, params, images_BnHWC, scales, starts, ends, guess_mode = control
    guess_mode = guess_mode and guided
    k, calls = call
    calls = jnp.maximum(calls, 1).astype(jnp.float32)
    first, last = k.astype(jnp.float32) / calls, (k + 1).astype(jnp.float32) / calls
    batch = x_2BHWC.shape[0] // 2
    down_sum, mid_sum = None, None
    for c, module in enumerate(modules):
        keep = jnp.where((first < starts[c]) | (last > ends[c]), 0.0, 1.0)
        scale = scales[c] * keep
        image = images_BnHWC[:, c].astype(module.dtype)
        if guess_mode:
            x_in, context, cond = x_2BHWC[batch:], context_2BLD[batch:], image
        elif not guided:
            x_in, context, cond = x_2BHWC, context_2BLD, image
        else:
            x_in, context, cond = x_2BHWC, context_2BLD, jnp.concatenate([image, image], axis=0)
        down, mid = module.apply({"params": params[c]}, x_in, t, context, cond, scale, guess_mode)
        if guess_mode:
            down = tuple(jnp.concatenate([jnp.zeros_like(r), r], axis=0) for r in down)
            mid = jnp.concatenate([jnp.zeros_like(mid), mid], axis=0)
        down_sum = down if down_sum is None else tuple(a + b for a, b in zip(down_sum, down, strict=True))
        mid_sum = mid if mid_sum is None else mid_sum + mid
    return down_sum, mid_sum


def _pick_texts(texts, added, call):
    """(context (2B, L, D), added) of this model call from the stacks of prompt editing: `texts` is
    (context (2B, T, L, D), pooled (2B, T, P) or None, text_steps (2B, max_steps), scheduler order); the
    call's sampler step is its index among the run's calls // order."""
    context_2BTLD, pooled_2BTP, steps_2BK, order = texts
    step = jnp.minimum(call[0] // order, steps_2BK.shape[1] - 1)
    chosen = jax.lax.dynamic_index_in_dim(steps_2BK, step, axis=1, keepdims=False)  # (2B,)

    def pick(stack):
        index = chosen.reshape(-1, *[1] * (stack.ndim - 1))
        return jnp.take_along_axis(stack, index, axis=1)[:, 0]

    if pooled_2BTP is not None:
        added = {**added, "text_embeds_BD": pick(pooled_2BTP)}
    return pick(context_2BTLD), added


def _guided_model(unet, unet_params, context_2BLD, extra_2BHWC, control=None, added=None, texts=None, guided=True):
    """model_fn for the loop: one UNet call on [uncond; cond] (with the residuals of `control`'s ControlNets,
    see `_control_residuals`, and SDXL's `added` text embeddings and time ids), then classifier-free
    guidance. With `texts` (prompt editing, see `_pick_texts`) each call takes its own context.

    Not `guided` (a request with guidance <= 1): the rows, context and inputs are the conditional ones
    alone and the UNet's prediction is the result, as diffusers (which then skips the unconditional half).
    Guided with a traced guidance <= 1, the result is the conditional prediction too; with
    guidance_rescale == 0 it is plain CFG, bit for bit.
    """

    def model_fn(x_BHWC, t, guidance, rescale, call=None):
        context, extra_inputs = context_2BLD, added or {}
        if texts is not None:
            context, extra_inputs = _pick_texts(texts, extra_inputs, call)
        x2 = jnp.concatenate([x_BHWC, x_BHWC], axis=0) if guided else x_BHWC
        residuals = {}
        if control is not None:
            down, mid = _control_residuals(control, x2, t, context, call, guided)
            residuals = {"down_residuals": down, "mid_residual": mid}
        if extra_2BHWC is not None:
            x2 = jnp.concatenate([x2, extra_2BHWC.astype(x2.dtype)], axis=-1)
        out = unet.apply({"params": unet_params}, x2, t, context, **residuals, **extra_inputs)
        if not guided:
            return out
        uncond, text = jnp.split(out, 2, axis=0)
        cfg = uncond + guidance.astype(out.dtype) * (text - uncond)
        cfg = jnp.where(rescale > 0, rescale_guidance(cfg, text, rescale.astype(out.dtype)), cfg)
        return jnp.where(guidance > 1, cfg, text)

    return model_fn


def _decode(vae, vae_params, latents_BHWC, scaling_factor, tiled: bool = False, upcast: bool = False):
    """Latents -> (uint8 images (B, H, W, 3), whether each image's decoded pixels are all finite (B,)); a
    float16 VAE that overflows on an image re-decodes that image in float32, and with `upcast` (SDXL's
    pipelines, for a VAE whose config says `force_upcast`) a float16 VAE decodes in float32 from the start.
    `tiled` decodes in overlapping tiles as diffusers' `enable_tiling` (`sdjax.nn.vae.decode_tiled`).

    The images are decoded one at a time (`lax.map`, diffusers' `enable_slicing`): only one image's
    activations are ever live, and a TPU decodes four 512x512 images faster one by one than as one batch
    (README, "Accelerators: TPU and GPU")."""

    def decode(params, module, z_1hwc):
        z = (z_1hwc / scaling_factor).astype(module.dtype)
        if tiled:
            return decode_tiled(module, params, z).astype(jnp.float32)
        return module.apply({"params": params}, z, method="decode").astype(jnp.float32)

    if vae.dtype == jnp.float16:
        vae32 = vae.clone(dtype=jnp.float32)
        params32 = jax.tree.map(lambda p: p.astype(jnp.float32), vae_params)

    def decode_image(z_1hwc):
        if vae.dtype != jnp.float16:
            return decode(vae_params, vae, z_1hwc)
        if upcast:
            return decode(params32, vae32, z_1hwc)
        image = decode(vae_params, vae, z_1hwc)
        return jax.lax.cond(jnp.all(jnp.isfinite(image)), lambda: image, lambda: decode(params32, vae32, z_1hwc))

    if latents_BHWC.shape[0] == 1:
        image = decode_image(latents_BHWC)
    else:
        image = jax.lax.map(decode_image, latents_BHWC[:, None])[:, 0]
    finite = jnp.all(jnp.isfinite(image), axis=(1, 2, 3))
    return jnp.round(jnp.clip(image / 2 + 0.5, 0.0, 1.0) * 255).astype(jnp.uint8), finite


def _run(params: dict[str, Any], inputs: Inputs, *, unet, vae, text_encoder, plan: Plan, text_encoder_2=None) -> Drawn:
    """One generation call -> Drawn(uint8 images (B, H, W, 3), finite (B,)). See the module docstring for
    what is traced.

    With a mesh, the rows are split over its devices (`shard_map`); every device runs the same per-device
    program as a single device would, on its own rows, with the parameters gathered whole (FSDP-sharded
    parameters are all-gathered on entry). An image is therefore bit-identical on 1 device and on N.
    """
    if inputs.adapters:
        params = apply_adapters(params, inputs.adapters, inputs.adapter_scales)
    if plan.controlnets:
        params = {**params, "controlnets": inputs.control_params}
    per_image = {k: getattr(inputs, k) for k in _PER_IMAGE if getattr(inputs, k) is not None}
    shared = {k: getattr(inputs, k) for k in _SHARED}
    encoders = (text_encoder, text_encoder_2)
    draw = functools.partial(_draw_rows, unet=unet, vae=vae, text_encoders=encoders, plan=plan)
    if plan.mesh is None:
        return draw(params, per_image, shared)
    batch = PartitionSpec(BATCH_AXES)
    # No collectives inside: each device draws its own rows (check_vma off: the skipped-group branch returns
    # a constant, which the varying-axes check would reject).
    per_device = jax.shard_map(
        draw,
        mesh=plan.mesh,
        in_specs=(PartitionSpec(), batch, PartitionSpec()),
        out_specs=Drawn(batch, batch),
        check_vma=False,
    )
    return per_device(params, per_image, shared)


@functools.cache
def program(backend: str | None = None):
    """`_run` jitted for a backend (default: JAX's default) with its compiler options
    (`sdjax.xla_options`); static: unet, vae, text_encoder, plan, text_encoder_2 (SDXL's, else None)."""
    options = compiler_options(backend)
    static = ("unet", "vae", "text_encoder", "plan", "text_encoder_2")
    return jax.jit(_run, static_argnames=static, compiler_options=options)


def _draw_rows(
    params, per_image: dict[str, jax.Array], shared: dict[str, jax.Array], *, unet, vae, text_encoders, plan
):
    """The rows of one device -> Drawn(uint8 (rows, H, W, 3), finite (rows,)), in groups of
    `plan.micro_batch` images.

    The last group is padded with copies of the last row: every compiled operation sees the same shapes
    whatever the number of rows, so an image is bit-identical in any batch (XLA:CPU reductions round
    differently for different batch sizes), and memory stays that of one group. A group without a valid
    row is skipped (`lax.cond`); invalid rows of a drawn group are returned as 0.
    """
    m = plan.micro_batch
    rows = per_image["seeds"].shape[0]
    groups = -(-rows // m)

    def padded(x):
        pad = groups * m - x.shape[0]
        return jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)]) if pad else x

    per_image = jax.tree.map(padded, per_image)
    shape, dtype = _output_row(plan, unet, vae)
    blank = Drawn(jnp.zeros((m, *shape), dtype), jnp.ones((m,), bool))

    def one_group(g, out: Drawn) -> Drawn:
        group = jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, g * m, m), per_image)

        def draw():
            images, finite = _generate_group(
                params, group, shared, unet=unet, vae=vae, text_encoders=text_encoders, plan=plan
            )
            valid = group["valid"]
            return Drawn(jnp.where(valid[:, None, None, None], images, 0), finite | ~valid)

        drawn = jax.lax.cond(jnp.any(group["valid"]), draw, lambda: blank)
        return jax.tree.map(lambda all_, new: jax.lax.dynamic_update_slice_in_dim(all_, new, g * m, axis=0), out, drawn)

    out = Drawn(jnp.zeros((groups * m, *shape), dtype), jnp.ones((groups * m,), bool))
    out = jax.lax.fori_loop(0, groups, one_group, out)
    return Drawn(out.images[:rows], out.finite[:rows])


def _output_row(plan: Plan, unet, vae) -> tuple[tuple[int, ...], Any]:
    """(shape, dtype) of one output row: a uint8 (H, W, 3) image, or float32 (h, w, C) latents."""
    if plan.output == "latent":
        factor = vae.config.downscale
        return (plan.height // factor, plan.width // factor, unet.config.out_channels), jnp.float32
    return (plan.height, plan.width, 3), jnp.uint8


def _generate_group(
    params, group: dict[str, jax.Array], shared: dict[str, jax.Array], *, unet, vae, text_encoders, plan
):
    """Text encoding, the denoising loop and the decode for one group of images -> (uint8 (m, H, W, 3),
    finite (m,)).

    `group` holds the per-image inputs of the group (ids, weights, seeds, noise, image, mask; leading axis
    m); `shared` the scalars (guidance, guidance_rescale, num_steps, strength).
    """
    sf = vae.config.scaling_factor
    factor = vae.config.downscale
    latent_shape = (plan.height // factor, plan.width // factor, unet.config.out_channels)
    # per image: the initial-noise key, the sampler key, the VAE key, all from that image's seed only
    noise_keys, sampler_keys, vae_keys = split_rows(seed_keys(group["seeds"]), 3)
    dtype = unet.dtype

    halves = (0, 1) if plan.guided else (1,)  # [negative, positive] rows, or the positive alone
    if text_encoders[1] is None:
        text_encoder, te = text_encoders[0], params["text_encoder"]
        ids, weights = group["ids"], group["weights"]
        skips = (None, plan.clip_skip)  # diffusers applies clip_skip to the prompt only
        encoded = [
            _per_text(encode_prompt_windows, text_encoder, te, ids[:, h], weights[:, h], clip_skip=skips[h])
            for h in halves
        ]
        context = jnp.concatenate(encoded, axis=0).astype(dtype)
        added = {}
    else:
        context, added = _sdxl_conditioning(params, group, shared, text_encoders, plan.clip_skip, dtype, halves)
    texts = None
    if plan.texts > 1:  # every call picks its row's text of its step
        steps = jnp.concatenate([group["text_steps"][:, h] for h in halves], axis=0)
        texts = (context, added.pop("text_embeds_BD", None), steps, plan.scheduler.order)
        context = None
    else:
        context = context[:, 0]
        if "text_embeds_BD" in added:
            added["text_embeds_BD"] = added["text_embeds_BD"][:, 0]

    noise = group["noise"] if plan.noise_given else normal_rows(noise_keys, latent_shape)
    noise = noise.astype(jnp.float32)
    num_steps = shared["num_steps"]
    scheduler = plan.scheduler

    extra = None
    post_step = None
    init_sample = None
    start_step = jnp.zeros((), jnp.int32)
    # the whole schedule's state: where diffusers' denoising_start / denoising_end cutoffs fall in it
    whole = scheduler.init(num_steps, noise.shape, max_steps=plan.max_steps)
    end_cutoff = shared.get("end_cutoff")
    end_call = None if end_cutoff is None else loop.calls_from(whole, end_cutoff)
    if plan.mode != "txt2img":
        image_keys, masked_keys = split_rows(vae_keys, 2)
        if "image_latents" in group:  # given as latents (e.g. another model's output_type="latent")
            image_latents = group["image_latents"].astype(jnp.float32)
        else:
            image = group["image"].astype(vae.dtype)
            image_latents = encode_sample(vae, params["vae"], image, image_keys) * sf
        # diffusers' denoising_start: from the first timestep below the cutoff, the image as it is
        start_step = loop.img2img_start_step(num_steps, shared["strength"])
        handed_over = False
        if shared.get("start_cutoff") is not None:
            handed_over = shared["start_cutoff"] >= 0
            below = loop.start_step_below(scheduler, whole, shared["start_cutoff"])
            start_step = jnp.where(handed_over, below, start_step)
        state0 = scheduler.init(num_steps, noise.shape, max_steps=plan.max_steps, start_step=start_step)
        noised = jnp.where(handed_over, image_latents, scheduler.add_noise(state0, image_latents, noise))
        init_sample = noised
        if plan.mode == "inpaint":
            # diffusers' StableDiffusionInpaintPipeline: strength 1 starts from pure noise.
            full = shared["strength"] >= 1.0
            init_sample = jnp.where(full, noise * scheduler.init_noise_sigma(state0), noised)
            mask = group["mask"].astype(jnp.float32)
            mask_lat = mask[:, ::factor, ::factor, :]  # nearest-neighbour downsampling, as F.interpolate
            if unet.config.in_channels == 2 * latent_shape[-1] + 1:
                masked = group["image"] * (mask < 0.5)
                masked_latents = encode_sample(vae, params["vae"], masked.astype(vae.dtype), masked_keys) * sf
                extra = jnp.concatenate([mask_lat, masked_latents], axis=-1)
                extra = jnp.concatenate([extra, extra], axis=0) if plan.guided else extra
            else:

                def post_step(x, state):
                    # Regular UNets: keep the unmasked region on the image's own noisy trajectory.
                    last = state.index >= state.num_calls
                    proper = jnp.where(last, image_latents, scheduler.add_noise(state, image_latents, noise))
                    return (1 - mask_lat) * proper + mask_lat * x

    control = None
    if plan.controlnets:
        control = (
            plan.controlnets,
            params["controlnets"],
            group["control_image"],
            shared["control_scale"],
            shared["control_start"],
            shared["control_end"],
            plan.guess_mode,
        )
    model_fn = _guided_model(unet, params["unet"], context, extra, control, added, texts, plan.guided)
    latents = loop.sample(
        scheduler,
        model_fn,
        noise,
        sampler_keys,
        num_steps,
        (shared["guidance"], shared["guidance_rescale"]),
        max_steps=plan.max_steps,
        start_step=start_step,
        init_sample=init_sample,
        post_step=post_step,
        on_call=plan.on_step,
        model_dtype=dtype,
        pass_call=bool(plan.controlnets) or texts is not None,
        end_call=end_call,
    )
    if plan.output == "latent":
        return latents.astype(jnp.float32), jnp.all(jnp.isfinite(latents), axis=(1, 2, 3))
    upcast = text_encoders[1] is not None and vae.config.force_upcast
    return _decode(vae, params["vae"], latents, sf, tiled=plan.vae_tiling, upcast=upcast)


def _per_text(encode, module, params, ids_mTL, weights_mTL, **kwargs):
    """`encode` (a prompt-window encoder) of every text of a (m, T, L) stack, the results (m, T, ...)."""
    m, t = ids_mTL.shape[:2]
    flat = lambda x: x.reshape(m * t, *x.shape[2:])  # noqa: E731
    out = encode(module, params, flat(ids_mTL), flat(weights_mTL), **kwargs)
    return jax.tree.map(lambda x: x.reshape(m, t, *x.shape[1:]), out)


def _sdxl_conditioning(params, group, shared, text_encoders, clip_skip, dtype, halves=(0, 1)):
    """SDXL's UNet inputs for [negative; positive] rows (2m; with `halves` (1,) the positive m alone), per
    text of the stack (T): the context (2m, T, W*77, D1 + D2), both encoders' states side by side (a
    refiner's: the second encoder's alone), and {"text_embeds_BD": the second encoder's pooled projection
    (2m, T, P), "time_ids_BN": (2m, N)}. The negative half is zeros when `shared["zero_negative"]`, as
    diffusers."""
    if text_encoders[0] is None:  # a refiner: the second encoder alone, on the "ids" rows
        encoders = ((text_encoders[1], "text_encoder_2", ""),)
    else:
        encoders = ((text_encoders[0], "text_encoder", ""), (text_encoders[1], "text_encoder_2", "_2"))
    encoded = []
    for half in halves:
        states, pooled = [], None
        for encoder, name, suffix in encoders:
            ids, weights = group["ids" + suffix][:, half], group["weights" + suffix][:, half]
            skip = clip_skip if half else None
            z, pooled = _per_text(encode_sdxl_prompt_windows, encoder, params[name], ids, weights, clip_skip=skip)
            states.append(z.astype(jnp.float32))
        context, pooled = jnp.concatenate(states, axis=-1), pooled.astype(jnp.float32)
        if half == 0:  # zero unconditional embeddings (force_zeros_for_empty_prompt)
            context, pooled = (jnp.where(shared["zero_negative"], jnp.zeros_like(x), x) for x in (context, pooled))
        encoded.append((context, pooled))
    time_ids = group["time_ids"]
    context = jnp.concatenate([c for c, _ in encoded], axis=0).astype(dtype)
    added = {
        "text_embeds_BD": jnp.concatenate([p for _, p in encoded], axis=0).astype(dtype),
        "time_ids_BN": jnp.concatenate([time_ids[:, h] for h in halves], axis=0),
    }
    return context, added


def place_inputs(inputs: Inputs, mesh: Mesh | None) -> Inputs:
    """Host inputs -> device arrays: per-image rows as global arrays split over the mesh's batch axes (this
    process's rows at its place in the global batch), scalars as they are. Shapes (`jax.ShapeDtypeStruct`:
    the parameters of a ControlNet loaded with `weights=False`) stay shapes, to compile against."""
    if mesh is None:
        return jax.tree.map(lambda a: a if isinstance(a, jax.ShapeDtypeStruct) else jnp.asarray(a), inputs)
    fields = {k: getattr(inputs, k) for k in _PER_IMAGE if getattr(inputs, k) is not None}
    return dataclasses.replace(inputs, **global_batch(fields, mesh))


def place_params(params, mesh: Mesh | None):
    """Parameters on the mesh by `sdjax.sharding`'s rules (replicated, FSDP-split when the mesh has an fsdp
    axis); arrays already placed so are not copied again."""
    return params if mesh is None else shard_params(params, mesh)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """A generation program compiled ahead of time for one plan: call it with (params, placed inputs)."""

    plan: Plan
    executable: Any

    def __call__(self, params, inputs: Inputs) -> Drawn:
        return self.executable(params, inputs)


def modules(pipe) -> dict[str, Any]:
    """The program's static module arguments of a pipeline: unet, vae, text_encoder, text_encoder_2."""
    return dict(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2)


def compile_generate(pipe, plan: Plan, inputs: Inputs, on_step=None, params=None) -> Compiled:
    """Compiles the program for `plan` now (so that compile time can be reported apart from sampling time).
    `inputs` are placed ones (`place_inputs`); `params` default to the pipeline's."""
    plan = dataclasses.replace(plan, on_step=on_step)
    params = pipe.params if params is None else params
    lowered = program().lower(params, inputs, plan=plan, **modules(pipe))
    compiled = Compiled(dataclasses.replace(plan, on_step=None), lowered.compile())
    release_free_memory()  # the compiler's freed memory (see sdjax.memory)
    return compiled


def draw_images(pipe, plan: Plan, inputs: Inputs) -> np.ndarray:
    """Runs the program for (plan, host inputs from `sdjax.request.prepare`) -> this process's drawn
    images, uint8 (rows, H, W, 3) numpy, padding rows dropped."""
    enable_default_cache()
    drawn = int(inputs.valid.sum())
    params = place_params(pipe.params, plan.mesh)
    placed = place_inputs(inputs, plan.mesh)
    out = program()(params, placed, plan=plan, **modules(pipe))
    images, finite = jax.device_get(out) if plan.mesh is None else jax.tree.map(local_rows, out)
    release_free_memory()  # what a first call's compile freed (see sdjax.memory)
    check_finite(finite[:drawn])
    return images[:drawn]


class NonFiniteImageError(ValueError):
    """Generated images whose pixels came out NaN or infinite (they would be saved as black)."""


def check_finite(finite) -> None:
    """Raises NonFiniteImageError naming the images (0-based rows) whose `finite` flag is False."""
    bad = [int(i) for i in np.flatnonzero(~np.asarray(finite, bool))]
    if bad:
        raise NonFiniteImageError(
            f"image(s) {', '.join(map(str, bad))} came out NaN/Inf (not saved as black): the weights hold "
            "non-finite values, or a float16 model overflowed: try --dtype float32 or bfloat16"
        )
