"""A property kit for binary losses: extreme-float strategies, an mpmath reference, a battery.

Run the battery on any `fn(logits, labels) -> per-element loss` from a pytest test::

    from nanlab.testing import check_binary_loss

    def test_my_loss_is_stable():
        check_binary_loss(my_loss)                       # raises LossPropertyError on failure

    def test_my_clipped_loss():
        check_binary_loss(my_clipped_loss, skip=("gradient", "limits"))

Each property is a Hypothesis test over scalar (logit, label) pairs drawn from `logits()` and
`labels()`: full-range float32 with ±0, subnormals, ±FLT_MAX, ±inf and the known edges (the exp
overflow at ±88.7, sigmoid saturation at ±17 and ±104). The number of examples follows the active
Hypothesis profile (nanlab's `tests/conftest.py` registers `ci` and `thorough`). A failure raises
`LossPropertyError` with the property's name and Hypothesis's minimal counterexample.

The reference values come from mpmath at `REFERENCE_DIGITS` decimal digits; errors are
counted in float32 units in the last place (ULP) of the exact value.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

__all__ = [
    "Counterexample", "LossPropertyError", "PROPERTIES", "PropertyResult", "bce_gradient_reference",
    "bce_reference", "check_binary_loss", "float32_ulp", "focal_gradient_reference", "focal_reference",
    "hard_labels", "labels", "logits", "run_battery", "soft_labels", "ulp_error",
]

REFERENCE_DIGITS = 60  # >= 50 decimal digits: float32 needs ~9, the margin absorbs any cancellation
FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)  # smallest normal float32
FLT_TRUE_MIN = float(np.finfo(np.float32).smallest_subnormal)

# Logits where float32 losses typically break: exp(x) overflows above ~88.72 and underflows to a
# subnormal below ~-87.34 (to 0 below ~-103.97); sigmoid(x) rounds to 1 above ~16.64 (so 1 - p is
# 0) and sigmoid(-x) leaves the subnormals near 104.
EDGE_LOGITS = tuple(
    float(np.float32(v))
    for magnitude in (
        0.0,
        FLT_TRUE_MIN,
        FLT_MIN,
        1e-8,
        0.5,
        1.0,
        16.635532,
        17.0,
        36.7368,
        87.33655,
        88.72284,
        88.72283,
        89.0,
        103.27893,
        103.97208,
        104.0,
        1e9,
        FLT_MAX,
        math.inf,
    )
    for v in (magnitude, -magnitude)
)
# Labels are drawn without subnormals: XLA flushes subnormal operands to zero on CPU and GPU, so
# to any JAX loss a subnormal label *is* 0 (and at x = -inf the limits of z = 0 and z = 1e-45
# differ: 0 against +inf). Subnormal logits are drawn; flushing them to 0 changes no loss value.
EDGE_LABELS = tuple(float(np.float32(v)) for v in (0.0, 1.0, 0.5, 0.25, 0.75, 0.1, 0.9, FLT_MIN, 2.0**-24, 1 - 2.0**-24))


# ----------------------------------------------------------------------------- strategies


def _f32(value: float) -> float:
    return float(np.float32(value))


def logits(*, allow_infinity: bool = True, allow_nan: bool = False) -> st.SearchStrategy[float]:
    """Float32-representable logits over the full range, weighted toward the known edges.

    Args:
      allow_infinity: include ±inf.
      allow_nan: include NaN.

    Returns:
      A strategy of Python floats, each exactly a float32 value.
    """
    edges = [v for v in EDGE_LOGITS if allow_infinity or math.isfinite(v)]
    near_edges = st.sampled_from((17.0, 88.72, 104.0, 36.7)).flatmap(
        lambda edge: st.floats(_f32(edge - 1.5), _f32(edge + 1.5), width=32)
    )
    signed_near_edges = st.tuples(near_edges, st.booleans()).map(lambda t: -t[0] if t[1] else t[0])
    return st.one_of(
        st.sampled_from(edges),
        st.floats(width=32, allow_nan=allow_nan, allow_infinity=allow_infinity, allow_subnormal=True),
        st.floats(-30.0, 30.0, width=32),  # where the loss is O(1) and most values live
        signed_near_edges,
    )


def hard_labels() -> st.SearchStrategy[float]:
    """Labels 0.0 and 1.0."""
    return st.sampled_from((0.0, 1.0))


def soft_labels() -> st.SearchStrategy[float]:
    """Float32-representable labels in [0, 1], edges included (0, 1, 2**-24, 1 - 2**-24, ...);
    no subnormals (see `EDGE_LABELS`)."""
    return st.one_of(
        st.sampled_from(EDGE_LABELS),
        st.floats(0.0, 1.0, width=32, allow_subnormal=False),
    )


def labels(kind: str = "soft") -> st.SearchStrategy[float]:
    """`hard_labels()` for kind="hard", else `soft_labels()` (which also draws 0 and 1)."""
    if kind not in ("hard", "soft"):
        raise ValueError(f"labels kind must be 'hard' or 'soft', got {kind!r}")
    return hard_labels() if kind == "hard" else soft_labels()


# ----------------------------------------------------------------------------- mpmath reference


def _mp(value: float):
    return mpmath.mpf(float(value))


def _times(coefficient, value):
    """coefficient * value with an absent (zero-coefficient) term being exactly 0, even if inf."""
    return mpmath.mpf(0) if coefficient == 0 else coefficient * value


def _softplus(t):
    with mpmath.workdps(REFERENCE_DIGITS):
        return mpmath.log1p(mpmath.exp(t))


def _sigmoid(t):
    with mpmath.workdps(REFERENCE_DIGITS):
        return 1 / (1 + mpmath.exp(-t))


def bce_reference(logit: float, label: float, pos_weight: float = 1.0):
    """Exact binary cross-entropy p z softplus(-x) + (1-z) softplus(x) as an mpmath number.

    The inputs are taken as the exact values of their float32 roundings; ±inf logits give the
    limits (0 or +inf), NaN gives NaN.
    """
    with mpmath.workdps(REFERENCE_DIGITS):
        x, z, p = _mp(logit), _mp(label), _mp(pos_weight)
        if mpmath.isnan(x) or mpmath.isnan(z):
            return mpmath.mpf("nan")
        return _times(p * z, _softplus(-x)) + _times(1 - z, _softplus(x))


def bce_gradient_reference(logit: float, label: float, pos_weight: float = 1.0):
    """Exact d/dx of `bce_reference`: (1-z) sigmoid(x) - p z sigmoid(-x) (= sigmoid(x) - z for p=1)."""
    with mpmath.workdps(REFERENCE_DIGITS):
        x, z, p = _mp(logit), _mp(label), _mp(pos_weight)
        if mpmath.isnan(x) or mpmath.isnan(z):
            return mpmath.mpf("nan")
        return (1 - z) * _sigmoid(x) - p * z * _sigmoid(-x)


def focal_reference(logit: float, label: float, alpha: float | None = 0.25, gamma: float = 2.0):
    """Exact sigmoid focal loss alpha_t (1-p_t)^gamma BCE(x, z) as an mpmath number."""
    with mpmath.workdps(REFERENCE_DIGITS):
        x, z = _mp(logit), _mp(label)
        if mpmath.isnan(x) or mpmath.isnan(z):
            return mpmath.mpf("nan")
        miss = z * _sigmoid(-x) + (1 - z) * _sigmoid(x)
        alpha_t = 1 if alpha is None else _mp(alpha) * z + (1 - _mp(alpha)) * (1 - z)
        modulator = mpmath.mpf(1) if gamma == 0 else miss ** _mp(gamma)
        return _times(alpha_t, _times(modulator, bce_reference(logit, label)))


def focal_gradient_reference(logit: float, label: float, alpha: float | None = 0.25, gamma: float = 2.0):
    """Exact d/dx of `focal_reference`: alpha_t m [gamma r BCE + sigmoid(x) - z], m = (1-p_t)^gamma,
    r = d log(1-p_t)/dx = sigmoid(x) sigmoid(-x) (1-2z) / (1-p_t)."""
    with mpmath.workdps(REFERENCE_DIGITS):
        x, z = _mp(logit), _mp(label)
        if mpmath.isnan(x) or mpmath.isnan(z):
            return mpmath.mpf("nan")
        s_pos, s_neg = _sigmoid(x), _sigmoid(-x)
        miss = z * s_neg + (1 - z) * s_pos
        alpha_t = 1 if alpha is None else _mp(alpha) * z + (1 - _mp(alpha)) * (1 - z)
        modulator = mpmath.mpf(1) if gamma == 0 else miss ** _mp(gamma)
        if miss == 0:  # x = ±inf on the label's side: the loss is flat there
            return mpmath.mpf(0) if gamma > 0 else alpha_t * (s_pos - z)
        ratio = s_pos * s_neg * (1 - 2 * z) / miss
        inner = _times(_mp(gamma) * ratio, bce_reference(logit, label)) + (s_pos - z)
        return _times(alpha_t, modulator * inner)


def focal_gradient_scale(logit: float, label: float, alpha: float | None = 0.25, gamma: float = 2.0):
    """The size of the terms of the focal gradient alpha_t m [gamma r BCE + sigmoid(x) - z]:
    alpha_t m max(|gamma r BCE|, sigmoid(x), z), the analogue of `bce_gradient_scale`."""
    with mpmath.workdps(REFERENCE_DIGITS):
        x, z = _mp(logit), _mp(label)
        s_pos, s_neg = _sigmoid(x), _sigmoid(-x)
        miss = z * s_neg + (1 - z) * s_pos
        if miss == 0:
            return mpmath.mpf(0)
        alpha_t = 1 if alpha is None else _mp(alpha) * z + (1 - _mp(alpha)) * (1 - z)
        modulator = mpmath.mpf(1) if gamma == 0 else miss ** _mp(gamma)
        ratio = s_pos * s_neg * (1 - 2 * z) / miss
        focus = abs(_times(_mp(gamma) * ratio, bce_reference(logit, label)))
        return _times(alpha_t, modulator * max(focus, s_pos, z))


def float32_ulp(value) -> mpmath.mpf:
    """The float32 ULP at an exact value: 2**(exponent - 23), and the subnormal spacing below FLT_MIN."""
    with mpmath.workdps(REFERENCE_DIGITS):
        magnitude = abs(mpmath.mpf(value))
        if magnitude < FLT_MIN:
            return mpmath.mpf(FLT_TRUE_MIN)
        exponent = int(mpmath.floor(mpmath.log(magnitude, 2)))
        # log2 of an exact power of two may round below the integer: confirm against the value
        if mpmath.mpf(2) ** (exponent + 1) <= magnitude:
            exponent += 1
        return mpmath.mpf(2) ** (exponent - 23)


def ulp_error(computed: float, exact, scale=None) -> float:
    """|computed - exact| in float32 ULP of `scale` (default: of `exact`); inf when the infinities or
    NaNs disagree, 0 when they agree."""
    with mpmath.workdps(REFERENCE_DIGITS):
        exact = mpmath.mpf(exact)
        if mpmath.isnan(exact) or math.isnan(computed):
            return 0.0 if (mpmath.isnan(exact) and math.isnan(computed)) else math.inf
        if mpmath.isinf(exact) or math.isinf(computed):
            return 0.0 if mpmath.mpf(computed) == exact else math.inf
        unit = float32_ulp(exact if scale is None else scale)
        return float(abs(mpmath.mpf(computed) - exact) / unit)


def representable(exact) -> bool:
    """True when an exact value lies in float32's normal range (the ULP targets apply there)."""
    magnitude = abs(mpmath.mpf(exact))
    return bool(magnitude == 0 or FLT_MIN <= magnitude <= FLT_MAX)


