"""The kernels behind the layers, chosen per target platform: attention, convolutions and products.

The layers call `attention`, `projected_attention`, `feed_forward`, `biased_conv`, `norm_act_conv`, `conv`,
`conv2d` and `matmul` and never name a backend. Each choice is made with `jax.lax.platform_dependent` (`by_platform`),
so it follows the platform a program is lowered for (a TPU topology compiled on a CPU host gets the TPU kernels,
although the host's own backend is the CPU), and only the chosen branch is lowered. The measurements behind each
choice are in the README ("Kernel choices on XLA:CPU" and "Accelerators: TPU and GPU").

| operation              | cpu                                | tpu                         | cuda / rocm             |
|------------------------|------------------------------------|-----------------------------|-------------------------|
| attention (not causal) | query-chunked einsum (attention.py)| Pallas flash attention      | cuDNN fused attention if|
|                        |                                    | (tokens padded; heads over  | its limits allow, else  |
|                        |                                    | 128 padded to 128s)         | cpu                     |
| projected attention    | projections + `attention`          | bf16 heads <= 128: weights  | as cpu                  |
| (diffusers' Attention) |                                    | regrouped, packed-heads     |                         |
|                        |                                    | kernel (tpu_attention.py),  |                         |
|                        |                                    | to_out and residual inside; |                         |
|                        |                                    | else as cpu                 |                         |
| 3x3 conv, stride 1     | products over shifted copies on    | Pallas kernel (tpu_conv.py) | XLA convolution         |
|                        | small maps, else XLA               | in bfloat16 where it fits   |                         |
|                        |                                    | VMEM (taps packed into one  |                         |
|                        |                                    | product where channels are  |                         |
|                        |                                    | not whole 128-lane tiles);  |                         |
|                        |                                    | else one product            |                         |
|                        |                                    | per tap up to 512 rows      |                         |
|                        |                                    | (`_tpu_form`), else XLA     |                         |
| GroupNorm, SiLU, 3x3   | norm, SiLU, then as 3x3 conv       | where the Pallas conv runs: | as cpu                  |
| conv (ResNet blocks)   |                                    | the norm as an affine map   |                         |
|                        |                                    | applied with the SiLU in    |                         |
|                        |                                    | the kernel's input copy     |                         |
| LayerNorm + GEGLU      | norm, product, split, erf GELU,    | bf16: one Pallas kernel     | as cpu                  |
| feed-forward + residual| product, residual add              | (tpu_feed_forward.py)       |                         |
| 1x1 conv               | one product in half precision      | one product up to 32,768    | XLA convolution         |
|                        |                                    | rows, else XLA              |                         |
| nearest 2x + 3x3 conv  | sub-pixel 2x2 convs on large maps  | bf16, whole 128-lane output | repeat, then XLA        |
|                        |                                    | tiles: Pallas kernel on the |                         |
|                        |                                    | unrepeated map; else repeat,|                         |
|                        |                                    | then as 3x3 conv            |                         |
| conv gradients         | per-tap matrix products            | XLA's                       | XLA's                   |

Precision: float32 products and convolutions ask for `Precision.HIGHEST` (the parity mode: GPUs would use
TF32 and TPUs bf16 passes by default); half-precision operands accumulate in float32 (`accumulator`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sdjax.nn import norms, tpu_attention, tpu_conv, tpu_feed_forward
from sdjax.nn.attention import dot_product_attention as chunked_attention
from sdjax.nn.precision import accumulator, precision
from sdjax.targets import kernel_platforms

# 3x3 convolutions on feature maps of at most this many positions run on the CPU as one matrix product
# over the nine shifted copies of the input (im2col); in half precision up to ROWS_MAX_POSITIONS as one
# product per kernel row.
IM2COL_MAX_POSITIONS = 256
ROWS_MAX_POSITIONS = 128 * 128
# On the TPU, convolutions with at most this many output rows (batch x positions) run as one product per
# kernel tap (`_tpu_form`).
TPU_TAPS_MAX_ROWS = 512
# On the TPU, 1x1 convolutions with at most this many output rows (batch x positions) run as one product,
# larger ones as XLA's convolution (see `conv`).
TPU_1X1_PRODUCT_MAX_ROWS = 32768
# The Pallas TPU flash kernel works on blocks of 128 tokens; head dims above 128 must be multiples of 128.
TPU_LANES = 128


def by_platform(*args, default, **branches):
    """`jax.lax.platform_dependent(*args, default=default, **branches)`: the branch of the platform the
    program is lowered for. JAX traces every branch, lowered or not; with $SDJAX_KERNEL_PLATFORMS set (e.g.
    to `cpu`, as the test suite does) only the named platforms' branches are traced, and lowering the
    program for another platform fails (JAX's error names the platform; `sdjax.targets.kernel_platforms`).
    Tracing the TPU kernels into every CPU program cost the test suite's tiny models 3-17% of a test's time
    (README "Tests")."""
    named = kernel_platforms()
    if named is not None:
        branches = {p: branches.get(p, default) for p in named}
        default = None
    return jax.lax.platform_dependent(*args, default=default, **branches)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (..., K) @ w (K, N) -> (..., N), accumulated (and returned) in `accumulator(x.dtype)`."""
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(x, w, dims, precision=precision(x.dtype), preferred_element_type=accumulator(x.dtype))


# ---------------------------------------------------------------------------------------------- convolutions


def _conv_nhwc(x_BHWC, kernel_HWIO, stride: int, padding: int) -> jax.Array:
    """XLA's convolution with symmetric zero padding, accumulated (and returned) in `accumulator`."""
    pad = ((padding, padding), (padding, padding))
    return jax.lax.conv_general_dilated(
        x_BHWC,
        kernel_HWIO,
        (stride, stride),
        pad,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=precision(x_BHWC.dtype),
        preferred_element_type=accumulator(x_BHWC.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x_BHWC: jax.Array, kernel_HWIO: jax.Array, stride: int, padding: int) -> jax.Array:
    """A 2-D convolution (NHWC, HWIO, symmetric padding) with per-backend gradients.

    On the CPU the gradients are matrix products: XLA:CPU computes a convolution's kernel gradient far
    slower than the forward pass, and both gradients slower again inside a loop (`lax.scan`, as in gradient
    accumulation). There the kernel gradient is one product per kernel tap (strided window of the input
    against the output gradient) and the input gradient a convolution with the flipped kernel (stride 1) or
    a sum of per-tap products (stride 2), equal to XLA's up to float rounding. Elsewhere XLA's own.
    """
    return _conv_nhwc(x_BHWC, kernel_HWIO, stride, padding)


def _conv2d_fwd(x_BHWC, kernel_HWIO, stride, padding):
    return _conv_nhwc(x_BHWC, kernel_HWIO, stride, padding), (x_BHWC, kernel_HWIO)


def _conv2d_bwd_xla(stride, padding, x_BHWC, kernel, dy_BHWO):
    _, pullback = jax.vjp(lambda x, k: _conv_nhwc(x, k, stride, padding), x_BHWC, kernel)
    return pullback(dy_BHWO.astype(accumulator(x_BHWC.dtype) or x_BHWC.dtype))


def _conv2d_bwd_products(stride, padding, x_BHWC, kernel, dy_BHWO):
    dy_BHWO = dy_BHWO.astype(x_BHWC.dtype)
    acc = accumulator(x_BHWC.dtype)
    k = kernel.shape[0]
    h_out, w_out = dy_BHWO.shape[1:3]
    padded = jnp.pad(x_BHWC, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    rows = lambda i: slice(i, i + stride * (h_out - 1) + 1, stride)
    cols = lambda j: slice(j, j + stride * (w_out - 1) + 1, stride)
    taps = [
        [
            jnp.einsum("bhwc,bhwo->co", padded[:, rows(i), cols(j)], dy_BHWO, preferred_element_type=acc)
            for j in range(k)
        ]
        for i in range(k)
    ]
    d_kernel = jnp.stack([jnp.stack(row) for row in taps]).astype(kernel.dtype)
    if stride == 1:
        flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
        dx = _conv_nhwc(dy_BHWO, flipped.astype(dy_BHWO.dtype), 1, k - 1 - padding)
    else:
        d_padded = jnp.zeros(padded.shape, acc or dy_BHWO.dtype)
        for i in range(k):
            for j in range(k):
                tap = jnp.einsum(
                    "bhwo,co->bhwc", dy_BHWO, kernel[i, j].astype(dy_BHWO.dtype), preferred_element_type=acc
                )
                d_padded = d_padded.at[:, rows(i), cols(j)].add(tap)
        dx = d_padded[:, padding : padding + x_BHWC.shape[1], padding : padding + x_BHWC.shape[2]]
    return dx.astype(x_BHWC.dtype), d_kernel


def _conv2d_bwd(stride, padding, residuals, dy_BHWO):
    x_BHWC, kernel = residuals

    def cast(grads):
        dx, dk = grads
        return dx.astype(x_BHWC.dtype), dk.astype(kernel.dtype)

    products = lambda *a: cast(_conv2d_bwd_products(stride, padding, *a))  # noqa: E731
    xla = lambda *a: cast(_conv2d_bwd_xla(stride, padding, *a))  # noqa: E731
    return by_platform(x_BHWC, kernel, dy_BHWO, default=xla, cpu=products)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def _as_products(positions: int, dtype) -> bool:
    """Whether a stride-1 convolution with `positions` output positions runs as products on the CPU."""
    limit = ROWS_MAX_POSITIONS if accumulator(dtype) is not None else IM2COL_MAX_POSITIONS
    return positions <= limit


def _cpu_form(positions: int) -> str:
    """The CPU's product form: one im2col product on small maps, one product per kernel row above."""
    return "im2col" if positions <= IM2COL_MAX_POSITIONS else "rows"


def _tpu_form(batch: int, positions: int) -> str:
    """How a stride-1 convolution of `batch` maps of `positions` output positions runs on a TPU when the
    Pallas kernel does not take it (float32, widths below a VMEM tile, maps too large for VMEM), from the
    TPU cost model (one v5e chip, bf16; README "Accelerators"). Up to TPU_TAPS_MAX_ROWS output rows the
    weights dominate, and XLA's convolution emitter (the batch in a vector register's 8 sublanes, each map
    row padded to a multiple of 8 plus a halo) mostly moves padding: one product per kernel tap reads each
    weight once (3x3 at 8x8x1280, batch 2: 0.06 against 0.20 ms; 16x16x1280: 0.12 against 0.30 ms). Above
    it XLA's convolution: per kernel row products won some shapes alone (64x64x320 at batch 2: 0.20
    against 0.21 ms) but not inside the UNet, where XLA fuses the GroupNorm and SiLU before a convolution
    into it (SD 1.5 UNet step 21.5 against 21.7 ms by the cost model, 18.9 against 17.4 ms by the roofline)."""
    return "taps" if batch * positions <= TPU_TAPS_MAX_ROWS else "xla"


def _valid_conv_as_products(padded_BHWC: jax.Array, kernel_HWIO: jax.Array, form: str) -> jax.Array:
    """Unpadded stride-1 convolution as matrix products (output in `accumulator(dtype)`): "im2col" one
    product over all kh*kw shifted copies of the input side by side, "rows" one product per kernel row over
    its kw shifted copies, "taps" one product per kernel tap; summed."""
    kh, kw, c, o = kernel_HWIO.shape
    h = padded_BHWC.shape[1] - kh + 1
    w = padded_BHWC.shape[2] - kw + 1
    if form == "im2col":
        taps = [padded_BHWC[:, i : i + h, j : j + w] for i in range(kh) for j in range(kw)]
        return matmul(jnp.concatenate(taps, axis=-1), kernel_HWIO.reshape(kh * kw * c, o))
    if form == "taps":
        parts = [(padded_BHWC[:, i : i + h, j : j + w], kernel_HWIO[i, j]) for i in range(kh) for j in range(kw)]
    else:
        rows_BHWK = jnp.concatenate([padded_BHWC[:, :, j : j + w] for j in range(kw)], axis=-1)
        parts = [(rows_BHWK[:, i : i + h], kernel_HWIO[i].reshape(kw * c, o)) for i in range(kh)]
    y = None
    for x, k in parts:
        part = matmul(x, k)
        y = part if y is None else y + part
    return y


def _product_branches(batch: int, positions: int, dtype, prepare) -> dict:
    """The `platform_dependent` branches that run a stride-1 convolution of `batch` maps of `positions`
    output positions as products: the CPU's (`_as_products`, `_cpu_form`) and the TPU's (`_tpu_form`);
    `prepare` pads the input first (identity for an already padded one)."""
    branches = {}
    if _as_products(positions, dtype):
        branches["cpu"] = lambda x, k: _valid_conv_as_products(prepare(x), k, _cpu_form(positions))
    tpu_form = _tpu_form(batch, positions)
    if tpu_form != "xla":
        branches["tpu"] = lambda x, k: _valid_conv_as_products(prepare(x), k, tpu_form)
    return branches


def conv(x_BHWC: jax.Array, kernel_HWIO: jax.Array, stride: int, padding: int) -> jax.Array:
    """A layer's convolution (output in `accumulator(x.dtype)`), by backend: 1x1 kernels as one matrix
    product on the CPU in half precision, and on the TPU up to TPU_1X1_PRODUCT_MAX_ROWS output rows; 3x3
    kernels as products by `_product_branches`; else `conv2d`. (On the TPU, `biased_conv` runs bfloat16
    3x3 convolutions as a Pallas kernel before any of these.)

    The TPU's 1x1 rule, from the cost model (one v5e chip, bf16, SD 1.5 at 512x512): in the UNet (at most
    8,192 rows: 64x64 latents, batch 2) products take the CFG step from 22.6 to 21.7 ms. In the VAE
    decoder (65,536 rows and more: its shortcuts at 256x256 and 512x512) a product's output leaves XLA's
    padded convolution layout, so the residual stream after it is copied, sliced and re-padded around
    every following 3x3 convolution: products 28.0 ms per decode, XLA's convolution 20.6 ms."""
    k = kernel_HWIO.shape[0]
    batch, positions = x_BHWC.shape[0], x_BHWC.shape[1] * x_BHWC.shape[2]
    xla = lambda x, w: conv2d(x, w, stride, padding)
    branches = {}
    if k == 1 and stride == 1 and padding == 0:
        product = lambda x, w: matmul(x, w[0, 0])
        if batch * positions <= TPU_1X1_PRODUCT_MAX_ROWS:
            branches["tpu"] = product
        if accumulator(x_BHWC.dtype) is not None:
            branches["cpu"] = product
    elif k == 3 and stride == 1 and padding == 1:
        pad = lambda x: jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        branches = _product_branches(batch, positions, x_BHWC.dtype, pad)
    if not branches:
        return xla(x_BHWC, kernel_HWIO)
    return by_platform(x_BHWC, kernel_HWIO, default=xla, **branches)


def biased_conv(
    x_BHWC: jax.Array, kernel_HWIO: jax.Array, bias_O: jax.Array, stride: int, padding: int, upsample2x: bool = False
) -> jax.Array:
    """A layer's convolution plus its bias, summed in `accumulator(x.dtype)` and rounded once to x's dtype:
    `conv`, or with `upsample2x` (3x3, padding 1) `upsample2x_conv`, then the bias.

    On the TPU, bfloat16 3x3 stride-1 convolutions that `tpu_conv.fits` run as sdjax's Pallas kernel, the
    bias added inside and the output written in bfloat16. SD 1.5's UNet CFG step on one v5e chip (bf16,
    cost model; README "Accelerators"): 21.70 ms with XLA's convolutions and taps; 17.50 ms with the kernel
    on maps of widths 16 to 64; 16.34 ms also on the 8x8 maps (taps before); 16.06 ms with the bias added
    and bfloat16 written inside the kernel (before: a float32 output that the next op read back). At
    batches that are multiples of 8, where XLA's emitter fills its sublanes with the batch, XLA's took the
    convolutions whose output channels are not whole 128-lane tiles until the kernel packed its taps
    (`tpu_conv.packs`); since then the kernel wins there too: the step at batch 8 (4 images with CFG) 42.34
    ms with XLA's on SD 1.5's 320-channel maps, 41.98 ms with the kernel everywhere.

    Upsampling ones whose repeated map the kernel would take run as `tpu_conv.upsample2x_conv3x3` where
    their output channels are whole 128-lane tiles: it never builds the repeated map (XLA wrote it in a
    layout with two rows per tile: 1.84 ms for SD 1.5's 64x64x640 map at batch 4). At batch 4 (cost model,
    with a SiLU after): 8x8x1280 0.351 -> 0.142 ms, 16x16x1280 1.404 -> 0.568 ms, 32x32x640 1.612 -> 0.625
    ms; the UNet CFG step 49.22 -> 46.23 ms. Where the repeated map is too large for the kernel, the
    convolutions after it are XLA's, which want their input in XLA's padded layout: there the kernel's
    output would be copied (SD 1.5's VAE decode: 19.87 ms without the upsampling kernel, 19.54 ms with it
    on the 64x64 map, 20.12 ms with it on the 128x128 map too), so they stay XLA's on the repeated map."""

    def plain(x, k, b):
        y = upsample2x_conv(x, k) if upsample2x else conv(x, k, stride, padding)
        return (y + b.astype(y.dtype)).astype(x.dtype)

    b, h, w, c = x_BHWC.shape
    out_channels = kernel_HWIO.shape[-1]
    is_3x3 = kernel_HWIO.shape[:2] == (3, 3) and stride == 1 and padding == 1
    conv_shape = (b, 2 * h, 2 * w, c) if upsample2x else (b, h, w, c)
    if not (is_3x3 and tpu_conv.fits(conv_shape, out_channels, x_BHWC.dtype)):
        return plain(x_BHWC, kernel_HWIO, bias_O)
    if not upsample2x:
        kernel = tpu_conv.conv3x3
    elif tpu_conv.fits(x_BHWC.shape, out_channels, x_BHWC.dtype, upsample2x=True):
        kernel = tpu_conv.upsample2x_conv3x3
    else:
        kernel = lambda x, k, b: tpu_conv.conv3x3(tpu_conv.nearest_2x(x), k, b)  # noqa: E731
    pallas = _per_device(kernel, plain, batched=(True, False, False))
    return by_platform(x_BHWC, kernel_HWIO, bias_O, default=plain, tpu=pallas)


def norm_act_conv(
    x_BHWC: jax.Array,
    offset_BC: jax.Array | None,
    scale_C: jax.Array,
    bias_C: jax.Array,
    kernel_HWIO: jax.Array,
    bias_O: jax.Array,
    *,
    groups: int,
    eps: float,
    act,
    dtype,
    parts: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """A ResNet block's normalise-activate-convolve: the 3x3 convolution (stride 1, padding 1, plus bias) of
    act(GroupNorm(x + offset)), x (B, H, W, C), offset (B, C) or None, in `dtype`: (B, H, W, O). `parts`:
    x's two channel parts (an up block's map and skip connection; x is their concatenation), or None.

    Everywhere, these are `norms.group_norm`, `act` and `biased_conv` one after the other. On the TPU, with
    a SiLU, in bfloat16 and where `biased_conv` would run the Pallas kernel, the norm's per-channel sums stay
    XLA's (they fuse into the op that produced x); the kernel makes them a per-image, per-channel affine map
    and applies it, with the SiLU, to each image as it copies it into VMEM (`tpu_conv.norm_silu_conv3x3`):
    the normalised map is never written out and read back. One v5e chip, cost model, GroupNorm + SiLU +
    convolution at batch 2: 64x64x960 -> 320 0.585 -> 0.380 ms, 64x64x320 0.222 -> 0.148 ms, 32x32x640
    0.160 -> 0.128 ms (README "Accelerators" for the UNet step). There the kernel reads an up block's
    `parts` as they are, so that x is not written for it (only XLA's 1x1 shortcut product reads x, which
    fuses the concatenation in), where that pads no more channels to the matrix unit's width than x
    (`tpu_conv.parts_pay`): SD 1.5's UNet CFG step 13.63 -> 13.43 ms (README "Accelerators")."""

    def plain(x, first, second, offset, scale, bias, kernel, conv_bias):
        if offset is not None:
            x = x + offset[:, None, None, :]
        return biased_conv(act(norms.group_norm(x, scale, bias, groups, eps, dtype)), kernel, conv_bias, 1, 1)

    if parts is not None and tpu_conv.parts_pay([p.shape[-1] for p in parts]):
        read = tuple(parts)
    else:
        read = (x_BHWC,)
    widths = [p.shape[-1] for p in read]
    out_channels = kernel_HWIO.shape[-1]
    split = read if len(read) == 2 else (None, None)
    args = (x_BHWC, *split, offset_BC, scale_C, bias_C, kernel_HWIO, bias_O)
    if not (
        act is jax.nn.silu
        and kernel_HWIO.shape[:2] == (3, 3)
        and jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16)
        and all(p.dtype == jnp.bfloat16 for p in read)
        and tpu_conv.fits(x_BHWC.shape, out_channels, jnp.bfloat16, normalized=True, widths=widths)
    ):
        return plain(*args)

    def fused(x, first, second, offset, scale, bias, kernel, conv_bias):
        read = [x] if first is None else [first, second]
        if offset is not None:
            offsets = tpu_conv.split_channels(offset, widths)
            shifted = [(p + o[:, None, None, :]).astype(jnp.float32) for p, o in zip(read, offsets, strict=True)]
        else:
            shifted = [p.astype(jnp.float32) for p in read]
        sums = jnp.concatenate([jnp.sum(p, axis=(1, 2)) for p in shifted], axis=-1)
        squares = jnp.concatenate([jnp.sum(jnp.square(p), axis=(1, 2)) for p in shifted], axis=-1)
        offset = None if offset is None else offset.astype(jnp.float32)
        return tpu_conv.norm_silu_conv3x3(
            read, sums, squares, offset, scale, bias, kernel, conv_bias, groups=groups, eps=eps
        )

    return _by_platform_with_nones(args, plain, fused, batched=(True, True, True, True))


def _by_platform_with_nones(args, plain, tpu, *, batched):
    """`by_platform(*args, default=plain, tpu=tpu run per device)` where some args may be None (the
    branches still get them, as None; `platform_dependent` takes arrays only). `batched`: whether each of
    the first args carries the batch (split over devices); the rest do not."""
    present = [k for k, a in enumerate(args) if a is not None]

    def rebuild(f):
        def call(*given):
            full = [None] * len(args)
            for k, a in zip(present, given, strict=True):
                full[k] = a
            return f(*full)

        return call

    flags = [bool(batched[k]) if k < len(batched) else False for k in present]
    per_device = _per_device(rebuild(tpu), rebuild(plain), batched=tuple(flags))
    return by_platform(*[args[k] for k in present], default=rebuild(plain), tpu=per_device)


def valid_conv(padded_BHWC: jax.Array, kernel_HWIO: jax.Array) -> jax.Array:
    """An unpadded stride-1 convolution of an already padded input, by backend as `conv`."""
    batch = padded_BHWC.shape[0]
    positions = (padded_BHWC.shape[1] - kernel_HWIO.shape[0] + 1) * (padded_BHWC.shape[2] - kernel_HWIO.shape[1] + 1)
    xla = lambda x, k: conv2d(x, k, 1, 0)
    branches = _product_branches(batch, positions, padded_BHWC.dtype, lambda x: x)
    if not branches:
        return xla(padded_BHWC, kernel_HWIO)
    return by_platform(padded_BHWC, kernel_HWIO, default=xla, **branches)


def _subpixel_kernels(kernel_HWIO: jax.Array) -> jax.Array:
    """The 3x3 kernel of "nearest 2x, then conv" as four 2x2 kernels, one per output parity, side by side:
    (2, 2, C, 4 * O), parity (a, b) at [..., (2a + b) * O : (2a + b + 1) * O]. Output row 2i + a reads input
    rows i - 1 + a and i + a; for a = 0 the first gets kernel row 0 and the second rows 1 + 2, for a = 1
    the first gets rows 0 + 1 and the second row 2 (columns likewise). Sums, not products: on CPU an einsum
    with 0/1 matrices runs as slow dot products over the whole kernel."""
    k = kernel_HWIO
    rows = ((k[0], k[1] + k[2]), (k[0] + k[1], k[2]))  # rows[a][tap]: (3, C, O) over kernel columns
    taps = []
    for tap_row in range(2):
        row_taps = []
        for tap_col in range(2):
            parities = []
            for a in range(2):
                r = rows[a][tap_row]
                cols = ((r[0], r[1] + r[2]), (r[0] + r[1], r[2]))
                parities.extend(cols[b][tap_col] for b in range(2))
            row_taps.append(jnp.concatenate(parities, axis=-1))
        taps.append(jnp.stack(row_taps))
    return jnp.stack(taps)


def _subpixel_upsample_conv(x_BHWC: jax.Array, kernel_HWIO: jax.Array) -> jax.Array:
    """conv3x3(nearest_2x(x)) without the 4x larger upsampled map: each of the four output parities (a, b)
    is a 2x2 convolution of x with a kernel summed from the 3x3 one (`_subpixel_kernels`), 4/9 of the
    multiply-adds. One 2x2 convolution of the zero-padded x with the four kernels side by side gives
    (H+1, W+1, 4, O) outputs; parity (a, b) is the window shifted by (a, b)."""
    b, h, w, _ = x_BHWC.shape
    o = kernel_HWIO.shape[-1]
    padded = jnp.pad(x_BHWC, ((0, 0), (1, 1), (1, 1), (0, 0)))
    y = valid_conv(padded, _subpixel_kernels(kernel_HWIO)).reshape(b, h + 1, w + 1, 2, 2, o)
    rows = [jnp.stack([y[:, a : a + h, bb : bb + w, a, bb] for bb in range(2)], axis=3) for a in range(2)]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, o)


def upsample2x_conv(x_BHWC: jax.Array, kernel_HWIO: jax.Array) -> jax.Array:
    """conv3x3(nearest_2x(x)), stride 1, padding 1, output in `accumulator(x.dtype)`: (B, H, W, C) ->
    (B, 2H, 2W, O). On the CPU in the sub-pixel form where the map is the larger (B*H*W >= 4*O: the VAE
    decoder's, not the UNet's 1280-channel ones; the form builds a kernel 16/9 the conv's size each call);
    elsewhere the repeated map through `conv`: on one v5e chip (cost model, bf16) SD 1.5's VAE decode takes
    28.0 ms that way against 35.5 ms in the sub-pixel form."""
    repeated = lambda x, k: conv(tpu_conv.nearest_2x(x), k, 1, 1)
    b, h, w, _ = x_BHWC.shape
    if b * h * w < 4 * kernel_HWIO.shape[-1]:
        return repeated(x_BHWC, kernel_HWIO)
    return by_platform(x_BHWC, kernel_HWIO, cpu=_subpixel_upsample_conv, default=repeated)


# ---------------------------------------------------------------------------------------------- attention


def flash_attention_tpu(q_BQHD, k_BKHD, v_BKHD, *, block: int = 512) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v with the Pallas TPU flash-attention kernel, (B, Q, H, D) layout.

    Head dims of at most 128 go in as they are (a block may span a whole axis; SD 1.5's 40- and 80-wide
    heads, SD 2's 64); wider heads are zero-padded to a multiple of 128 lanes (q.k and the kept output
    columns are unchanged). Token counts must be multiples of 128: query tokens are padded and cut off
    again, padded key tokens masked out through segment ids (real tokens 1, padding 0). Blocks of up to
    `block` tokens.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    b, q_len, _, d = q_BQHD.shape
    k_len = k_BKHD.shape[1]
    d_pad = d if d <= TPU_LANES else tpu_conv.round_up(d, TPU_LANES)
    q_pad, k_pad = tpu_conv.round_up(q_len, TPU_LANES), tpu_conv.round_up(k_len, TPU_LANES)

    def heads_first(x_BTHD, length):
        x = jnp.pad(x_BTHD, ((0, 0), (0, length - x_BTHD.shape[1]), (0, 0), (0, d_pad - d)))
        return x.transpose(0, 2, 1, 3)

    q, k, v = heads_first(q_BQHD, q_pad), heads_first(k_BKHD, k_pad), heads_first(v_BKHD, k_pad)
    segments = None
    if k_pad != k_len:
        kv_ids = jnp.broadcast_to((jnp.arange(k_pad) < k_len).astype(jnp.int32), (b, k_pad))
        segments = tpu_flash.SegmentIds(q=jnp.ones((b, q_pad), jnp.int32), kv=kv_ids)
    block_q = tpu_conv.largest_divisor(q_pad, block, TPU_LANES)
    block_k = tpu_conv.largest_divisor(k_pad, block, TPU_LANES)
    sizes = tpu_flash.BlockSizes(
        block_q=block_q,
        block_k_major=block_k,
        block_k=block_k,
        block_b=1,
        block_q_major_dkv=block_q,
        block_k_major_dkv=block_k,
        block_k_dkv=block_k,
        block_q_dkv=block_q,
        block_k_major_dq=block_k,
        block_k_dq=block_k,
        block_q_dq=block_q,
    )
    out = tpu_flash.flash_attention(q, k, v, segment_ids=segments, sm_scale=d**-0.5, block_sizes=sizes)
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :d]


def _per_device(kernel, fallback, batched: tuple[bool, ...] | None = None):
    """`kernel` applied per device when the program is partitioned over a mesh (under `jax.set_mesh`, as
    train/'s sharded step): Pallas kernels cannot be partitioned automatically, so the batch axis of the
    arguments flagged in `batched` (all by default) is split over every free mesh axis with `shard_map`
    (attention and convolutions never mix rows); the others (weights) are whole on every device.
    `fallback` when the batch does not split evenly. Inside a `shard_map` already (generation) or
    without a mesh: `kernel` itself."""

    def call(*args):
        mesh = jax.sharding.get_abstract_mesh()
        axes = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes) if not mesh.empty else ()
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        if size == 1:
            return kernel(*args)
        if args[0].shape[0] % size:
            return fallback(*args)
        spec = PartitionSpec(axes)
        flags = batched or (True,) * len(args)
        in_specs = tuple(spec if flag else PartitionSpec() for flag in flags)
        return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, out_specs=spec, check_vma=False)(*args)

    return call


