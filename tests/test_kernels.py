"""The per-backend kernels (sdjax.nn.kernels) against the plain reference on this CPU: the Pallas TPU
flash attention in interpret mode, XLA's convolution gradients against the CPU's per-tap products, and
which kernel each platform's lowering actually gets."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from sdjax import targets, xla_options
from sdjax.nn import kernels, norms, tpu_attention, tpu_conv, tpu_feed_forward
from sdjax.nn.attention import dot_product_attention

KERNEL_PLATFORMS = "all"  # lowers for the TPU and CUDA: every platform's kernels traced (conftest.py)


def _qkv(q_len, k_len, heads, dim, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (2, q_len, heads, dim), dtype)
    k = jax.random.normal(keys[1], (2, k_len, heads, dim), dtype)
    v = jax.random.normal(keys[2], (2, k_len, heads, dim), dtype)
    return q, k, v


@pytest.mark.parametrize(
    "q_len, k_len, heads, dim",
    [(64, 64, 2, 40), (128, 77, 2, 80), (256, 256, 1, 160)],  # SD's 8x8 map, cross-attention, a wide head
)
def test_tpu_flash_attention_equals_the_reference(q_len, k_len, heads, dim):
    q, k, v = _qkv(q_len, k_len, heads, dim)
    with pltpu.force_tpu_interpret_mode():
        ours = kernels.flash_attention_tpu(q, k, v, block=128)
    np.testing.assert_allclose(ours, dot_product_attention(q, k, v), rtol=2e-5, atol=2e-5)


def test_tpu_flash_attention_in_bfloat16():
    q, k, v = _qkv(128, 77, 2, 40, jnp.bfloat16)
    with pltpu.force_tpu_interpret_mode():
        ours = kernels.flash_attention_tpu(q, k, v).astype(jnp.float32)
    reference = dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    np.testing.assert_allclose(ours, reference, rtol=0.03, atol=0.03)


def test_tpu_flash_attention_gradients_equal_the_reference():
    """The backward kernels (training on TPU) with an unpadded 40-wide head and masked key padding."""
    q, k, v = _qkv(128, 77, 2, 40)
    weights = jax.random.normal(jax.random.key(9), q.shape)
    loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) * weights)
    with pltpu.force_tpu_interpret_mode():
        ours = jax.grad(loss(functools.partial(kernels.flash_attention_tpu, block=128)), (0, 1, 2))(q, k, v)
    reference = jax.grad(loss(dot_product_attention), (0, 1, 2))(q, k, v)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _packed(q, k, v):
    """`tpu_attention.packed_attention` on (B, T, H, D) tensors: packed, keys padded to 128, unpacked."""
    b, q_len, heads, d = q.shape
    k_len = k.shape[1]
    pad = lambda x: jnp.pad(x, ((0, 0), (0, -k_len % 128), (0, 0), (0, 0)))  # noqa: E731
    pack = lambda x: tpu_attention.pack(x.reshape(*x.shape[:2], heads * d), d)  # noqa: E731
    out = tpu_attention.packed_attention(pack(q), pack(pad(k)), pack(pad(v)), heads=heads, head_dim=d, key_len=k_len)
    width = tpu_attention.heads_per_group(d) * d
    groups = out.reshape(b, q_len, -1, 128)[..., :width].reshape(b, q_len, -1)
    return groups[..., : heads * d].reshape(b, q_len, heads, d)


@pytest.mark.parametrize(
    "q_len, k_len, heads, dim",
    [
        (64, 64, 8, 40),  # SD 1.5's heads: 3 to a lane group, the last group 2 heads + padding
        (1024, 1024, 3, 40),  # two query blocks, two key blocks: the online softmax across blocks
        (136, 77, 5, 64),  # SD 2's heads, 2 to a group, an odd count; cross-attention's masked key padding
        (64, 600, 10, 64),  # 10 heads of 64 = 5 whole groups (no regrouping); a partly padded last key block
        (64, 64, 1, 128),  # a head filling its group
    ],
)
def test_tpu_packed_attention_equals_the_reference(q_len, k_len, heads, dim):
    q, k, v = _qkv(q_len, k_len, heads, dim)
    with pltpu.force_tpu_interpret_mode():
        ours = jax.jit(_packed)(q, k, v)
    np.testing.assert_allclose(ours, dot_product_attention(q, k, v), rtol=2e-5, atol=2e-5)


def test_tpu_packing_puts_whole_heads_in_each_lane_group():
    x = jnp.arange(2 * 3 * 320, dtype=jnp.float32).reshape(2, 3, 320)  # 8 heads of 40
    packed = tpu_attention.pack(x, 40)
    assert packed.shape == (2, 3, 384)
    np.testing.assert_array_equal(packed[..., 128 + 40 : 128 + 80], x[..., 160:200])  # head 4: group 1, slot 1
    assert not packed[..., 120:128].any() and not packed[..., 256 + 80 :].any()
    weights = jax.random.normal(jax.random.key(5), (320, 320), jnp.bfloat16)  # packed by a 0/1 product: exact
    moved = tpu_attention.pack(weights, 40)
    assert moved.dtype == jnp.bfloat16
    np.testing.assert_array_equal(moved[:, 256 : 256 + 80], weights[:, 240:])
    whole_groups = x[..., :256]  # 4 heads of 64: SD 2's layout is packed already
    assert tpu_attention.pack(whole_groups, 64) is whole_groups


def _attention_weights(channels, context_dim, heads, dim, dtype):
    keys = jax.random.split(jax.random.key(21), 5)
    inner = heads * dim
    shapes = [(channels, inner), (context_dim, inner), (context_dim, inner), (inner, channels), (channels,)]
    scaled = [jax.random.normal(key, shape) * shape[0] ** -0.5 for key, shape in zip(keys, shapes, strict=True)]
    return [w.astype(dtype) for w in scaled]


@pytest.mark.parametrize(
    "heads, dim, context_len", [(8, 40, 77), (5, 64, None), pytest.param(2, 80, 77, marks=pytest.mark.slow)]
)
def test_projected_attention_on_the_tpu_is_the_layers_attention(heads, dim, context_len):
    """The TPU branch (weights regrouped, the packed kernel; a self-attention's q, k and v from one product,
    a cross-attention's k and v) against the other backends' (projections, (B, N, H, D) attention, output
    projection), bfloat16; with a residual (to_out.0 and the addition inside
    the kernel) against the branch without plus the residual; and its gradients are the plain path's."""
    x = jax.random.normal(jax.random.key(22), (2, 72, 96), jnp.bfloat16)
    context = None if context_len is None else jax.random.normal(jax.random.key(23), (2, context_len, 48), jnp.bfloat16)
    weights = _attention_weights(96, 96 if context is None else 48, heads, dim, jnp.bfloat16)
    residual = (3 * jax.random.normal(jax.random.key(25), x.shape)).astype(jnp.bfloat16)
    args = (x, context, *weights)
    plain = kernels.projected_attention(*args, heads=heads, head_dim=dim)
    packed = jax.jit(functools.partial(kernels._projected_attention_packed, heads, dim, False))
    with pltpu.force_tpu_interpret_mode():
        ours = packed(*args)
        fused = packed(*args, residual)
    assert ours.shape == plain.shape and ours.dtype == plain.dtype == jnp.bfloat16
    np.testing.assert_allclose(ours.astype(jnp.float32), plain.astype(jnp.float32), rtol=3e-2, atol=3e-2)
    # the same arithmetic but for the order of to_out.0's float32 sums (per lane group in the kernel)
    want = (residual + ours).astype(jnp.float32)
    assert fused.shape == residual.shape and fused.dtype == jnp.bfloat16
    step = 2.0 ** (np.floor(np.log2(np.abs(np.asarray(want)).max())) - 7)  # one bf16 step at the largest
    assert np.abs(np.asarray(fused, np.float32) - np.asarray(want)).max() <= step
    assert np.mean(np.asarray(fused, np.float32) == np.asarray(want)) > 0.95

    with_residual = (*args, residual)
    cotangent = jax.random.normal(jax.random.key(24), plain.shape)
    loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cotangent)  # noqa: E731
    tpu = functools.partial(kernels._projected_attention_tpu, heads, dim, False)
    ours = jax.jit(jax.grad(loss(tpu), range(8)))(*with_residual)  # no interpret mode: the kernel is not run
    plain = functools.partial(kernels._projected_attention_plain, heads, dim, False)
    want = jax.jit(jax.grad(loss(plain), range(8)))(*with_residual)
    for a, b in zip(ours, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_projected_attention_lowers_to_the_packed_kernel_on_the_tpu():
    """bfloat16 heads of at most 128 lanes get the packed kernel (one call, no flash kernel), wider heads
    and float32 JAX's flash kernel; the CPU gets neither."""

    def lower(platform, heads, dim, dtype):
        x = jnp.ones((2, 64, 96), dtype)
        weights = _attention_weights(96, 96, heads, dim, dtype)
        f = jax.jit(functools.partial(kernels.projected_attention, heads=heads, head_dim=dim))
        return jax.export.export(f, platforms=(platform,))(x, x, *weights).mlir_module()

    packed = lower("tpu", 8, 40, jnp.bfloat16)
    assert packed.count("tpu_custom_call") == 1 and "flash" not in packed
    x = jnp.ones((2, 64, 96), jnp.bfloat16)
    f = jax.jit(functools.partial(kernels.projected_attention, heads=8, head_dim=40))
    weights = _attention_weights(96, 96, 8, 40, jnp.bfloat16)
    fused = jax.export.export(f, platforms=("tpu",))(x, x, *weights, residual_BNC=x).mlir_module()
    # one kernel, to_out.0's product inside it: the projections are XLA's dot_generals, q and k + v two
    assert (
        fused.count("tpu_custom_call") == 1
        and fused.count("stablehlo.dot_general") == packed.count("stablehlo.dot_general") - 1
    )
    # a self-attention (no context): q, k and v from one product
    own = jax.export.export(f, platforms=("tpu",))(x, None, *weights, residual_BNC=x).mlir_module()
    assert own.count("tpu_custom_call") == 1
    assert own.count("stablehlo.dot_general") == fused.count("stablehlo.dot_general") - 1
    assert "flash" in lower("tpu", 2, 160, jnp.bfloat16) and "flash" in lower("tpu", 8, 40, jnp.float32)
    assert "tpu_custom_call" not in lower("cpu", 8, 40, jnp.bfloat16)


def _feed_forward_args(rows, k, f, seed=31):
    keys = jax.random.split(jax.random.key(seed), 7)
    x = (jax.random.normal(keys[0], (2, rows // 2, k)) * 3 + 1).astype(jnp.bfloat16)  # a mean for the norm
    scale = 1 + 0.2 * jax.random.normal(keys[1], (k,))
    shift = 0.3 * jax.random.normal(keys[2], (k,))
    w1 = (jax.random.normal(keys[3], (k, 2 * f)) * k**-0.5).astype(jnp.bfloat16)
    b1 = jax.random.normal(keys[4], (2 * f,)).astype(jnp.bfloat16)
    w2 = (jax.random.normal(keys[5], (f, k)) * f**-0.5).astype(jnp.bfloat16)
    b2 = jax.random.normal(keys[6], (k,)).astype(jnp.bfloat16)
    return x, scale, shift, w1, b1, w2, b2


# SD 1.5's first width in one block of rows and columns: slow (the small blocks' case sums over blocks)
@pytest.mark.parametrize(
    "rows, in_features, features, small_blocks",
    [(96, 64, 256, True), pytest.param(128, 320, 1280, False, marks=pytest.mark.slow)],
)
def test_tpu_feed_forward_is_the_blocks_third_sublayer(monkeypatch, rows, in_features, features, small_blocks):
    """The TPU kernel of x + ff(norm3(x)) (interpret mode; with small blocks, several row blocks and several
    128-wide inner column blocks summed into net.2's output) agrees with the other backends' path and with
    float32 arithmetic no worse than it; the norm is flax's `nn.LayerNorm` bit for bit (one-pass variance in
    bfloat16, two passes in float32); the gradients are the plain path's exactly."""
    if small_blocks:
        monkeypatch.setattr(tpu_feed_forward, "ROW_BLOCK", 32)
        monkeypatch.setattr(tpu_feed_forward, "TEMP_BYTES", 3 * 4 * 32 * 128)
    block_rows, block_cols = tpu_feed_forward.blocks(rows, in_features, features)
    assert (block_rows < rows and block_cols < features) == small_blocks
    args = _feed_forward_args(rows, in_features, features)
    x, scale, shift = args[:3]

    for dtype, fast in ((jnp.bfloat16, True), (jnp.float32, False)):
        flax_norm = nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=fast)
        want = flax_norm.apply({"params": {"scale": scale, "bias": shift}}, x.astype(dtype))
        np.testing.assert_array_equal(norms.layer_norm(x.astype(dtype), scale, shift, 1e-5, dtype), want)

    tpu = jax.jit(kernels._feed_forward_tpu, static_argnums=(7, 8))
    with pltpu.force_tpu_interpret_mode():
        ours = tpu(*args, 1e-5, jnp.bfloat16)
    plain = kernels.feed_forward(*args[:3], 1e-5, *args[3:], dtype=jnp.bfloat16)
    assert ours.shape == plain.shape == x.shape and ours.dtype == jnp.bfloat16
    # within one bfloat16 step of the largest outputs (|y| < 16): the GEGLU output rounded once, not twice
    np.testing.assert_allclose(ours.astype(jnp.float32), plain.astype(jnp.float32), rtol=2**-7, atol=2**-4)
    exact = kernels._feed_forward_plain(*(a.astype(jnp.float32) for a in args), eps=1e-5, dtype=jnp.float32)
    error = lambda y: float(jnp.abs(y.astype(jnp.float32) - exact).mean())  # noqa: E731
    assert error(ours) <= 1.05 * error(plain), (error(ours), error(plain))

    cotangent = jax.random.normal(jax.random.key(32), plain.shape)
    loss = lambda f: lambda *a: jnp.sum(f(*a).astype(jnp.float32) * cotangent)  # noqa: E731
    plain_fn = functools.partial(kernels._feed_forward_plain, eps=1e-5, dtype=jnp.bfloat16)
    ours = jax.jit(jax.grad(loss(lambda *a: tpu(*a, 1e-5, jnp.bfloat16)), range(7)))(*args)  # no kernel runs
    want = jax.jit(jax.grad(loss(plain_fn), range(7)))(*args)
    np.testing.assert_array_equal(ours[0], want[0])
    for a, c in zip(ours, want, strict=True):  # the same arithmetic, which XLA may sum in another order
        a, c = a.astype(jnp.float32), c.astype(jnp.float32)
        np.testing.assert_allclose(a, c, rtol=2**-7, atol=2**-7 * float(jnp.abs(c).max()))


def test_tpu_feed_forward_blocks():
    """Which sublayers the kernel takes, its blocks at SD 1.5's and SDXL's widest rows, and that on the TPU
    the whole sublayer (norm included) is one kernel, on the CPU XLA's ops."""
    assert tpu_feed_forward.fits(8192, 320, 1280, jnp.bfloat16)
    assert not tpu_feed_forward.fits(8192, 320, 1280, jnp.float32)
    assert not tpu_feed_forward.fits(77, 320, 1280, jnp.bfloat16)
    assert tpu_feed_forward.blocks(8192, 320, 1280) == (2048, 256)  # SD 1.5, 64x64 with CFG
    for rows, k in ((8192, 320), (4 * 8192, 320), (8192, 640), (2048, 1280), (512, 1280)):  # SD 1.5, SDXL
        block_rows, block_cols = tpu_feed_forward.blocks(rows, k, 4 * k)
        row_buffers = block_rows * k * (5 * 2 + 4)
        weights, temporaries = 3 * k * block_cols * 2, 3 * block_rows * block_cols * 4
        assert row_buffers <= tpu_feed_forward.ROW_BUFFER_BYTES and temporaries <= tpu_feed_forward.TEMP_BYTES
        assert row_buffers + 2 * weights + temporaries <= tpu_feed_forward.VMEM_LIMIT_BYTES * 3 // 4
    args = _feed_forward_args(128, 1280, 5120)
    sublayer = jax.jit(lambda *a: kernels.feed_forward(*a[:3], 1e-5, *a[3:], dtype=jnp.bfloat16))
    tpu = jax.export.export(sublayer, platforms=("tpu",))(*args).mlir_module()
    assert tpu.count("tpu_custom_call") == 1 and "stablehlo.reduce" not in tpu
    cpu = jax.export.export(sublayer, platforms=("cpu",))(*args).mlir_module()
    assert "tpu_custom_call" not in cpu and "stablehlo.reduce" in cpu


@pytest.mark.parametrize(
    "shape, out_channels, dtype",
    [
        ((2, 8, 16, 24), 40, jnp.bfloat16),  # several row blocks, O not a multiple of 128
        ((1, 12, 32, 16), 256, jnp.bfloat16),  # row blocks that do not halve H, two output-channel blocks
        ((1, 4, 16, 8), 128, jnp.float32),  # the kernel's arithmetic; `fits` takes bfloat16 only
        ((1, 4, 16, 128), 128, jnp.bfloat16),  # whole lane tiles: nine products, not packed
    ],
)
def test_tpu_conv_equals_xla_convolution(monkeypatch, shape, out_channels, dtype):
    """The Pallas 3x3 kernel in interpret mode, with small blocks so that row halos at the image's top and
    bottom, the W shifts at its left and right edges and several output-channel blocks are all crossed; the
    taps as one packed product where that `packs` (all but the last case), else as nine."""
    c = shape[-1]
    monkeypatch.setattr(tpu_conv, "TARGET_ROWS", 3 * shape[2])
    monkeypatch.setattr(tpu_conv, "WEIGHT_BLOCK_BYTES", 9 * c * 128 * jnp.dtype(dtype).itemsize)
    x = jax.random.normal(jax.random.key(10), shape, dtype)
    kernel = (jax.random.normal(jax.random.key(11), (3, 3, c, out_channels)) * 0.1).astype(dtype)
    bias = jax.random.normal(jax.random.key(15), (out_channels,))
    with pltpu.force_tpu_interpret_mode():
        ours = tpu_conv.conv3x3(x, kernel, bias)
    assert ours.dtype == dtype
    reference = tpu_conv._reference(x, kernel, bias)
    if dtype == jnp.float32:
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    else:  # the same float32 sums, rounded once: at most one rounding step apart
        np.testing.assert_allclose(ours.astype(jnp.float32), reference.astype(jnp.float32), rtol=1e-2, atol=1e-2)


def test_tpu_conv_packs_its_taps_where_the_matrix_unit_pads_less():
    """One product of the three kernel rows' windows side by side (3 C lanes) against the three kernel
    columns' weights side by side (3 O) wherever that pads less to 128-lane tiles than nine products: SD
    1.5's 64x64 maps (320 channels, an up block's 640 and its 640 + 320 parts), the 4-channel conv_in and
    conv_out; never whole lane tiles (1280, 640 -> 128-wide blocks), where it is the same work."""
    assert tpu_conv.packs([320], 320) and tpu_conv.packs([640], 320) and tpu_conv.packs([640, 320], 320)
    assert tpu_conv.packs([4], 320) and tpu_conv.packs([320], 4)
    assert not tpu_conv.packs([1280], 1280) and not tpu_conv.packs([1280, 640], 128) and not tpu_conv.packs([128], 128)
    assert tpu_conv._mxu_work([320], 320, True) == 1024 * 1024
    assert tpu_conv._mxu_work([320], 320, False) == 9 * 384 * 384


def test_tpu_conv_gradients_are_xlas():
    x = jax.random.normal(jax.random.key(12), (2, 8, 16, 8))
    kernel = jax.random.normal(jax.random.key(13), (3, 3, 8, 24)) * 0.1
    bias = jax.random.normal(jax.random.key(16), (24,))
    weights = jax.random.normal(jax.random.key(14), (2, 8, 16, 24))
    loss = lambda conv: lambda x, k, b: jnp.sum(conv(x, k, b) * weights)  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        ours = jax.grad(loss(tpu_conv.conv3x3), (0, 1, 2))(x, kernel, bias)
    reference = jax.grad(loss(tpu_conv._reference), (0, 1, 2))(x, kernel, bias)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_biased_conv_on_the_tpu_is_the_layers_convolution():
    """The TPU branch (the Pallas kernel with the bias inside, bfloat16 out; upsampling on the repeated
    map) and the other backends' (conv, then the bias in float32, rounded once) agree."""
    x = jax.random.normal(jax.random.key(17), (2, 8, 16, 32), jnp.bfloat16)
    kernel = (jax.random.normal(jax.random.key(18), (3, 3, 32, 16)) * 0.1).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(19), (16,))
    for upsample in (False, True):
        plain = kernels.biased_conv(x, kernel, bias, 1, 1, upsample)
        x_in = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2) if upsample else x
        with pltpu.force_tpu_interpret_mode():
            ours = tpu_conv.conv3x3(x_in, kernel, bias)
        assert ours.shape == plain.shape and ours.dtype == plain.dtype == jnp.bfloat16
        # the CPU upsamples in the sub-pixel form, whose 2x2 kernels are sums of bf16 taps, rounded in bf16
        tolerance = 3e-2 if upsample else 1e-2
        np.testing.assert_allclose(ours.astype(jnp.float32), plain.astype(jnp.float32), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "shape, out_channels, offset, widths",
    [
        ((2, 6, 16, 24), 256, True, None),  # three row blocks (halos inside and at both edges), two O blocks
        ((1, 8, 8, 8), 40, False, None),  # one row block: both halos are the image's zero padding, not silu(b)
        # three images (the kernel picks its image's statistics), 10 per group
        pytest.param((3, 4, 8, 40), 128, True, None, marks=pytest.mark.slow),
        ((2, 6, 16, 24), 128, True, (16, 8)),  # two channel parts, group 2 (channels 12..17) straddling both
        ((1, 4, 8, 256), 128, False, (128, 128)),  # whole lane tiles: nine products per part, not packed
        pytest.param((1, 4, 8, 48), 40, False, (32, 16), marks=pytest.mark.slow),  # parts of 2 and 1 groups
    ],
)
@pytest.mark.fusion_emitters
def test_tpu_norm_silu_conv_equals_xla_on_the_activated_map(monkeypatch, shape, out_channels, offset, widths):
    """norm_silu_conv3x3 (interpret mode): the GroupNorm's affine map made from the per-channel sums in the
    kernel and applied with the SiLU in its input copy, against `_norm_silu_reference` (the same map in
    XLA, then XLA's convolution of silu(x * a + b)): the same bfloat16 operands, so all but a few sums
    (rounded the other way) are equal, and the gradients are the reference's. The padding stays zero:
    silu(0 * a + b) would not be. With `widths` x comes in channel parts (an up block's map and skip), whose
    concatenation the kernel never builds: the same results as the concatenated input's."""
    b, _, _, c = shape
    monkeypatch.setattr(tpu_conv, "TARGET_ROWS", 2 * shape[2])
    monkeypatch.setattr(tpu_conv, "WEIGHT_BLOCK_BYTES", 9 * c * 128 * 2)
    x = (jax.random.normal(jax.random.key(40), shape) * 1.5 + 0.3).astype(jnp.bfloat16)
    t = jax.random.normal(jax.random.key(41), (b, c)) if offset else None
    shifted = x.astype(jnp.float32) + (0 if t is None else t[:, None, None, :])
    sums, squares = shifted.sum(axis=(1, 2)), jnp.square(shifted).sum(axis=(1, 2))
    gamma = jax.random.uniform(jax.random.key(42), (c,), minval=0.5, maxval=2.0).astype(jnp.bfloat16)
    beta = (jax.random.normal(jax.random.key(43), (c,)) + 1.0).astype(jnp.bfloat16)
    kernel = (jax.random.normal(jax.random.key(44), (3, 3, c, out_channels)) * 0.2).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(45), (out_channels,)).astype(jnp.bfloat16)
    groups = 4 if c % 4 == 0 else 2
    whole = x
    if widths is not None:
        x = tuple(jnp.split(x, [widths[0]], axis=-1))
    args = (x, sums, squares, t, gamma, beta, kernel, bias)
    options = dict(groups=groups, eps=1e-5)
    with pltpu.force_tpu_interpret_mode():
        ours = jax.jit(functools.partial(tpu_conv.norm_silu_conv3x3, **options))(*args)
        if widths is not None:  # the concatenated input's result, but for the order of float32 sums
            concatenated = jax.jit(functools.partial(tpu_conv.norm_silu_conv3x3, **options))(whole, *args[1:])
            concatenated = np.asarray(concatenated, np.float32)
            np.testing.assert_allclose(np.asarray(ours, np.float32), concatenated, rtol=8e-3, atol=1e-2)
            assert np.mean(np.asarray(ours, np.float32) == concatenated) > 0.98
    reference = tpu_conv._norm_silu_reference(*args, **options)
    assert ours.shape == reference.shape == (*shape[:3], out_channels) and ours.dtype == jnp.bfloat16
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    np.testing.assert_allclose(ours, reference, rtol=8e-3, atol=1e-2)
    assert np.mean(ours == reference) > 0.98
    # the reference is the layers' GroupNorm, SiLU and convolution of x + t, within their roundings
    norm = norms.group_norm(shifted, gamma, beta, groups, 1e-5, jnp.float32)
    layers = tpu_conv._reference(jax.nn.silu(norm).astype(jnp.bfloat16), kernel, bias)
    np.testing.assert_allclose(reference, np.asarray(layers, np.float32), rtol=3e-2, atol=3e-2)
    weights = jax.random.normal(jax.random.key(46), ours.shape)
    loss = lambda conv: lambda *a: jnp.sum(conv(*a, **options).astype(jnp.float32) * weights)  # noqa: E731
    wrt = [i for i, a in enumerate(args) if a is not None]
    # two programs compared bit for bit: sdjax's compiler options, with the default fusion emitters (the mark)
    with pltpu.force_tpu_interpret_mode():  # jitted: the kernel's unused forward output is dropped
        grads = xla_options.jit(jax.grad(loss(tpu_conv.norm_silu_conv3x3), wrt))(*args)
    expected = xla_options.jit(jax.grad(loss(tpu_conv._norm_silu_reference), wrt))(*args)
    for a, r in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, r)
    with pytest.raises(ValueError, match="do not split into 7 groups"):
        tpu_conv.norm_silu_conv3x3(*args, groups=7, eps=1e-5)


