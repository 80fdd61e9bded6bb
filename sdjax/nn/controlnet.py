"""ControlNet (diffusers' `ControlNetModel`, the SD 1.x / 2.x layout of lllyasviel's v1.0 and v1.1 models), NHWC.

A trainable copy of the UNet's encoder (conv_in, down blocks, mid block) whose input is the noisy latents
plus an embedding of the condition image (`controlnet_cond_embedding`: a small stride-2 conv stack from
pixels to the latent size). Every skip activation and the mid-block output go through a 1x1 convolution
(`controlnet_down_blocks.k`, `controlnet_mid_block`, zero-initialised for training) and are returned as
residuals that the UNet adds to its skip connections and mid-block output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.nn.config_utils import config_from_dict, config_to_dict
from sdjax.nn.layers import conv
from sdjax.nn.unet import UNET_UNSUPPORTED_DEFAULTS, UNetConfig, _MidBlock, down_blocks, time_embedding

# diffusers options of ControlNetModel sdjax does not implement, at the values where they change nothing
CONTROLNET_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    k: v
    for k, v in UNET_UNSUPPORTED_DEFAULTS.items()
    if k
    in (
        "encoder_hid_dim",
        "encoder_hid_dim_type",
        "class_embed_type",
        "addition_time_embed_dim",
        "num_class_embeds",
        "resnet_time_scale_shift",
        "projection_class_embeddings_input_dim",
    )
} | {"addition_embed_type": None, "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None}
CHANNEL_ORDERS = ("rgb", "bgr")
_UP_OF_DOWN = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """Architecture of a `ControlNetModel`; field names and defaults are diffusers'. The encoder fields mean
    what they mean in `UNetConfig` (`unet_config` is the UNet whose encoder this copies)."""

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
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
    upcast_attention: bool | None = False  # null: False, as diffusers reads it
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        object.__setattr__(self, "upcast_attention", bool(self.upcast_attention))
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ValueError(
                f"controlnet_conditioning_channel_order must be one of {CHANNEL_ORDERS}, "
                f"got {self.controlnet_conditioning_channel_order!r}"
            )
        self.unet_config()  # the encoder's own checks (block types, lengths, activation)

    @classmethod
    def from_dict(cls, raw: dict, what: str = "controlnet config.json") -> ControlNetConfig:
        return config_from_dict(cls, raw, what=what, unsupported_defaults=CONTROLNET_UNSUPPORTED_DEFAULTS)

    def to_dict(self) -> dict:
        meta = {"_class_name": "ControlNetModel", "_diffusers_version": "0.42.1"}
        return config_to_dict(self, CONTROLNET_UNSUPPORTED_DEFAULTS, meta)

    def unet_config(self) -> UNetConfig:
        """The UNet configuration of the encoder this ControlNet copies (up blocks mirrored, unused)."""
        shared = {f.name for f in dataclasses.fields(UNetConfig)} & {f.name for f in dataclasses.fields(self)}
        fields = {name: getattr(self, name) for name in shared}
        up = tuple(_UP_OF_DOWN.get(t, t) for t in reversed(self.down_block_types))
        return UNetConfig(**fields, up_block_types=up)

    @classmethod
    def from_unet(
        cls,
        unet: UNetConfig,
        *,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        controlnet_conditioning_channel_order: str = "rgb",
    ) -> ControlNetConfig:
        """The ControlNet of `unet`'s encoder, as diffusers' `ControlNetModel.from_unet` configures it: every
        encoder field copied, the condition embedding as given (its 2^(len - 1) must be the VAE's factor)."""
        shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(UNetConfig)}
        return cls(
            **{name: getattr(unet, name) for name in shared},
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
            controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
        )

    @property
    def condition_downscale(self) -> int:
        """How many times smaller the latents are than the condition image: the embedding halves it 2^(len - 1)
        times (one per channel count after the first); a ControlNet fits a model whose VAE factor is this."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @property
    def residual_count(self) -> int:
        """The number of down-block residuals: conv_in's output, every layer's, every downsampler's."""
        unet = self.unet_config()
        return 1 + sum(unet.layers()) + unet.num_blocks - 1


class ConditioningEmbedding(nn.Module):
    """Condition image (B, H, W, C) in [0, 1] -> features (B, H/f, W/f, out_channels), f = 2^(len(channels)-1):
    conv_in, then per level a 3x3 conv and a stride-2 3x3 conv, silu after each, then conv_out."""

    out_channels: int
    channels: tuple[int, ...]
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, cond_BHWC: jax.Array) -> jax.Array:
        h = jax.nn.silu(conv(self.channels[0], 3, "conv_in", self.dtype)(cond_BHWC.astype(self.dtype)))
        for i in range(len(self.channels) - 1):
            h = jax.nn.silu(conv(self.channels[i], 3, f"blocks.{2 * i}", self.dtype)(h))
            h = jax.nn.silu(conv(self.channels[i + 1], 3, f"blocks.{2 * i + 1}", self.dtype, stride=2)(h))
        return conv(self.out_channels, 3, "conv_out", self.dtype)(h)