@functools.cache
def _cudnn_available() -> bool:
    """Whether cuDNN's fused attention can be traced here (a CPU host exporting for CUDA cannot)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        check_cudnn_version()
    except Exception:  # no cuDNN in this process: the XLA path stands in
        return False
    return True


def _cudnn_fits(q_BQHD) -> bool:
    """cuDNN's fused attention: half precision, head dims up to 128 in multiples of 8."""
    d = q_BQHD.shape[-1]
    return q_BQHD.dtype in (jnp.bfloat16, jnp.float16) and d <= 128 and d % 8 == 0


def attention(q_BQHD, k_BKHD, v_BKHD, *, upcast: bool = False, causal: bool = False) -> jax.Array:
    """softmax(q k^T / sqrt(D)) v, (B, Q, H, D) -> (B, Q, H, D) in v's dtype, by backend (module table).

    `upcast` computes q k^T in float32 (diffusers' `upcast_attention`; the flash and cuDNN kernels
    accumulate in float32 anyway); `causal` (CLIP's text encoder, 77 tokens) always takes the XLA path.
    """
    xla = lambda q, k, v: chunked_attention(q, k, v, upcast=upcast, causal=causal)
    if causal:
        return xla(q_BQHD, k_BKHD, v_BKHD)
    flash = lambda q, k, v: flash_attention_tpu(q, k, v).astype(v.dtype)
    branches = {"tpu": _per_device(flash, xla)}
    if _cudnn_fits(q_BQHD) and _cudnn_available():
        branches["cuda"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return by_platform(q_BQHD, k_BKHD, v_BKHD, default=xla, **branches)


def _dense(x, w, b=None):
    """x @ w (+ b) as a `Dense` layer computes it: accumulated in `accumulator`, the bias added there, rounded
    once to x's dtype."""
    y = matmul(x, w.astype(x.dtype))
    if b is not None:
        y = y + b.astype(y.dtype)
    return y.astype(x.dtype)


def _projected_attention_plain(heads, head_dim, upcast, x, context, wq, wk, wv, wo, bo, residual=None):
    context = x if context is None else context
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, head_dim)  # noqa: E731
    q, k, v = split(_dense(x, wq)), split(_dense(context, wk)), split(_dense(context, wv))
    out = attention(q, k, v, upcast=upcast)
    out = out.reshape(out.shape[0], out.shape[1], heads * head_dim)
    out = _dense(out, wo, bo)
    return out if residual is None else residual + out