@pytest.mark.parametrize("offset", [False, True])
def test_norm_act_conv_on_the_tpu_is_the_resnet_blocks_path(offset):
    """The TPU branch of norm_act_conv (the per-channel sums of x + t in, GroupNorm folded into the kernel's
    input as x * a + b, the time embedding's offset into b) against the other backends' GroupNorm, SiLU,
    then convolution: within a bfloat16 rounding of the activated map. Lowered for the TPU it is one Pallas
    call and no activated map; for the CPU the same program as the layers' GroupNorm, SiLU and Conv2d one
    after the other."""
    x = (jax.random.normal(jax.random.key(46), (2, 8, 16, 64)) * 2 + 0.5).astype(jnp.bfloat16)
    t = jax.random.normal(jax.random.key(47), (2, 64), jnp.bfloat16) if offset else None
    gamma = jax.random.uniform(jax.random.key(48), (64,), minval=0.5, maxval=1.5)
    beta = jax.random.normal(jax.random.key(49), (64,)) * 0.3
    kernel = (jax.random.normal(jax.random.key(50), (3, 3, 64, 128)) * 0.05).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(51), (128,))
    options = dict(groups=8, eps=1e-5, act=jax.nn.silu, dtype=jnp.bfloat16)
    plain = jax.jit(functools.partial(kernels.norm_act_conv, **options))(x, t, gamma, beta, kernel, bias)
    shifted = (x if t is None else x + t[:, None, None, :]).astype(jnp.float32)
    sums, squares = shifted.sum(axis=(1, 2)), jnp.square(shifted).sum(axis=(1, 2))
    offset = None if t is None else t.astype(jnp.float32)
    with pltpu.force_tpu_interpret_mode():
        fused = jax.jit(functools.partial(tpu_conv.norm_silu_conv3x3, groups=8, eps=1e-5))
        ours = fused(x, sums, squares, offset, gamma, beta, kernel, bias)
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(plain, np.float32), rtol=3e-2, atol=3e-2)

    def ours(x, t, gamma, beta, kernel, bias):
        return kernels.norm_act_conv(x, t, gamma, beta, kernel, bias, **options)

    def layers(x, t, gamma, beta, kernel, bias):
        h = x if t is None else x + t[:, None, None, :]
        h = jax.nn.silu(norms.group_norm(h, gamma, beta, 8, 1e-5, jnp.bfloat16))
        return kernels.biased_conv(h, kernel, bias, 1, 1)

    args = (x, t, gamma, beta, kernel, bias)
    tpu = jax.export.export(jax.jit(ours), platforms=("tpu",))(*args).mlir_module()
    assert tpu.count("tpu_custom_call") == 1 and "logistic" not in tpu
    assert re.findall(r'kernel_name = "(\w+)"', tpu) == ["_norm_silu_conv_kernel"]
    cpu = jax.jit(ours).lower(*args).compile().as_text()
    expected = jax.jit(layers).lower(*args).compile().as_text()

    def instructions(hlo: str) -> list[str]:  # the optimised program's instructions, without metadata
        lines = [line for line in hlo.splitlines() if re.match(r"\s*(ROOT )?%", line)]
        return [re.sub(r"metadata=\{[^}]*\}|\.\d+", "", line) for line in lines]

    assert instructions(cpu) == instructions(expected)


