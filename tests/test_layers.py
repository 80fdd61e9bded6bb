"""sdjax.nn.layers: the convolution with hand-written gradients equals XLA's own (value and VJP); every
other way a convolution is computed (matrix products, the sub-pixel upsampling convolution) equals the
plain one; half precision accumulates in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.nn.kernels import conv2d
from sdjax.nn.layers import Conv2d, Dense, Upsample2D


def _xla_conv(x, kernel, stride, padding):
    pad = ((padding, padding), (padding, padding))
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize(
    "k,stride,padding,size", [(3, 1, 1, 9), (3, 2, 1, 8), (3, 2, 0, 9), (1, 1, 0, 6), (3, 1, 0, 7)]
)
def test_conv2d_value_and_gradients_match_xla(k, stride, padding, size):
    kx, kk, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (2, size, size, 5))
    kernel = jax.random.normal(kk, (k, k, 5, 7))
    ours, ours_vjp = jax.vjp(lambda a, b: conv2d(a, b, stride, padding), x, kernel)
    theirs, theirs_vjp = jax.vjp(lambda a, b: _xla_conv(a, b, stride, padding), x, kernel)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    dy = jax.random.normal(kd, ours.shape)
    for a, b in zip(ours_vjp(dy), theirs_vjp(dy), strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv2d_gradient_inside_scan_and_in_bfloat16():
    x = jax.random.normal(jax.random.key(1), (3, 2, 8, 8, 4))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 4, 4))

    def loss(kern, conv):
        total = jax.lax.scan(lambda c, xs: (c + jnp.sum(conv(xs, kern, 2, 1) ** 2), None), 0.0, x)[0]
        return total

    ours = jax.grad(loss)(kernel, conv2d)
    theirs = jax.grad(loss)(kernel, _xla_conv)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-3)
    half = jax.grad(lambda a: jnp.sum(conv2d(a, kernel.astype(jnp.bfloat16), 1, 1).astype(jnp.float32)))(
        x[0].astype(jnp.bfloat16)
    )
    assert half.dtype == jnp.bfloat16 and half.shape == x[0].shape


def _reference_upsample(params, x):
    """diffusers' Upsample2D: nearest 2x, then the 3x3 conv (padding 1)."""
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _xla_conv(up, params["conv"]["kernel"], 1, 1) + params["conv"]["bias"]


# sub-pixel as products (<= 256 positions) and as a convolution; the plain path (maps small next to the kernel)
@pytest.mark.parametrize("size,out", [((4, 5), 5), ((7, 7), 5), ((20, 23), 5), ((2, 3), 40)])
def test_upsample_subpixel_equals_nearest_then_conv(size, out):
    x = jax.random.normal(jax.random.key(3), (2, *size, 6))
    module = Upsample2D(out)
    params = module.init(jax.random.key(4), x)["params"]
    params["conv"]["bias"] = jax.random.normal(jax.random.key(5), (out,))
    ours = module.apply({"params": params}, x)
    theirs = _reference_upsample(params, x)
    assert ours.shape == (2, 2 * size[0], 2 * size[1], out)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda p, a: jnp.sum(jnp.sin(f(p, a)))
    ours_grads = jax.grad(loss(lambda p, a: module.apply({"params": p}, a)), argnums=(0, 1))(params, x)
    theirs_grads = jax.grad(loss(_reference_upsample), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(ours_grads), jax.tree.leaves(theirs_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("size", [8, 24, 130])  # im2col, rows (half precision), XLA's convolution
def test_conv2d_module_paths_equal_the_plain_convolution(size, dtype):
    x = jax.random.normal(jax.random.key(6), (1, size, size, 8))
    module = Conv2d(16, 3, padding=1, dtype=dtype)
    params = module.init(jax.random.key(7), x)["params"]
    ours = module.apply({"params": params}, x.astype(dtype))
    assert ours.dtype == dtype
    theirs = _xla_conv(x, params["kernel"], 1, 1) + params["bias"]
    # bf16: the inputs are rounded to 8 bits of mantissa, the sums accumulate in float32
    tol = 1e-5 if dtype == jnp.float32 else 0.05
    np.testing.assert_allclose(ours.astype(jnp.float32), theirs, rtol=tol, atol=tol)


def test_half_precision_products_accumulate_in_float32():
    """A long bf16 dot: float32 accumulation keeps it within bf16 rounding of the exact value; summing in
    bf16 would drift by far more."""
    x = jnp.full((1, 4096), 0.1, jnp.float32)
    layer = Dense(1, use_bias=False, dtype=jnp.bfloat16)
    params = {"kernel": jnp.ones((4096, 1), jnp.float32)}
    out = layer.apply({"params": params}, x)
    exact = 4096 * float(jnp.asarray(0.1, jnp.bfloat16).astype(jnp.float32))
    assert out.dtype == jnp.bfloat16
    assert abs(float(out[0, 0]) - exact) <= exact * 2**-8
    assert float(Dense(1, use_bias=False).apply({"params": params}, x)[0, 0]) == pytest.approx(409.6, rel=1e-5)


def test_given_parameters_are_shape_checked_without_tracing_their_initialisers(monkeypatch):
    """A parameter passed to `apply` is used as given when its shape is the layer's, and refused in one line
    naming it otherwise; its initialiser runs only in `init` (Flax's own check traces it at every apply)."""
    x = jnp.ones((2, 5, 5, 3))
    conv = Conv2d(4, 3, padding=1)
    params = conv.init(jax.random.key(0), x)["params"]
    calls = []
    initialiser = jax.nn.initializers.lecun_normal()
    monkeypatch.setattr(jax.nn.initializers, "lecun_normal", lambda: lambda *a: (calls.append(1), initialiser(*a))[1])
    monkeypatch.setattr("flax.linen.initializers.lecun_normal", jax.nn.initializers.lecun_normal)
    np.testing.assert_array_equal(jax.jit(conv.apply)({"params": params}, x), conv.apply({"params": params}, x))
    assert calls == []
    wrong = {**params, "kernel": jnp.ones((3, 3, 2, 4))}
    with pytest.raises(ValueError, match=r"kernel has shape \(3, 3, 2, 4\), but this architecture's is \(3, 3, 3, 4\)"):
        conv.apply({"params": wrong}, x)
    assert Dense(6).apply({"params": Dense(6).init(jax.random.key(1), x)["params"]}, x).shape == (2, 5, 5, 6)
