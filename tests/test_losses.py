"""Tests of nanlab.losses: values at the edges, options, bad input, dtypes, accuracy, the battery."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nanlab import _float_pairs as pairs
from nanlab import check, losses, testing

INF = math.inf
FLT_MAX = testing.FLT_MAX
bce = losses.sigmoid_binary_cross_entropy


def f32(*values):
    return np.array(values, np.float32)


def grad_wrt_logits(fn, logits, labels, **options):
    return jax.grad(lambda x: jnp.sum(fn(x, labels, **options)))(logits)


# ----------------------------------------------------------------------------- BCE edge values


@pytest.mark.parametrize(
    "logit, label, expected",
    [
        (INF, 1.0, 0.0),  # optax: NaN
        (-INF, 0.0, 0.0),  # optax: NaN
        (INF, 0.0, INF),
        (-INF, 1.0, INF),
        (INF, 0.5, INF),
        (0.0, 1.0, math.log(2)),
        (-0.0, 0.0, math.log(2)),
        (FLT_MAX, 0.0, FLT_MAX),
        (-FLT_MAX, 1.0, FLT_MAX),
        (FLT_MAX, 1.0, 0.0),
        (100.0, 1.0, 0.0),  # exp(-100) is subnormal: flushed to 0 by XLA, and excepted anyway
    ],
)
def test_bce_limits_and_extremes(logit, label, expected):
    value = float(bce(f32(logit), f32(label))[0])
    assert value == pytest.approx(expected, rel=2**-22, abs=1e-38)


@pytest.mark.parametrize("logit", [INF, -INF, FLT_MAX, -FLT_MAX, 0.0, 1e-45, 88.8, -88.8, 17.0, -104.0])
@pytest.mark.parametrize("label", [0.0, 1.0, 0.3])
def test_bce_gradient_is_sigmoid_minus_label_and_finite(logit, label):
    grad = float(grad_wrt_logits(bce, f32(logit), f32(label))[0])
    expected = float(testing.bce_gradient_reference(logit, label))
    assert math.isfinite(grad)
    assert grad == pytest.approx(expected, rel=2**-21, abs=1e-37)


def test_bce_is_nan_only_for_nan_input():
    values = bce(f32(math.nan, 0.0, INF, -INF), f32(0.5, math.nan, 1.0, 0.0))
    assert np.isnan(values[:2]).all() and np.array_equal(values[2:], f32(0.0, 0.0))


def test_bce_hard_label_loss_keeps_relative_accuracy_where_sigmoid_saturates():
    # log1p(exp(-30)) = 9.357622968840175e-14: the naive form gives 0 (or NaN) here
    assert float(bce(f32(30.0), f32(1.0))[0]) == pytest.approx(9.357622968840175e-14, rel=2**-22)
    assert float(grad_wrt_logits(bce, f32(30.0), f32(1.0))[0]) == pytest.approx(-9.357622968840175e-14, rel=2**-22)


def test_bce_tiny_soft_label_at_underflowing_exp_is_accurate():
    # z * |x| and exp(-|x|) are both ~1e-36 here; XLA flushes subnormal intermediates
    exact = testing.bce_reference(-87.3365478515625, testing.FLT_MIN)
    value = float(bce(f32(-87.3365478515625), f32(testing.FLT_MIN))[0])
    assert testing.ulp_error(value, exact) <= 2


_bce_jit = jax.jit(bce)
_bce_grad_jit = jax.jit(jax.grad(lambda x, z: jnp.sum(bce(x, z))))


@given(testing.logits(), testing.soft_labels())
@example(1e9, 1.0)
@example(-1e9, 0.0)
@example(1e9, 0.0)
@example(INF, 1.0)
@example(-INF, 0.0)
@example(0.0, 0.5)
@example(-0.0, 1.0)
@example(88.72284, 0.0)
@example(-88.72284, 1.0)
@example(-103.97208, 0.3)
@example(17.0, 1.0)
def test_bce_matches_the_reference_with_pinned_edges(logit, label):
    logit, label = float(np.float32(logit)), float(np.float32(label))  # the values the loss sees
    exact, exact_grad = testing.bce_reference(logit, label), testing.bce_gradient_reference(logit, label)
    value = float(_bce_jit(f32(logit), f32(label))[0])
    grad = float(_bce_grad_jit(f32(logit), f32(label))[0])
    hard = label in (0.0, 1.0)
    if math.isinf(exact):
        assert value == exact
    elif testing.representable(exact):
        assert testing.ulp_error(value, exact) <= (2 if hard else 3)
    assert math.isfinite(grad)
    scale = None if hard else testing.bce_gradient_scale(logit, label)
    if testing.representable(exact_grad) and exact_grad != 0 and (scale is None or testing.representable(scale)):
        assert testing.ulp_error(grad, exact_grad, scale) <= 2


# ----------------------------------------------------------------------------- BCE options


def test_bce_label_smoothing_moves_labels_toward_one_half():
    x, z = f32(-3.0, 0.5, 4.0), f32(0.0, 1.0, 1.0)
    smoothed = bce(x, z, label_smoothing=0.2)
    np.testing.assert_array_equal(smoothed, bce(x, z * 0.8 + 0.1))


_bce_pos_weight = jax.jit(lambda x, z, pw: bce(x, z, pos_weight=pw))
_bce_pos_weight_grad = jax.jit(jax.grad(lambda x, z, pw: jnp.sum(bce(x, z, pos_weight=pw))))


@given(st.floats(-100, 100, width=32), testing.soft_labels(), st.sampled_from([0.5, 2.0, 7.0]))
@example(INF, 1.0, 3.0)
@example(-INF, 0.0, 3.0)
@example(FLT_MAX, 0.0, 3.0)
@example(88.77876, 1.0, 7.0)  # exp(-x) is subnormal (flushed) but 7 * exp(-x) is a normal float32
@example(-88.77876, 0.0, 7.0)
def test_bce_pos_weight_matches_tensorflow_definition(logit, label, pos_weight):
    logit, label = float(np.float32(logit)), float(np.float32(label))  # the values the loss sees
    exact = testing.bce_reference(logit, label, pos_weight)
    value = float(_bce_pos_weight(f32(logit), f32(label), np.float32(pos_weight))[0])
    grad = float(_bce_pos_weight_grad(f32(logit), f32(label), np.float32(pos_weight))[0])
    exact_grad = testing.bce_gradient_reference(logit, label, pos_weight)
    hard = label in (0.0, 1.0)
    if math.isinf(exact):
        assert value == exact
    elif testing.representable(exact) and exact != 0:
        assert testing.ulp_error(value, exact) <= (2 if hard else 3)
    assert math.isfinite(grad)
    # soft labels: ULP of the terms' size max(pos_weight z, sigmoid(x)), as max(z, sigmoid(x)) without
    scale = None if hard else max(testing.mpmath.mpf(pos_weight) * label, testing._sigmoid(testing._mp(logit)))
    if testing.representable(exact_grad) and exact_grad != 0 and (scale is None or testing.representable(scale)):
        assert testing.ulp_error(grad, exact_grad, scale) <= 2


def test_bce_pos_weight_per_class_broadcasts():
    x, z = np.zeros((2, 3), np.float32), np.ones((2, 3), np.float32)
    loss = bce(x, z, pos_weight=f32(1.0, 2.0, 3.0))
    np.testing.assert_allclose(loss, np.log(2) * np.array([[1, 2, 3]] * 2), rtol=1e-6)


def test_bce_zero_weight_masks_an_infinite_loss():
    loss = bce(f32(INF, 1.0), f32(0.0, 1.0), weights=f32(0.0, 2.0))
    assert float(loss[0]) == 0.0 and float(loss[1]) == pytest.approx(2 * math.log1p(math.exp(-1)), rel=1e-6)
    grad = grad_wrt_logits(bce, f32(INF, 1.0), f32(0.0, 1.0), weights=f32(0.0, 2.0))
    assert np.isfinite(grad).all() and float(grad[0]) == 0.0


def test_bce_reductions():
    x, z = f32(-1.0, 0.0, 2.0), f32(1.0, 0.5, 0.0)
    per_element = bce(x, z)
    assert float(bce(x, z, reduction="sum")) == pytest.approx(float(jnp.sum(per_element)))
    assert float(bce(x, z, reduction="mean")) == pytest.approx(float(jnp.mean(per_element)))


def test_bce_agrees_with_optax_where_optax_is_finite():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 5, 256).astype(np.float32)
    z = rng.uniform(0, 1, 256).astype(np.float32)
    np.testing.assert_allclose(bce(x, z), optax.sigmoid_binary_cross_entropy(x, z), rtol=1e-5, atol=1e-7)


def test_bce_works_under_jit_vmap_and_second_derivative():
    x, z = f32(-2.0, 0.0, 3.0), f32(1.0, 0.5, 0.0)
    np.testing.assert_array_equal(jax.jit(bce)(x, z), jax.vmap(bce)(x, z))
    hessian_diag = jax.vmap(jax.grad(jax.grad(lambda a, b: bce(a, b))))(x, z)
    sig = jax.nn.sigmoid(x)
    np.testing.assert_allclose(hessian_diag, sig * (1 - sig), rtol=1e-5)


def test_bce_label_gradient_is_minus_logit_and_zero_tangent_stays_finite():
    x, z = f32(INF, 2.0), f32(1.0, 0.25)
    grad_z = jax.grad(lambda b: jnp.sum(bce(f32(2.0, 2.0), b)))(z)
    np.testing.assert_allclose(grad_z, f32(-2.0, -2.0))
    assert np.isfinite(grad_wrt_logits(bce, x, z)).all()


# ----------------------------------------------------------------------------- dtypes and bad input


@pytest.mark.parametrize("fn", [bce, losses.sigmoid_focal_loss], ids=["bce", "focal"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_inputs_are_computed_in_float32(dtype, fn):
    x = jnp.array([-30.0, -2.0, 0.5, 20.0], dtype)
    z = jnp.array([1.0, 0.0, 1.0, 1.0], dtype)
    loss = fn(x, z)
    assert loss.dtype == jnp.float32
    np.testing.assert_array_equal(loss, fn(x.astype(jnp.float32), z.astype(jnp.float32)))
    grad = grad_wrt_logits(fn, x, z)
    assert grad.dtype == dtype and bool(jnp.isfinite(grad).all())


def test_no_float64_inside_even_with_x64_enabled():
    with jax.enable_x64(True):
        x, z = jnp.zeros(3, jnp.float32), jnp.ones(3, jnp.float32)
        options = dict(label_smoothing=0.1, pos_weight=jnp.float32(2.0), weights=jnp.ones(3, jnp.float32))
        with_options = functools.partial(bce, **options)
        for fn in (bce, with_options, losses.sigmoid_focal_loss, losses.softmax_cross_entropy):
            text = str(jax.make_jaxpr(jax.value_and_grad(lambda a: jnp.sum(fn(a, z))))(x))
            assert "f64" not in text, fn


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: bce(np.array([1, 2]), f32(0, 1)), TypeError, ["logits", "int"]),
        (lambda: bce(np.array([True]), f32(1)), TypeError, ["logits", "bool"]),
        (lambda: bce(f32(1, 2), f32(1)), ValueError, ["labels", "(1,)", "(2,)"]),
        (lambda: bce(f32(1, 2), np.ones((2, 2), np.float32)), ValueError, ["labels", "(2, 2)"]),
        (lambda: bce(f32(1), f32(1.5), validate=True), ValueError, ["labels", "1.5"]),
        (lambda: bce(f32(1), f32(-0.5), validate=True), ValueError, ["labels", "-0.5"]),
        (lambda: bce(f32(1), f32(1), reduction="avg"), ValueError, ["reduction", "avg"]),
        (lambda: bce(f32(1), f32(1), label_smoothing=1.5), ValueError, ["label_smoothing", "1.5"]),
        (lambda: bce(f32(1, 2), f32(1, 1), weights=f32(1, 2, 3)), ValueError, ["weights", "(3,)"]),
        (lambda: bce(f32(1), f32(1), pos_weight=np.array([2])), TypeError, ["pos_weight", "int"]),
        (lambda: losses.sigmoid_focal_loss(f32(1), f32(1), gamma=-1.0), ValueError, ["gamma", "-1.0"]),
        (lambda: losses.sigmoid_focal_loss(np.array([1]), f32(1)), TypeError, ["logits"]),
        (lambda: losses.softmax_cross_entropy(f32(1, 2), f32(1)), ValueError, ["labels"]),
        (lambda: losses.softmax_cross_entropy_with_integer_labels(f32(1, 2)[None], f32(0)), TypeError, ["labels", "float32"]),
        (lambda: losses.softmax_cross_entropy_with_integer_labels(np.zeros((2, 3), np.float32), np.array([0, 3]), validate=True), ValueError, ["labels", "3"]),
        (lambda: losses.binary_cross_entropy_from_probabilities(np.array([1]), f32(1)), TypeError, ["probs"]),
    ],
)
def test_bad_input_raises_naming_argument_and_value(call, error, words):
    with pytest.raises(error) as raised:
        call()
    for word in words:
        assert word in str(raised.value)


def test_validate_inside_jit_raises_instead_of_checking_nothing():
    with pytest.raises(ValueError, match="validate=True"):
        jax.jit(lambda x, z: bce(x, z, validate=True))(f32(1.0), f32(0.5))


# ----------------------------------------------------------------------------- the battery on nanlab


def test_bce_passes_the_battery_with_soft_labels():
    testing.check_binary_loss(bce, label_kind="soft")


def test_bce_passes_the_battery_with_hard_labels_and_smoothing_zero():
    testing.check_binary_loss(functools.partial(bce, label_smoothing=0.0), label_kind="hard")


# ----------------------------------------------------------------------------- focal loss

focal_reference = functools.partial(testing.focal_reference, alpha=0.25, gamma=2.0)


def focal_value_and_gradient(logits, labels, **options):
    """The per-element focal loss and its derivative, from one trace (one compilation)."""
    values, pullback = jax.vjp(lambda x: losses.sigmoid_focal_loss(x, labels, **options), logits)
    return values, pullback(jnp.ones_like(values))[0]


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.0, 2.0, 3.5])
def test_focal_value_and_gradient_finite_for_every_gamma(gamma):
    x = f32(INF, -INF, FLT_MAX, -FLT_MAX, 0.0, 1e-45, 17.0, -17.0, 40.0, -40.0, 88.8, -104.0)
    for label in (0.0, 1.0, 0.3):
        z = np.full_like(x, label)
        value, grad = focal_value_and_gradient(x, z, alpha=0.25, gamma=gamma)
        assert not np.isnan(value).any() and bool(jnp.isfinite(grad).all()), (gamma, label)
        for logit, v in zip(x, value):
            exact = testing.focal_reference(float(logit), label, 0.25, gamma)
            assert (float(v) == float(exact)) if math.isinf(exact) else math.isfinite(v)


def test_focal_with_bfloat16_inputs_under_jit_vmap_and_grad():
    x = jnp.array([-30.0, -2.0, 0.5, 20.0], jnp.bfloat16)
    z = jnp.array([1.0, 0.0, 0.25, 1.0], jnp.bfloat16)
    loss = losses.sigmoid_focal_loss(x, z)
    np.testing.assert_allclose(jax.jit(losses.sigmoid_focal_loss)(x, z), loss, rtol=2**-22)
    np.testing.assert_allclose(jax.vmap(losses.sigmoid_focal_loss)(x[:, None], z[:, None])[:, 0], loss, rtol=2**-22)
    grad = jax.jit(jax.grad(lambda a: jnp.sum(losses.sigmoid_focal_loss(a, z))))(x)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_array_equal(grad, grad_wrt_logits(losses.sigmoid_focal_loss, x, z))


def test_focal_with_float64_inputs_is_computed_in_float64():
    with jax.enable_x64(True):
        x = np.array([-3.0, 0.5, 20.0, -1e30], np.float64)
        z = np.array([1.0, 0.0, 0.3, 1e-22], np.float64)
        value, grad = focal_value_and_gradient(x, z, alpha=0.25, gamma=2.0)
        assert value.dtype == grad.dtype == jnp.float64
        for logit, label, v, g in zip(x, z, value.tolist(), grad.tolist()):
            assert v == pytest.approx(float(focal_reference(logit, label)), rel=1e-12)
            assert g == pytest.approx(float(testing.focal_gradient_reference(logit, label)), rel=1e-12)


def test_naive_focal_gradient_is_infinite_for_small_gamma_where_nanlab_is_not():
    x, z = f32(20.0), f32(1.0)
    naive = grad_wrt_logits(losses.naive_sigmoid_focal_loss, x, z, gamma=0.5)
    stable = grad_wrt_logits(losses.sigmoid_focal_loss, x, z, gamma=0.5)
    assert not np.isfinite(naive).all() and np.isfinite(stable).all()


def test_focal_with_gamma_zero_is_alpha_weighted_bce():
    x, z = f32(-3.0, 0.0, 5.0, 30.0), f32(1.0, 0.0, 0.0, 1.0)
    alpha_t = np.where(z == 1, 0.25, 0.75)
    np.testing.assert_allclose(losses.sigmoid_focal_loss(x, z, gamma=0.0), alpha_t * bce(x, z), rtol=1e-6)
    np.testing.assert_allclose(losses.sigmoid_focal_loss(x, z, alpha=None, gamma=0.0), bce(x, z), rtol=1e-6)


def test_focal_agrees_with_optax_on_ordinary_inputs():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 4, 256).astype(np.float32)
    z = rng.choice([0.0, 1.0], 256).astype(np.float32)
    np.testing.assert_allclose(
        losses.sigmoid_focal_loss(x, z, alpha=0.25, gamma=2.0),
        optax.sigmoid_focal_loss(x, z, alpha=0.25, gamma=2.0),
        rtol=2e-5,
        atol=1e-30,
    )


FOCAL_BATTERY = dict(
    reference=focal_reference,
    gradient_reference=functools.partial(testing.focal_gradient_reference, alpha=0.25, gamma=2.0),
    gradient_scale=functools.partial(testing.focal_gradient_scale, alpha=0.25, gamma=2.0),
    skip=("symmetry",),  # alpha = 0.25 weights the classes differently: no label symmetry
    loss_ulps=(2, 3),  # the issue's targets, spelled out (they are also run_battery's defaults)
    gradient_ulps=(2, 2),
)
_focal = functools.partial(losses.sigmoid_focal_loss, alpha=0.25, gamma=2.0)


@pytest.mark.parametrize("label_kind", ["soft", "hard"])
def test_focal_meets_the_issue_ulp_target(label_kind):
    testing.check_binary_loss(_focal, label_kind=label_kind, **FOCAL_BATTERY)


@pytest.mark.slow
@pytest.mark.parametrize("label_kind", ["soft", "hard"])
def test_focal_meets_the_issue_ulp_target_in_the_thorough_profile(label_kind):
    """>= 20,000 examples per property (about 5 minutes per label kind on a loaded 2-core CPU)."""
    thorough = settings(settings.get_profile("thorough"), derandomize=True, database=None)
    results = testing.check_binary_loss(_focal, label_kind=label_kind, hypothesis_settings=thorough, **FOCAL_BATTERY)
    print(f"\nthorough, {label_kind} labels:\n{check.format_table(results)}")  # the figures, with -s
    assert all(r.examples >= 20_000 for r in results if r.name not in ("limits", "nan_propagation"))


def _focal_ulp_errors(logits, labels, alpha, gamma):
    """Max ULP errors (loss, gradient) of the focal loss at float32 points against mpmath, over
    normal float32 results; soft-label gradients in ULP of the size of their terms."""
    x, z = f32(*logits), f32(*labels)
    values, grads = focal_value_and_gradient(x, z, alpha=alpha, gamma=gamma)
    loss_errors, grad_errors = [0.0], [0.0]
    for logit, label, value, grad in zip(x.tolist(), z.tolist(), values.tolist(), grads.tolist()):
        exact = testing.focal_reference(logit, label, alpha, gamma)
        if testing.representable(exact) and exact != 0:
            loss_errors.append(testing.ulp_error(value, exact))
        exact_grad = testing.focal_gradient_reference(logit, label, alpha, gamma)
        scale = None if label in (0.0, 1.0) else testing.focal_gradient_scale(logit, label, alpha, gamma)
        if testing.representable(exact_grad) and exact_grad != 0 and (scale is None or testing.representable(scale)):
            grad_errors.append(testing.ulp_error(grad, exact_grad, scale))
    return max(loss_errors), max(grad_errors)


@pytest.mark.parametrize("gamma", [0, 3, 16])  # no power, an odd one, the largest
def test_focal_meets_the_target_for_integer_gammas_and_an_alpha_that_is_not_a_float32(gamma):
    rng = np.random.default_rng(gamma)
    logits = np.concatenate([rng.normal(0, 8, 40), rng.uniform(-100, 100, 12), [-87.0, -41.0, 0.0, 45.0]])
    for labels in (rng.choice([0.0, 1.0], logits.size), rng.uniform(0, 1, logits.size)):
        loss_error, grad_error = _focal_ulp_errors(logits, labels, alpha=0.3, gamma=gamma)
        assert loss_error <= 2 and grad_error <= 2, (gamma, loss_error, grad_error)


@pytest.mark.parametrize(
    "logit, label, gamma",
    [
        (-1e30, 1e-22, 2.0),  # (1 - p_t)**2 = 1e-44 underflows; the loss, 7.5e-37, does not
        (-1e30, 1e-3, 16.0),  # (1 - p_t)**16 = 1e-48 against a BCE of 1e27
        (-87.0, 1e-37, 0.0),  # BCE terms z|x| and exp(-|x|) near FLT_MIN (formed scaled)
        (-60.0, 0.0, 0.0),  # a hard label on its own side: alpha_t log1p(e^-60), scaled
        (3e38, 0.3, 2.0),  # |x| near FLT_MAX: u |x| is split without overflow
    ],
)
def test_focal_is_accurate_where_its_factors_leave_the_float32_range(logit, label, gamma):
    loss_error, grad_error = _focal_ulp_errors([logit], [label], alpha=0.25, gamma=gamma)
    assert loss_error <= 2 and grad_error <= 2


def test_focal_pair_arithmetic_is_not_optimized_away():
    """The pairs' tails survive jit (XLA would rewrite (1 + e) - 1 as e, or fuse a product into a
    multiply-add) and make exp and log1p accurate far beyond float32's 6e-8."""
    e = f32(2.0**-30, 0.1, 0.7)
    total, error = jax.jit(lambda a: pairs.fast_two_sum(1, a))(e)
    np.testing.assert_array_equal(np.float64(total) + np.float64(error), 1 + np.float64(e))  # exact
    a, b = f32(1.1, 3.7, -0.3), f32(0.9, 1e-3, 7.0)
    product = jax.jit(lambda a, b: pairs.mul(pairs.split(a), pairs.split(b)))(a, b)
    np.testing.assert_allclose(np.float64(product[0]) + np.float64(product[1]), np.float64(a) * np.float64(b), rtol=2**-32)
    y = f32(0.5, 3.0, 17.25, 39.9)
    exp_head, exp_tail = jax.jit(pairs.exp_neg)(y, np.zeros(4, np.int32))
    log_head, log_tail = jax.jit(pairs.log1p)((exp_head, exp_tail))
    mp = testing.mpmath
    with mp.workdps(40):
        for index, value in enumerate(y.tolist()):
            assert exp_tail[index] != 0 and log_tail[index] != 0
            computed_exp = mp.mpf(float(exp_head[index])) + float(exp_tail[index])
            assert abs(computed_exp / mp.exp(-value) - 1) < 2**-31
            computed_log = mp.mpf(float(log_head[index])) + float(log_tail[index])
            assert abs(computed_log / mp.log1p(computed_exp) - 1) < 2**-28