@pytest.mark.parametrize("channels, skip_channels, parts", [(128, 128, True), (32, 16, False)])
def test_an_up_blocks_resnet_reads_its_map_and_skip_as_parts_on_the_tpu(channels, skip_channels, parts):
    """ResnetBlock2D given a skip connection (as up blocks give it) is the block applied to the map and the
    skip concatenated: the same output on the CPU. Lowered for the TPU, conv1's GroupNorm kernel reads the
    two as channel parts where that pads no more lanes than their concatenation (128 + 128), so the
    concatenation is built only for conv_shortcut's product, which XLA fuses it into; 32 + 16 channels
    would pad to 256 lanes as parts against 128, and are concatenated first."""
    from sdjax.nn.layers import ResnetBlock2D

    block = ResnetBlock2D(128, groups=8, eps=1e-5, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(60), (2, 8, 16, channels), jnp.bfloat16)
    skip = jax.random.normal(jax.random.key(61), (2, 8, 16, skip_channels), jnp.bfloat16)
    temb = jax.random.normal(jax.random.key(62), (2, 64))
    joined = jnp.concatenate([x, skip], axis=-1)
    params = block.init(jax.random.key(63), joined, temb)
    apply = jax.jit(block.apply)
    np.testing.assert_array_equal(apply(params, x, temb, skip), apply(params, joined, temb))
    tpu = jax.export.export(apply, platforms=("tpu",))(params, x, temb, skip).mlir_module()
    assert re.findall(r'kernel_name = "(\w+)"', tpu) == ["_norm_silu_conv_kernel"] * 2  # conv1 and conv2
    conv1 = re.search(r"tpu_custom_call.*_norm_silu_conv_kernel.*", tpu).group(0)
    assert conv1.count(f"tensor<2x8x16x{channels + skip_channels}xbf16>") == (0 if parts else 1)


