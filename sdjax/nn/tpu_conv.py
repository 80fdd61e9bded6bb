"""A Pallas TPU kernel for 3x3 stride-1 convolutions with zero padding 1 and a bias, NHWC, bfloat16.

XLA's TPU convolution emitter re-lays its input out before every convolution (rows and columns swapped, the
width padded to a multiple of 8 plus halo, the map cut into overlapping column chunks), and in SD 1.5's UNet
those copies cost about as much as the convolutions themselves (README "Accelerators"). This kernel reads
each image once in its own layout. A grid step (image, output-channel block, row block) copies its rows
plus one halo row above and below (zeros outside the image) into VMEM, sums the nine kernel taps as
(rows * W, C) @ (C, O_block) products in float32, shifts the three kernel columns' sums along W on the
output side, adds the bias and writes the block rounded once to bfloat16.

The declared cost (what the TPU compiler's cost model prices the call at) counts the MXU's real work:
input and output channels rounded up to the 128-wide matrix unit (SD 1.5's 320 channels cost as 384),
and the bytes of the input, the weights and the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

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


def fits(x_BHWC_shape, out_channels: int, dtype) -> bool:
    """Whether the kernel takes this convolution: bfloat16 (float32 keeps XLA's convolution at
    `Precision.HIGHEST`, the parity mode; Mosaic cannot load float16 vectors on a v5e), the width a multiple
    of 8 (row windows are reshaped to (rows * W, C): whole sublane tiles), and its VMEM blocks
    (one whole input image, the weight block, the output block, each double-buffered, and the float32
    partial sums) within VMEM_LIMIT_BYTES."""
    _, h, w, c = x_BHWC_shape
    if jnp.dtype(dtype) != jnp.dtype(jnp.bfloat16) or w % 8:
        return False
    itemsize = jnp.dtype(dtype).itemsize
    rows, o_block = _blocks(h, w, c, out_channels, itemsize)
    lanes_c, lanes_o = round_up(c, MXU), round_up(o_block, MXU)
    image = 2 * h * w * lanes_c * itemsize
    weights = 2 * 9 * lanes_c * lanes_o * itemsize
    scratch = (rows + 2) * w * lanes_c * itemsize
    sums = 6 * rows * w * lanes_o * 4  # output block (double-buffered), three partial sums, one temporary
    return image + weights + scratch + sums <= VMEM_LIMIT_BYTES * 3 // 4


def _blocks(h: int, w: int, c: int, o: int, itemsize: int) -> tuple[int, int]:
    """(rows per grid step, output channels per grid step): rows x W near TARGET_ROWS and dividing H;
    output channels a multiple of 128 dividing O whose weight block fits WEIGHT_BLOCK_BYTES (all of O when
    O is not a multiple of 128)."""
    rows = max(1, min(h, TARGET_ROWS // w))
    while h % rows:
        rows -= 1
    o_block = o
    if o % MXU == 0:
        fitting = [n for n in range(o, 0, -MXU) if o % n == 0 and 9 * c * n * itemsize <= WEIGHT_BLOCK_BYTES]
        o_block = fitting[0] if fitting else MXU
    return rows, o_block


def _conv_kernel(x_ref, w_ref, bias_ref, out_ref, rows_ref, *, rows: int):
    """One grid step: output rows [r * rows, (r + 1) * rows) of one image, O_block channels, plus the bias,
    rounded once to the output dtype.

    The input rows it needs (one halo row above and below, zero outside the image) are copied into
    `rows_ref` (rows + 2, W, C); kernel row i reads its rows i..i + rows, as one (rows * W, C) matrix, and
    kernel column j's product Y_j is shifted along W by j - 1 on the output side (rolled, with the wrapped
    column zeroed), so no input is ever read at an unaligned offset."""
    r = pl.program_id(2)
    height, width, channels = x_ref.shape[1:]
    top = r * rows
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

    by_column = [None, None, None]
    for i in range(3):
        window = rows_ref[pl.ds(i, rows)].reshape(rows * width, channels)
        for j in range(3):
            part = jnp.dot(window, w_ref[i, j], preferred_element_type=jnp.float32)
            by_column[j] = part if by_column[j] is None else by_column[j] + part
    n = rows * width
    column = jax.lax.broadcasted_iota(jnp.int32, (n, 1), 0) % width
    left = jnp.where(column == 0, 0.0, pltpu.roll(by_column[0], 1, 0))  # y[w] += Y_0[w - 1]
    right = jnp.where(column == width - 1, 0.0, pltpu.roll(by_column[2], n - 1, 0))  # y[w] += Y_2[w + 1]
    y = by_column[1] + left + right + bias_ref[...]
    out_ref[0] = y.reshape(rows, width, -1).astype(out_ref.dtype)


@jax.custom_vjp
def conv3x3(x_BHWC: jax.Array, kernel_HWIO: jax.Array, bias_O: jax.Array) -> jax.Array:
    """3x3 convolution, stride 1, zero padding 1, plus a bias: (B, H, W, C), (3, 3, C, O), (O,) ->
    (B, H, W, O) in x's dtype, summed in float32 and rounded once. Gradients are XLA's (training on TPU
    differentiates the plain convolution)."""
    b, h, w, c = x_BHWC.shape
    o = kernel_HWIO.shape[-1]
    itemsize = x_BHWC.dtype.itemsize
    rows, o_block = _blocks(h, w, c, o, itemsize)
    cost = pl.CostEstimate(
        flops=2 * b * h * w * 9 * round_up(c, MXU) * round_up(o, MXU),
        transcendentals=0,
        bytes_accessed=(x_BHWC.size + kernel_HWIO.size + b * h * w * o) * itemsize + o * 4,
    )
    return pl.pallas_call(
        functools.partial(_conv_kernel, rows=rows),
        grid=(b, o // o_block, h // rows),
        in_specs=[
            pl.BlockSpec((1, h, w, c), lambda n, k, r: (n, 0, 0, 0)),
            pl.BlockSpec((3, 3, c, o_block), lambda n, k, r: (0, 0, 0, k)),
            pl.BlockSpec((1, o_block), lambda n, k, r: (0, k)),
        ],
        out_specs=pl.BlockSpec((1, rows, w, o_block), lambda n, k, r: (n, r, 0, k)),
        out_shape=jax.ShapeDtypeStruct((b, h, w, o), x_BHWC.dtype),
        scratch_shapes=[pltpu.VMEM((rows + 2, w, c), x_BHWC.dtype)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary"), vmem_limit_bytes=VMEM_LIMIT_BYTES
        ),
        cost_estimate=cost,
    )(x_BHWC, kernel_HWIO, bias_O.astype(jnp.float32).reshape(1, o))


def _reference(x_BHWC, kernel_HWIO, bias_O):
    """The same with XLA's convolution."""
    y = jax.lax.conv_general_dilated(
        x_BHWC,
        kernel_HWIO,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32,
    )
    return (y + bias_O.astype(jnp.float32)).astype(x_BHWC.dtype)


def _conv3x3_fwd(x_BHWC, kernel_HWIO, bias_O):
    return conv3x3(x_BHWC, kernel_HWIO, bias_O), (x_BHWC, kernel_HWIO, bias_O)


def _conv3x3_bwd(residuals, dy_BHWO):
    _, pullback = jax.vjp(_reference, *residuals)
    return pullback(dy_BHWO)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)
