"""Tests of nanlab.step with a tiny flax model (the step is model-agnostic)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanlab import numerics
from nanlab import step as step_lib


class TinyNet(nn.Module):
    """Conv -> BatchNorm -> relu -> mean pool -> Dense, sowing max |a| like InceptionV3 does."""

    use_batchnorm: bool = True

    @nn.compact
    def __call__(self, x, *, train):
        h = nn.Conv(4, (3, 3), use_bias=False, name="Conv")(x)
        if self.use_batchnorm:
            h = nn.BatchNorm(use_running_average=not train, name="BN")(h)
        h = nn.relu(h)
        self.sow("stats", "Block", {"max_abs": jnp.max(jnp.abs(h)), "nonfinite": jnp.sum(~jnp.isfinite(h))})
        h = jnp.mean(h, axis=(1, 2))
        return nn.Dense(1, name="Logits")(h)


def _bce(logits, labels):
    return optax.sigmoid_binary_cross_entropy(logits, labels)


def _batch(seed=0, n=8, scale=1.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32) * scale
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.float32)[:, None]
    return jnp.asarray(x), jnp.asarray(y)


def _setup(tx=None, model=None, **kwargs):
    model = model or TinyNet()
    tx = tx or optax.adam(1e-2)
    x, _ = _batch()
    state = step_lib.create_train_state(model, tx, x, seed=0)
    return model, tx, state, step_lib.make_train_step(model, _bce, tx, **kwargs)


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_finite_step_updates_state_and_reports_norms():
    _, _, state, train_step = _setup(schedule=optax.constant_schedule(1e-2))
    params_before = jax.tree.map(np.asarray, state.params)
    new_state, stats = jax.jit(train_step)(state, _batch())
    assert int(new_state.step) == 1
    assert bool(stats.finite) and bool(stats.loss_finite) and bool(stats.grads_finite)
    assert not _leaves_equal(params_before, new_state.params)
    module_norms = {k: float(v) for k, v in stats.module_grad_norms.items()}
    assert set(module_norms) == {"Conv", "BN", "Logits"}
    np.testing.assert_allclose(float(stats.grad_norm), np.sqrt(sum(v**2 for v in module_norms.values())), rtol=1e-5)
    np.testing.assert_allclose(float(stats.lr), 1e-2, rtol=1e-6)
    assert stats.activation_max_abs == {}


def test_update_telemetry_measures_the_applied_update():
    _, _, state, train_step = _setup()
    before = jax.tree.map(np.asarray, state.params)
    new_state, _ = jax.jit(train_step)(state, _batch())
    after = jax.tree.map(np.asarray, new_state.params)
    telemetry = jax.jit(step_lib.update_telemetry)(before, new_state.params)
    param_norm = np.sqrt(sum(np.sum(np.square(p.astype(np.float64))) for p in jax.tree.leaves(before)))
    update_norm = np.sqrt(sum(np.sum(np.square(a.astype(np.float64) - b)) for a, b in
                              zip(jax.tree.leaves(after), jax.tree.leaves(before))))
    np.testing.assert_allclose(float(telemetry["param_norm"]), param_norm, rtol=1e-5)
    np.testing.assert_allclose(float(telemetry["update_norm"]), update_norm, rtol=1e-5)
    np.testing.assert_allclose(float(telemetry["update_ratio"]), update_norm / param_norm, rtol=1e-5)
    assert update_norm > 0 and bool(telemetry["updates_finite"])


def test_sum_of_squares_is_exact_over_small_and_large_leaves():
    # Small leaves are reduced as one concatenation, large ones one by one: the total must not care.
    rng = np.random.default_rng(0)
    tree = {"a": {"bias": rng.normal(size=7), "kernel": rng.normal(size=(64, 80))},
            "b": {"scale": rng.normal(size=(3, 5)), "big": rng.normal(size=5000)}}
    tree = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
    sums = jax.jit(numerics.tree_sq_norms)(tree)
    for name, sub in tree.items():
        expected = sum(np.sum(np.square(np.asarray(leaf, np.float64))) for leaf in jax.tree.leaves(sub))
        np.testing.assert_allclose(float(sums[name]), expected, rtol=1e-5)


def test_nonfinite_step_returns_the_input_state_unchanged():
    _, _, state, train_step = _setup()
    state, _ = jax.jit(train_step)(state, _batch(1))
    before = jax.tree.map(np.asarray, state)
    x, y = _batch(2)
    bad_x = x.at[0, 0, 0, 0].set(jnp.nan)
    after, stats = jax.jit(train_step, donate_argnums=0)(state, (bad_x, y))
    assert not bool(stats.finite)
    assert not bool(stats.loss_finite) and not bool(stats.grads_finite)
    assert not bool(stats.skipped)
    assert _leaves_equal(before, after)


def test_apply_update_false_freezes_a_finite_step():
    _, _, state, train_step = _setup()
    before = jax.tree.map(np.asarray, state)
    after, stats = jax.jit(train_step, donate_argnums=0)(state, _batch(), jnp.bool_(False))
    assert bool(stats.finite)
    assert _leaves_equal(before, after)


def test_inf_update_from_finite_gradients_is_caught_by_telemetry_and_the_next_step():
    # A transformation that turns finite gradients into an infinite update. The step does not
    # pay a pass over the updates: update_telemetry flags them, and the next step's sentinel
    # meets the non-finite weights, which trace reports as bad inputs and diagnose as a too-high
    # learning rate.
    from nanlab import diagnose, trace

    blow_up = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (jax.tree.map(lambda u: u * jnp.inf, updates), state),
    )
    _, _, state, train_step = _setup(tx=blow_up)
    before = jax.tree.map(jnp.copy, state.params)
    state, stats = jax.jit(train_step)(state, _batch())
    assert bool(stats.finite)
    assert not bool(jax.jit(step_lib.update_telemetry)(before, state.params)["updates_finite"])
    batch = _batch(1)
    _, stats = jax.jit(train_step)(state, batch)
    assert not bool(stats.finite) and not bool(stats.loss_finite)
    report = trace.localize(train_step, state, batch)
    assert any("params" in path for path in report.bad_inputs)
    # Step 1: the update of step 0 came before and wrote the weights (at step 0 it would be the
    # initial state's fault: nonfinite-state).
    assert diagnose.diagnose(report, batch=batch, step=1).cause == "learning-rate-too-high"


def test_huge_but_finite_updates_are_finite():
    # The norm overflows float32 (1e30 squared), but no value is non-finite: the flag must say so.
    params = {"w": jnp.zeros((4, 4)), "b": jnp.zeros(3)}
    after = jax.tree.map(lambda p: jnp.full_like(p, 1e30), params)
    telemetry = jax.jit(step_lib.update_telemetry)(params, after)
    assert bool(telemetry["updates_finite"])
    assert float(telemetry["update_ratio"]) == 0.0  # all-zero weights before: ratio defined as 0


def test_skip_nonfinite_counts_and_keeps_params_and_batch_stats():
    from nanlab import numerics, optim

    tx = optim.skip_nonfinite(optax.adam(1e-2))
    _, _, state, train_step = _setup(tx=tx, skip_nonfinite=True)
    jitted = jax.jit(train_step)
    state, stats = jitted(state, _batch(1))
    assert int(stats.total_skipped) == 0 and not bool(stats.skipped)
    before = jax.tree.map(np.asarray, (state.params, state.batch_stats))
    x, y = _batch(2)
    state, stats = jitted(state, (x.at[0, 0, 0, 0].set(jnp.nan), y))
    assert bool(stats.skipped) and int(stats.total_skipped) == 1
    assert int(state.step) == 2
    assert _leaves_equal(before, (state.params, state.batch_stats))
    state, stats = jitted(state, _batch(3))
    assert bool(stats.finite) and int(stats.total_skipped) == 1
    assert optim.tree_all_finite(state.params)


def test_collect_stats_reports_activation_max_abs():
    model, _, state, train_step = _setup(collect_stats=True)
    _, stats = jax.jit(train_step)(state, _batch())
    assert set(stats.activation_max_abs) == {"Block"}
    assert float(stats.activation_max_abs["Block"]) > 0


def test_dropout_rng_is_folded_with_the_step():
    class DropNet(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            h = nn.Dropout(0.5, deterministic=not train)(x.reshape(x.shape[0], -1))
            return nn.Dense(1)(h)

    _, _, state, train_step = _setup(model=DropNet(), tx=optax.sgd(0.0))
    jitted = jax.jit(train_step)
    state1, stats1 = jitted(state, _batch())
    _, stats2 = jitted(state1, _batch())
    _, stats1_again = jitted(state, _batch())
    assert float(stats1.loss) == float(stats1_again.loss)  # pure: same state, same batch, same result
    assert float(stats1.loss) != float(stats2.loss)  # sgd(0) leaves params; only the dropout mask changed


def test_eval_step_masks_padding():
    model, _, state, _ = _setup()
    eval_step = jax.jit(step_lib.make_eval_step(model, _bce))
    x, y = _batch(n=8)
    full = eval_step(state, (x[:5], y[:5]), jnp.ones(5))
    padded = eval_step(state, (x, y), jnp.array([1, 1, 1, 1, 1, 0, 0, 0]))
    assert float(padded["count"]) == 5
    np.testing.assert_allclose(float(padded["loss_sum"]), float(full["loss_sum"]), rtol=1e-5)
    np.testing.assert_allclose(float(padded["correct_sum"]), float(full["correct_sum"]), rtol=1e-6)


def test_model_without_batchnorm_has_empty_batch_stats():
    _, _, state, train_step = _setup(model=TinyNet(use_batchnorm=False))
    assert state.batch_stats == {}
    new_state, stats = jax.jit(train_step)(state, _batch())
    assert bool(stats.finite) and new_state.batch_stats == {}


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_norms_are_float32_for_low_precision_trees(dtype):
    tree = {"a": jnp.full((1000,), 300.0, dtype)}  # 300^2 * 1000 = 9e7 overflows float16 (max 65504)
    np.testing.assert_allclose(float(numerics.tree_norm(tree)), 300.0 * np.sqrt(1000), rtol=1e-2)


@pytest.mark.parametrize(
    "values, finite",
    [([1.0, -2.0], True), ([1.0, np.nan], False), ([np.inf, 1.0], False), ([-np.inf, 1.0], False),
     ([3e19, 3e19], True)],  # the last: the sum of squares overflows, the values do not
)
@pytest.mark.parametrize("size", [2, 5000])  # reduced in the small-leaf concatenation, and alone
def test_finite_flag_from_the_sum_of_squares(values, finite, size):
    a = np.ones(size, np.float32)
    a[:2] = values
    tree = {"a": jnp.asarray(a), "b": jnp.ones((3,), jnp.float32)}
    flag = jax.jit(lambda t: numerics.finite_from_sq_norm(numerics.tree_sq_norm(t, nan_if_nonfinite=True)))
    assert bool(flag(tree)) is finite
    # Under vmap (nanlab.compare's replicas): same answers per replica.
    stacked = jax.tree.map(lambda x: jnp.stack([x, jnp.zeros_like(x)]), tree)
    assert jax.vmap(flag)(stacked).tolist() == [finite, True]
    # The flagged sum is the plain sum of squares whenever the values are finite.
    if finite:
        np.testing.assert_allclose(float(numerics.tree_sq_norm(tree, nan_if_nonfinite=True)),
                                   float(numerics.tree_sq_norm(tree)), rtol=1e-6)


def test_recalibrated_takes_the_float32_mean_of_the_batch_moments():
    model = TinyNet()
    state = step_lib.create_train_state(model, optax.sgd(0.1), _batch()[0], seed=0)
    moments_fn = jax.jit(step_lib.make_batch_moments_fn(model, 0.99))
    xs = [_batch(seed)[0] * (1 + seed) for seed in range(3)]
    moments = jax.device_get([moments_fn(state, x) for x in xs])
    out = step_lib.recalibrated(state, moments_fn, xs)
    # The mean as float32 arithmetic does it, left to right and then one division (not a
    # multiplication by 1/3, which rounds differently): the jitted mean must keep those bits.
    expected = jax.tree.map(lambda *vs: (np.float32(vs[0]) + vs[1] + vs[2]) / np.float32(3), *moments)
    jax.tree.map(lambda o, e: np.testing.assert_array_equal(np.asarray(o), e), out.batch_stats, expected)
    assert jax.tree.leaves(out.batch_stats)  # a BatchNorm model: the comparison saw arrays
    assert step_lib.recalibrated(state, moments_fn, []) is state
