"""The Stable Diffusion VAE (diffusers' `AutoencoderKL`), NHWC.

encode: image (B, H, W, 3) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent_channels)
decode: z (B, H/f, W/f, latent_channels), already divided by `scaling_factor` -> image (B, H, W, 3)
with f = 2^(number of blocks - 1) (8 for SD).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.keys import normal_rows
from sdjax.nn.config_utils import config_from_dict, config_to_dict
from sdjax.nn.layers import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    SpatialSelfAttention,
    Upsample2D,
    activation,
    conv,
)

VAE_UNSUPPORTED_DEFAULTS: dict[str, Any] = {}
_VAE_EPS = 1e-6  # diffusers' Encoder/Decoder fix every norm epsilon of the VAE at 1e-6


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of an `AutoencoderKL`; field names and defaults are diffusers'.

    `scaling_factor`/`shift_factor`/`latents_mean`/`latents_std` describe how latents are normalised for
    the UNet; `force_upcast` says the VAE overflows in fp16 and should run in fp32 (both used by the
    pipeline, not by the module).
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        for kind, names, known in (
            ("down", self.down_block_types, "DownEncoderBlock2D"),
            ("up", self.up_block_types, "UpDecoderBlock2D"),
        ):
            if len(names) != n:
                raise ValueError(f"{kind}_block_types has {len(names)} entries for {n} block_out_channels")
            for name in names:
                if name != known:
                    raise ValueError(f"unknown VAE {kind} block type {name!r}; sdjax supports [{known!r}]")
        activation(self.act_fn)

    @classmethod
    def from_dict(cls, raw: dict, what: str = "vae/config.json") -> VAEConfig:
        return config_from_dict(cls, raw, what=what, unsupported_defaults=VAE_UNSUPPORTED_DEFAULTS)

    def to_dict(self) -> dict:
        meta = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1"}
        return config_to_dict(self, VAE_UNSUPPORTED_DEFAULTS, meta)

    @property
    def downscale(self) -> int:
        """Pixels per latent along each side (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)


