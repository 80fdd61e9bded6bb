"""Building blocks shared by the UNet and the VAE, NHWC throughout.

Submodule names are the diffusers attribute names (`norm1`, `to_out.0`, `transformer_blocks.1`, ...), so a
parameter path joined with "." is the PyTorch state-dict name (see `sdjax.convert.keymap`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdjax.nn import kernels, norms

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The elementwise activation diffusers calls `name` (silu/swish, mish, gelu, relu)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; sdjax supports {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _param(module: nn.Module, name: str, init: Callable, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """`module.param(name, init, shape, dtype)`, without Flax's check of a given parameter by tracing `init`.

    Flax runs `jax.eval_shape(init)` for every parameter at every trace of `apply`, to compare shapes: about
    half of the UNet's tracing time (README "Tests"). A given parameter's shape is compared with `shape`
    here instead; `init` runs only when the parameter is created (`module.init`)."""
    if not module.has_variable("params", name):
        return module.param(name, init, shape, dtype)
    value = module.get_variable("params", name)
    if tuple(np.shape(value)) != tuple(shape):
        raise ValueError(
            f"parameter {module.scope.path_text}/{name} has shape {tuple(np.shape(value))}, but this architecture's "
            f"is {tuple(shape)}: the weights belong to another model configuration"
        )
    return value


def _norm_params(module: nn.Module, channels: int) -> tuple[jax.Array, jax.Array]:
    """A GroupNorm's or LayerNorm's per-channel `scale` (ones) and `bias` (zeros), float32, declared on
    `module`."""
    return (
        _param(module, "scale", nn.initializers.ones, (channels,), jnp.float32),
        _param(module, "bias", nn.initializers.zeros, (channels,), jnp.float32),
    )


class GroupNorm(nn.Module):
    """Group normalisation over the channel (last) axis; statistics in fp32 whatever the input dtype.

    x (B, ..., C) is split into `num_groups` groups of C/num_groups channels; each group of each sample is
    normalised over all its positions and channels, then scaled and shifted per channel (`norms.group_norm`:
    PyTorch's two-pass variance in float32, one pass in half precision).
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = _norm_params(self, x.shape[-1])
        return norms.group_norm(x, scale, bias, self.num_groups, self.epsilon, self.dtype)


class GroupNormWeights(nn.Module):
    """A `GroupNorm`'s parameters, `scale` and `bias`, returned unapplied for a kernel that applies them
    itself (`kernels.norm_act_conv`)."""

    @nn.compact
    def __call__(self, channels: int) -> tuple[jax.Array, jax.Array]:
        return _norm_params(self, channels)


def layer_norm(epsilon: float, dtype, name: str) -> nn.LayerNorm:
    """LayerNorm over the last axis, statistics in float32: PyTorch's two-pass variance in float32, one pass
    in half precision (`norms.fast_variance`)."""
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, use_fast_variance=norms.fast_variance(dtype), name=name)


class Conv2d(nn.Module):
    """A 2-D convolution on NHWC input with PyTorch's symmetric padding; params `kernel` (HWIO) and `bias`.
    With `upsample2x` (a 3x3 kernel, padding 1) it convolves the nearest-neighbour 2x enlargement of the
    input, (B, H, W, C) -> (B, 2H, 2W, O) (`kernels.biased_conv`)."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dtype: jnp.dtype = jnp.float32
    upsample2x: bool = False

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        kernel, bias = _conv_params(self, x_BHWC.shape[-1], self.features, self.kernel_size)
        x_BHWC, kernel = x_BHWC.astype(self.dtype), kernel.astype(self.dtype)
        return kernels.biased_conv(x_BHWC, kernel, bias, self.stride, self.padding, self.upsample2x)


def _conv_params(module: nn.Module, in_channels: int, features: int, size: int) -> tuple[jax.Array, jax.Array]:
    """A convolution's `kernel` (size, size, in, out: HWIO) and `bias`, declared on `module`."""
    kernel = _param(module, "kernel", nn.initializers.lecun_normal(), (size, size, in_channels, features))
    return kernel, _param(module, "bias", nn.initializers.zeros, (features,))


class ConvWeights(nn.Module):
    """A `Conv2d`'s parameters, `kernel` (HWIO) and `bias`, returned unapplied for a kernel that applies
    them itself (`kernels.norm_act_conv`)."""

    features: int
    kernel_size: int

    @nn.compact
    def __call__(self, in_channels: int) -> tuple[jax.Array, jax.Array]:
        return _conv_params(self, in_channels, self.features, self.kernel_size)


