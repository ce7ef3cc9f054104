"""Max pooling whose gradient XLA's CPU backend runs fast.

JAX differentiates a max `lax.reduce_window` through select-and-gather, which XLA's CPU backend
lowers to a variadic reduce-window carrying int32 iota index maps beside the values. In
InceptionV3's train step at 75x75, batch 32, those index maps and reduce-windows took 16% of the
XLA kernels' time on a 2-core AMD EPYC (`python benchmarks/bench_model.py --profile`).

`max_pool` keeps the forward pass (the same reduce-window, so the same bits) and writes the
gradient as one strided comparison per window tap: the gradient of an output goes to the first
input of its window (in row-major tap order) that equals the output, which is JAX's own choice
among ties (a window of zeros after a ReLU). A NaN output's gradient goes to the window's first NaN;
JAX's own gradient sends it to other entries of the window, whose order its comparisons leave
undefined for NaN. Each tap's share is placed back with an interior-padded `lax.pad`, so the whole gradient is
elementwise work that XLA fuses into a few loops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["max_pool"]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    """VALID max pooling of an NHWC array; equal to ``flax.linen.max_pool(x, window, strides, "VALID")``.

    Args:
      x: (batch, height, width, channels), floating point.
      window: (height, width) of the pooling window.
      strides: (height, width) strides.
    """
    return _forward(x, window, strides)


def _forward(x: jax.Array, window: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, (1, *window, 1), (1, *strides, 1), "VALID")


def _max_pool_fwd(x, window, strides):
    y = _forward(x, window, strides)
    return y, (x, y)


def _max_pool_bwd(window, strides, residuals, g):
    x, y = residuals
    batch, height, width, channels = x.shape
    out_h, out_w = y.shape[1:3]
    (kh, kw), (sh, sw) = window, strides
    y_is_nan = jnp.isnan(y)
    taken = jnp.zeros(y.shape, jnp.bool_)  # outputs whose gradient a tap already took
    dx = jnp.zeros(x.shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for i in range(kh):
        for j in range(kw):
            # The input each output's window holds at tap (i, j): a strided slice of y's shape.
            tap = lax.slice(x, (0, i, j, 0), (batch, i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1, channels),
                            (1, sh, sw, 1))
            # x == y misses a NaN maximum (NaN != NaN): a NaN output's gradient goes to the first NaN.
            hit = jnp.where(y_is_nan, jnp.isnan(tap), tap == y) & ~taken
            taken = taken | hit
            # Back to the input positions of tap (i, j): interior padding spreads the outputs by the stride.
            dx = dx + lax.pad(jnp.where(hit, g, zero), zero,
                              ((0, 0, 0), (i, height - i - sh * (out_h - 1) - 1, sh - 1),
                               (j, width - j - sw * (out_w - 1) - 1, sw - 1), (0, 0, 0)))
    return (dx,)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