def _projected_attention_packed(heads, head_dim, upcast, x, context, wq, wk, wv, wo, bo, residual=None):
    """The same through `tpu_attention.packed_attention` (`packed_attention_out` with a residual): the
    weights' columns regrouped into packed lane groups (to_out's rows likewise, zero rows for the padding
    lanes), so that no activation is re-laid out; queries padded to a multiple of 8 tokens, keys to a
    multiple of 128 (masked). One product makes what the kernel reads from one input: q, k and v side by
    side in a self-attention (context None; its queries padded as its keys), k and v in a cross-attention."""
    columns = lambda w: tpu_attention.pack(w.astype(x.dtype), head_dim)  # noqa: E731
    q_len = x.shape[1]
    k_len = q_len if context is None else context.shape[1]
    pad = lambda t, n: jnp.pad(t, ((0, 0), (0, tpu_conv.round_up(t.shape[1], n) - t.shape[1]), (0, 0)))  # noqa: E731
    g = tpu_attention.groups(heads, head_dim)
    x = pad(x, TPU_LANES if context is None else 8)
    if context is None:
        q = k = v = _dense(x, jnp.concatenate([columns(wq), columns(wk), columns(wv)], axis=1))
        offsets = (0, g, 2 * g)
    else:
        q = _dense(x, columns(wq))
        k = v = _dense(pad(context, TPU_LANES), jnp.concatenate([columns(wk), columns(wv)], axis=1))
        offsets = (0, 0, g)
    shape = dict(heads=heads, head_dim=head_dim, key_len=k_len, offsets=offsets)
    wo_rows = columns(wo.T).T
    if residual is not None:
        residual = pad(residual, x.shape[1])
        return tpu_attention.packed_attention_out(q, k, v, wo_rows, bo, residual, **shape)[:, :q_len]
    return _dense(tpu_attention.packed_attention(q, k, v, **shape)[:, :q_len], wo_rows, bo)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _projected_attention_tpu(heads, head_dim, upcast, *args):
    """`_projected_attention_packed`, differentiated through the plain path (on the TPU JAX's flash kernel
    and its backward kernels)."""
    return _projected_attention_packed(heads, head_dim, upcast, *args)