@pytest.mark.parametrize(
    "shape, out_channels",
    [
        ((2, 6, 16, 24), 256),  # three row blocks of two input rows, two output-channel blocks
        ((1, 8, 8, 8), 128),  # one row block: both halos are the image's zero padding
    ],
)
def test_tpu_upsample_conv_equals_the_repeated_maps_convolution(monkeypatch, shape, out_channels):
    """conv3x3(nearest_2x(x)) + bias as the Pallas kernel that never builds the repeated map (interpret
    mode), against XLA's convolution of the repeated map: the same bfloat16 products summed in float32, so
    all but a few outputs (sums rounded the other way) are equal and none is more than one step apart."""
    c = shape[-1]
    monkeypatch.setattr(tpu_conv, "TARGET_ROWS", 4 * shape[2])  # two input rows per grid step when upsampling
    monkeypatch.setattr(tpu_conv, "WEIGHT_BLOCK_BYTES", 9 * c * 128 * 2)
    x = jax.random.normal(jax.random.key(20), shape, jnp.bfloat16)
    kernel = (jax.random.normal(jax.random.key(21), (3, 3, c, out_channels)) * 0.2).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(22), (out_channels,))
    with pltpu.force_tpu_interpret_mode():
        ours = tpu_conv.upsample2x_conv3x3(x, kernel, bias)
    reference = tpu_conv._upsample_reference(x, kernel, bias)
    b, h, w, _ = shape
    assert ours.shape == reference.shape == (b, 2 * h, 2 * w, out_channels) and ours.dtype == jnp.bfloat16
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    np.testing.assert_allclose(ours, reference, rtol=8e-3, atol=1e-2)
    assert np.mean(ours == reference) > 0.99