# ----------------------------------------------------------------------------- probabilities form


def test_probability_form_is_finite_at_zero_and_one_with_dtype_aware_clip():
    p, z = f32(0.0, 1.0, 0.5), f32(1.0, 0.0, 1.0)
    loss = losses.binary_cross_entropy_from_probabilities(p, z)
    eps = np.finfo(np.float32).eps
    np.testing.assert_allclose(loss, [-np.log(eps), -np.log1p(-(1 - eps)), np.log(2)], rtol=1e-6)
    half = losses.binary_cross_entropy_from_probabilities(jnp.array([0.0], jnp.float16), jnp.array([1.0], jnp.float16))
    assert float(half[0]) == pytest.approx(-math.log(float(np.finfo(np.float16).eps)), rel=1e-6)


def test_probability_form_gradient_is_zero_inside_the_clipped_band():
    grad = jax.grad(lambda p: jnp.sum(losses.binary_cross_entropy_from_probabilities(p, f32(1.0, 1.0))))(
        f32(1e-9, 0.5)
    )
    assert float(grad[0]) == 0.0 and float(grad[1]) == pytest.approx(-2.0)


# ----------------------------------------------------------------------------- softmax cross-entropy


def test_softmax_ce_with_minus_inf_masks_and_plus_inf_logits():
    x = f32(0.0, -INF, 1.0)[None].repeat(3, 0)
    x[1] = [INF, 0.0, INF]
    x[2] = [-INF, -INF, -INF]
    z = np.array([[1.0, 0.0, 0.0], [0.5, 0.0, 0.5], [1.0, 0.0, 0.0]], np.float32)
    loss = losses.softmax_cross_entropy(x, z)
    assert float(loss[0]) == pytest.approx(float(jnp.log1p(jnp.exp(1.0))), rel=1e-6)
    assert float(loss[1]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(loss[2]) == INF  # no class is possible: the label's class has probability 0
    grad = jax.grad(lambda a: jnp.sum(losses.softmax_cross_entropy(a, z)))(x)
    assert bool(jnp.isfinite(grad).all())
    np.testing.assert_allclose(grad[1], [0.0, 0.0, 0.0], atol=1e-7)
    assert float(grad[0, 1]) == 0.0  # a masked class gets no gradient


def test_softmax_ce_matches_optax_on_finite_logits_and_integer_variant_matches_one_hot():
    rng = np.random.default_rng(2)
    x = rng.normal(0, 3, (8, 5)).astype(np.float32)
    z = rng.dirichlet(np.ones(5), 8).astype(np.float32)
    np.testing.assert_allclose(losses.softmax_cross_entropy(x, z), optax.softmax_cross_entropy(x, z), rtol=1e-5)
    ints = rng.integers(0, 5, 8)
    np.testing.assert_allclose(
        losses.softmax_cross_entropy_with_integer_labels(x, ints),
        optax.softmax_cross_entropy_with_integer_labels(x, ints),
        rtol=1e-5,
    )
    masked = x.copy()
    masked[:, 0] = -INF
    safe = np.where(ints == 0, 1, ints)
    assert bool(jnp.isfinite(losses.softmax_cross_entropy_with_integer_labels(masked, safe)).all())


# ----------------------------------------------------------------------------- naive forms


def test_naive_bce_reproduces_the_nan():
    loss = losses.naive_sigmoid_binary_cross_entropy(f32(17.0, INF), f32(1.0, 1.0))
    assert np.isnan(loss).all()
    assert not np.isfinite(grad_wrt_logits(losses.naive_sigmoid_binary_cross_entropy, f32(17.0), f32(0.0))).all()