def _projected_attention_tpu_fwd(heads, head_dim, upcast, *args):
    return jax.vjp(functools.partial(_projected_attention_plain, heads, head_dim, upcast), *args)


def _projected_attention_tpu_bwd(heads, head_dim, upcast, pullback, dy):
    return pullback(dy)


_projected_attention_tpu.defvjp(_projected_attention_tpu_fwd, _projected_attention_tpu_bwd)


def projected_attention(
    x_BNC,
    context_BMD,
    wq_CI,
    wk_DI,
    wv_DI,
    wo_IC,
    bo_C,
    *,
    heads: int,
    head_dim: int,
    upcast: bool = False,
    residual_BNC: jax.Array | None = None,
) -> jax.Array:
    """diffusers' `Attention` from its weights: to_q(x), to_k/to_v(context) (no bias), `attention` over
    `heads` heads of `head_dim`, to_out.0 (with bias); (B, N, C), (B, M, D) -> (B, N, C') in x's dtype, each
    product accumulated in `accumulator` and rounded once; `context_BMD` None: x itself (self-attention);
    with `residual_BNC` (B, N, C'), the transformer block's residual stream, residual + that output, as the
    block adds them.

    On the TPU, bfloat16 heads of at most 128 lanes skip the (B, N, H, D) layout altogether: the projection
    weights are regrouped so that q, k and v come out of their products already packed, `128 // D` heads to
    a lane group, and `tpu_attention`'s kernel attends in that layout, with to_out.0 and the residual inside
    it when there is one (README "Accelerators: TPU and GPU" for the figures). `upcast` needs nothing more
    there: bfloat16 products summed in float32 are exact, as float32 operands would give. Differentiated,
    the plain path runs instead."""
    args = (x_BNC, context_BMD, wq_CI, wk_DI, wv_DI, wo_IC, bo_C, residual_BNC)
    plain = functools.partial(_projected_attention_plain, heads, head_dim, upcast)
    if x_BNC.dtype != jnp.bfloat16 or head_dim > TPU_LANES:
        return plain(*args)
    tpu = functools.partial(_projected_attention_tpu, heads, head_dim, upcast)
    return _by_platform_with_nones(args, plain, tpu, batched=(True, True, False, False, False, False, False, True))