def test_interleaved_bfloat16_rounds_like_a_cast():
    """The upsampling kernel's output packing: rows interleaved, each value rounded to nearest-even
    bfloat16 exactly as `astype` does, NaN and infinities kept."""
    even = jax.random.normal(jax.random.key(23), (16, 128)) * 100
    halfway = jax.lax.bitcast_convert_type(jnp.arange(16 * 128, dtype=jnp.uint32) * 0x10000 + 0x3F808000, jnp.float32)
    odd = halfway.reshape(16, 128).at[0, :4].set(jnp.array([jnp.nan, jnp.inf, -jnp.inf, -0.0]))
    packed = jax.jit(tpu_conv._interleaved_bfloat16)(even, odd)
    expected = jnp.stack([even, odd], axis=1).reshape(32, 128).astype(jnp.bfloat16)
    assert packed.dtype == jnp.bfloat16 and packed.shape == (32, 128)
    same = jax.lax.bitcast_convert_type(packed, jnp.uint16) == jax.lax.bitcast_convert_type(expected, jnp.uint16)
    assert bool(jnp.all(same | (jnp.isnan(packed) & jnp.isnan(expected))))


def test_tpu_upsample_conv_gradients_are_xlas():
    x = jax.random.normal(jax.random.key(24), (1, 4, 8, 8), jnp.bfloat16)
    kernel = (jax.random.normal(jax.random.key(25), (3, 3, 8, 128)) * 0.1).astype(jnp.bfloat16)
    bias = jax.random.normal(jax.random.key(26), (128,))
    weights = jax.random.normal(jax.random.key(27), (1, 8, 16, 128))
    loss = lambda conv: lambda x, k, b: jnp.sum(conv(x, k, b).astype(jnp.float32) * weights)  # noqa: E731
    with pltpu.force_tpu_interpret_mode():
        ours = jax.grad(loss(tpu_conv.upsample2x_conv3x3), (0, 1, 2))(x, kernel, bias)
    reference = jax.grad(loss(tpu_conv._upsample_reference), (0, 1, 2))(x, kernel, bias)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(a, b)


