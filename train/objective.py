"""Training losses: the diffusion (noise-prediction) loss of the UNet and the VAE's reconstruction + KL loss.

A micro-batch is a dict of per-row arrays (leading axis b): "ids" (b, 77) token ids (SDXL: also "ids_2" of
the second tokenizer and "time_ids" (b, 6)), or with cache_text_embeddings their encodings "context"
(b, 77, D) (SDXL: and "text_embeds" (b, P)), "pixels" (b, R, R, 3)
in [-1, 1] or "moments" (b, h, w, 2C) cached VAE posteriors, "control" (b, R, R, 3) condition images in
[0, 1] (mode controlnet), "row" int32 (b,) a row id unique within the
run (it keys the row's randomness), "weight" float32 (b,) the row's loss weight (1 for instance images,
prior_loss_weight for DreamBooth class images, 0 for padding) and "count" (b,) 1 for the rows the loss is
averaged over (instance images). Losses come back as (sum of weight * row loss, sum of count), so that
micro-batches and devices add up to the exact mean over the whole update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sdjax.keys import keys_for_rows, normal_rows, split_rows
from sdjax.nn.vae import encode_sample, posterior_sample
from sdjax.schedulers import add_noise, alphas_cumprod, velocity


def latents_of(setup, params, batch, keys_B) -> jax.Array:
    """Scaled VAE posterior samples (b, h, w, C) float32 of the micro-batch's images (or cached moments)."""
    if "moments" in batch:
        mean, logvar = jnp.split(batch["moments"], 2, axis=-1)
        z = posterior_sample(mean, logvar, normal_rows(keys_B, mean.shape[1:]))
    else:
        z = encode_sample(setup.vae, params["vae"], batch["pixels"], keys_B)
    return jax.lax.stop_gradient(z * setup.scaling_factor)


def encode_text(setup, params, ids, ids_2=None) -> tuple[jax.Array, jax.Array | None]:
    """(context (b, 77, D), pooled (b, P) or None) of token ids (b, 77) in the text encoders' compute dtype:
    the text encoder's last hidden state; for SDXL, as diffusers' train_text_to_image_sdxl.py, both
    encoders' penultimate hidden states side by side (the second's ids `ids_2`), and the second's projected
    pooled output."""
    if setup.text_encoder_2 is None:
        return setup.text_encoder.apply({"params": params["text_encoder"]}, ids)[0], None
    first = setup.text_encoder.apply({"params": params["text_encoder"]}, ids)
    second = setup.text_encoder_2.apply({"params": params["text_encoder_2"]}, ids_2)
    context = jnp.concatenate(
        [first.hidden_states[-2], second.hidden_states[-2].astype(first.hidden_states[-2].dtype)], -1
    )
    return context, second.text_embeds


def text_conditioning(setup, params, batch) -> tuple[jax.Array, dict]:
    """(context (b, 77, D), extra UNet inputs) of the micro-batch's captions: `encode_text` of its token
    ids, or its cached "context" (and SDXL "text_embeds") with cache_text_embeddings; for SDXL the pooled
    embedding and the rows' time ids ("time_ids" (b, 6): original size, crop top-left, target size) are
    the UNet's added inputs."""
    if "context" in batch:
        context, pooled = batch["context"], batch.get("text_embeds")
    else:
        context, pooled = encode_text(setup, params, batch["ids"], batch.get("ids_2"))
    if pooled is None:
        return context, {}
    return context, {"text_embeds_BD": pooled, "time_ids_BN": batch["time_ids"]}