def bce_gradient_scale(logit: float, label: float):
    """The size of the terms of sigmoid(x) - z: max(sigmoid(x), z). The difference cancels near the
    optimum, so for soft labels its error is measured in ULP of this scale."""
    with mpmath.workdps(REFERENCE_DIGITS):
        return max(_sigmoid(_mp(logit)), _mp(label))


# ----------------------------------------------------------------------------- the battery

PROPERTIES = {
    "finite": "finite loss for finite logits and labels in [0, 1]",
    "non_negative": "loss >= 0 for every non-NaN input, ±inf included",
    "finite_gradient": "finite d loss / d logit for every non-NaN input, ±inf included",
    "gradient": "d loss / d logit matches the reference gradient (sigmoid(x) - z) within the ULP budget",
    "symmetry": "loss(x, z) == loss(-x, 1 - z) within twice the ULP budget",
    "limits": "the exact limit at ±inf logits (0 on the label's side, +inf otherwise)",
    "reference": "loss within the ULP budget of the mpmath reference (normal float32 results)",
    "transforms": "the same values eagerly, under jit and under vmap",
    "nan_propagation": "NaN logits give a NaN loss",
}


@dataclasses.dataclass(frozen=True)
class Counterexample:
    """One failing input: the logit and label, what the loss gave and what was expected."""

    logit: float
    label: float
    value: object
    expected: object

    def __str__(self) -> str:
        return (
            f"logit={self.logit!r}, label={self.label!r}: got {self.value!r}, "
            f"expected {self.expected!r}"
        )


