"""sdjax.nn.layers.conv2d: the convolution with hand-written gradients equals XLA's own, value and VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdjax.nn.layers import conv2d


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
