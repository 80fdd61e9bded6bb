"""A Pallas TPU kernel for 3x3 stride-1 convolutions with zero padding 1 and a bias, NHWC, bfloat16.

XLA's TPU convolution emitter re-lays its input out before every convolution (rows and columns swapped, the
width padded to a multiple of 8 plus halo, the map cut into overlapping column chunks), and in SD 1.5's UNet
those copies cost about as much as the convolutions themselves (README "Accelerators"). This kernel reads
each image once in its own layout. A grid step (image, output-channel block, row block) copies its rows
plus one halo row above and below (zeros outside the image) into VMEM, sums the nine kernel taps as
(rows * W, C) @ (C, O_block) products in float32, shifts the three kernel columns' sums along W on the
output side, adds the bias and writes the block rounded once to bfloat16.

`norm_silu_conv3x3` is the same for the convolution of silu(GroupNorm(x)): from XLA's per-channel sums the
kernel makes the norm a per-image, per-channel affine map and applies it, with the SiLU, to each image as
it is copied in.

`upsample2x_conv3x3` is the same for a 3x3 convolution of the nearest-2x enlarged map, computed from the
unenlarged one: both output row parities from three windows of the input rows (15 products of the input's
size), the two column parities interleaved on the way out.

The declared cost (what the TPU compiler's cost model prices the call at) counts the MXU's real work:
input and output channels rounded up to the 128-wide matrix unit (SD 1.5's 320 channels cost as 384),
and the bytes of the input, the weights and the output.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sdjax.nn import norms

MXU = 128  # the TPU matrix unit's width: operand dims are padded to multiples of it
TARGET_ROWS = 1024  # output positions per grid step (rows x W), the accumulator's height
WEIGHT_BLOCK_BYTES = 8 * 2**20  # the largest weight block (3 x 3 x C x O_block) held in VMEM
VMEM_LIMIT_BYTES = 96 * 2**20  # of a v5e's 128 MiB


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def largest_divisor(n: int, limit: int, step: int) -> int:
    """The largest multiple of `step` that divides n and is <= limit (`step` when none is; n itself a
    multiple of step): block sizes of the Pallas kernels."""
    best = step
    for size in range(step, min(n, limit) + 1, step):
        if n % size == 0:
            best = size
    return best


def fits(x_BHWC_shape, out_channels: int, dtype, upsample2x: bool = False, normalized: bool = False) -> bool:
    """Whether the kernel takes this convolution (`conv3x3`, or with `upsample2x` `upsample2x_conv3x3` of
    this input): bfloat16 (float32 keeps XLA's convolution at `Precision.HIGHEST`, the parity mode; Mosaic
    cannot load float16 vectors on a v5e), the width a multiple of 8 (row windows are reshaped to (rows * W,
    C): whole sublane tiles), output channels whole 128-lane tiles when upsampling (as every upsampler of
    SD's UNets and VAEs has: the only ones compiled and measured for the TPU), and its VMEM blocks (one
    whole input image, the weight block, the output block, each double-buffered, and the float32 partial
    sums; with `normalized` (`norm_silu_conv3x3`) the scratch is the whole padded image, and two float32
    temporaries of a block of its rows) within VMEM_LIMIT_BYTES."""
    _, h, w, c = x_BHWC_shape
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16) or w % 8 or (upsample2x and out_channels % MXU):
        return False
    itemsize = jnp.dtype(dtype).itemsize
    rows, o_block = _blocks(h, w, c, out_channels, itemsize, upsample2x)
    lanes_c, lanes_o = round_up(c, MXU), round_up(o_block, MXU)
    image = 2 * h * w * lanes_c * itemsize
    weights = 2 * 9 * lanes_c * lanes_o * itemsize
    scratch = ((h if normalized else rows) + 2) * w * lanes_c * itemsize
    if upsample2x:  # output block (double-buffered), three shared and three parity sums, four temporaries
        sums = 2 * 4 * rows * w * lanes_o * itemsize + 10 * rows * w * lanes_o * 4
    else:  # output block (double-buffered), three partial sums, one temporary
        sums = 6 * rows * w * lanes_o * 4
    loaded = 2 * rows * w * lanes_c * 4 if normalized else 0
    return image + weights + scratch + sums + loaded <= VMEM_LIMIT_BYTES * 3 // 4


def _blocks(h: int, w: int, c: int, o: int, itemsize: int, upsample2x: bool = False) -> tuple[int, int]:
    """(input rows per grid step, output channels per grid step): rows x W near TARGET_ROWS (half of it when
    upsampling: each input position gives four outputs) and dividing H; output channels a multiple of 128
    dividing O whose weight block fits WEIGHT_BLOCK_BYTES (all of O when O is not a multiple of 128)."""
    target = TARGET_ROWS // 2 if upsample2x else TARGET_ROWS
    rows = max(1, min(h, target // w))
    while h % rows:
        rows -= 1
    o_block = o
    if o % MXU == 0:
        fitting = [n for n in range(o, 0, -MXU) if o % n == 0 and 9 * c * n * itemsize <= WEIGHT_BLOCK_BYTES]
        o_block = fitting[0] if fitting else MXU
    return rows, o_block


def _copy_rows_with_halo(x_ref, rows_ref, top, rows: int) -> None:
    """Copies rows [top - 1, top + rows + 1) of the image in `x_ref` (1, H, W, C) into `rows_ref`
    (rows + 2, W, C), with zero rows where the halo falls outside the image."""
    height, width, channels = x_ref.shape[1:]
    rows_ref[pl.ds(1, rows)] = x_ref[0, pl.ds(top, rows)]
    zero_row = jnp.zeros((1, width, channels), rows_ref.dtype)

    @pl.when(top > 0)
    def _():
        rows_ref[pl.ds(0, 1)] = x_ref[0, pl.ds(top - 1, 1)]

    @pl.when(top == 0)
    def _():
        rows_ref[pl.ds(0, 1)] = zero_row

    @pl.when(top + rows < height)
    def _():
        rows_ref[pl.ds(rows + 1, 1)] = x_ref[0, pl.ds(top + rows, 1)]

    @pl.when(top + rows >= height)
    def _():
        rows_ref[pl.ds(rows + 1, 1)] = zero_row


def _shifted_columns(y, width: int, shift: int):
    """y (rows * W, O), row-major over (row, column), with each column taking column `column + shift`'s
    values (shift -1 or +1), zero where that falls outside the row: a roll along the rows, the wrapped
    column zeroed."""
    n = y.shape[0]
    column = jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0) % width
    if shift == -1:
        return jnp.where(column == 0, 0.0, pltpu.roll(y, 1, 0))
    return jnp.where(column == width - 1, 0.0, pltpu.roll(y, n - 1, 0))


def _sum_taps(window, w_ref, bias_ref, out_ref, rows: int, width: int) -> None:
    """Output rows of one grid step: kernel row i's input rows are `window(i)` (rows * W, C); kernel column
    j's product Y_j is shifted along W by j - 1 on the output side (rolled, with the wrapped column
    zeroed), so no input is ever read at an unaligned offset; plus the bias, rounded once."""
    by_column = [None, None, None]
    for i in range(3):
        rows_i = window(i)
        for j in range(3):
            part = jnp.dot(rows_i, w_ref[i, j], preferred_element_type=jnp.float32)
            by_column[j] = part if by_column[j] is None else by_column[j] + part
    left = _shifted_columns(by_column[0], width, -1)  # y[w] += Y_0[w - 1]
    right = _shifted_columns(by_column[2], width, +1)  # y[w] += Y_2[w + 1]
    y = by_column[1] + left + right + bias_ref[...].astype(jnp.float32)
    out_ref[0] = y.reshape(rows, width, -1).astype(out_ref.dtype)


def _conv_kernel(x_ref, w_ref, bias_ref, out_ref, rows_ref, *, rows: int):
    """One grid step: output rows [r * rows, (r + 1) * rows) of one image, O_block channels, plus the bias,
    rounded once to the output dtype. The input rows it needs (one halo row above and below, zero outside
    the image) are copied into `rows_ref` (rows + 2, W, C), kernel row i reading rows i..i + rows."""
    width, channels = x_ref.shape[2:]
    _copy_rows_with_halo(x_ref, rows_ref, pl.program_id(2) * rows, rows)
    window = lambda i: rows_ref[pl.ds(i, rows)].reshape(rows * width, channels)  # noqa: E731
    _sum_taps(window, w_ref, bias_ref, out_ref, rows, width)


def group_affine(sums_1C, squares_1C, offset_1C, scale_1C, bias_1C, *, groups: int, count: int, eps: float):
    """GroupNorm of one image as a per-channel affine map, from the per-channel sums of x and of x^2 over
    the image's positions (all (1, C) float32; `count` positions x channels per group): (a, b) such that
    group_norm(x + offset) = x * a + b (a = scale / std of the channel's group, b = bias - (mean - offset)
    * a; offset None for none), the variance in one pass. Written with masks and sums only, so that the
    kernel and XLA (the gradients' reference) compute it the same way."""
    channels = sums_1C.shape[-1]
    group = jax.lax.broadcasted_iota(jnp.int32, (groups, channels), 0) * (channels // groups)
    channel = jax.lax.broadcasted_iota(jnp.int32, (groups, channels), 1)
    member = (channel >= group) & (channel < group + channels // groups)  # (G, C)
    of_group = lambda v: jnp.sum(jnp.where(member, v, 0.0), axis=1, keepdims=True) / count  # noqa: E731
    of_channel = lambda g: jnp.sum(jnp.where(member, g, 0.0), axis=0, keepdims=True)  # noqa: E731
    mean = of_group(sums_1C)
    variance = jnp.maximum(of_group(squares_1C) - mean * mean, 0.0)
    a = of_channel(jax.lax.rsqrt(variance + eps)) * scale_1C
    b = bias_1C - of_channel(mean) * a
    return a, b if offset_1C is None else b + offset_1C * a


def _image_row(ref):
    """Row `pl.program_id(0)` (this step's image) of a whole (B, C) input, float32 (1, C)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, ref.shape, 0)
    return jnp.sum(jnp.where(rows == pl.program_id(0), ref[...].astype(jnp.float32), 0.0), axis=0, keepdims=True)


def _norm_silu_conv_kernel(x_ref, *refs, rows: int, groups: int, eps: float):
    """`_conv_kernel` of silu(GroupNorm(x + offset)): at an image's first grid step its GroupNorm becomes an
    affine map (`group_affine`, from the (B, C) per-channel sums of x + offset and of its squares, the
    offset, and the norm's (1, C) scale and bias), and the whole activated image is written into
    `image_ref` (H + 2, W, C) between two zero rows (the convolution's padding: the activation of a zero
    would not be zero), `rows` rows at a time in float32; every step of the image then reads its windows
    from there. refs: sums, squares, [offset,] scale, bias, weights, conv bias, out, image scratch."""
    *stats, w_ref, bias_ref, out_ref, image_ref = refs
    height, width, channels = x_ref.shape[1:]

    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():
        sums, squares, *offset = [_image_row(ref) for ref in stats[:-2]]
        scale, bias = (ref[...].astype(jnp.float32) for ref in stats[-2:])
        a, b = group_affine(
            sums, squares, offset[0] if offset else None, scale, bias,
            groups=groups, count=height * width * (channels // groups), eps=eps,
        )  # fmt: skip
        zero_row = jnp.zeros((1, width, channels), image_ref.dtype)
        image_ref[pl.ds(0, 1)] = zero_row
        image_ref[pl.ds(height + 1, 1)] = zero_row
        for top in range(0, height, rows):
            y = x_ref[0, pl.ds(top, rows)].astype(jnp.float32) * a + b
            image_ref[pl.ds(1 + top, rows)] = (y / (1.0 + jnp.exp(-y))).astype(image_ref.dtype)

    top = pl.program_id(2) * rows
    window = lambda i: image_ref[pl.ds(top + i, rows)].reshape(rows * width, channels)  # noqa: E731
    _sum_taps(window, w_ref, bias_ref, out_ref, rows, width)


def _bfloat16_bits(y):
    """float32 y's bfloat16 rounding (to nearest, ties to even; NaN stays NaN) in the upper 16 bits of a
    uint32."""
    bits = jax.lax.bitcast_convert_type(y, jnp.uint32)
    rounded = bits + jnp.uint32(0x7FFF) + ((bits >> 16) & jnp.uint32(1))
    return jnp.where(jnp.isnan(y), jnp.uint32(0x7FC00000), rounded)


def _interleaved_bfloat16(even, odd):
    """Two float32 (n, O) arrays as one bfloat16 (2n, O): row 2i is even[i], row 2i + 1 is odd[i], each
    rounded once. A bfloat16 tile packs rows 2i and 2i + 1 into one 32-bit word (the lower half first), so
    the words are built with integer operations and reinterpreted, with no sublane shuffle."""
    words = (_bfloat16_bits(odd) & jnp.uint32(0xFFFF0000)) | (_bfloat16_bits(even) >> 16)
    return pltpu.bitcast(words, jnp.bfloat16)


def _upsample_conv_kernel(x_ref, w_ref, bias_ref, out_ref, rows_ref, *, rows: int):
    """One grid step of conv3x3(nearest_2x(x)) + bias: input rows [r * rows, (r + 1) * rows) of one image
    give output rows [2 r * rows, 2 (r + 1) * rows), O_block channels, as `out_ref` (1, rows, 2, 2W, O_block).

    Output row 2i + a, column 2j + b reads the repeated map's rows 2i + a - 1 .. 2i + a + 1, i.e. input rows
    (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1 under kernel rows 0, 1, 2 (columns likewise with j and
    b). So with window s the input rows shifted by s - 1 and Y[s, i, j] = window_s @ kernel[i, j], parity
    a's kernel-column sums are S_a[j] = Y[0, 0, j] + Y[1, 1, j] + Y[1, 2, j] (a = 0) or Y[1, 0, j] + Y[1, 1, j]
    + Y[2, 2, j] (a = 1): 15 distinct products of the input's size, where the repeated map needs 36. Column
    2j sums S[0] at column j - 1, S[1] and S[2]; column 2j + 1 sums S[0], S[1] and S[2] at column j + 1. The
    products are the repeated map's exactly (the same bfloat16 operands, summed in float32)."""
    width, channels = x_ref.shape[2:]
    _copy_rows_with_halo(x_ref, rows_ref, pl.program_id(2) * rows, rows)
    n = rows * width
    windows = [rows_ref[pl.ds(s, rows)].reshape(n, channels) for s in range(3)]

    def product(s, i, j):
        return jnp.dot(windows[s], w_ref[i, j], preferred_element_type=jnp.float32)

    shared = [product(1, 1, j) for j in range(3)]
    for a in range(2):
        if a == 0:
            sums = [product(0, 0, j) + shared[j] + product(1, 2, j) for j in range(3)]
        else:
            sums = [product(1, 0, j) + shared[j] + product(2, 2, j) for j in range(3)]
        bias = bias_ref[...].astype(jnp.float32)
        even = _shifted_columns(sums[0], width, -1) + sums[1] + sums[2] + bias
        odd = sums[0] + sums[1] + _shifted_columns(sums[2], width, +1) + bias
        out_ref[0, :, a] = _interleaved_bfloat16(even, odd).reshape(rows, 2 * width, -1)


def _reference(x_BHWC, kernel_HWIO, bias_O):
    """`conv3x3` with XLA's convolution."""
    y = jax.lax.conv_general_dilated(
        x_BHWC,
        kernel_HWIO,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32,
    )
    return (y + bias_O.astype(jnp.float32)).astype(x_BHWC.dtype)


def nearest_2x(x_BHWC: jax.Array) -> jax.Array:
    """Nearest-neighbour 2x enlargement, (B, H, W, C) -> (B, 2H, 2W, C): the repeated map that
    `upsample2x_conv3x3` never builds (and the layers' upsampling wherever it is built)."""
    return jnp.repeat(jnp.repeat(x_BHWC, 2, axis=1), 2, axis=2)


def _upsample_reference(x_BHWC, kernel_HWIO, bias_O):
    """`upsample2x_conv3x3` as XLA's convolution of the repeated map."""
    return _reference(nearest_2x(x_BHWC), kernel_HWIO, bias_O)


def _with_gradients_of(reference):
    """Makes a kernel function differentiable with `reference`'s gradients (training on the TPU
    differentiates XLA's convolution; the kernels only run forward)."""

    def wrap(kernel_fn):
        differentiable = jax.custom_vjp(kernel_fn)

        def forward(*args):
            return kernel_fn(*args), args

        def backward(args, dy):
            return jax.vjp(reference, *args)[1](dy)

        differentiable.defvjp(forward, backward)
        return differentiable

    return wrap


def _pallas_conv(kernel_fn, x_BHWC, kernel_HWIO, bias_O, *, rows, o_block, out_block, out_shape, flops, norm=()):
    """Runs a convolution kernel over the grid (image, output-channel block, row block of `rows` input
    rows): each step gets the whole input image, its (3, 3, C, o_block) weights and bias (in their own
    dtype), and a row scratch with halos; `out_block` is the output block's shape, indexed (image, row
    block, 0..., channel block). With `norm` (the inputs of `_norm_silu_conv_kernel`'s GroupNorm, each
    passed whole) its scratch holds the whole padded image and the steps of an image run in order. The
    declared cost is `flops`, the bytes read and written, and with `norm` one transcendental (the SiLU's
    exp) per input element."""
    b, h, w, c = x_BHWC.shape
    o = kernel_HWIO.shape[-1]
    itemsize = x_BHWC.dtype.itemsize
    middle = (0,) * (len(out_block) - 3)
    cost = pl.CostEstimate(
        flops=flops,
        transcendentals=x_BHWC.size if norm else 0,
        bytes_accessed=(x_BHWC.size + kernel_HWIO.size + math.prod(out_shape)) * itemsize
        + sum(a.size * a.dtype.itemsize for a in (*norm, bias_O)),
    )
    whole = lambda a: pl.BlockSpec(a.shape, lambda n, k, r: (0,) * a.ndim)  # noqa: E731
    scratch = (h + 2, w, c) if norm else (rows + 2, w, c)
    order = ("parallel", "arbitrary" if norm else "parallel", "arbitrary")
    return pl.pallas_call(
        functools.partial(kernel_fn, rows=rows),
        grid=(b, o // o_block, h // rows),
        in_specs=[
            pl.BlockSpec((1, h, w, c), lambda n, k, r: (n, 0, 0, 0)),
            *[whole(a) for a in norm],
            pl.BlockSpec((3, 3, c, o_block), lambda n, k, r: (0, 0, 0, k)),
            pl.BlockSpec((1, o_block), lambda n, k, r: (0, k)),
        ],
        out_specs=pl.BlockSpec(out_block, lambda n, k, r: (n, r, *middle, k)),
        out_shape=jax.ShapeDtypeStruct(out_shape, x_BHWC.dtype),
        scratch_shapes=[pltpu.VMEM(scratch, x_BHWC.dtype)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=order, vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=cost,
    )(x_BHWC, *norm, kernel_HWIO, bias_O.reshape(1, o))


def _conv3x3_grid(x_BHWC, kernel_HWIO, bias_O, kernel_fn=_conv_kernel, norm=()) -> jax.Array:
    """A 3x3 convolution's kernel call: `_conv_kernel`, or `_norm_silu_conv_kernel` with its `norm` inputs."""
    b, h, w, c = x_BHWC.shape
    o = kernel_HWIO.shape[-1]
    rows, o_block = _blocks(h, w, c, o, x_BHWC.dtype.itemsize)
    return _pallas_conv(
        kernel_fn,
        x_BHWC,
        kernel_HWIO,
        bias_O,
        rows=rows,
        o_block=o_block,
        out_block=(1, rows, w, o_block),
        out_shape=(b, h, w, o),
        flops=2 * b * h * w * 9 * round_up(c, MXU) * round_up(o, MXU),
        norm=norm,
    )


@_with_gradients_of(_reference)
def conv3x3(x_BHWC: jax.Array, kernel_HWIO: jax.Array, bias_O: jax.Array) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, plus a bias: (B, H, W, C), (3, 3, C, O), (O,) ->
    (B, H, W, O) in x's dtype, summed in float32 and rounded once. Gradients are XLA's."""
    return _conv3x3_grid(x_BHWC, kernel_HWIO, bias_O)


def _norm_silu_reference(x_BHWC, sums_BC, squares_BC, offset_BC, scale_C, bias_C, kernel_HWIO, bias_O, *, groups, eps):
    """`norm_silu_conv3x3` in XLA: `group_affine` per image, then XLA's convolution of silu(x * a + b)
    (float32, rounded to x's dtype)."""
    b, h, w, c = x_BHWC.shape
    rows = lambda v: v.astype(jnp.float32).reshape(b, 1, c)  # noqa: E731
    one = lambda v: v.astype(jnp.float32).reshape(1, c)  # noqa: E731
    affine = functools.partial(group_affine, groups=groups, count=h * w * (c // groups), eps=eps)
    offsets = None if offset_BC is None else rows(offset_BC)
    a, shift = jax.vmap(affine, in_axes=(0, 0, None if offsets is None else 0, None, None))(
        rows(sums_BC), rows(squares_BC), offsets, one(scale_C), one(bias_C)
    )
    y = x_BHWC.astype(jnp.float32) * a[:, :, None, :] + shift[:, :, None, :]
    return _reference(jax.nn.silu(y).astype(x_BHWC.dtype), kernel_HWIO, bias_O)


@functools.cache
def _norm_silu_conv(groups: int, eps: float, with_offset: bool):
    """`norm_silu_conv3x3` for one GroupNorm's settings, with `_norm_silu_reference`'s gradients."""
    reference = functools.partial(_norm_silu_reference, groups=groups, eps=eps)
    kernel_fn = functools.partial(_norm_silu_conv_kernel, groups=groups, eps=eps)

    def call(x, sums, squares, offset, scale, bias, kernel, conv_bias):
        norm = (sums, squares, *([offset] if with_offset else []), scale.reshape(1, -1), bias.reshape(1, -1))
        return _conv3x3_grid(x, kernel, conv_bias, kernel_fn, norm)

    return _with_gradients_of(reference)(call)


def norm_silu_conv3x3(
    x_BHWC: jax.Array,
    sums_BC: jax.Array,
    squares_BC: jax.Array,
    offset_BC: jax.Array | None,
    scale_C: jax.Array,
    bias_C: jax.Array,
    kernel_HWIO: jax.Array,
    bias_O: jax.Array,
    *,
    groups: int,
    eps: float,
) -> jax.Array:
    """conv3x3(silu(GroupNorm(x + offset))) + bias, with the norm and the SiLU applied in the kernel's input
    copy: x (B, H, W, C) -> (B, H, W, O) in x's dtype. The norm's statistics come in as the float32 (B, C)
    per-channel sums of x + offset and of its squares over the positions (XLA fuses them into the op that
    made x); the kernel makes them the affine map of `group_affine` (offset (B, C) or None; scale and
    bias (C,)). The activated map is never written out; gradients are XLA's."""
    norms.check_groups(x_BHWC.shape[-1], groups)
    conv = _norm_silu_conv(groups, float(eps), offset_BC is not None)
    return conv(x_BHWC, sums_BC, squares_BC, offset_BC, scale_C, bias_C, kernel_HWIO, bias_O)


@_with_gradients_of(_upsample_reference)
def upsample2x_conv3x3(x_BHWC: jax.Array, kernel_HWIO: jax.Array, bias_O: jax.Array) -> jax.Array:
    """conv3x3(nearest_2x(x)) + bias, stride 1, zero padding 1, without the repeated map: (B, H, W, C),
    (3, 3, C, O), (O,) -> (B, 2H, 2W, O) in bfloat16, summed in float32 and rounded once. Reads each input
    image once and does 15 products of the input's size per output-channel block where the repeated map
    needs 36 (`_upsample_conv_kernel`). Gradients are XLA's."""
    b, h, w, c = x_BHWC.shape
    o = kernel_HWIO.shape[-1]
    rows, o_block = _blocks(h, w, c, o, x_BHWC.dtype.itemsize, upsample2x=True)
    y = _pallas_conv(
        _upsample_conv_kernel,
        x_BHWC,
        kernel_HWIO,
        bias_O,
        rows=rows,
        o_block=o_block,
        out_block=(1, rows, 2, 2 * w, o_block),
        out_shape=(b, h, 2, 2 * w, o),
        flops=2 * b * h * w * 15 * round_up(c, MXU) * o,
    )
    return y.reshape(b, 2 * h, 2 * w, o)  # (H, 2) -> 2H: the tiled minor dims are unchanged, a bitcast
