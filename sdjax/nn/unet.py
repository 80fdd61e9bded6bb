"""The Stable Diffusion UNet (diffusers' `UNet2DConditionModel`, the SD 1.x / 2.x / inpainting / SDXL subset:
plus the additions to the timestep embedding, `addition_embed_type="text"` (pooled text states) and
`"text_time"` (SDXL: pooled text embedding and size/crop/aesthetic-score ids)), NHWC."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax.nn.config_utils import config_from_dict, config_to_dict
from sdjax.nn.layers import (
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TextTimeEmbedding,
    TimestepEmbedding,
    Transformer2D,
    Upsample2D,
    activation,
    conv,
    timestep_embedding,
)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn",)
ADDITION_EMBED_TYPES = (None, "text", "text_time")

# diffusers options sdjax does not implement, at the values where they change nothing.
UNET_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "dropout": 0.0,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}


def _per_block(value, n: int, name: str) -> tuple:
    """An int/bool option broadcast to one value per block, or a per-block tuple checked for length n."""
    if isinstance(value, tuple):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries for {n} blocks")
        return value
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of a `UNet2DConditionModel`; field names and defaults are diffusers'.

    As in diffusers, `attention_head_dim` is the number of heads per block unless `num_attention_heads` is
    given (a historical misnaming kept for checkpoint compatibility); the head width is channels / heads.
    `mid_block_only_cross_attention` is accepted but, as in diffusers, has no effect on
    UNetMidBlock2DCrossAttn.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    mid_block_only_cross_attention: bool | None = None
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool | None = False  # null in SDXL's configs: False, as diffusers reads it
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # "text": a pooled projection of the text states is added to the timestep embedding (TextTimeEmbedding);
    # "text_time" (SDXL): an MLP of [pooled text embedding, sinusoidal features of each time id] is added
    addition_embed_type: str | None = None
    addition_embed_type_num_heads: int = 64
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "upcast_attention", bool(self.upcast_attention))
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length"
            )
        for kind, names, known in (
            ("down", self.down_block_types, DOWN_BLOCK_TYPES),
            ("up", self.up_block_types, UP_BLOCK_TYPES),
            ("mid", (self.mid_block_type,), MID_BLOCK_TYPES),
        ):
            for name in names:
                if name not in known:
                    raise ValueError(f"unknown {kind} block type {name!r}; sdjax supports {list(known)}")
        if self.act_fn:
            activation(self.act_fn)
        layers = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
        if any(not isinstance(x, int) for x in layers):
            raise ValueError("nested transformer_layers_per_block (per-layer lists) is not supported")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(
                f"addition_embed_type {self.addition_embed_type!r} is not supported; sdjax supports "
                f"{list(ADDITION_EMBED_TYPES)}"
            )
        if self.addition_embed_type == "text":
            width = self.cross_attention_dim
            if not isinstance(width, int) or width % self.addition_embed_type_num_heads:
                raise ValueError(
                    f"addition_embed_type 'text' needs one int cross_attention_dim divisible by "
                    f"addition_embed_type_num_heads ({self.addition_embed_type_num_heads}), got {width}"
                )

        if self.addition_embed_type == "text_time" and (
            not self.addition_time_embed_dim or not self.projection_class_embeddings_input_dim
        ):
            raise ValueError(
                "addition_embed_type 'text_time' needs addition_time_embed_dim and "
                "projection_class_embeddings_input_dim"
            )

    @classmethod
    def from_dict(cls, raw: dict, what: str = "unet/config.json") -> UNetConfig:
        return config_from_dict(cls, raw, what=what, unsupported_defaults=UNET_UNSUPPORTED_DEFAULTS)

    def to_dict(self) -> dict:
        meta = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1"}
        return config_to_dict(self, UNET_UNSUPPORTED_DEFAULTS, meta)

    # Per-block settings, as diffusers resolves them.
    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    def heads(self) -> tuple[int, ...]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, self.num_blocks, "attention_head_dim")

    def layers(self) -> tuple[int, ...]:
        return _per_block(self.layers_per_block, self.num_blocks, "layers_per_block")

    def transformer_layers(self) -> tuple[int, ...]:
        return _per_block(self.transformer_layers_per_block, self.num_blocks, "transformer_layers_per_block")

    def only_cross(self) -> tuple[bool, ...]:
        return _per_block(self.only_cross_attention, self.num_blocks, "only_cross_attention")

    def context_dims(self) -> tuple[int, ...]:
        return _per_block(self.cross_attention_dim, self.num_blocks, "cross_attention_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]


REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
}


def rematted(cls, policy: str | None):
    """`cls` (a resnet or transformer block) under gradient checkpointing with a named policy, or unchanged
    for None/"none". Parameter names are unchanged; only what the backward pass keeps differs:
    "full" recomputes the whole block, "dots" keeps matrix products without batch dimensions (weights x
    activations), "dots_all" keeps every matrix product."""
    if policy in (None, "none"):
        return cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {policy!r}; choose one of none, {', '.join(REMAT_POLICIES)}")
    return nn.remat(cls, policy=REMAT_POLICIES[policy])


class _UNetBlock(nn.Module):
    """One down or up block: resnets (each followed by a spatial transformer when `heads` is set), then an
    optional down/up sampler. Up blocks concatenate a skip activation before each resnet."""

    out_channels: int
    num_layers: int
    heads: int | None
    transformer_layers: int
    only_cross_attention: bool
    config: UNetConfig
    sampler: str | None  # "down", "up" or None
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None

    @nn.compact
    def __call__(self, h, temb, context, skips=None):
        cfg = self.config
        outputs = []
        for j in range(self.num_layers):
            h = rematted(ResnetBlock2D, self.remat)(
                self.out_channels,
                cfg.norm_num_groups,
                cfg.norm_eps,
                cfg.act_fn,
                dtype=self.dtype,
                name=f"resnets.{j}",
            )(h, temb, None if skips is None else skips.pop())
            if self.heads is not None:
                h = rematted(Transformer2D, self.remat)(
                    self.heads,
                    self.out_channels // self.heads,
                    self.transformer_layers,
                    cfg.norm_num_groups,
                    cfg.use_linear_projection,
                    self.only_cross_attention,
                    cfg.upcast_attention,
                    self.dtype,
                    name=f"attentions.{j}",
                )(h, context)
            outputs.append(h)
        if self.sampler == "down":
            h = Downsample2D(self.out_channels, cfg.downsample_padding, self.dtype, name="downsamplers.0")(h)
            outputs.append(h)
        elif self.sampler == "up":
            # Sizes that are not multiples of 2^(blocks-1) (e.g. 520 px) upsample to the next skip's size.
            size = skips[-1].shape[1:3] if skips else None
            h = Upsample2D(self.out_channels, self.dtype, name="upsamplers.0")(h, size)
        return h, outputs


class _MidBlock(nn.Module):
    """resnets.0 -> attentions.0 -> resnets.1 at the lowest resolution (UNetMidBlock2DCrossAttn)."""

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None

    @nn.compact
    def __call__(self, h, temb, context):
        cfg = self.config
        channels = cfg.block_out_channels[-1]
        heads = cfg.heads()[-1]
        resnet = lambda name: rematted(ResnetBlock2D, self.remat)(
            channels,
            cfg.norm_num_groups,
            cfg.norm_eps,
            cfg.act_fn,
            cfg.mid_block_scale_factor,
            self.dtype,
            name=name,
        )
        h = resnet("resnets.0")(h, temb)
        h = rematted(Transformer2D, self.remat)(
            heads,
            channels // heads,
            cfg.transformer_layers()[-1],
            cfg.norm_num_groups,
            cfg.use_linear_projection,
            False,
            cfg.upcast_attention,
            self.dtype,
            name="attentions.0",
        )(h, context)
        return resnet("resnets.1")(h, temb)


def time_embedding(cfg: UNetConfig, timesteps_B, batch: int, dtype) -> jax.Array:
    """The timestep embedding (B, time_embed_dim) of timesteps (B,) or a scalar: sinusoidal features, then
    the `time_embedding` MLP (a submodule of the calling module: the UNet's, or a ControlNet's copy)."""
    timesteps_B = jnp.broadcast_to(jnp.asarray(timesteps_B), (batch,))
    t_emb = timestep_embedding(timesteps_B, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    return TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype, name="time_embedding")(t_emb.astype(dtype))


def text_time_embedding(cfg: UNetConfig, text_embeds_BD, time_ids_BN, dtype) -> jax.Array:
    """SDXL's addition to the timestep embedding, (B, time_embed_dim): the `add_embedding` MLP (a submodule
    of the calling module) of [text_embeds (B, D), sinusoidal features of each of the N time ids (B, N *
    addition_time_embed_dim)], N x addition_time_embed_dim + D = projection_class_embeddings_input_dim."""
    if text_embeds_BD is None or time_ids_BN is None:
        raise ValueError("an SDXL UNet (addition_embed_type 'text_time') needs text_embeds_BD and time_ids_BN")
    b, n = time_ids_BN.shape
    width = text_embeds_BD.shape[-1] + n * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
        raise ValueError(
            f"text embeddings of width {text_embeds_BD.shape[-1]} and {n} time ids make {width} features, but "
            f"the UNet's add_embedding takes {cfg.projection_class_embeddings_input_dim} (projection_class_"
            "embeddings_input_dim): a base model takes 6 time ids, a refiner 5 (with the aesthetic score)"
        )
    features = timestep_embedding(
        time_ids_BN.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
    )
    added = jnp.concatenate([text_embeds_BD.astype(jnp.float32), features.reshape(b, -1)], axis=-1)
    return TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype, name="add_embedding")(added.astype(dtype))


def down_blocks(cfg: UNetConfig, h, temb, context_BLD, dtype, remat) -> tuple[jax.Array, list[jax.Array]]:
    """The encoder's down blocks `down_blocks.{i}` (submodules of the calling module) from conv_in's output
    -> (the lowest-resolution activation, the skip activations: conv_in's, every layer's, every
    downsampler's)."""
    n = cfg.num_blocks
    heads, layers, t_layers, only_cross = cfg.heads(), cfg.layers(), cfg.transformer_layers(), cfg.only_cross()
    skips = [h]
    for i, block_type in enumerate(cfg.down_block_types):
        h, outs = _UNetBlock(
            cfg.block_out_channels[i],
            layers[i],
            heads[i] if block_type == "CrossAttnDownBlock2D" else None,
            t_layers[i],
            only_cross[i],
            cfg,
            "down" if i < n - 1 else None,
            dtype,
            remat,
            name=f"down_blocks.{i}",
        )(h, temb, context_BLD)
        skips.extend(outs)
    return h, skips


class UNet2DConditionModel(nn.Module):
    """Noise/velocity predictor eps(x_t, t, context).

    __call__(sample (B, H, W, in_channels), timesteps (B,) or scalar, context (B, L, cross_attention_dim),
    optional ControlNet residuals: down_residuals (one per skip connection), mid_residual; SDXL
    ("text_time") also text_embeds_BD (the pooled, projected text embedding) and time_ids_BN (original
    size, crop top-left, target size or aesthetic score, as diffusers' `added_cond_kwargs`)) -> (B, H, W,
    out_channels). H and W need not be divisible by 2^(blocks - 1): as diffusers, upsampling then
    resizes to each skip connection's size.

    `remat` (training): gradient checkpointing of every resnet and transformer block with a policy of
    `REMAT_POLICIES` ("full", "dots", "dots_all"), or None. It changes memory and time, not the numbers.
    """

    config: UNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None

    @nn.compact
    def __call__(
        self,
        sample_BHWC: jax.Array,
        timesteps_B: jax.Array,
        context_BLD: jax.Array,
        down_residuals: tuple[jax.Array, ...] | None = None,
        mid_residual: jax.Array | None = None,
        text_embeds_BD: jax.Array | None = None,
        time_ids_BN: jax.Array | None = None,
    ) -> jax.Array:
        cfg = self.config
        n = cfg.num_blocks
        temb = time_embedding(cfg, timesteps_B, sample_BHWC.shape[0], self.dtype)
        context_BLD = context_BLD.astype(self.dtype)
        if cfg.addition_embed_type == "text":
            temb = temb + TextTimeEmbedding(
                cfg.time_embed_dim, cfg.addition_embed_type_num_heads, self.dtype, name="add_embedding"
            )(context_BLD)
        elif cfg.addition_embed_type == "text_time":
            temb = temb + text_time_embedding(cfg, text_embeds_BD, time_ids_BN, self.dtype)
        h = sample_BHWC.astype(self.dtype)
        if cfg.center_input_sample:
            h = 2 * h - 1.0
        h = conv(cfg.block_out_channels[0], cfg.conv_in_kernel, "conv_in", self.dtype)(h)
        h, skips = down_blocks(cfg, h, temb, context_BLD, self.dtype, self.remat)

        if down_residuals is not None:  # a ControlNet's, added to every skip (diffusers' additional residuals)
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down residuals for the UNet's {len(skips)} skip connections")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_residuals, strict=True)]

        h = _MidBlock(cfg, self.dtype, self.remat, name="mid_block")(h, temb, context_BLD)
        if mid_residual is not None:
            h = h + mid_residual.astype(h.dtype)

        heads, layers, t_layers, only_cross = cfg.heads(), cfg.layers(), cfg.transformer_layers(), cfg.only_cross()
        for i, block_type in enumerate(cfg.up_block_types):
            r = n - 1 - i  # the down level this up block mirrors
            h, _ = _UNetBlock(
                cfg.block_out_channels[r],
                layers[r] + 1,
                heads[r] if block_type == "CrossAttnUpBlock2D" else None,
                t_layers[r],
                only_cross[r],
                cfg,
                "up" if i < n - 1 else None,
                self.dtype,
                self.remat,
                name=f"up_blocks.{i}",
            )(h, temb, context_BLD, skips)

        h = GroupNorm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, name="conv_norm_out")(h)
        h = activation(cfg.act_fn)(h)
        return conv(cfg.out_channels, cfg.conv_out_kernel, "conv_out", self.dtype)(h)

    def dummy_inputs(self, height: int = 8, width: int = 8) -> tuple:
        """Zero inputs of the right shapes for `init`/`eval_shape` (batch 1, 77 context tokens; SDXL: the
        whole add_embedding input as text embedding, no time ids, which gives the same parameters)."""
        cfg = self.config
        ctx_dim = cfg.context_dims()[0]
        factor = 2 ** (cfg.num_blocks - 1)
        h, w = max(height, factor), max(width, factor)
        inputs = (
            jnp.zeros((1, h, w, cfg.in_channels), self.dtype),
            jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 77, ctx_dim), self.dtype),
        )
        if cfg.addition_embed_type == "text_time":
            added = (jnp.zeros((1, cfg.projection_class_embeddings_input_dim), self.dtype), jnp.zeros((1, 0)))
            inputs += (None, None) + added
        return inputs