def test_upsampling_convolutions_lower_to_one_kernel_on_the_tpu():
    """With whole 128-lane output tiles, nearest 2x + 3x3 conv is one Pallas call and no repeated map;
    otherwise the repeat, then the convolution kernel; and XLA's convolution where the repeated map is too
    large for the kernel (the convolutions after it are XLA's too, and want XLA's layout)."""

    def lower(shape, out_channels):
        kernel = jnp.ones((3, 3, shape[-1], out_channels), jnp.bfloat16)
        f = jax.jit(kernels.biased_conv, static_argnums=(3, 4, 5))
        x = jnp.ones(shape, jnp.bfloat16)
        return jax.export.export(f, platforms=("tpu",))(x, kernel, jnp.zeros(out_channels), 1, 1, True).mlir_module()

    fused, repeated = lower((2, 8, 8, 16), 128), lower((2, 8, 8, 16), 16)
    assert fused.count("tpu_custom_call") == 1 and "broadcast_in_dim" not in fused.split("tpu_custom_call")[0]
    assert repeated.count("tpu_custom_call") == 1 and "broadcast_in_dim" in repeated
    too_large = lower((1, 128, 128, 512), 512)  # SD's VAE decoder, 128x128 -> 256x256
    assert "tpu_custom_call" not in too_large and "convolution" in too_large