class ControlNetModel(nn.Module):
    """Residuals for the UNet from (latents, timesteps, text context, condition image).

    __call__(sample (B, h, w, in_channels), timesteps (B,) or scalar, context (B, L, D), cond (B, H, W,
    conditioning_channels) in [0, 1] with H = h * 8 for SD's VAE, conditioning_scale (a float or a traced
    scalar), guess_mode (static)) -> (tuple of `residual_count` down residuals (B, h_k, w_k, C_k), mid
    residual (B, h_last, w_last, C_last)), each already multiplied by its scale as diffusers does.
    """

    config: ControlNetConfig
    dtype: jnp.dtype = jnp.float32
    remat: str | None = None

    @nn.compact
    def __call__(
        self,
        sample_BHWC: jax.Array,
        timesteps_B: jax.Array,
        context_BLD: jax.Array,
        cond_BHWC: jax.Array,
        conditioning_scale: float | jax.Array = 1.0,
        guess_mode: bool = False,
    ) -> tuple[tuple[jax.Array, ...], jax.Array]:
        cfg = self.config
        unet = cfg.unet_config()
        if cfg.controlnet_conditioning_channel_order == "bgr":
            cond_BHWC = cond_BHWC[..., ::-1]
        temb = time_embedding(unet, timesteps_B, sample_BHWC.shape[0], self.dtype)
        context_BLD = context_BLD.astype(self.dtype)
        h = conv(cfg.block_out_channels[0], 3, "conv_in", self.dtype)(sample_BHWC.astype(self.dtype))
        h = h + ConditioningEmbedding(
            cfg.block_out_channels[0],
            tuple(cfg.conditioning_embedding_out_channels),
            self.dtype,
            name="controlnet_cond_embedding",
        )(cond_BHWC)
        h, skips = down_blocks(unet, h, temb, context_BLD, self.dtype, self.remat)
        h = _MidBlock(unet, self.dtype, self.remat, name="mid_block")(h, temb, context_BLD)

        down = tuple(
            conv(skip.shape[-1], 1, f"controlnet_down_blocks.{k}", self.dtype)(skip) for k, skip in enumerate(skips)
        )
        mid = conv(h.shape[-1], 1, "controlnet_mid_block", self.dtype)(h)
        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if guess_mode and not cfg.global_pool_conditions:
            scales = np.logspace(-1, 0, len(down) + 1).astype(np.float32)  # 0.1 .. 1 from shallow to deep
            down = tuple((r * (scale * s)).astype(r.dtype) for r, s in zip(down, scales[:-1], strict=True))
            mid = (mid * (scale * scales[-1])).astype(mid.dtype)
        else:
            down = tuple((r * scale).astype(r.dtype) for r in down)
            mid = (mid * scale).astype(mid.dtype)
        if cfg.global_pool_conditions:
            down = tuple(jnp.mean(r, axis=(1, 2), keepdims=True) for r in down)
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return down, mid

    def dummy_inputs(self, height: int = 8, width: int = 8) -> tuple[jax.Array, ...]:
        """Zero inputs of the right shapes for `init`/`eval_shape` (batch 1, 77 context tokens)."""
        cfg = self.config
        unet = cfg.unet_config()
        factor = 2 ** (unet.num_blocks - 1)
        h, w = max(height, factor), max(width, factor)
        up = cfg.condition_downscale
        return (
            jnp.zeros((1, h, w, cfg.in_channels), self.dtype),
            jnp.zeros((1,), jnp.float32),
            jnp.zeros((1, 77, unet.context_dims()[0]), self.dtype),
            jnp.zeros((1, h * up, w * up, cfg.conditioning_channels), self.dtype),
        )


# the parameters a ControlNet shares with its UNet (diffusers' from_unet copies these)
SHARED_WITH_UNET = ("conv_in", "time_embedding", "mid_block")


def _torch_default(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """PyTorch's default draw for a conv's weight and bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def params_from_unet(module: ControlNetModel, unet_params: dict, key: jax.Array) -> dict:
    """Float32 starting parameters of `module` from its UNet's (diffusers' `from_unet` + the ControlNet's own
    initialisation): conv_in, the time embedding, the down blocks and the mid block copied; the condition
    embedding drawn as PyTorch initialises a conv (keyed by `key`) except its conv_out, which is zero as are
    every `controlnet_down_blocks.k` and `controlnet_mid_block`, so the residuals start at exactly 0 and
    training starts from the UNet's own images."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *module.dummy_inputs())["params"]
    copied = [name for name in shapes if name in SHARED_WITH_UNET or name.startswith("down_blocks.")]
    params: dict[str, Any] = {}
    for name in copied:
        if name not in unet_params:
            raise ValueError(f"the UNet has no {name} to copy into the ControlNet: not the UNet of this ControlNet")
        want = jax.tree.map(lambda s: s.shape, shapes[name])
        got = jax.tree.map(lambda a: tuple(a.shape), unet_params[name])
        if want != got:
            raise ValueError(
                f"the UNet's {name} has other shapes than the ControlNet's: not the UNet of this ControlNet"
            )
        params[name] = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), unet_params[name])
    embedding = {}
    for i, (conv_name, leaves) in enumerate(sorted(shapes["controlnet_cond_embedding"].items())):
        kernel = leaves["kernel"].shape
        fan_in = int(np.prod(kernel[:-1]))
        if conv_name == "conv_out":
            embedding[conv_name] = {"kernel": jnp.zeros(kernel), "bias": jnp.zeros(leaves["bias"].shape)}
            continue
        k_kernel, k_bias = jax.random.split(jax.random.fold_in(key, i))
        embedding[conv_name] = {
            "kernel": _torch_default(k_kernel, kernel, fan_in),
            "bias": _torch_default(k_bias, leaves["bias"].shape, fan_in),
        }
    params["controlnet_cond_embedding"] = embedding
    for name, leaves in shapes.items():
        if name.startswith("controlnet_down_blocks.") or name == "controlnet_mid_block":
            params[name] = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), leaves)
    return params


__all__ = ["SHARED_WITH_UNET", "ConditioningEmbedding", "ControlNetConfig", "ControlNetModel", "params_from_unet"]
