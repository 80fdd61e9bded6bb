"""A Pallas TPU kernel for 3x3 stride-1 convolutions with zero padding 1 and a bias, NHWC, bfloat16.

XLA's TPU convolution emitter re-lays its input out before every convolution (rows and columns swapped, the
width padded to a multiple of 8 plus halo, the map cut into overlapping column chunks), and in SD 1.5's UNet
those copies cost about as much as the convolutions themselves (README "Accelerators"). This kernel reads
each image once in its own layout. A grid step (image, output-channel block, row block) copies its rows
plus one halo row above and below (zeros outside the image) into VMEM, sums the nine kernel taps as
(rows * W, C) @ (C, O_block) products in float32, shifts the three kernel columns' sums along W on the
output side, adds the bias and writes the block rounded once to bfloat16. Where the channels are not whole
128-lane tiles (SD 1.5's 320, the UNet's 4-channel input and output) the nine products are one (`packs`):
the three kernel rows' windows side by side in lanes against the weights regrouped in VMEM as (3 C, 3
O_block), so that the matrix unit pads 3 C and 3 O once instead of C and O nine times.

`norm_silu_conv3x3` is the same for the convolution of silu(GroupNorm(x)): from XLA's per-channel sums the
kernel makes the norm a per-image, per-channel affine map and applies it, with the SiLU, to each image as
it is copied in. x may come as channel parts (an up block's map and skip connection), each multiplied by
its own rows of the weights, so that their concatenation is never built.

`upsample2x_conv3x3` is the same for a 3x3 convolution of the nearest-2x enlarged map, computed from the
unenlarged one: both output row parities from three windows of the input rows (15 products of the input's
size), the two column parities interleaved on the way out.

The declared cost (what the TPU compiler's cost model prices the call at) counts the MXU's real work:
input and output channels rounded up to the 128-wide matrix unit (SD 1.5's 320 channels cost as 384),
and the bytes of the input, the weights and the output.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sdjax.nn import norms

MXU = 128  # the TPU matrix unit's width: operand dims are padded to multiples of it
TARGET_ROWS = 1024  # output positions per grid step (rows x W), the accumulator's height
WEIGHT_BLOCK_BYTES = 8 * 2**20  # the largest weight block (3 x 3 x C x O_block) held in VMEM
VMEM_LIMIT_BYTES = 96 * 2**20  # of a v5e's 128 MiB
# A v5p has 64 MiB of VMEM, the least of the TPU generations compiled for (v5e, v6e: 128 MiB), and kernels are
# chosen when a program is traced, before the chip is known. A kernel whose VMEM estimate (`_vmem_bytes`) with its
# input image double-buffered is above this gets one buffer: SDXL's 64x64 up-block convolution at 1024x1024
# (1280 + 640 channels) used 70.2 MB on a v5p with two, and no v5p compile of the SDXL UNet went through.
DOUBLE_BUFFER_BYTES = 60 * 2**20


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


def fits(
    x_BHWC_shape, out_channels: int, dtype, upsample2x: bool = False, normalized: bool = False, widths=None
) -> bool:
    """Whether the kernel takes this convolution (`conv3x3`, or with `upsample2x` `upsample2x_conv3x3` of
    this input): bfloat16 (float32 keeps XLA's convolution at `Precision.HIGHEST`, the parity mode; Mosaic
    cannot load float16 vectors on a v5e), the width a multiple of 8 (row windows are reshaped to (rows * W,
    C): whole sublane tiles), output channels whole 128-lane tiles when upsampling (as every upsampler of
    SD's UNets and VAEs has: the only ones compiled and measured for the TPU), and its VMEM (`_vmem_bytes`,
    the input image single-buffered: `_image_buffers`) within 3/4 of VMEM_LIMIT_BYTES. `widths`: the input's
    channel parts for `norm_silu_conv3x3` (each part's channels take whole lane tiles), which must pass
    `parts_fit`."""
    _, h, w, c = x_BHWC_shape
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16) or w % 8 or (upsample2x and out_channels % MXU):
        return False
    if widths is not None and (sum(widths) != c or not parts_fit(widths)):
        return False
    image, rest = _vmem_bytes(x_BHWC_shape, out_channels, dtype, upsample2x, normalized, widths)
    return image + rest <= VMEM_LIMIT_BYTES * 3 // 4


def _image_buffers(x_BHWC_shape, out_channels: int, dtype, upsample2x=False, normalized=False, widths=None) -> int:
    """How many VMEM buffers the kernel's whole input image gets: two (the next image's copy overlaps this
    one's steps) where that keeps its estimate within DOUBLE_BUFFER_BYTES, else one (SD 1.5's and SDXL's
    widest 64x64 up-block maps, SD 2's 96x96 ones), so that it fits a v5p."""
    image, rest = _vmem_bytes(x_BHWC_shape, out_channels, dtype, upsample2x, normalized, widths)
    return 2 if 2 * image + rest <= DOUBLE_BUFFER_BYTES else 1


def _vmem_bytes(x_BHWC_shape, out_channels: int, dtype, upsample2x, normalized, widths) -> tuple[int, int]:
    """(one buffer of the whole input image, everything else) of a kernel's VMEM: the weight block and the
    output block, double-buffered, the float32 partial sums; with `normalized` (`norm_silu_conv3x3`) the
    scratch is the whole padded image, and two float32 temporaries of a block of its rows; with packed taps
    their operands, product and weights."""
    _, h, w, c = x_BHWC_shape
    itemsize = jnp.dtype(dtype).itemsize
    rows, o_block = _blocks(h, w, c, out_channels, itemsize, upsample2x)
    lanes_c = sum(round_up(width, MXU) for width in widths or [c])
    lanes_o = round_up(o_block, MXU)
    image = h * w * lanes_c * itemsize
    weights = 2 * 9 * lanes_c * lanes_o * itemsize
    scratch = ((h if normalized else rows) + 2) * w * lanes_c * itemsize
    if upsample2x:  # output block (double-buffered), three shared and three parity sums, four temporaries
        sums = 2 * 4 * rows * w * lanes_o * itemsize + 10 * rows * w * lanes_o * 4
    else:  # output block (double-buffered), three partial sums, one temporary
        sums = 6 * rows * w * lanes_o * 4
    loaded = 2 * rows * w * lanes_c * 4 if normalized else 0
    if not upsample2x and packs(widths or [c], o_block):  # the side-by-side windows and the packed product
        sums += rows * w * (round_up(3 * c, MXU) * itemsize + round_up(3 * o_block, MXU) * 4)
        sums += round_up(3 * c, 16) * round_up(3 * o_block, MXU) * itemsize
    return image, weights + scratch + sums + loaded


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


def _sum_taps(window, w_refs, bias_ref, out_ref, rows: int, width: int, packed_ref=None) -> None:
    """Output rows of one grid step: kernel row i's input rows are `window(i)`, one (rows * W, C_part) array
    per channel part of the input, each multiplied by its part's weights in `w_refs`; kernel column j's
    product Y_j is shifted along W by j - 1 on the output side (rolled, with the wrapped column zeroed), so
    no input is ever read at an unaligned offset; plus the bias, rounded once. With `packed_ref` (`packs`)
    one product instead of nine: the three kernel rows' windows side by side in lanes (rows * W, 3 C)
    against the weights packed as (3 C, 3 O_block) (`_pack_weights`), whose output holds Y_0, Y_1 and Y_2
    side by side."""
    out_block = out_ref.shape[-1]
    if packed_ref is not None:
        x = jnp.concatenate([part for i in range(3) for part in window(i)], axis=1)
        y = jnp.dot(x, packed_ref[...], preferred_element_type=jnp.float32)
        by_column = [y[:, j * out_block : (j + 1) * out_block] for j in range(3)]
    else:
        by_column = [None, None, None]
        for i in range(3):
            rows_i = window(i)
            for j in range(3):
                for part_rows, w_ref in zip(rows_i, w_refs, strict=True):
                    part = jnp.dot(part_rows, w_ref[i, j], preferred_element_type=jnp.float32)
                    by_column[j] = part if by_column[j] is None else by_column[j] + part
    left = _shifted_columns(by_column[0], width, -1)  # y[w] += Y_0[w - 1]
    right = _shifted_columns(by_column[2], width, +1)  # y[w] += Y_2[w + 1]
    y = by_column[1] + left + right + bias_ref[...].astype(jnp.float32)
    out_ref[0] = y.reshape(rows, width, -1).astype(out_ref.dtype)


def _conv_kernel(x_ref, w_ref, bias_ref, out_ref, rows_ref, *packed_ref, rows: int, packed: bool):
    """One grid step: output rows [r * rows, (r + 1) * rows) of one image, O_block channels, plus the bias,
    rounded once to the output dtype. The input rows it needs (one halo row above and below, zero outside
    the image) are copied into `rows_ref` (rows + 2, W, C), kernel row i reading rows i..i + rows. `packed`:
    the taps as one product, with the weights regrouped in the scratch `packed_ref` (`_sum_taps`)."""
    width, channels = x_ref.shape[2:]
    _copy_rows_with_halo(x_ref, rows_ref, pl.program_id(2) * rows, rows)
    window = lambda i: [rows_ref[pl.ds(i, rows)].reshape(rows * width, channels)]  # noqa: E731
    _sum_taps(window, [w_ref], bias_ref, out_ref, rows, width, _pack_weights(w_ref, *packed_ref) if packed else None)


def _pack_weights(w_ref, packed_ref):
    """The (3, 3, C, O_block) weights regrouped into the scratch `packed_ref` (3 C, 3 O_block) at the first
    row block of an image and output-channel block, row i * C + c and column j * O_block + o holding
    w[i, j, c, o] (`_sum_taps`' packed product); returns the scratch."""

    @pl.when(pl.program_id(2) == 0)
    def _():
        by_row = [jnp.concatenate([w_ref[i, j] for j in range(3)], axis=1) for i in range(3)]
        packed_ref[...] = jnp.concatenate(by_row, axis=0)

    return packed_ref


def group_affine(sums, squares, offsets, scales, biases, *, groups: int, count: int, eps: float) -> list:
    """GroupNorm of one image as a per-channel affine map, from the per-channel sums of x and of x^2 over
    the image's positions (`count` positions x channels per group): [(a, b), ...] such that
    group_norm(x + offset) = x * a + b (a = scale / std of the channel's group, b = bias - (mean - offset)
    * a), the variance in one pass. The channels may come in parts (the input's channels split in order, a
    group possibly straddling two parts): each argument is a list with one float32 (1, C_part) array per
    part (`offsets` None for no offset), and so is the result. Written with masks and sums only, so that the
    kernel and XLA (the gradients' reference) compute it the same way, and no part is sliced along its lanes."""
    channels = sum(part.shape[-1] for part in sums)
    size = channels // groups
    members, start = [], 0
    for part in sums:  # (G, C_part): whether each of the part's channels is in group g
        group = jax.lax.broadcasted_iota(jnp.int32, (groups, part.shape[-1]), 0) * size
        channel = jax.lax.broadcasted_iota(jnp.int32, (groups, part.shape[-1]), 1) + start
        members.append((channel >= group) & (channel < group + size))
        start += part.shape[-1]

    def of_group(values):  # (G, 1): the mean over each group's channels, summed across the parts
        per_part = [jnp.sum(jnp.where(m, v, 0.0), axis=1, keepdims=True) for m, v in zip(members, values, strict=True)]
        return sum(per_part) / count

    mean = of_group(sums)
    inverse_std = jax.lax.rsqrt(jnp.maximum(of_group(squares) - mean * mean, 0.0) + eps)
    maps = []
    for k, member in enumerate(members):
        a = _of_channel(member, inverse_std) * scales[k]
        b = biases[k] - _of_channel(member, mean) * a
        maps.append((a, b if offsets is None else b + offsets[k] * a))
    return maps


def _of_channel(member_GC, per_group_G1):
    """(1, C): each channel's value of its group, from a (G, 1) per-group value and the (G, C) membership."""
    return jnp.sum(jnp.where(member_GC, per_group_G1, 0.0), axis=0, keepdims=True)


def _image_row(ref):
    """Row `pl.program_id(0)` (this step's image) of a whole (B, C) input, float32 (1, C)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, ref.shape, 0)
    return jnp.sum(jnp.where(rows == pl.program_id(0), ref[...].astype(jnp.float32), 0.0), axis=0, keepdims=True)


def _norm_silu_conv_kernel(*refs, parts: int, rows: int, packed: bool, groups: int, eps: float):
    """`_conv_kernel` of silu(GroupNorm(x + offset)), x given as `parts` channel parts (the input is their
    concatenation, which is never built): at an image's first grid step its GroupNorm becomes an affine map
    per part (`group_affine`, from the (B, C_part) per-channel sums of x + offset and of its squares, the
    offset, and the norm's (1, C_part) scale and bias), and each whole activated part is written into its
    scratch (H + 2, W, C_part) between two zero rows (the convolution's padding: the activation of a zero
    would not be zero), `rows` rows at a time in float32; every step of the image then reads its windows from
    there, each part through its own rows of the weights. refs: the parts, then per part its sums, squares,
    [offset,] scale and bias, then the weights, the conv bias, out, per part its scratch and, `packed`, the
    packed weights' scratch (`_sum_taps`)."""
    x_refs, refs = refs[:parts], refs[parts:]
    per_part = (len(refs) - parts - 3 - packed) // parts
    stats = [refs[k * per_part : (k + 1) * per_part] for k in range(parts)]
    w_ref, bias_ref, out_ref, *image_refs = refs[per_part * parts :]
    packed_ref = _pack_weights(w_ref, image_refs.pop()) if packed else None  # the parts side by side, as w's rows
    starts = channel_starts([ref.shape[-1] for ref in x_refs])
    w_refs = [w_ref.at[:, :, pl.ds(start, ref.shape[-1])] for start, ref in zip(starts, x_refs, strict=True)]
    height, width = x_refs[0].shape[1:3]
    channels = sum(ref.shape[-1] for ref in x_refs)

    @pl.when((pl.program_id(1) == 0) & (pl.program_id(2) == 0))
    def _():
        rows_of = [[_image_row(ref) for ref in part[:-2]] for part in stats]
        column = lambda k: [r[k] for r in rows_of]  # noqa: E731
        norm_weights = lambda k: [part[k][...].astype(jnp.float32) for part in stats]  # noqa: E731
        maps = group_affine(
            column(0), column(1), column(2) if per_part == 5 else None, norm_weights(-2), norm_weights(-1),
            groups=groups, count=height * width * (channels // groups), eps=eps,
        )  # fmt: skip
        for x_ref, image_ref, (a, b) in zip(x_refs, image_refs, maps, strict=True):
            zero_row = jnp.zeros((1, width, x_ref.shape[-1]), image_ref.dtype)
            image_ref[pl.ds(0, 1)] = zero_row
            image_ref[pl.ds(height + 1, 1)] = zero_row
            for top in range(0, height, rows):
                y = x_ref[0, pl.ds(top, rows)].astype(jnp.float32) * a + b
                image_ref[pl.ds(1 + top, rows)] = (y / (1.0 + jnp.exp(-y))).astype(image_ref.dtype)

    top = pl.program_id(2) * rows
    window = lambda i: [  # noqa: E731
        ref[pl.ds(top + i, rows)].reshape(rows * width, ref.shape[-1]) for ref in image_refs
    ]
    _sum_taps(window, w_refs, bias_ref, out_ref, rows, width, packed_ref)


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


def _pallas_conv(
    kernel_fn,
    x_BHWC,
    kernel_HWIO,
    bias_O,
    *,
    rows,
    o_block,
    out_block,
    out_shape,
    flops,
    norm=(),
    packed=False,
    image_buffers=2,
):
    """Runs a convolution kernel over the grid (image, output-channel block, row block of `rows` input
    rows): each step gets the whole input image, its (3, 3, C, o_block) weights and bias (in their own
    dtype), and a row scratch with halos (`packed`: and a (3 C, 3 o_block) scratch for the weights packed
    as `_sum_taps` multiplies them); `out_block` is the output block's shape, indexed (image, row block,
    0..., channel block). With `norm` (per channel part of the input, the inputs of
    `_norm_silu_conv_kernel`'s GroupNorm, each passed whole) x may be a list of channel parts (`parts_fit`;
    each reads its rows of the weight block), each part's scratch holds its whole padded image, and the
    steps of an image run in order. The whole input image gets `image_buffers` VMEM buffers (`_image_buffers`).
    The declared cost is `flops`, the bytes read and written, and with `norm` one transcendental (the SiLU's
    exp) per input element."""
    parts = as_parts(x_BHWC)
    b, h, w = parts[0].shape[:3]
    o = kernel_HWIO.shape[-1]
    itemsize = parts[0].dtype.itemsize
    middle = (0,) * (len(out_block) - 3)
    norm_arrays = [a for part in norm for a in part]
    size = sum(x.size for x in parts)
    cost = pl.CostEstimate(
        flops=flops,
        transcendentals=size if norm else 0,
        bytes_accessed=(size + kernel_HWIO.size + math.prod(out_shape)) * itemsize
        + sum(a.size * a.dtype.itemsize for a in (*norm_arrays, bias_O)),
    )
    whole = lambda a: pl.BlockSpec(a.shape, lambda n, k, r: (0,) * a.ndim)  # noqa: E731
    c = sum(x.shape[-1] for x in parts)
    if norm:
        scratch = [pltpu.VMEM((h + 2, w, x.shape[-1]), x.dtype) for x in parts]
    else:
        scratch = [pltpu.VMEM((rows + 2, w, parts[0].shape[-1]), parts[0].dtype)]
    order = ("parallel", "arbitrary" if norm else "parallel", "arbitrary")
    kernel_args = {"rows": rows, **({"parts": len(parts)} if norm else {})}
    if packed:
        scratch.append(pltpu.VMEM((3 * c, 3 * o_block), kernel_HWIO.dtype))
    single = {} if image_buffers == 2 else {"pipeline_mode": pl.Buffered(1)}
    return pl.pallas_call(
        functools.partial(kernel_fn, **kernel_args),
        grid=(b, o // o_block, h // rows),
        in_specs=[
            *[pl.BlockSpec((1, h, w, x.shape[-1]), lambda n, k, r: (n, 0, 0, 0), **single) for x in parts],
            *[whole(a) for a in norm_arrays],
            pl.BlockSpec((3, 3, c, o_block), lambda n, k, r: (0, 0, 0, k)),
            pl.BlockSpec((1, o_block), lambda n, k, r: (0, k)),
        ],
        out_specs=pl.BlockSpec(out_block, lambda n, k, r: (n, r, *middle, k)),
        out_shape=jax.ShapeDtypeStruct(out_shape, parts[0].dtype),
        scratch_shapes=scratch,
        compiler_params=pltpu.CompilerParams(dimension_semantics=order, vmem_limit_bytes=VMEM_LIMIT_BYTES),
        cost_estimate=cost,
    )(*parts, *norm_arrays, kernel_HWIO, bias_O.reshape(1, o))


def _conv3x3_grid(x_BHWC, kernel_HWIO, bias_O, kernel_fn=_conv_kernel, norm=()) -> jax.Array:
    """A 3x3 convolution's kernel call: `_conv_kernel`, or `_norm_silu_conv_kernel` with its `norm` inputs
    (x then a list of channel parts); its taps packed into one product where that `packs`."""
    parts = as_parts(x_BHWC)
    b, h, w = parts[0].shape[:3]
    widths = [x.shape[-1] for x in parts]
    o = kernel_HWIO.shape[-1]
    rows, o_block = _blocks(h, w, sum(widths), o, parts[0].dtype.itemsize)
    packed = packs(widths, o_block)
    return _pallas_conv(
        functools.partial(kernel_fn, packed=packed),
        x_BHWC,
        kernel_HWIO,
        bias_O,
        rows=rows,
        o_block=o_block,
        out_block=(1, rows, w, o_block),
        out_shape=(b, h, w, o),
        flops=2 * b * h * w * _mxu_work(widths, o_block, packed) * (o // o_block),
        norm=norm,
        packed=packed,
        image_buffers=_image_buffers(
            (b, h, w, sum(widths)), o, parts[0].dtype, normalized=bool(norm), widths=widths if norm else None
        ),
    )


def _mxu_work(widths, o_block: int, packed: bool) -> int:
    """Multiply-adds per output position and output-channel block of a 3x3 convolution of an input in
    channel parts of `widths`, as the matrix unit does them (operands padded to 128-wide tiles): nine
    products of each part against the block, or packed, one product of the three kernel rows' windows side
    by side (3 C) against the three kernel columns' weights side by side (3 O_block)."""
    if packed:
        return round_up(3 * sum(widths), MXU) * round_up(3 * o_block, MXU)
    return 9 * sum(round_up(width, MXU) for width in widths) * round_up(o_block, MXU)


def packs(widths, o_block: int) -> bool:
    """Whether a 3x3 convolution of an input in channel parts of `widths` to `o_block` output channels per
    grid step runs its nine taps as one packed product (`_sum_taps`): where that leaves the matrix unit less
    padding to compute. SD 1.5's 64x64 maps: 320 -> 320 channels 1024 x 1024 multiply-adds per position
    against 9 x 384 x 384 (-21%); the UNet's 4-channel conv_in and conv_out -70%; never for channel counts
    that are whole 128-lane tiles (1280 -> 1280: the same work). SD 1.5's UNet CFG step, one v5e chip,
    cost model: 13.41 -> 13.09 ms (README "Accelerators")."""
    return _mxu_work(widths, o_block, True) < _mxu_work(widths, o_block, False)


@_with_gradients_of(_reference)
def conv3x3(x_BHWC: jax.Array, kernel_HWIO: jax.Array, bias_O: jax.Array) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, plus a bias: (B, H, W, C), (3, 3, C, O), (O,) ->
    (B, H, W, O) in x's dtype, summed in float32 and rounded once. Gradients are XLA's."""
    return _conv3x3_grid(x_BHWC, kernel_HWIO, bias_O)


def as_parts(x) -> tuple:
    """An input given whole or as a sequence of channel parts, as a tuple of parts."""
    return tuple(x) if isinstance(x, list | tuple) else (x,)


def channel_starts(widths) -> list[int]:
    """The first channel of each of consecutive channel parts of these widths."""
    return list(itertools.accumulate(widths, initial=0))[:-1]


def split_channels(v, widths) -> list:
    """v (..., C) cut along its last axis into consecutive pieces of `widths` (an input's channel parts)."""
    return jnp.split(v, channel_starts(widths)[1:], axis=-1)


def _norm_silu_reference(parts, sums_BC, squares_BC, offset_BC, scale_C, bias_C, kernel_HWIO, bias_O, *, groups, eps):
    """`norm_silu_conv3x3` in XLA: `group_affine` per image, then XLA's convolution of silu(x * a + b) of
    the concatenated parts (float32, rounded to x's dtype); `parts` a sequence of channel parts or one x."""
    parts = as_parts(parts)
    b, h, w = parts[0].shape[:3]
    widths = [x.shape[-1] for x in parts]
    c = sum(widths)
    rows = lambda v: [p.astype(jnp.float32).reshape(b, 1, -1) for p in split_channels(v, widths)]  # noqa: E731
    one = lambda v: [p.astype(jnp.float32).reshape(1, -1) for p in split_channels(v, widths)]  # noqa: E731
    affine = functools.partial(group_affine, groups=groups, count=h * w * (c // groups), eps=eps)
    offsets = None if offset_BC is None else rows(offset_BC)
    maps = jax.vmap(affine, in_axes=(0, 0, None if offsets is None else 0, None, None))(
        rows(sums_BC), rows(squares_BC), offsets, one(scale_C), one(bias_C)
    )
    y = jnp.concatenate(
        [
            x.astype(jnp.float32) * a[:, :, None, :] + shift[:, :, None, :]
            for x, (a, shift) in zip(parts, maps, strict=True)
        ],
        -1,
    )
    return _reference(jax.nn.silu(y).astype(parts[0].dtype), kernel_HWIO, bias_O)


@functools.cache
def _norm_silu_conv(groups: int, eps: float, with_offset: bool):
    """`norm_silu_conv3x3` for one GroupNorm's settings, with `_norm_silu_reference`'s gradients."""
    reference = functools.partial(_norm_silu_reference, groups=groups, eps=eps)
    kernel_fn = functools.partial(_norm_silu_conv_kernel, groups=groups, eps=eps)

    def call(parts, sums, squares, offset, scale, bias, kernel, conv_bias):
        widths = [x.shape[-1] for x in parts]
        per_part = [split_channels(v, widths) for v in (sums, squares, *([offset] if with_offset else []))]
        per_part += [split_channels(v.reshape(1, -1), widths) for v in (scale, bias)]
        norm = [tuple(v[k] for v in per_part) for k in range(len(parts))]
        return _conv3x3_grid(list(parts), kernel, conv_bias, kernel_fn, norm)

    return _with_gradients_of(reference)(call)


def parts_fit(widths) -> bool:
    """Whether `norm_silu_conv3x3` takes an input in channel parts of these widths without concatenating
    them: each part's rows of the weights start on a whole bfloat16 sublane tile (16 rows)."""
    return all(width % 16 == 0 for width in widths[:-1])


def parts_pay(widths) -> bool:
    """Whether reading an input in channel parts of these widths costs the matrix unit no more than their
    concatenation: each part's channels are padded to whole 128-lane tiles on their own."""
    return sum(round_up(width, MXU) for width in widths) == round_up(sum(widths), MXU)


def norm_silu_conv3x3(
    x_BHWC: jax.Array | Sequence[jax.Array],
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
    copy: x (B, H, W, C) -> (B, H, W, O) in x's dtype. x may also be a sequence of channel parts (B, H, W,
    C_part) whose concatenation is the input (an up block's upsampled map and its skip connection; see
    `parts_fit`): the concatenation is never built. The norm's statistics come in as the float32 (B, C)
    per-channel sums of x + offset and of its squares over the positions (XLA fuses them into the op that
    made x); the kernel makes them the affine map of `group_affine` (offset (B, C) or None; scale and bias
    (C,)). The activated map is never written out; gradients are XLA's."""
    parts = as_parts(x_BHWC)
    norms.check_groups(sum(x.shape[-1] for x in parts), groups)
    if not parts_fit([x.shape[-1] for x in parts]):
        raise ValueError(f"channel parts {[x.shape[-1] for x in parts]}: all but the last must be multiples of 16")
    conv = _norm_silu_conv(groups, float(eps), offset_BC is not None)
    return conv(parts, sums_BC, squares_BC, offset_BC, scale_C, bias_C, kernel_HWIO, bias_O)


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
        image_buffers=_image_buffers(x_BHWC.shape, o, x_BHWC.dtype, upsample2x=True),
    )
    return y.reshape(b, 2 * h, 2 * w, o)  # (H, 2) -> 2H: the tiled minor dims are unchanged, a bitcast