def test_tpu_conv_takes_bfloat16_maps_that_fit():
    assert tpu_conv.fits((2, 64, 64, 960), 320, jnp.bfloat16)
    assert not tpu_conv.fits((2, 64, 64, 320), 320, jnp.float32)  # the parity mode keeps XLA's
    assert not tpu_conv.fits((2, 64, 64, 320), 320, jnp.float16)  # Mosaic cannot load it on a v5e
    assert tpu_conv.fits((2, 8, 8, 1280), 1280, jnp.bfloat16)
    assert not tpu_conv.fits((2, 8, 12, 1280), 1280, jnp.bfloat16)  # width not whole sublane tiles
    assert not tpu_conv.fits((2, 128, 128, 960), 320, jnp.bfloat16)  # the whole image exceeds VMEM
    # upsampling: the input image in VMEM, not the repeated one; whole 128-lane output tiles
    assert tpu_conv.fits((1, 128, 128, 512), 512, jnp.bfloat16, upsample2x=True)  # SD's VAE, to 256x256
    assert not tpu_conv.fits((1, 256, 256, 512), 512, jnp.bfloat16)
    assert not tpu_conv.fits((2, 32, 32, 640), 320, jnp.bfloat16, upsample2x=True)


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 1), (1, 0)])
def test_xla_and_product_convolution_gradients_agree(stride, padding):
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 6))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 6, 5))
    y = kernels._conv_nhwc(x, kernel, stride, padding)
    dy = jax.random.normal(jax.random.key(3), y.shape)
    xla = kernels._conv2d_bwd_xla(stride, padding, x, kernel, dy)
    products = kernels._conv2d_bwd_products(stride, padding, x, kernel, dy)
    for a, b in zip(xla, products, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["im2col", "rows", "taps"])
