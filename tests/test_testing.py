"""Tests of nanlab.testing: the strategies reach the edges, the reference is exact, the kit can fail."""

import functools
import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import optax
import pytest
from hypothesis import find, settings
from hypothesis.errors import NoSuchExample

from nanlab import check, losses, testing

INF = math.inf


# ----------------------------------------------------------------------------- strategies


@pytest.mark.parametrize(
    "wanted",
    [
        lambda v: v == INF,
        lambda v: v == -INF,
        lambda v: v == 0 and math.copysign(1, v) < 0,
        lambda v: 0 < abs(v) < testing.FLT_MIN,  # subnormal
        lambda v: abs(v) == testing.FLT_MAX,
        lambda v: 88.0 < v < 89.5,  # exp overflow edge
        lambda v: -105 < v < -103,  # sigmoid(-x) leaves the subnormals
        lambda v: 16 < v < 18,  # sigmoid saturates
    ],
)
def test_logit_strategy_reaches_each_edge(wanted):
    found = find(testing.logits(), wanted, settings=settings(max_examples=2000, database=None, derandomize=True))
    assert wanted(found) and found == float(np.float32(found))


def test_logit_strategy_options_exclude_infinities_and_nan():
    finite = find(testing.logits(allow_infinity=False), lambda v: abs(v) > 1e38, settings=settings(database=None))
    assert math.isfinite(finite)
    with pytest.raises(NoSuchExample):
        find(testing.logits(allow_infinity=False), math.isinf, settings=settings(max_examples=300, database=None))
    with pytest.raises(NoSuchExample):
        find(testing.logits(), math.isnan, settings=settings(max_examples=300, database=None))
    # 2000 examples, find's own default: Hypothesis also draws constants from the loaded nanlab
    # modules, so how soon a NaN comes up changes with their source
    assert math.isnan(find(testing.logits(allow_nan=True), math.isnan, settings=settings(database=None, max_examples=2000)))


def test_label_strategies_stay_in_unit_interval_and_reach_the_edges():
    for kind in ("hard", "soft"):
        for target in (0.0, 1.0):
            assert find(testing.labels(kind), lambda v, t=target: v == t, settings=settings(database=None)) == target
    soft = find(testing.soft_labels(), lambda v: 0 < v < 1e-6, settings=settings(database=None))
    assert 0 < soft < 1e-6 and soft == float(np.float32(soft))
    with pytest.raises(ValueError, match="kind"):
        testing.labels("fuzzy")


# ----------------------------------------------------------------------------- reference and ULP


def test_reference_values_and_limits():
    with mpmath.workdps(testing.REFERENCE_DIGITS):
        assert abs(testing.bce_reference(0.0, 1.0) - mpmath.log(2)) < mpmath.mpf(10) ** -55
    assert testing.bce_reference(INF, 1.0) == 0 and testing.bce_reference(-INF, 0.0) == 0
    assert testing.bce_reference(INF, 0.0) == mpmath.inf and testing.bce_reference(-INF, 0.3) == mpmath.inf
    assert mpmath.isnan(testing.bce_reference(math.nan, 0.5))
    assert testing.bce_gradient_reference(INF, 0.25) == mpmath.mpf(0.75)
    # softplus(-30) = log(1 + t), t = e^-30, from the series t - t^2/2 + t^3/3 (next term ~1e-53)
    with mpmath.workdps(testing.REFERENCE_DIGITS):
        t = mpmath.exp(-30)
        assert abs(testing.bce_reference(30.0, 1.0) - (t - t**2 / 2 + t**3 / 3)) < mpmath.mpf(10) ** -50


def test_ulp_helpers():
    assert testing.float32_ulp(1.0) == mpmath.mpf(2) ** -23
    assert testing.float32_ulp(0.75) == mpmath.mpf(2) ** -24
    assert testing.float32_ulp(2.0**-140) == mpmath.mpf(2) ** -149  # subnormal spacing
    one_up = float(np.nextafter(np.float32(1), np.float32(2)))
    assert testing.ulp_error(one_up, 1) == pytest.approx(1.0)
    assert testing.ulp_error(INF, mpmath.inf) == 0 and testing.ulp_error(math.nan, 1) == INF
    assert testing.ulp_error(1.0 + 2**-23, 0.5, scale=1.0) == pytest.approx(2**22 + 1)
    assert testing.representable(1.0) and not testing.representable(1e-40) and testing.representable(0)