@dataclasses.dataclass(frozen=True)
class PropertyResult:
    """The outcome of one property of the battery."""

    name: str
    passed: bool
    description: str
    counterexample: Counterexample | None = None
    message: str = ""
    examples: int = 0  # calls of the property, shrinking included
    seconds: float = 0.0


class LossPropertyError(AssertionError):
    """Raised by `check_binary_loss`: names each failing property and its minimal counterexample."""

    def __init__(self, failures: Sequence[PropertyResult]):
        self.failures = tuple(failures)
        lines = [f"{len(self.failures)} loss propert{'y' if len(self.failures) == 1 else 'ies'} failed:"]
        for failure in self.failures:
            lines.append(f"  {failure.name} ({failure.description}): {failure.message}")
            if failure.counterexample is not None:
                lines.append(f"    minimal counterexample: {failure.counterexample}")
        super().__init__("\n".join(lines))


class _Violation(AssertionError):
    """Raised inside a property; Hypothesis shrinks it and re-raises the minimal one."""

    def __init__(self, message: str, counterexample: Counterexample):
        super().__init__(f"{message}: {counterexample}")
        self.message = message
        self.counterexample = counterexample


@dataclasses.dataclass(frozen=True)
class _Evaluators:
    """The loss under each transformation, on one (logit, label) pair as float32 arrays of shape (1,)."""

    eager: Callable
    jitted: Callable
    vmapped: Callable
    gradient: Callable

    @classmethod
    def of(cls, fn: Callable) -> "_Evaluators":
        def total(x, z):
            return jnp.sum(fn(x, z))

        return cls(
            eager=fn,
            jitted=jax.jit(fn),
            vmapped=jax.jit(jax.vmap(fn)),
            gradient=jax.jit(jax.grad(total)),
        )