def snr_weights(alpha_bar_B: jax.Array, gamma: float, prediction_type: str, floor: float = 0.0) -> jax.Array:
    """Loss weights of the model's own target from a weight on the x0 error of SNR clipped to [floor, gamma]:
    min-SNR-gamma (Hang et al. 2023, gamma > 0) caps the weight of the low-noise steps, truncated SNR
    (Salimans & Ho 2022, floor 1) raises that of the noisiest ones, where an epsilon loss barely sees the
    image (at t = 999 of SD's schedule x_t holds 0.07 of x0). As diffusers' scripts for the cap alone:
    clip(SNR) / SNR for epsilon, / (SNR + 1) for v-prediction, unnormalised for sample prediction.
    gamma = 0 means no cap."""
    snr = alpha_bar_B / (1.0 - alpha_bar_B)
    clipped = jnp.maximum(snr, floor) if floor else snr
    if gamma:
        clipped = jnp.minimum(clipped, gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def timestep_weights(cfg, train_steps: int) -> np.ndarray | None:
    """Relative sampling weights (train_steps,) of the training timesteps under the timestep bias of `cfg` (a
    run config's `objective`), or None for uniform sampling. "later" multiplies the weights of the last
    (noisiest) `portion` of [0, train_steps) by `multiplier`, "earlier" those of the first, "range" those in
    [begin, end)."""
    strategy = cfg.timestep_bias_strategy
    if strategy == "none" or cfg.timestep_bias_multiplier == 1.0:
        return None
    weights = np.ones(train_steps, np.float64)
    count = max(1, int(round(cfg.timestep_bias_portion * train_steps)))
    if strategy == "later":
        chosen = slice(train_steps - count, train_steps)
    elif strategy == "earlier":
        chosen = slice(0, count)
    else:
        if cfg.timestep_bias_end > train_steps:
            raise ValueError(
                f"timestep_bias_end {cfg.timestep_bias_end} is beyond the model's {train_steps} training timesteps"
            )
        chosen = slice(cfg.timestep_bias_begin, cfg.timestep_bias_end)
    weights[chosen] *= cfg.timestep_bias_multiplier
    return weights / weights.sum()


def sample_timesteps(cfg, train_steps: int, keys_B: jax.Array) -> jax.Array:
    """int32 (b,) training timesteps, one per row key: uniform in [0, train_steps), or biased (above)."""
    weights = timestep_weights(cfg, train_steps)
    if weights is None:
        return jax.vmap(lambda k: jax.random.randint(k, (), 0, train_steps))(keys_B)
    logits = jnp.log(jnp.asarray(weights, jnp.float32))
    return jax.vmap(lambda k: jax.random.categorical(k, logits))(keys_B).astype(jnp.int32)


def diffusion_loss(setup, params, batch, key) -> tuple[jax.Array, jax.Array]:
    """Noise-prediction loss of one micro-batch: (sum of weight * per-row MSE, sum of count).

    Per row (randomness from `key` folded with the row id): a posterior sample of the image's latents x0,
    noise eps (plus `noise_offset` * per-channel noise), a timestep t in [0, T) (uniform, or biased: see
    `timestep_weights`), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; the UNet's prediction at (x_t, t,
    text) is compared with eps (epsilon models), v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0
    (v_prediction) or x0 (sample), in float32, optionally SNR weighted (`snr_weights`).
    """
    cfg = setup.config.objective
    keys = keys_for_rows(key, batch["row"])
    latent_keys, noise_keys, offset_keys, time_keys = split_rows(keys, 4)
    x0 = latents_of(setup, params, batch, latent_keys)
    noise = normal_rows(noise_keys, x0.shape[1:])
    if cfg.noise_offset:
        noise = noise + cfg.noise_offset * normal_rows(offset_keys, (1, 1, x0.shape[-1]))
    train_steps = setup.schedule.num_train_timesteps
    t = sample_timesteps(cfg, train_steps, time_keys)
    abar = jnp.asarray(alphas_cumprod(setup.schedule))[t]
    noisy = add_noise(setup.schedule, x0, noise, t)
    context, added = text_conditioning(setup, params, batch)
    residuals = {}
    if "controlnet" in params:  # as train_controlnet.py: the ControlNet's residuals into the frozen UNet
        down, mid = setup.controlnet.apply({"params": params["controlnet"]}, noisy, t, context, batch["control"])
        residuals = {"down_residuals": down, "mid_residual": mid}
    pred = setup.unet.apply({"params": params["unet"]}, noisy, t, context, **residuals, **added)
    pred = pred.astype(jnp.float32)
    if setup.prediction_type == "epsilon":
        target = noise
    elif setup.prediction_type == "v_prediction":
        target = velocity(setup.schedule, x0, noise, t)
    else:
        target = x0
    per_row = jnp.mean(jnp.square(pred - target), axis=(1, 2, 3))
    if cfg.min_snr_gamma or cfg.snr_floor:
        per_row = per_row * snr_weights(abar, cfg.min_snr_gamma, setup.prediction_type, cfg.snr_floor)
    return jnp.sum(per_row * batch["weight"]), jnp.sum(batch["count"])


def vae_loss(setup, params, batch, key) -> tuple[jax.Array, jax.Array]:
    """VAE loss of one micro-batch: per row, the pixel MSE of the reconstruction from a posterior sample
    plus kl_weight * KL(q(z|x) || N(0, I)) (summed over latent elements, as diffusers' `kl()`)."""
    cfg = setup.config.objective
    keys = keys_for_rows(key, batch["row"])
    x = batch["pixels"]
    mean, logvar = setup.vae.apply({"params": params["vae"]}, x, method="encode")
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = posterior_sample(mean, logvar, normal_rows(keys, mean.shape[1:]))
    recon = setup.vae.apply({"params": params["vae"]}, z, method="decode").astype(jnp.float32)
    mse = jnp.mean(jnp.square(recon - x.astype(jnp.float32)), axis=(1, 2, 3))
    kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
    per_row = mse + cfg.kl_weight * kl
    return jnp.sum(per_row * batch["weight"]), jnp.sum(batch["count"])