# ----------------------------------------------------------------------------- the kit can fail


def failures_by_name(error: testing.LossPropertyError) -> dict:
    return {failure.name: failure for failure in error.failures}


def test_kit_catches_the_naive_loss_with_a_counterexample():
    with pytest.raises(testing.LossPropertyError) as raised:
        testing.check_binary_loss(losses.naive_sigmoid_binary_cross_entropy)
    failed = failures_by_name(raised.value)
    assert {"finite", "limits", "finite_gradient"} <= set(failed)
    example = failed["finite"].counterexample
    assert math.isfinite(example.logit) and not math.isfinite(example.value)
    assert abs(example.logit) >= 16  # where sigmoid rounds to 1 in float32 (or 0 below -88)
    message = str(raised.value)
    assert "finite" in message and f"logit={example.logit!r}" in message


def test_kit_catches_optax_at_infinite_logits():
    with pytest.raises(testing.LossPropertyError) as raised:
        testing.check_binary_loss(optax.sigmoid_binary_cross_entropy, skip=("gradient", "reference"))
    failed = failures_by_name(raised.value)
    assert "limits" in failed and "finite" not in failed  # optax is finite for finite logits
    example = failed["limits"].counterexample
    assert math.isinf(example.logit) and math.isnan(example.value) and example.expected == 0.0
    # whatever else fails (non_negative may draw (inf, 1) too), it fails at an infinite logit
    assert all(math.isinf(f.counterexample.logit) for f in failed.values())


def test_kit_reports_a_wrong_gradient_and_an_exception():
    def detached_gradient(logits, labels):  # right values, but the gradient is cut off
        return jax.lax.stop_gradient(losses.sigmoid_binary_cross_entropy(logits, labels))

    quick = settings(max_examples=50, derandomize=True, database=None, deadline=None)
    keep = ("gradient", "reference")
    skip = tuple(name for name in testing.PROPERTIES if name not in keep)
    results = testing.run_battery(detached_gradient, skip=skip, hypothesis_settings=quick)
    status = {result.name: result for result in results}
    assert not status["gradient"].passed and status["reference"].passed
    assert status["gradient"].counterexample.value == 0.0

    def broken(logits, labels):
        raise RuntimeError("boom")

    only_finite = tuple(name for name in testing.PROPERTIES if name != "finite")
    (result,) = testing.run_battery(broken, skip=only_finite, hypothesis_settings=quick)
    assert not result.passed and "RuntimeError: boom" in result.message


def test_options_turn_properties_off_for_a_clipped_loss():
    def clipped(logits, labels):
        return losses.binary_cross_entropy_from_probabilities(jax.nn.sigmoid(logits), labels)

    quick = settings(max_examples=60, derandomize=True, database=None, deadline=None)
    with pytest.raises(testing.LossPropertyError):
        testing.check_binary_loss(clipped, hypothesis_settings=quick)
    results = testing.check_binary_loss(
        clipped, skip=("gradient", "limits", "reference", "symmetry"), hypothesis_settings=quick
    )
    assert [r.name for r in results] == ["finite", "non_negative", "finite_gradient", "transforms", "nan_propagation"]
    with pytest.raises(ValueError, match="unknown properties"):
        testing.run_battery(clipped, skip=("finiteness",))


def test_gradient_reference_none_skips_the_gradient_property():
    quick = settings(max_examples=20, derandomize=True, database=None, deadline=None)
    results = testing.run_battery(
        losses.sigmoid_binary_cross_entropy,
        gradient_reference=None,
        skip=("reference", "symmetry", "transforms"),
        hypothesis_settings=quick,
    )
    assert "gradient" not in [r.name for r in results] and all(r.passed for r in results)


@pytest.mark.slow
def test_nanlab_losses_pass_the_thorough_profile():
    """>= 20,000 examples per property (the `thorough` profile), hard and soft labels."""
    thorough = settings(settings.get_profile("thorough"), derandomize=True, database=None)
    assert thorough.max_examples >= 20_000
    for kind in ("soft", "hard"):
        results = testing.check_binary_loss(
            losses.sigmoid_binary_cross_entropy, label_kind=kind, hypothesis_settings=thorough
        )
        print(f"\nthorough, {kind} labels:\n{check.format_table(results)}")  # the figures, with -s
        print(f"seconds: {sum(r.seconds for r in results):.0f}")
        assert all(r.examples >= 20_000 for r in results if r.name not in ("limits", "nan_propagation"))