def _pair(logit: float, label: float):
    return np.array([logit], np.float32), np.array([label], np.float32)


def _scalar(value) -> float:
    return float(np.asarray(value, np.float64).reshape(-1)[0])


def _is_hard(label: float) -> bool:
    return label in (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class _Battery:
    """The properties of `check_binary_loss`, each a function of one (logit, label) pair."""

    run: _Evaluators
    reference: Callable
    gradient_reference: Callable | None
    gradient_scale: Callable | None
    loss_ulps: tuple[float, float]
    gradient_ulps: tuple[float, float]
    transform_ulps: float

    def value(self, logit, label) -> float:
        return _scalar(self.run.jitted(*_pair(logit, label)))

    def grad(self, logit, label) -> float:
        return _scalar(self.run.gradient(*_pair(logit, label)))

    def loss_budget(self, label) -> float:
        return self.loss_ulps[0] if _is_hard(label) else self.loss_ulps[1]

    def finite(self, logit, label):
        value = self.value(logit, label)
        if not math.isfinite(value):
            raise _Violation("non-finite loss", Counterexample(logit, label, value, "finite"))

    def non_negative(self, logit, label):
        value = self.value(logit, label)
        if not value >= 0:  # written so that NaN fails too
            raise _Violation("negative or NaN loss", Counterexample(logit, label, value, ">= 0"))

    def finite_gradient(self, logit, label):
        grad = self.grad(logit, label)
        if not math.isfinite(grad):
            raise _Violation("non-finite gradient", Counterexample(logit, label, grad, "finite"))

    def gradient(self, logit, label):
        exact = self.gradient_reference(logit, label)
        hard = _is_hard(label)
        scale = None if (hard or self.gradient_scale is None) else self.gradient_scale(logit, label)
        if not representable(exact) or (scale is not None and not representable(scale)):
            return  # subnormal results are outside the accuracy target
        if scale is None and exact == 0:
            scale = mpmath.mpf(FLT_MIN)  # an exact 0 must come out as 0 up to the smallest normal ULP
        budget = self.gradient_ulps[0] if hard else self.gradient_ulps[1]
        grad = self.grad(logit, label)
        error = ulp_error(grad, exact, scale)
        if not error <= budget:
            raise _Violation(
                f"gradient off by {error:.3g} ULP (budget {budget})",
                Counterexample(logit, label, grad, float(exact)),
            )

    def symmetry(self, logit, label):
        mirrored = _f32(1 - label)
        if _f32(1 - mirrored) != label:
            return  # 1 - z is not exact in float32: the mirrored problem is a different one
        value, mirror = self.value(logit, label), self.value(-logit, mirrored)
        budget = 2 * self.loss_budget(label)
        if math.isnan(value) and math.isnan(mirror):
            return
        error = ulp_error(mirror, _mp(value)) if math.isfinite(value) else (0.0 if mirror == value else math.inf)
        if not error <= budget:
            raise _Violation(
                f"loss(-x, 1-z) = {mirror!r} differs by {error:.3g} ULP (budget {budget})",
                Counterexample(logit, label, value, mirror),
            )

    def limits(self, logit, label):
        limit_logit = math.copysign(math.inf, logit)
        value = self.value(limit_logit, label)
        expected = self.reference(limit_logit, label)
        if not (value == expected):
            raise _Violation("wrong limit", Counterexample(limit_logit, label, value, float(expected)))

    def reference_agreement(self, logit, label):
        exact = self.reference(logit, label)
        if not math.isfinite(logit) or not representable(exact):
            return
        value = self.value(logit, label)
        budget = self.loss_budget(label)
        error = ulp_error(value, exact)
        if not error <= budget:
            raise _Violation(
                f"loss off by {error:.3g} ULP (budget {budget})",
                Counterexample(logit, label, value, float(exact)),
            )

    def transforms(self, logit, label):
        x, z = _pair(logit, label)
        eager = _scalar(self.run.eager(x, z))
        for name, value in (
            ("jit", _scalar(self.run.jitted(x, z))),
            ("vmap", _scalar(self.run.vmapped(x[None], z[None]))),
        ):
            same = (math.isnan(eager) and math.isnan(value)) or (
                ulp_error(value, _mp(eager)) <= self.transform_ulps
                if math.isfinite(eager)
                else value == eager
            )
            if not same:
                raise _Violation(f"{name} differs from eager", Counterexample(logit, label, value, eager))

    def nan_propagation(self, logit, label):
        value = self.value(math.nan, label)
        if not math.isnan(value):
            raise _Violation("NaN logit gave a number", Counterexample(math.nan, label, value, math.nan))


def _property_inputs(name: str, label_kind: str) -> st.SearchStrategy:
    """The (logit, label) pairs each property draws."""
    finite_only = name in ("finite", "reference")
    infinite_only = name == "limits"
    if infinite_only:
        logit = st.sampled_from((math.inf, -math.inf))
    else:
        logit = logits(allow_infinity=not finite_only)
    return st.tuples(logit, labels(label_kind))


def _run_property(
    check: Callable, inputs: st.SearchStrategy, hypothesis_settings
) -> tuple[Exception | None, int]:
    """Runs one property as a Hypothesis test; returns (the minimal failure or None, examples run)."""
    calls = [0]

    @given(inputs)
    def prop(pair):
        calls[0] += 1
        check(*pair)

    # The active profile (nanlab's conftest: `ci` or `thorough`) unless settings are given; one
    # minimal failure per property (not an ExceptionGroup of distinct ones); no health checks,
    # which fire on examples that are cheap to draw but slow to evaluate.
    prop = settings(
        hypothesis_settings, report_multiple_bugs=False, suppress_health_check=list(HealthCheck)
    )(prop)
    try:
        prop()
    except Exception as failure:  # noqa: BLE001 - the user's loss may raise anything
        return failure, calls[0]
    return None, calls[0]


def run_battery(
    fn: Callable,
    *,
    label_kind: str = "soft",
    skip: Sequence[str] = (),
    reference: Callable = bce_reference,
    gradient_reference: Callable | None = bce_gradient_reference,
    gradient_scale: Callable | None = bce_gradient_scale,
    loss_ulps: tuple[float, float] = (2.0, 3.0),
    gradient_ulps: tuple[float, float] = (2.0, 2.0),
    transform_ulps: float | None = None,
    hypothesis_settings: settings | None = None,
) -> list[PropertyResult]:
    """Runs every property of the battery on `fn` and returns one result per property.

    Args:
      fn: `fn(logits, labels) -> per-element loss`, both float32 arrays of the same shape.
      label_kind: "soft" (labels in [0, 1], 0 and 1 included) or "hard" (0 and 1 only).
      skip: names of properties to leave out (see `PROPERTIES`), e.g. ("gradient", "limits")
        for a clipped loss.
      reference: exact loss `(logit, label) -> mpmath number`; default binary cross-entropy.
      gradient_reference: exact d loss / d logit, or None to skip the "gradient" property.
      gradient_scale: for soft labels, the gradient error is measured in ULP of
        `gradient_scale(logit, label)` (default max(sigmoid(x), z)); None measures it against the
        gradient itself.
      loss_ulps: (hard-label, soft-label) ULP budgets of the loss.
      gradient_ulps: (hard-label, soft-label) ULP budgets of the gradient.
      transform_ulps: allowed ULP difference between eager, jit and vmap; default twice the
        largest loss budget (two values each within budget of the exact one). XLA fuses a jitted
        function and may contract a*b + c into one fused multiply-add, so jitted and eager values
        legitimately differ by roundings; a change of finiteness or NaN is always a failure.
      hypothesis_settings: a `hypothesis.settings` to use instead of the active profile.

    Returns:
      A PropertyResult per property that was run, in `PROPERTIES` order.

    Raises:
      ValueError: an unknown property name in `skip`, or an unknown label_kind.
    """
    unknown = sorted(set(skip) - set(PROPERTIES))
    if unknown:
        raise ValueError(f"skip names unknown properties {unknown}; known: {sorted(PROPERTIES)}")
    labels(label_kind)  # validates the kind
    if gradient_reference is None:
        skip = tuple(skip) + ("gradient",)
    battery = _Battery(
        run=_Evaluators.of(fn),
        reference=reference,
        gradient_reference=gradient_reference,
        gradient_scale=gradient_scale,
        loss_ulps=tuple(loss_ulps),
        gradient_ulps=tuple(gradient_ulps),
        transform_ulps=2 * max(loss_ulps) if transform_ulps is None else transform_ulps,
    )
    checks = {
        "finite": battery.finite,
        "non_negative": battery.non_negative,
        "finite_gradient": battery.finite_gradient,
        "gradient": battery.gradient,
        "symmetry": battery.symmetry,
        "limits": battery.limits,
        "reference": battery.reference_agreement,
        "transforms": battery.transforms,
        "nan_propagation": battery.nan_propagation,
    }
    results = []
    for name, description in PROPERTIES.items():
        if name in skip:
            continue
        start = time.perf_counter()
        failure, examples = _run_property(checks[name], _property_inputs(name, label_kind), hypothesis_settings)
        counts = dict(examples=examples, seconds=time.perf_counter() - start)
        if failure is None:
            results.append(PropertyResult(name, True, description, **counts))
        elif isinstance(failure, _Violation):
            results.append(
                PropertyResult(name, False, description, failure.counterexample, failure.message, **counts)
            )
        else:
            message = f"raised {type(failure).__name__}: {failure}".splitlines()[0]
            results.append(PropertyResult(name, False, description, None, message, **counts))
    return results


def check_binary_loss(fn: Callable, **options) -> list[PropertyResult]:
    """Runs the battery (`run_battery`, same options) and raises if any property fails.

    Args:
      fn: `fn(logits, labels) -> per-element loss`.
      **options: see `run_battery` (label_kind, skip, reference, budgets, hypothesis_settings).

    Returns:
      The (all passing) results.

    Raises:
      LossPropertyError: one or more properties failed; it names each with its minimal
        counterexample (logit, label, value, expected).
    """
    results = run_battery(fn, **options)
    failures = [result for result in results if not result.passed]
    if failures:
        raise LossPropertyError(failures)
    return results