def _add_bias(y: jax.Array, bias: jax.Array | None, dtype) -> jax.Array:
    """y (accumulator dtype) + bias, rounded once to `dtype`."""
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y.astype(dtype)


class Dense(nn.Module):
    """A linear layer over the last axis, params `kernel` (in, out) and `bias`, as flax's `nn.Dense`, but
    half-precision inputs accumulate in float32 and the bias is added before rounding (see `sdjax.nn.precision`)."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _param(self, "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = _param(self, "bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        return _add_bias(kernels.matmul(x.astype(self.dtype), kernel.astype(self.dtype)), bias, self.dtype)


class LinearWeights(nn.Module):
    """A `Dense` layer's parameters, `kernel` (in, out) and `bias` (None without), returned unapplied for a
    kernel that applies them itself (`kernels.projected_attention`)."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array | None]:
        kernel = _param(self, "kernel", nn.initializers.lecun_normal(), (in_features, self.features))
        bias = _param(self, "bias", nn.initializers.zeros, (self.features,)) if self.use_bias else None
        return kernel, bias


def conv(features: int, kernel: int, name: str | None, dtype, stride: int = 1, padding: int | None = None) -> Conv2d:
    """A 2-D convolution on NHWC input with PyTorch's symmetric padding ((kernel-1)//2 by default)."""
    pad = (kernel - 1) // 2 if padding is None else padding
    return Conv2d(features, kernel, stride=stride, padding=pad, dtype=dtype, name=name)