@pytest.mark.parametrize("kernel_size", [3, 2])
def test_product_forms_equal_xla_convolution(form, kernel_size):
    """Every product form (the CPU's, the TPU's) is the unpadded convolution, for 3x3 and the sub-pixel
    upsampler's 2x2 kernels."""
    x = jax.random.normal(jax.random.key(4), (2, 7, 6, 5))
    kernel = jax.random.normal(jax.random.key(5), (kernel_size, kernel_size, 5, 3))
    ours = kernels._valid_conv_as_products(x, kernel, form)
    np.testing.assert_allclose(ours, kernels._conv_nhwc(x, kernel, 1, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "batch, positions, form",
    [(2, 64, "taps"), (2, 256, "taps"), (8, 64, "taps"), (4, 256, "xla"), (2, 4096, "xla")],
)
def test_tpu_convolution_form_by_shape(batch, positions, form):
    assert kernels._tpu_form(batch, positions) == form


def test_each_platform_lowers_its_own_kernels():
    """TPU lowering gets the Pallas kernel (a tpu_custom_call), products for a 3x3 conv of two 8x8 maps,
    XLA's convolution for eight 32x32 ones in float32, the Pallas convolution for two or eight in bfloat16;
    CUDA lowering neither the TPU kernels nor the products; CPU the products (no convolution) on the small
    map."""

    def block(q, k, v, x, kernel):
        return kernels.attention(q, k, v), kernels.conv(x, kernel, 1, 1)

    q, k, v = _qkv(64, 77, 2, 40)
    kernel = jnp.ones((3, 3, 16, 16))
    lower = lambda p, x: jax.export.export(jax.jit(block), platforms=(p,))(q, k, v, x, kernel).mlir_module()
    small, large = jnp.ones((2, 8, 8, 16)), jnp.ones((8, 32, 32, 16))
    text = {p: lower(p, small) for p in ("tpu", "cuda", "cpu")}
    assert "tpu_custom_call" in text["tpu"] and "convolution" not in text["tpu"]
    assert "convolution" in lower("tpu", large)
    assert "tpu_custom_call" not in text["cuda"] and "convolution" in text["cuda"]
    assert "tpu_custom_call" not in text["cpu"] and "convolution" not in text["cpu"]
    biased = lambda x: jax.export.export(jax.jit(kernels.biased_conv, static_argnums=(3, 4)), platforms=("tpu",))(  # noqa: E731
        x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), jnp.zeros(16), 1, 1
    ).mlir_module()
    for maps in (large[:2], large):  # eight maps, 16 output channels too: the kernel packs its taps
        lowered = biased(maps)
        assert "tpu_custom_call" in lowered and "convolution" not in lowered


def test_tpu_1x1_convolutions_are_products_up_to_the_row_limit():
    """On the TPU a 1x1 convolution is one product up to TPU_1X1_PRODUCT_MAX_ROWS output rows (the UNet's),
    XLA's convolution above (the VAE decoder's full-size shortcuts); both equal XLA's on the CPU."""
    kernel = jax.random.normal(jax.random.key(6), (1, 1, 8, 4))
    side = int((kernels.TPU_1X1_PRODUCT_MAX_ROWS // 2) ** 0.5)
    small = jnp.ones((2, side, side, 8))  # exactly the limit
    large = jnp.ones((2, 2 * side, side, 8))
    lower = lambda x: jax.export.export(jax.jit(kernels.conv, static_argnums=(2, 3)), platforms=("tpu",))(  # noqa: E731
        x, kernel, 1, 0
    ).mlir_module()
    assert "stablehlo.convolution" not in lower(small) and "stablehlo.dot_general" in lower(small)
    assert "stablehlo.convolution" in lower(large)
    x = jax.random.normal(jax.random.key(7), (2, 5, 6, 8))
    np.testing.assert_allclose(
        kernels.matmul(x, kernel[0, 0]), kernels._conv_nhwc(x, kernel, 1, 0), rtol=1e-5, atol=1e-5
    )


def test_kernel_platforms_trace_only_the_named_platforms_branches(monkeypatch):
    """With $SDJAX_KERNEL_PLATFORMS=cpu a layer's convolution traces the CPU's branch alone (the TPU's and
    CUDA's are not traced), computes the same numbers, and refuses to lower for the TPU."""
    x = jax.random.normal(jax.random.key(40), (2, 8, 8, 16), jnp.bfloat16)
    kernel = jax.random.normal(jax.random.key(41), (3, 3, 16, 16), jnp.bfloat16) * 0.1
    fresh = lambda: lambda x, k: kernels.conv(x, k, 1, 1)  # noqa: E731  (a new function: no cached trace)
    branches = lambda jaxpr: [len(e.params["branches"]) for e in jaxpr.eqns if e.primitive.name == "cond"]  # noqa: E731
    every = jax.make_jaxpr(fresh())(x, kernel)
    want = jax.jit(fresh())(x, kernel)
    monkeypatch.setenv(targets.KERNEL_PLATFORMS_ENV, "cpu")
    assert targets.kernel_platforms() == ("cpu",)
    named = jax.make_jaxpr(fresh())(x, kernel)
    assert branches(every) == [3] and branches(named) == [1]  # cpu, tpu and the default; then cpu alone
    np.testing.assert_array_equal(jax.jit(fresh())(x, kernel), want)
    with pytest.raises(NotImplementedError, match="platform tpu"):
        jax.export.export(jax.jit(fresh()), platforms=("tpu",))(x, kernel)