class _MidBlock(nn.Module):
    """resnets.0 -> (attentions.0) -> resnets.1, without time conditioning."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        channels = cfg.block_out_channels[-1]
        resnet = lambda name: ResnetBlock2D(
            channels, cfg.norm_num_groups, _VAE_EPS, cfg.act_fn, dtype=self.dtype, name=name
        )
        h = resnet("resnets.0")(h, None)
        if cfg.mid_block_add_attention:
            h = SpatialSelfAttention(cfg.norm_num_groups, _VAE_EPS, self.dtype, name="attentions.0")(h)
        return resnet("resnets.1")(h, None)


class _Encoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        cfg = self.config
        n = len(cfg.block_out_channels)
        h = conv(cfg.block_out_channels[0], 3, "conv_in", self.dtype)(x_BHWC.astype(self.dtype))
        for i, channels in enumerate(cfg.block_out_channels):
            block = f"down_blocks.{i}"
            for j in range(cfg.layers_per_block):
                h = ResnetBlock2D(
                    channels,
                    cfg.norm_num_groups,
                    _VAE_EPS,
                    cfg.act_fn,
                    dtype=self.dtype,
                    name=f"{block}.resnets.{j}",
                )(h, None)
            if i < n - 1:
                h = Downsample2D(channels, 0, self.dtype, name=f"{block}.downsamplers.0")(h)
        h = _MidBlock(cfg, self.dtype, name="mid_block")(h)
        h = activation(cfg.act_fn)(GroupNorm(cfg.norm_num_groups, _VAE_EPS, self.dtype, name="conv_norm_out")(h))
        return conv(2 * cfg.latent_channels, 3, "conv_out", self.dtype)(h)


class _Decoder(nn.Module):
    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z_BHWC):
        cfg = self.config
        n = len(cfg.block_out_channels)
        h = conv(cfg.block_out_channels[-1], 3, "conv_in", self.dtype)(z_BHWC.astype(self.dtype))
        h = _MidBlock(cfg, self.dtype, name="mid_block")(h)
        for i, channels in enumerate(reversed(cfg.block_out_channels)):
            block = f"up_blocks.{i}"
            for j in range(cfg.layers_per_block + 1):
                h = ResnetBlock2D(
                    channels,
                    cfg.norm_num_groups,
                    _VAE_EPS,
                    cfg.act_fn,
                    dtype=self.dtype,
                    name=f"{block}.resnets.{j}",
                )(h, None)
            if i < n - 1:
                h = Upsample2D(channels, self.dtype, name=f"{block}.upsamplers.0")(h)
        h = activation(cfg.act_fn)(GroupNorm(cfg.norm_num_groups, _VAE_EPS, self.dtype, name="conv_norm_out")(h))
        return conv(cfg.out_channels, 3, "conv_out", self.dtype)(h)


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder. Methods: `encode` (-> mean, logvar) and `decode`; see the module doc."""

    config: VAEConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        cfg = self.config
        self.encoder = _Encoder(cfg, self.dtype)
        self.decoder = _Decoder(cfg, self.dtype)
        if cfg.use_quant_conv:
            self.quant_conv = conv(2 * cfg.latent_channels, 1, None, self.dtype)
        if cfg.use_post_quant_conv:
            self.post_quant_conv = conv(cfg.latent_channels, 1, None, self.dtype)

    def encode(self, x_BHWC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Image in [-1, 1] -> posterior mean and log-variance (clamped to [-30, 20] as diffusers)."""
        moments = self.encoder(x_BHWC)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z_BHWC: jax.Array) -> jax.Array:
        """Latents (already divided by the scaling factor) -> image, nominally in [-1, 1] (not clipped)."""
        z_BHWC = z_BHWC.astype(self.dtype)
        if self.config.use_post_quant_conv:
            z_BHWC = self.post_quant_conv(z_BHWC)
        return self.decoder(z_BHWC)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        """Reconstruction from the posterior mean (used to create every parameter at init)."""
        mean, _ = self.encode(x_BHWC)
        return self.decode(mean)

    def dummy_inputs(self) -> tuple[jax.Array]:
        f = self.config.downscale
        return (jnp.zeros((1, f, f, self.config.in_channels), self.dtype),)


def posterior_sample(mean_BHWC: jax.Array, logvar_BHWC: jax.Array, eps_BHWC: jax.Array) -> jax.Array:
    """A sample of the VAE posterior N(mean, exp(logvar)): mean + exp(logvar / 2) * eps, float32, unscaled
    (multiply by `config.scaling_factor` for the UNet's latents)."""
    return mean_BHWC.astype(jnp.float32) + jnp.exp(0.5 * logvar_BHWC.astype(jnp.float32)) * eps_BHWC


def encode_sample(vae: AutoencoderKL, params, pixels_BHWC: jax.Array, keys_B: jax.Array) -> jax.Array:
    """Images (B, H, W, 3) in [-1, 1] -> posterior samples (B, H/f, W/f, C) float32, unscaled; row b's
    noise from keys_B[b] alone."""
    mean, logvar = vae.apply({"params": params}, pixels_BHWC, method="encode")
    return posterior_sample(mean, logvar, normal_rows(keys_B, mean.shape[1:]))


def decode_tiled(vae: AutoencoderKL, params, z_BHWC: jax.Array, overlap: float = 0.25) -> jax.Array:
    """`vae.decode` in overlapping tiles, exactly as diffusers' `AutoencoderKL.tiled_decode` (enable_tiling):
    bounded memory for large images.

    Tiles are `sample_size / 2**(levels-1)` latents wide (64 for SD: 512 pixels), start every
    `tile * (1 - overlap)` latents, and each tile's first `sample_size * overlap` pixel rows/columns are
    blended linearly with the tile above / to the left; each tile keeps `sample_size * (1 - overlap)`
    pixels. Latents no larger than one tile are decoded whole (as diffusers does).
    z_BHWC: latents already divided by the scaling factor; returns (B, H*f, W*f, 3) in [-1, 1].
    """
    cfg = vae.config
    tile = int(cfg.sample_size / 2 ** (len(cfg.block_out_channels) - 1))
    if z_BHWC.shape[1] <= tile and z_BHWC.shape[2] <= tile:
        return vae.apply({"params": params}, z_BHWC, method="decode")
    stride = int(tile * (1 - overlap))
    blend = int(cfg.sample_size * overlap)
    keep = cfg.sample_size - blend
    decode = lambda z: vae.apply({"params": params}, z, method="decode")
    starts_i, starts_j = range(0, z_BHWC.shape[1], stride), range(0, z_BHWC.shape[2], stride)
    tiles = {(i, j): z_BHWC[:, i : i + tile, j : j + tile] for i in starts_i for j in starts_j}
    # Tiles of one shape are decoded by one loop (`lax.map`): a program holds one decoder per tile shape
    # (at most four: whole, right edge, bottom edge, corner), not one per tile.
    by_shape: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for key, z in tiles.items():
        by_shape.setdefault(z.shape, []).append(key)
    decoded = {}
    for keys in by_shape.values():
        if len(keys) == 1:
            decoded[keys[0]] = decode(tiles[keys[0]])
            continue
        stacked = jax.lax.map(decode, jnp.stack([tiles[k] for k in keys]))
        decoded.update({k: stacked[n] for n, k in enumerate(keys)})
    rows = [[decoded[(i, j)] for j in starts_j] for i in starts_i]
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, current in enumerate(row):
            if i > 0:
                current = _blend(rows[i - 1][j], current, blend, axis=1)
            if j > 0:
                current = _blend(row[j - 1], current, blend, axis=2)
            row[j] = current  # the blended tile is what the next one to the right blends with (as diffusers)
            kept.append(current[:, :keep, :keep])
        out_rows.append(jnp.concatenate(kept, axis=2))
    return jnp.concatenate(out_rows, axis=1)


def _blend(before: jax.Array, current: jax.Array, extent: int, axis: int) -> jax.Array:
    """The first `extent` rows (axis 1) or columns (axis 2) of `current` faded in from the last ones of
    `before`: weight k / extent on current, 1 - k / extent on before."""
    extent = min(before.shape[axis], current.shape[axis], extent)
    shape = [1, 1, 1, 1]
    shape[axis] = extent
    w = (jnp.arange(extent, dtype=jnp.float32) / extent).reshape(shape).astype(current.dtype)
    head = jax.lax.slice_in_dim(before, before.shape[axis] - extent, before.shape[axis], axis=axis)
    mixed = head * (1 - w) + jax.lax.slice_in_dim(current, 0, extent, axis=axis) * w
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(current, extent, current.shape[axis], axis=axis)], axis=axis)
