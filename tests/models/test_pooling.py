"""nanlab.models.pooling.max_pool: the same forward bits as flax's max_pool, and the same gradient
(XLA's select-and-gather) up to the order in which overlapping windows' shares are summed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanlab.models import pooling
from nanlab.models.inception_v3 import InceptionV3


def _reference(x, window=(3, 3), strides=(2, 2)):
    return nn.max_pool(x, window, strides=strides, padding="VALID")


def _value_and_grad(fn, x, g):
    y, vjp = jax.vjp(fn, x)
    return y, vjp(g)[0]


@pytest.mark.parametrize("shape, window, strides", [
    ((2, 7, 7, 3), (3, 3), (2, 2)),
    ((2, 8, 9, 4), (3, 3), (2, 2)),  # even sides: the last row/column belongs to no window
    ((1, 35, 35, 5), (3, 3), (2, 2)),
    ((2, 9, 9, 2), (2, 2), (2, 2)),  # windows that do not overlap
    ((2, 9, 11, 2), (3, 2), (1, 2)),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_value_and_gradient_equal_flax_max_pool(shape, window, strides, dtype):
    rng = np.random.default_rng(0)
    # After a ReLU: about half the inputs are exact zeros, so many windows have tied maxima.
    x = jnp.asarray(np.maximum(rng.normal(size=shape), 0), dtype)
    y_ref, dx_ref = _value_and_grad(lambda a: _reference(a, window, strides), x,
                                    jnp.asarray(rng.normal(size=_reference(x, window, strides).shape), dtype))
    g = jnp.asarray(rng.normal(size=y_ref.shape), dtype)
    y_ref, dx_ref = _value_and_grad(lambda a: _reference(a, window, strides), x, g)
    y, dx = _value_and_grad(lambda a: pooling.max_pool(a, window, strides), x, g)
    assert y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    # Which input gets each output's gradient is exact (the tie-break is JAX's); only sums of
    # shares from overlapping windows may round differently.
    np.testing.assert_array_equal(np.asarray(dx) != 0, np.asarray(dx_ref) != 0)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32), rtol=tol, atol=tol)


def test_ties_go_to_the_first_maximum_in_row_major_order():
    x = jnp.asarray([[1.0, 2, 2], [2, 0, 2], [2, 2, 2]]).reshape(1, 3, 3, 1)
    _, dx = _value_and_grad(lambda a: pooling.max_pool(a, (3, 3), (2, 2)), x, jnp.ones((1, 1, 1, 1)))
    expected = np.zeros((3, 3))
    expected[0, 1] = 1.0
    np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], expected)


def test_a_nan_window_passes_its_gradient_to_its_first_nan():
    x = jnp.zeros((1, 3, 3, 1)).at[0, 1, 2, 0].set(jnp.nan).at[0, 2, 0, 0].set(jnp.nan)
    y, dx = _value_and_grad(lambda a: pooling.max_pool(a, (3, 3), (2, 2)), x, jnp.full((1, 1, 1, 1), 5.0))
    assert np.isnan(np.asarray(y)).all()
    expected = np.zeros((3, 3))
    expected[1, 2] = 5.0
    np.testing.assert_array_equal(np.asarray(dx)[0, :, :, 0], expected)


@pytest.mark.slow  # two InceptionV3 gradient compiles (~65 s on 2 cores); the unit tests above run by default
def test_inception_v3_gradients_equal_with_flax_max_pool(monkeypatch):
    """The model's max pools run through `pooling.max_pool` (conv_impl other than "xla"): its
    training gradients equal those of the same model with flax's max_pool in their place."""
    x = jax.random.normal(jax.random.key(1), (4, 75, 75, 3))
    model = InceptionV3(num_classes=1, width_multiplier=0.125, conv_impl="fast")
    variables = model.init(jax.random.key(0), x, train=False)

    def grads():
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jax.nn.softplus(logits))
        return jax.jit(jax.grad(loss))(variables["params"])

    ours = grads()
    with monkeypatch.context() as patch:
        patch.setattr(pooling, "max_pool", lambda a, window, strides: _reference(a, window, strides))
        theirs = grads()
    # The pools' own gradients differ only in float32 rounding (the unit tests above); through the
    # BatchNorm and the ~90 layers below a pool that rounding reaches ~1e-4 of a leaf's scale.
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        scale = float(jnp.max(jnp.abs(b))) or 1.0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * scale)
    # and the patch did take effect: the two programs are not the same computation
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)))