def _geglu(x, w, b):
    """diffusers' GEGLU: x @ w + b (accumulated in `accumulator`, rounded once to x's dtype, as a `Dense`
    layer) split into (hidden, gate), hidden * gelu(gate) with the exact erf GELU, in x's dtype."""
    hidden, gate = jnp.split(_dense(x, w, b), 2, axis=-1)
    return hidden * jax.nn.gelu(gate, approximate=False)


def _feed_forward_plain(x, scale, shift, w1, b1, w2, b2, *, eps, dtype):
    return x + _dense(_geglu(norms.layer_norm(x, scale, shift, eps, dtype), w1, b1), w2, b2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _feed_forward_tpu(x, scale, shift, w1, b1, w2, b2, eps, dtype):
    """`tpu_feed_forward.feed_forward` over the rows of x (..., K); differentiated through the plain path."""
    rows = x.reshape(-1, x.shape[-1])
    out = tpu_feed_forward.feed_forward(rows, scale, shift, eps, w1.astype(dtype), b1, w2.astype(dtype), b2)
    return out.reshape(x.shape)


def _feed_forward_tpu_fwd(x, scale, shift, w1, b1, w2, b2, eps, dtype):
    return jax.vjp(functools.partial(_feed_forward_plain, eps=eps, dtype=dtype), x, scale, shift, w1, b1, w2, b2)


_feed_forward_tpu.defvjp(_feed_forward_tpu_fwd, lambda eps, dtype, pullback, dy: pullback(dy))


def feed_forward(x, scale_K, shift_K, eps: float, w_KF2, b_F2, w_FK, b_K, *, dtype) -> jax.Array:
    """The transformer block's third sublayer: x + FeedForward(LayerNorm(x)), x (..., K) -> (..., K) in
    `dtype`. The norm is `norms.layer_norm` (scale, shift, eps); the feed-forward diffusers' GEGLU one:
    `_geglu` to F = w_KF2's width / 2 features, rounded to `dtype`, then a `Dense` layer back to K.

    On the TPU, bfloat16 rows run as `tpu_feed_forward`'s kernel: the norm, both products and the residual
    in one pass over VMEM, none of the F-wide or 2F-wide intermediates written (README "Accelerators: TPU
    and GPU"). Differentiated, the plain path runs instead."""
    plain = functools.partial(_feed_forward_plain, eps=eps, dtype=dtype)

    def tpu(x, *weights):  # the rows of one device: under a mesh fewer than the whole batch's
        rows, k, f = math.prod(x.shape[:-1]), x.shape[-1], weights[2].shape[-1] // 2
        fits = x.dtype == jnp.dtype(dtype) and tpu_feed_forward.fits(rows, k, f, dtype)
        return _feed_forward_tpu(x, *weights, eps, dtype) if fits else plain(x, *weights)

    per_device = _per_device(tpu, plain, batched=(True,) + (False,) * 6)
    args = (x, scale_K, shift_K, w_KF2, b_F2, w_FK, b_K)
    return by_platform(*args, default=plain, tpu=per_device)


__all__ = [
    "IM2COL_MAX_POSITIONS",
    "ROWS_MAX_POSITIONS",
    "accumulator",
    "attention",
    "biased_conv",
    "by_platform",
    "conv",
    "conv2d",
    "flash_attention_tpu",
    "feed_forward",
    "matmul",
    "precision",
    "projected_attention",
    "upsample2x_conv",
    "valid_conv",
]