def timestep_embedding(
    timesteps_B: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0
) -> jax.Array:
    """Sinusoidal embedding of diffusion timesteps, (B,) -> (B, dim) fp32.

    Frequencies are max_period^(-i / (dim/2 - freq_shift)) for i < dim/2; the first half of the features is
    sin, the second cos (swapped when `flip_sin_to_cos`), as diffusers' `get_timestep_embedding`.
    """
    half = dim // 2
    # The frequency table is a constant: built on the host in float64 and rounded once, because XLA's
    # fp32 exp is off by up to ~1e-6 relative, which at t ~ 1000 moves sin/cos by ~1e-3.
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half - freq_shift)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
    args_BF = timesteps_B.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    sin, cos = jnp.sin(args_BF), jnp.cos(args_BF)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal timestep features: linear_1 -> act -> linear_2."""

    features: int
    act_fn: str = "silu"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.features, dtype=self.dtype, name="linear_1")(x)
        x = activation(self.act_fn)(x)
        return Dense(self.features, dtype=self.dtype, name="linear_2")(x)


class AttentionPooling(nn.Module):
    """One pooled vector per sequence, (B, L, D) -> (B, D): a query token (the mean over the L tokens plus
    the learnt `positional_embedding`) attends with `num_heads` heads to itself and the L tokens; q, k and v
    are linear projections, with no output projection (diffusers' `AttentionPooling`, from DeepFloyd IF)."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BLD: jax.Array) -> jax.Array:
        b, _, d = x_BLD.shape
        position = _param(self, "positional_embedding", nn.initializers.normal(d**-0.5), (1, d))
        query_B1D = x_BLD.mean(axis=1, keepdims=True) + position.astype(x_BLD.dtype)
        tokens_BKD = jnp.concatenate([query_B1D, x_BLD], axis=1)
        heads = lambda y: y.reshape(y.shape[0], y.shape[1], self.num_heads, d // self.num_heads)
        q = heads(Dense(d, dtype=self.dtype, name="q_proj")(query_B1D))
        k = heads(Dense(d, dtype=self.dtype, name="k_proj")(tokens_BKD))
        v = heads(Dense(d, dtype=self.dtype, name="v_proj")(tokens_BKD))
        return kernels.attention(q, k, v).reshape(b, d)


class TextTimeEmbedding(nn.Module):
    """The text's addition to the timestep embedding (diffusers' `addition_embed_type="text"`):
    norm1 -> attention pooling of the (B, L, D) text states -> proj to `features` -> norm2, (B, features)."""

    features: int
    num_heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, context_BLD: jax.Array) -> jax.Array:
        h = layer_norm(1e-5, self.dtype, "norm1")(context_BLD)
        h = AttentionPooling(self.num_heads, self.dtype, name="pool")(h)
        h = Dense(self.features, dtype=self.dtype, name="proj")(h)
        return layer_norm(1e-5, self.dtype, "norm2")(h)


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice, with the time embedding added in between and a (1x1) skip path.

    (B, H, W, Cin), temb (B, T) or None -> (B, H, W, out_channels), divided by `output_scale_factor`. With
    `skip_BHWC` (an up block's skip connection) the input is x and the skip concatenated along channels, which
    conv1's TPU kernel may read as two parts (`kernels.norm_act_conv`).
    """

    out_channels: int
    groups: int
    eps: float
    act_fn: str = "silu"
    output_scale_factor: float = 1.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, temb_BT: jax.Array | None, skip_BHWC: jax.Array | None = None) -> jax.Array:
        act = activation(self.act_fn)
        parts = None
        if skip_BHWC is not None:
            parts = (x_BHWC, skip_BHWC)
            x_BHWC = jnp.concatenate(parts, axis=-1)
        h = self._norm_act_conv(x_BHWC, None, "norm1", "conv1", parts)
        t = None
        if temb_BT is not None:
            t = Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(act(temb_BT))
        h = self._norm_act_conv(h, t, "norm2", "conv2")
        if x_BHWC.shape[-1] != self.out_channels:
            x_BHWC = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x_BHWC)
        return (x_BHWC + h) / self.output_scale_factor

    def _norm_act_conv(
        self, x_BHWC: jax.Array, offset_BC: jax.Array | None, norm: str, conv_name: str, parts=None
    ) -> jax.Array:
        """conv(act(norm(x + offset))): the 3x3 convolution `conv_name` of the activated GroupNorm `norm` of
        x, plus a per-channel offset (the time embedding) first; `parts`: x's channel parts, or None
        (`kernels.norm_act_conv`)."""
        channels = x_BHWC.shape[-1]
        scale, bias = GroupNormWeights(name=norm)(channels)
        kernel, conv_bias = ConvWeights(self.out_channels, 3, name=conv_name)(channels)
        return kernels.norm_act_conv(
            x_BHWC,
            offset_BC,
            scale,
            bias,
            kernel.astype(self.dtype),
            conv_bias,
            groups=self.groups,
            eps=self.eps,
            act=activation(self.act_fn),
            dtype=self.dtype,
            parts=parts,
        )


class Downsample2D(nn.Module):
    """Halves H and W with a stride-2 3x3 conv; `padding=0` pads only bottom/right (the VAE's layout)."""

    channels: int
    padding: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        if self.padding == 0:
            x_BHWC = jnp.pad(x_BHWC, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.channels, 3, "conv", self.dtype, stride=2, padding=self.padding)(x_BHWC)


class Upsample2D(nn.Module):
    """Doubles H and W by nearest-neighbour repetition (or resizes to `size`), then a 3x3 conv."""

    channels: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        h, w = x_BHWC.shape[1:3]
        if size is None or tuple(size) == (2 * h, 2 * w):
            return Conv2d(self.channels, 3, padding=1, dtype=self.dtype, upsample2x=True, name="conv")(x_BHWC)
        x_BHWC = x_BHWC[:, _nearest_indices(h, size[0])][:, :, _nearest_indices(w, size[1])]
        return conv(self.channels, 3, "conv", self.dtype)(x_BHWC)


def _nearest_indices(src: int, dst: int) -> np.ndarray:
    """Source index of each output position of PyTorch's nearest interpolation from `src` to `dst`."""
    scale = np.float32(src) / np.float32(dst)
    return np.minimum(np.floor(np.arange(dst, dtype=np.float32) * scale).astype(np.int64), src - 1)


class CrossAttention(nn.Module):
    """Multi-head attention of tokens (B, N, C) over a context (B, M, Dc), or over themselves.

    Projections to_q/to_k/to_v (no bias) and to_out.0 (with bias), as diffusers' `Attention`.
    """

    heads: int
    head_dim: int
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x_BNC: jax.Array,
        context_BMD: jax.Array | None = None,
        residual_BNC: jax.Array | None = None,
    ) -> jax.Array:
        """The attention of x over the context (x itself when None), plus `residual_BNC` when given."""
        channels, inner = x_BNC.shape[-1], self.heads * self.head_dim
        context_channels = channels if context_BMD is None else context_BMD.shape[-1]
        wq, _ = LinearWeights(inner, use_bias=False, name="to_q")(channels)
        wk, _ = LinearWeights(inner, use_bias=False, name="to_k")(context_channels)
        wv, _ = LinearWeights(inner, use_bias=False, name="to_v")(context_channels)
        wo, bo = LinearWeights(channels, name="to_out.0")(inner)
        x = x_BNC.astype(self.dtype)
        context = None if context_BMD is None else context_BMD.astype(self.dtype)
        return kernels.projected_attention(
            x,
            context,
            wq,
            wk,
            wv,
            wo,
            bo,
            heads=self.heads,
            head_dim=self.head_dim,
            upcast=self.upcast,
            residual_BNC=residual_BNC,
        )


class LayerNormWeights(nn.Module):
    """A LayerNorm's parameters, `scale` and `bias` (float32, as flax's `nn.LayerNorm`), returned unapplied
    for a kernel that applies them itself (`kernels.feed_forward`)."""

    @nn.compact
    def __call__(self, channels: int) -> tuple[jax.Array, jax.Array]:
        return _norm_params(self, channels)


class GEGLUWeights(nn.Module):
    """diffusers' GEGLU layer's parameters: `proj`, a linear layer to 2 * features (hidden, then gate),
    returned unapplied as (kernel, bias)."""

    features: int

    @nn.compact
    def __call__(self, in_features: int) -> tuple[jax.Array, jax.Array]:
        return LinearWeights(2 * self.features, name="proj")(in_features)


class FeedForwardWeights(nn.Module):
    """diffusers' `FeedForward` with GEGLU and inner width 4 * C: its parameters under net.0.proj and net.2,
    returned unapplied as (net.0 kernel (C, 8C), bias, net.2 kernel (4C, C), bias)."""

    @nn.compact
    def __call__(self, channels: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        w1, b1 = GEGLUWeights(4 * channels, name="net.0")(channels)
        w2, b2 = LinearWeights(channels, name="net.2")(4 * channels)
        return w1, b1, w2, b2


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention (or cross-attention when `only_cross_attention`), cross-attention, GEGLU MLP,
    each added to the residual stream; the last sublayer (norm3, ff, residual) is `kernels.feed_forward`."""

    heads: int
    head_dim: int
    only_cross_attention: bool = False
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BNC: jax.Array, context_BMD: jax.Array) -> jax.Array:
        attn = lambda name: CrossAttention(self.heads, self.head_dim, self.upcast, self.dtype, name=name)
        h = layer_norm(1e-5, self.dtype, "norm1")(x_BNC)
        x_BNC = attn("attn1")(h, context_BMD if self.only_cross_attention else None, residual_BNC=x_BNC)
        h = layer_norm(1e-5, self.dtype, "norm2")(x_BNC)
        x_BNC = attn("attn2")(h, context_BMD, residual_BNC=x_BNC)
        scale, shift = LayerNormWeights(name="norm3")(x_BNC.shape[-1])
        ff = FeedForwardWeights(name="ff")(x_BNC.shape[-1])
        return kernels.feed_forward(x_BNC, scale, shift, 1e-5, *ff, dtype=self.dtype)


class Transformer2D(nn.Module):
    """Spatial transformer: GroupNorm, proj_in, transformer blocks over the H*W tokens, proj_out, residual.

    proj_in/proj_out are 1x1 convs, or linear layers when `use_linear_projection` (SD 2.x).
    (B, H, W, C), context (B, M, Dc) -> (B, H, W, C).
    """

    heads: int
    head_dim: int
    num_layers: int = 1
    groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array, context_BMD: jax.Array) -> jax.Array:
        b, hgt, wid, c = x_BHWC.shape
        inner = self.heads * self.head_dim
        h = GroupNorm(self.groups, 1e-6, self.dtype, name="norm")(x_BHWC)
        if self.use_linear_projection:
            h = Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = conv(inner, 1, "proj_in", self.dtype)(h).reshape(b, hgt * wid, inner)
        for i in range(self.num_layers):
            h = BasicTransformerBlock(
                self.heads,
                self.head_dim,
                self.only_cross_attention,
                self.upcast,
                self.dtype,
                name=f"transformer_blocks.{i}",
            )(h, context_BMD)
        if self.use_linear_projection:
            h = Dense(c, dtype=self.dtype, name="proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = conv(c, 1, "proj_out", self.dtype)(h.reshape(b, hgt, wid, inner))
        return h + x_BHWC


class SpatialSelfAttention(nn.Module):
    """The VAE's single-head self-attention over H*W positions with a GroupNorm in front and a residual.

    Projections to_q/to_k/to_v/to_out.0 all carry biases, as diffusers' `Attention(..., bias=True)`.
    """

    groups: int
    eps: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        b, hgt, wid, c = x_BHWC.shape
        h = GroupNorm(self.groups, self.eps, self.dtype, name="group_norm")(x_BHWC).reshape(b, hgt * wid, c)
        q, k, v = (Dense(c, dtype=self.dtype, name=n)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
        out = kernels.attention(q, k, v).reshape(b, hgt * wid, c)
        out = Dense(c, dtype=self.dtype, name="to_out.0")(out)
        return out.reshape(b, hgt, wid, c) + x_BHWC
