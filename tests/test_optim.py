"""Tests of nanlab.optim: clip specs, schedules, optimizers, the skip-nonfinite guard, telemetry."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanlab import numerics, optim
from nanlab.config import OPTIMIZERS


def _params():
    return {"w": jnp.asarray(np.arange(12, dtype=np.float32).reshape(3, 4) / 10 - 0.5), "b": jnp.ones(4)}


def _grads(scale=1.0):
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(scale * rng.standard_normal((3, 4)).astype(np.float32)),
        "b": jnp.asarray(scale * rng.standard_normal(4).astype(np.float32)),
    }


def _with_nan(grads):
    return {**grads, "b": grads["b"].at[1].set(jnp.nan)}


def _assert_tree_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _all_finite(tree):
    return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------------------------
# parse_clip_spec
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("none", ()),
        (" none ", ()),
        ("global_norm:1.0", (("global_norm", 1.0),)),
        ("value:0.5", (("value", 0.5),)),
        ("agc:0.01", (("agc", 0.01),)),
        ("agc:0.01,global_norm:5", (("agc", 0.01), ("global_norm", 5.0))),
        ("value:1e-3 , global_norm: 2", (("value", 1e-3), ("global_norm", 2.0))),
    ],
)
def test_parse_clip_spec_valid(spec, expected):
    assert optim.parse_clip_spec(spec) == expected


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", "empty part"),
        ("global_norm:1,", "empty part"),
        ("none,value:1", "'none' cannot be combined"),
        ("norm:1", "unknown clip 'norm'"),
        ("global_norm", "missing value"),
        ("global_norm:", "missing value"),
        ("value:abc", "'abc' is not a number"),
        ("value:0", "finite number > 0"),
        ("agc:-0.1", "finite number > 0"),
        ("global_norm:inf", "finite number > 0"),
        ("global_norm:nan", "finite number > 0"),
    ],
)
def test_parse_clip_spec_errors_name_the_part(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        optim.parse_clip_spec(spec)
    assert "\n" not in str(info.value)


_CLIP_PARTS = st.tuples(
    st.sampled_from(optim.CLIP_NAMES),
    st.floats(min_value=1e-30, max_value=1e30, allow_nan=False, allow_infinity=False),
)


@given(parts=st.lists(_CLIP_PARTS, min_size=1, max_size=4), spaces=st.booleans())
def test_parse_clip_spec_round_trips(parts, spaces):
    joiner = " , " if spaces else ","
    spec = joiner.join(f"{name}:{value!r}" for name, value in parts)
    assert optim.parse_clip_spec(spec) == tuple(parts)


def test_parse_clip_spec_rejects_non_string():
    with pytest.raises(TypeError, match="clip spec must be a string"):
        optim.parse_clip_spec(1.0)


# ---------------------------------------------------------------------------------------------
# make_clip_chain: each part does what optax does
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, reference",
    [
        ("global_norm:0.5", optax.clip_by_global_norm(0.5)),
        ("value:0.3", optax.clip(0.3)),
        ("agc:0.05", optax.adaptive_grad_clip(0.05)),
        ("agc:0.05,global_norm:0.5", optax.chain(optax.adaptive_grad_clip(0.05), optax.clip_by_global_norm(0.5))),
        ("none", optax.identity()),
    ],
)
def test_clip_chain_matches_optax(spec, reference):
    params, grads = _params(), _grads(scale=3.0)
    chain = optim.make_clip_chain(spec)
    ours, _ = chain.update(grads, chain.init(params), params)
    theirs, _ = reference.update(grads, reference.init(params), params)
    _assert_tree_equal(ours, theirs)
    if spec != "none":  # the test grads are large enough that every clip acts
        assert bool(optim.clip_activity(grads, ours))


def test_clip_chain_accepts_parsed_spec():
    params, grads = _params(), _grads(scale=3.0)
    chain = optim.make_clip_chain((("value", 0.3),))
    ours, _ = chain.update(grads, chain.init(params), params)
    assert float(jnp.max(jnp.abs(ours["w"]))) == pytest.approx(0.3)


def test_clip_chain_changes_nothing_below_thresholds():
    params, grads = _params(), _grads(scale=1e-3)
    chain = optim.make_clip_chain("global_norm:10,value:10")
    ours, _ = chain.update(grads, chain.init(params), params)
    _assert_tree_equal(ours, grads)
    assert not bool(optim.clip_activity(grads, ours))


# ---------------------------------------------------------------------------------------------
# make_schedule, make_optimizer
# ---------------------------------------------------------------------------------------------


def test_schedules():
    constant = optim.make_schedule("constant", 0.1, 100)
    assert float(constant(0)) == pytest.approx(0.1) and float(constant(99)) == pytest.approx(0.1)
    cosine = optim.make_schedule("cosine", 0.1, 100)
    assert float(cosine(0)) == pytest.approx(0.1)
    assert float(cosine(50)) == pytest.approx(0.05, rel=1e-5)
    assert float(cosine(100)) == pytest.approx(0.0, abs=1e-9)
    warm = optim.make_schedule("warmup-cosine", 0.1, 100, warmup_steps=10)
    assert float(warm(0)) == 0.0
    assert float(warm(5)) == pytest.approx(0.05, rel=1e-5)
    assert float(warm(10)) == pytest.approx(0.1, rel=1e-5)
    assert float(warm(100)) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (("linear", 0.1, 10), ValueError, "unknown schedule 'linear'"),
        (("constant", 0.0, 10), ValueError, "lr must be a finite number > 0, got 0.0"),
        (("constant", -1.0, 10), ValueError, "lr must be"),
        (("constant", float("nan"), 10), ValueError, "lr must be"),
        (("constant", "0.1", 10), TypeError, "lr must be a number"),
        (("cosine", 0.1, 0), ValueError, "total_steps must be >= 1, got 0"),
        (("warmup-cosine", 0.1, 10, 10), ValueError, "warmup_steps must be < total_steps"),
        (("warmup-cosine", 0.1, 10, -1), ValueError, "warmup_steps must be >= 0"),
    ],
)
def test_schedule_errors(args, error, message):
    with pytest.raises(error, match=message):
        optim.make_schedule(*args)


@pytest.mark.parametrize(
    "name, reference",
    [
        ("adam", optax.adam(0.1)),
        ("adamw", optax.adamw(0.1, weight_decay=0.0)),
        ("sgd", optax.sgd(0.1)),
        ("momentum", optax.sgd(0.1, momentum=0.9)),
        ("rmsprop", optax.rmsprop(0.1)),
    ],
)
def test_optimizers_match_optax(name, reference):
    params, grads = _params(), _grads()
    tx = optim.make_optimizer(name, 0.1)
    state, ref_state = tx.init(params), reference.init(params)
    for _ in range(3):  # several steps so momentum/second moments matter
        ours, state = tx.update(grads, state, params)
        theirs, ref_state = reference.update(grads, ref_state, params)
        _assert_tree_equal(ours, theirs)


def test_weight_decay():
    params, grads = _params(), _grads()
    adamw = optim.make_optimizer("adamw", 0.1, weight_decay=0.01)
    ref = optax.adamw(0.1, weight_decay=0.01)
    _assert_tree_equal(adamw.update(grads, adamw.init(params), params)[0], ref.update(grads, ref.init(params), params)[0])
    # Coupled L2 for the others: sgd sees grads + wd * params.
    sgd = optim.make_optimizer("sgd", 0.1, weight_decay=0.01)
    ours = sgd.update(grads, sgd.init(params), params)[0]
    expected = jax.tree.map(lambda g, p: -0.1 * (g + 0.01 * p), grads, params)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize(
    "args, error, message",
    [
        (("lion", 0.1), ValueError, "unknown optimizer 'lion'"),
        (("adam", 0.1, -0.1), ValueError, "weight_decay must be a finite number >= 0, got -0.1"),
        (("adam", 0.1, "0"), TypeError, "weight_decay must be a number"),
    ],
)
def test_optimizer_errors(args, error, message):
    with pytest.raises(error, match=message):
        optim.make_optimizer(*args)


def test_make_tx_is_clip_then_optimizer():
    params, grads = _params(), _grads(scale=3.0)
    tx = optim.make_tx("global_norm:0.5", "sgd", 0.1, 0.0, False)
    ours, _ = tx.update(grads, tx.init(params), params, loss=jnp.float32(1.0))  # loss accepted and ignored
    clipped, _ = optax.clip_by_global_norm(0.5).update(grads, optax.EmptyState())
    expected = jax.tree.map(lambda g: -0.1 * g, clipped)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    guarded = optim.make_tx("global_norm:0.5", "sgd", 0.1, 0.0, True)
    assert isinstance(guarded.init(params), optim.SkipNonfiniteState)


# ---------------------------------------------------------------------------------------------
# skip_nonfinite
# ---------------------------------------------------------------------------------------------


def _adam_moments(inner_state):
    """mu and nu of the (single) ScaleByAdamState inside a state tree."""
    found = [s for s in jax.tree.leaves(inner_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1
    return found[0].mu, found[0].nu


def test_apply_if_finite_gap_exists():
    """The gap we close: optax.apply_if_finite gives up and lets NaN into Adam's moments."""
    params = _params()
    tx = optax.apply_if_finite(optax.adam(0.1), max_consecutive_errors=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        _, state = update(_with_nan(_grads()), state, params)
    assert not _all_finite(_adam_moments(state.inner_state))


def test_skip_nonfinite_counts_and_never_poisons_adam():
    params = _params()
    tx = optim.skip_nonfinite(optax.adam(0.1))
    state = tx.init(params)
    update = jax.jit(tx.update)
    # A good step first, so the moments hold real values to protect.
    updates, state = update(_grads(), state, params)
    assert _all_finite(updates) and not bool(state.last_skipped)
    good_moments = _adam_moments(state.inner_state)
    good_inner = state.inner_state
    for i in range(1, 21):  # far past any max_consecutive_errors
        updates, state = update(_with_nan(_grads()), state, params)
        assert int(state.consecutive_skips) == i and int(state.total_skips) == i
        assert bool(state.last_skipped)
        _assert_tree_equal(updates, jax.tree.map(jnp.zeros_like, params))
    _assert_tree_equal(state.inner_state, good_inner)
    _assert_tree_equal(_adam_moments(state.inner_state), good_moments)
    # Recovery: a finite step resets the consecutive count, keeps the total.
    updates, state = update(_grads(), state, params)
    assert _all_finite(updates) and float(jnp.abs(updates["w"]).sum()) > 0
    assert int(state.consecutive_skips) == 0 and int(state.total_skips) == 20
    assert not bool(state.last_skipped)
    assert _all_finite(state.inner_state)


def test_skip_nonfinite_matches_inner_on_finite_steps():
    params, grads = _params(), _grads()
    tx, reference = optim.skip_nonfinite(optax.adam(0.1)), optax.adam(0.1)
    state, ref_state = tx.init(params), reference.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(reference.update)
    for _ in range(3):
        ours, state = update(grads, state, params, loss=jnp.float32(0.3))
        theirs, ref_state = ref_update(grads, ref_state, params)
        _assert_tree_equal(ours, theirs)
    _assert_tree_equal(state.inner_state, ref_state)


@pytest.mark.parametrize("bad_loss", [jnp.nan, jnp.inf, -jnp.inf])
def test_skip_nonfinite_catches_bad_loss_with_finite_grads(bad_loss):
    params = _params()
    tx = optim.skip_nonfinite(optax.adam(0.1))
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(_grads(), state, params, loss=jnp.float32(bad_loss))
    assert bool(new_state.last_skipped) and int(new_state.total_skips) == 1
    _assert_tree_equal(updates, jax.tree.map(jnp.zeros_like, params))
    _assert_tree_equal(new_state.inner_state, state.inner_state)


def _overflowing_scale():
    """A stateful inner transform whose updates overflow for finite gradients (scale 1e38 in f32)."""

    def init(params):
        return {"count": jnp.zeros([], jnp.int32)}

    def update(updates, state, params=None):
        return jax.tree.map(lambda g: g * jnp.float32(1e38) * jnp.float32(1e38), updates), {"count": state["count"] + 1}

    return optax.GradientTransformation(init, update)


def test_skip_nonfinite_catches_nonfinite_inner_updates():
    params, grads = _params(), _grads()
    # apply_if_finite looks only at incoming grads: it lets the overflow through.
    loose = optax.apply_if_finite(_overflowing_scale(), max_consecutive_errors=5)
    loose_updates, _ = jax.jit(loose.update)(grads, loose.init(params), params)
    assert not _all_finite(loose_updates)
    tx = optim.skip_nonfinite(_overflowing_scale())
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    assert bool(new_state.last_skipped) and int(new_state.total_skips) == 1
    _assert_tree_equal(updates, jax.tree.map(jnp.zeros_like, params))
    assert int(new_state.inner_state["count"]) == 0  # inner state untouched


def test_skip_nonfinite_forwards_other_extra_args():
    seen = {}

    def update(updates, state, params=None, **extra):
        seen.update(extra)
        return updates, state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    tx = optim.skip_nonfinite(inner)
    params = _params()
    tx.update(_grads(), tx.init(params), params, loss=jnp.float32(1.0), value=jnp.float32(2.0))
    assert set(seen) == {"value"}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_guarded_tx_jits_for_every_optimizer(name):
    params = _params()
    tx = optim.make_tx("agc:0.01,global_norm:1", name, optim.make_schedule("warmup-cosine", 0.1, 10, 2), 1e-4, True)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for grads in (_grads(), _with_nan(_grads()), _grads()):
        updates, state = update(grads, state, params, loss=jnp.float32(1.0))
        params = optax.apply_updates(params, updates)
    assert int(state.total_skips) == 1 and _all_finite(params) and _all_finite(state)


# ---------------------------------------------------------------------------------------------
# global_norm_f32, clip_activity
# ---------------------------------------------------------------------------------------------


def test_global_norm_f32_matches_optax_in_float32():
    grads = _grads()
    np.testing.assert_allclose(numerics.global_norm_f32(grads), optax.tree.norm(grads), rtol=1e-6)
    assert numerics.global_norm_f32(grads).dtype == jnp.float32
    assert float(numerics.global_norm_f32({})) == 0.0
    assert float(numerics.global_norm_f32({"z": jnp.zeros(3)})) == 0.0


def test_global_norm_f32_survives_float16_and_huge_values():
    grads16 = {"a": jnp.full((4,), 300.0, jnp.float16)}
    assert not math.isfinite(float(optax.tree.norm(grads16)))  # optax's gap: 300**2 overflows f16
    assert float(numerics.global_norm_f32(grads16)) == pytest.approx(600.0)
    grads_bf16 = {"a": jnp.full((4,), 3.0, jnp.bfloat16)}
    assert float(numerics.global_norm_f32(grads_bf16)) == pytest.approx(6.0)
    huge = {"a": jnp.full((4,), 1e20, jnp.float32), "b": jnp.zeros(2)}
    assert float(numerics.global_norm_f32(huge)) == pytest.approx(2e20, rel=1e-6)  # 1e40 would overflow f32


def test_global_norm_f32_propagates_nonfinite():
    assert math.isnan(float(numerics.global_norm_f32(_with_nan(_grads()))))
    assert float(numerics.global_norm_f32({"a": jnp.array([1.0, jnp.inf])})) == math.inf
    assert float(jax.jit(numerics.global_norm_f32)({"a": jnp.array([3.0, 4.0])})) == pytest.approx(5.0)


def test_clip_activity_nan_positions_count_as_unchanged():
    grads = _with_nan(_grads())
    assert not bool(jax.jit(optim.clip_activity)(grads, grads))
    changed = {**grads, "w": grads["w"].at[0, 0].set(0.0)}
    assert bool(jax.jit(optim.clip_activity)(grads, changed))
