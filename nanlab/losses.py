"""Stable per-element losses, and the unstable textbook forms kept for reproducing failures.

Every stable loss here is pure and per-element (it returns an array with the logits' shape
unless a `reduction` is asked for), safe under `jit`, `vmap` and `grad`, and:

* finite wherever the mathematical value is finite, for every float32 input (±0, subnormals,
  ±FLT_MAX), with the right limit at ±inf logits and NaN only where an input is NaN;
* accurate to a few float32 ULP by its formulation alone: no float64 inside (TPUs have none and
  GPUs run it slowly); bfloat16/float16 inputs are computed in float32 and the loss is
  returned in float32, so it is not rounded to 8 or 11 bits;
* differentiable with a finite gradient for every input including ±inf (a `jax.custom_jvp`
  gives the gradient its closed, stable form instead of differentiating the guarded formula).

The `naive_*` functions are the textbook forms, unstable on purpose: use them only to reproduce
a NaN, never as defaults.

References:
  Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (arXiv:1708.02002).
  Goldberg, "What every computer scientist should know about floating-point arithmetic", 1991.
  TensorFlow `tf.nn.weighted_cross_entropy_with_logits`; PyTorch `BCEWithLogitsLoss(pos_weight)`.
"""

from __future__ import annotations

import functools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nanlab import _float_pairs as pairs
from nanlab._float_pairs import Pair
from nanlab.config import LOSSES

__all__ = [
    "binary_cross_entropy_from_probabilities", "by_name", "naive_sigmoid_binary_cross_entropy",
    "naive_sigmoid_focal_loss", "sigmoid_binary_cross_entropy", "sigmoid_focal_loss", "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels", "stable_sigmoid",
]

_REDUCTIONS = ("none", "mean", "sum")


# ----------------------------------------------------------------------------- input checks


def _check_float(name: str, value) -> jax.Array:
    """Returns `value` as a JAX array, raising TypeError unless its dtype is floating point."""
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    return array


def _check_same_shape(logits: jax.Array, name: str, other: jax.Array) -> None:
    """Raises ValueError when `other` and `logits` differ in shape: nanlab never broadcasts them."""
    if other.shape != logits.shape:
        raise ValueError(
            f"{name} shape {tuple(other.shape)} differs from logits shape {tuple(logits.shape)}; "
            "nanlab does not broadcast labels (reshape them explicitly)"
        )


def _check_broadcastable(logits: jax.Array, name: str, other: jax.Array) -> None:
    """Raises ValueError unless `other` broadcasts to the logits' shape without changing it."""
    try:
        shape = jnp.broadcast_shapes(other.shape, logits.shape)
    except ValueError:
        shape = None
    if shape != logits.shape:
        raise ValueError(
            f"{name} shape {tuple(other.shape)} does not broadcast to logits shape "
            f"{tuple(logits.shape)}"
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_unit_interval(name: str, value) -> None:
    """Raises ValueError when a concrete `value` has an element outside [0, 1] (NaN passes).

    Only concrete arrays can be checked: inside `jit` the values are unknown, so asking for
    validation there raises instead of silently checking nothing.
    """
    try:
        host = np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as error:
        raise ValueError(
            f"validate=True needs concrete {name}; call the loss outside jit to validate"
        ) from error
    outside = (host < 0) | (host > 1)
    if np.any(outside):
        bad = host[outside].ravel()[0]
        raise ValueError(f"{name} must lie in [0, 1] when validate=True, got {bad!r}")


def _check_python_scalar_range(name: str, value, low: float, high: float) -> None:
    """Checks a hyperparameter when it is a Python number (traced values cannot be checked)."""
    if isinstance(value, (int, float)) and not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value!r}")


def _compute_dtype(logits: jax.Array):
    """float32 for 16-bit inputs (the loss is computed and returned in float32), else the input's."""
    return jnp.promote_types(logits.dtype, jnp.float32)


def _reduce(per_element: jax.Array, reduction: str) -> jax.Array:
    if reduction == "mean":
        return jnp.mean(per_element)
    if reduction == "sum":
        return jnp.sum(per_element)
    return per_element


# ----------------------------------------------------------------------------- stable pieces


def _times(coefficient: jax.Array, value: jax.Array) -> jax.Array:
    """coefficient * value, but exactly 0 when the coefficient is 0 (even if value is ±inf).

    A zero coefficient means "this term is absent" (a hard label, a zero weight), so its product
    with an infinite term must be 0, not the NaN of IEEE 0 * inf.
    """
    return jnp.where(coefficient == 0, jnp.zeros_like(value), coefficient * value)


def _one_plus(e: jax.Array) -> tuple[jax.Array, jax.Array]:
    """1 + e for 0 <= e <= 1 as an unevaluated sum head + tail, exact (Fast2Sum; Dekker 1971).

    fl(1 + e) drops the low bits of e; the tail e - (head - 1) recovers them exactly because
    head - 1 is exact (Sterbenz) and |e| <= 1 (see `_float_pairs.fast_two_sum`, which also keeps
    XLA from rewriting (1 + e) - 1 as e).
    """
    return pairs.fast_two_sum(1, e)


def stable_sigmoid(x: jax.Array) -> jax.Array:
    r"""sigmoid(x) = 1 / (1 + e^{-x}), accurate to about 1 ULP over the whole float range.

    With e = exp(-|x|) in (0, 1] (never overflows): sigmoid(|x|) = 1/(1+e) and
    sigmoid(-|x|) = e/(1+e). XLA's `logistic` computes 1/(1+exp(-x)), whose exp overflows for
    x < -88.7 and returns 0 where the true value is still positive. The denominator is used as
    the exact pair head + tail (see `_one_plus`), so its rounding adds no error:
    1/(head + tail) = (1/head)(1 - tail/head) to first order, tail/head < 2**-24.

    Args:
      x: floating-point array.

    Returns:
      sigmoid(x), same shape and dtype; exactly 0 at -inf and 1 at +inf.
    """
    e = jnp.exp(-jnp.abs(x))  # in (0, 1]: no overflow for any x
    head, tail = _one_plus(e)
    correction = 1 - tail / head  # the denominator's rounding, undone to first order
    return jnp.where(x >= 0, correction / head, (e / head) * correction)


def _log1p_small(e: jax.Array) -> jax.Array:
    """log(1 + e) for 0 <= e <= 1, about 1 ULP (XLA's CPU log1p is off by up to 2.3 ULP here).

    log(head + tail) = log(head) + tail/head to first order, with head + tail = 1 + e exactly;
    XLA's log is within ~1 ULP on [1, 2], and tail/head < 2**-24 needs no more precision.
    """
    head, tail = _one_plus(e)
    return jnp.log(head) + tail / head


def _log1p_exp_neg_abs(x: jax.Array) -> jax.Array:
    """log(1 + exp(-|x|)), the bounded part of softplus; in (0, log 2] and never overflows."""
    return _log1p_small(jnp.exp(-jnp.abs(x)))


# Beyond |x| = 80, exp(-|x|) < 1.9e-35 is near or below FLT_MIN, where XLA flushes subnormal
# results to zero; yet a tiny soft label z ~ 1e-37 puts it next to terms of the same size. There
# the sums are formed scaled by 2**64 (exact: a power of two) and scaled back once.
_FAR = 80.0
_SCALE, _UNSCALE = 2.0**64, 2.0**-64


def _exp_neg_abs_scaled(x: jax.Array) -> jax.Array:
    """exp(-|x|) * 2**64 without an intermediate underflow, for |x| >= _FAR.

    Computed as (exp(-|x|/2) * 2**32)**2: halving and the powers of two are exact, and
    exp(-|x|/2) stays a normal float32 up to |x| ~ 174, beyond which the unscaled result is below
    the subnormal range anyway.
    """
    # The barrier stops XLA from rewriting exp(a) * exp(a) as exp(2a), which underflows again.
    half = lax.optimization_barrier(jnp.exp(-0.5 * jnp.abs(x)) * 2.0**32)
    return half * half


def _bce_gradient(x: jax.Array, z: jax.Array) -> jax.Array:
    """sigmoid(x) - z, formed without cancellation where the result is small.

    For x >= 0, sigmoid(x) - z = (1 - z) - sigmoid(-x): with hard label z = 1 this is
    -sigmoid(-x) exactly, which keeps full relative accuracy where sigmoid(x) rounds to 1.
    For x < 0 the direct form is used, and sigmoid(x) itself is accurate there; for x < -_FAR,
    sigmoid(x) = exp(x) to float precision and the difference is formed scaled (see _FAR).
    """
    far = (_exp_neg_abs_scaled(x) - z * _SCALE) * _UNSCALE
    near = jnp.where(x >= 0, (1 - z) - stable_sigmoid(-x), stable_sigmoid(x) - z)
    return jnp.where(x < -_FAR, far, near)


def _bce_value(x: jax.Array, z: jax.Array) -> jax.Array:
    r"""z*softplus(-x) + (1-z)*softplus(x) as a sum of non-negative terms.

    softplus(±x) = max(±x, 0) + log1p(exp(-|x|)), so with w = 1 - z for x > 0 and w = z for
    x <= 0 the loss is w*|x| + log1p(exp(-|x|)). Every term is >= 0, so nothing cancels (the
    usual max(x, 0) - x*z cancels for soft labels), and a zero w makes its term exactly 0 even
    at |x| = inf (loss(+inf, 1) = 0, where max(x, 0) - x*z gives inf - inf = NaN).
    """
    w = jnp.where(x > 0, 1 - z, z)
    linear = _times(w, jnp.abs(x))
    near = linear + _log1p_exp_neg_abs(x)
    # For |x| > _FAR, log1p(exp(-|x|)) = exp(-|x|) in float32 but it is subnormal or nearly so;
    # when the linear term is tiny too (a label ~1e-37), add the two scaled by 2**64 (see _FAR).
    # The linear term is then < 2**-40, so its scaled value cannot overflow.
    far = (linear * _SCALE + _exp_neg_abs_scaled(x)) * _UNSCALE
    return jnp.where((jnp.abs(x) > _FAR) & (linear < 2.0**-40), far, near)


def _clamp_to_finite(x: jax.Array) -> jax.Array:
    """Clamps ±inf to ±max so that a zero tangent multiplied by it stays 0."""
    big = jnp.finfo(x.dtype).max
    return jnp.clip(x, -big, big)


@jax.custom_jvp
def _bce(x: jax.Array, z: jax.Array) -> jax.Array:
    return _bce_value(x, z)


@_bce.defjvp
def _bce_jvp(primals, tangents):
    x, z = primals
    dx, dz = tangents
    value = _bce_value(x, z)
    # d/dx = sigmoid(x) - z (finite for every x); d/dz = -x, whose ±inf is clamped so that a zero
    # label tangent (labels not differentiated) contributes 0 instead of inf * 0 = NaN.
    return value, _bce_gradient(x, z) * dx - _clamp_to_finite(x) * dz


def _weighted_bce_value(x: jax.Array, z: jax.Array, pos_weight: jax.Array) -> jax.Array:
    r"""pos_weight*z*softplus(-x) + (1-z)*softplus(x), each term >= 0 and 0*inf-free."""
    w = jnp.where(x > 0, 1 - z, pos_weight * z)
    log_weight = (1 - z) + pos_weight * z  # coefficient of log1p(exp(-|x|)) in both softplus terms
    linear = _times(w, jnp.abs(x))
    near = linear + _times(log_weight, _log1p_exp_neg_abs(x))
    # pos_weight > 1 lifts a subnormal exp(-|x|) back into the normal range: scaled sum (see _FAR)
    far = (linear * _SCALE + _times(log_weight, _exp_neg_abs_scaled(x))) * _UNSCALE
    return jnp.where((jnp.abs(x) > _FAR) & (linear < 2.0**-40), far, near)


@jax.custom_jvp
def _weighted_bce(x: jax.Array, z: jax.Array, pos_weight: jax.Array) -> jax.Array:
    return _weighted_bce_value(x, z, pos_weight)


@_weighted_bce.defjvp
def _weighted_bce_jvp(primals, tangents):
    x, z, pos_weight = primals
    dx, dz, dpw = tangents
    value = _weighted_bce_value(x, z, pos_weight)
    sig_pos, sig_neg = stable_sigmoid(x), stable_sigmoid(-x)
    # d/dx = (1-z)*sigmoid(x) - pos_weight*z*sigmoid(-x): sigmoid(-x) = 1 - sigmoid(x) exactly,
    # so the hard-label cases need no subtraction at all.
    d_x = (1 - z) * sig_pos - pos_weight * z * sig_neg
    # Beyond _FAR the smaller sigmoid is exp(-|x|) to float precision, possibly subnormal, and
    # pos_weight can lift the product back into the normal range: form it scaled (see _FAR).
    scaled_small = _exp_neg_abs_scaled(x)
    scaled_pos = jnp.where(x < 0, scaled_small, sig_pos * _SCALE)
    scaled_neg = jnp.where(x > 0, scaled_small, sig_neg * _SCALE)
    d_x_far = ((1 - z) * scaled_pos - pos_weight * z * scaled_neg) * _UNSCALE
    d_x = jnp.where(jnp.abs(x) > _FAR, d_x_far, d_x)
    softplus_pos = _clamp_to_finite(jnp.maximum(x, 0) + _log1p_exp_neg_abs(x))
    softplus_neg = _clamp_to_finite(jnp.maximum(-x, 0) + _log1p_exp_neg_abs(x))
    # d/dz = pos_weight*softplus(-x) - softplus(x); d/dpos_weight = z*softplus(-x). Infinite
    # softplus values are clamped so zero tangents stay zero (see _bce_jvp).
    d_z = pos_weight * softplus_neg - softplus_pos
    return value, d_x * dx + d_z * dz + z * softplus_neg * dpw


# ----------------------------------------------------------------------------- public losses


def sigmoid_binary_cross_entropy(
    logits,
    labels,
    *,
    label_smoothing: float = 0.0,
    pos_weight=None,
    weights=None,
    reduction: str = "none",
    validate: bool = False,
) -> jax.Array:
    r"""Binary cross-entropy on logits, stable and accurate for every float input.

    For a logit x and a (possibly soft) label z in [0, 1]:

    .. math::
        \ell(x, z) = -z \log\sigma(x) - (1-z)\log(1-\sigma(x))
                   = z\,\mathrm{softplus}(-x) + (1-z)\,\mathrm{softplus}(x)
                   = w|x| + \log(1 + e^{-|x|}),\quad w = 1-z \ (x>0),\ w = z \ (x \le 0).

    The last form is a sum of non-negative terms: no cancellation, no overflow, and the right
    limits at ±inf (loss(+inf, 1) = loss(-inf, 0) = 0, loss(+inf, 0) = +inf; optax gives NaN
    for the first two). The gradient w.r.t. the logits is sigma(x) - z, computed in a form that
    does not cancel for hard labels and is finite for every input including ±inf.

    With `pos_weight` p (TensorFlow's `weighted_cross_entropy_with_logits`, PyTorch's
    `BCEWithLogitsLoss(pos_weight=...)`) the positive term is scaled:
    :math:`p z\,\mathrm{softplus}(-x) + (1-z)\,\mathrm{softplus}(x)`.

    Args:
      logits: floating-point array (bfloat16/float16 are computed in float32).
      labels: array of the logits' exact shape (no broadcasting), values in [0, 1].
      label_smoothing: s in [0, 1]; labels become z*(1-s) + s/2.
      pos_weight: optional weight of the positive term, broadcastable to the logits' shape
        (e.g. one per class).
      weights: optional per-element weights broadcastable to the logits' shape; an element
        with weight 0 contributes exactly 0, even where its loss is infinite.
      reduction: "none" (per-element, the default), "mean" or "sum".
      validate: check that concrete labels lie in [0, 1] (raises ValueError otherwise).

    Returns:
      The per-element loss with the logits' shape (float32 for 16-bit logits), or its mean or
      sum over all elements.

    Raises:
      TypeError: logits (or weights, pos_weight) are not floating point.
      ValueError: shapes differ, labels outside [0, 1] with `validate`, an unknown reduction,
        or label_smoothing outside [0, 1].

    References:
      TensorFlow `tf.nn.sigmoid_cross_entropy_with_logits` (the max(x,0) - x z + log1p(e^{-|x|})
      form this refines); Szegedy et al., "Rethinking the Inception Architecture", CVPR 2016
      (label smoothing).
    """
    logits = _check_float("logits", logits)
    labels = jnp.asarray(labels)
    _check_same_shape(logits, "labels", labels)
    _check_reduction(reduction)
    _check_python_scalar_range("label_smoothing", label_smoothing, 0.0, 1.0)
    if validate:
        _check_unit_interval("labels", labels)
    dtype = _compute_dtype(logits)
    x = logits.astype(dtype)
    z = labels.astype(dtype)
    if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
        z = z * (1 - label_smoothing) + 0.5 * label_smoothing
    if pos_weight is None:
        loss = _bce(x, z)
    else:
        pos_weight = _check_float("pos_weight", pos_weight)
        _check_broadcastable(logits, "pos_weight", pos_weight)
        loss = _weighted_bce(x, z, jnp.broadcast_to(pos_weight.astype(dtype), x.shape))
    if weights is not None:
        weights = _check_float("weights", weights)
        _check_broadcastable(logits, "weights", weights)
        loss = _times(weights.astype(dtype), loss)
    return _reduce(loss, reduction)


def binary_cross_entropy_from_probabilities(probs, labels, eps=None) -> jax.Array:
    r"""Binary cross-entropy on probabilities (Keras' sigmoid layer + binary_crossentropy), clipped.

    .. math::
        \ell(p, z) = -z\log(\hat p) - (1-z)\log(1-\hat p),\quad \hat p = \mathrm{clip}(p, \epsilon, 1-\epsilon)

    The clipping keeps the value finite (log(0) never happens), but it is a patch: inside the
    clipped bands p < eps and p > 1 - eps the gradient is exactly zero, so a confidently wrong
    prediction stops learning; and sigmoid(x) has already rounded to 0 or 1 for |x| > ~17 in
    float32, so the information is lost before this function sees it. The fix is to keep the
    logits and call `sigmoid_binary_cross_entropy`.

    Args:
      probs: floating-point probabilities.
      labels: array of the same shape, values in [0, 1].
      eps: clipping width; default the machine epsilon of probs' dtype (1.19e-7 for float32,
        9.8e-4 for float16, 7.8e-3 for bfloat16), so that 1 - eps is representable in it.

    Returns:
      Per-element loss, float32 for 16-bit inputs.

    References:
      Keras `keras.losses.binary_crossentropy` (from_logits=False).
    """
    probs = _check_float("probs", probs)
    labels = jnp.asarray(labels)
    _check_same_shape(probs, "labels", labels)
    if eps is None:
        eps = float(jnp.finfo(probs.dtype).eps)  # the smallest band with 1 - eps < 1 in probs' dtype
    _check_python_scalar_range("eps", eps, 0.0, 0.5)
    dtype = _compute_dtype(probs)
    z = labels.astype(dtype)
    p = jnp.clip(probs.astype(dtype), eps, 1 - eps)
    # log1p(-p) is exact-rounded where 1 - p would lose the low bits of a small p.
    return -(_times(z, jnp.log(p)) + _times(1 - z, jnp.log1p(-p)))


# ----------------------------------------------------------------------------- focal loss

# The focal loss multiplies alpha_t, (1 - p_t)**gamma and the BCE. In float32 each factor is off by
# about an ULP (the square of the sigmoid by two), ~7 ULP in all; formed as float32 pairs
# (nanlab._float_pairs, 2**-30 relative or better) and rounded once, the loss is within an ULP.

# Where 1 - p_t and the BCE are sums of terms near FLT_MIN (a label z < 2**-45 with x < -40, or a
# hard label on its own side beyond |x| = 40), they are formed scaled by 2**64 (exact) so that no
# term or pair tail is flushed to zero. Beyond |x| = 40, exp(-|x|) < 2**-57, so there
# log1p(exp(-|x|)) = exp(-|x|) and 1 + exp(-|x|) = 1 to the pairs' precision.
_FOCAL_SCALED_FROM = 40.0
_FOCAL_SHIFT = 64


def _is_small_integer(gamma) -> bool:
    """True for the exponents that pair products raise exactly: Python integers 0, 1, ..., 16."""
    return isinstance(gamma, (int, float)) and float(gamma).is_integer() and 0 <= gamma <= 16


def _as_pair(value, dtype) -> Pair:
    """A coefficient as a pair of 0-d `dtype` arrays; a Python number keeps its double's bits.
    (float64 computes with the head alone: see `_focal_direct`.)"""
    if dtype != jnp.float32:
        return jnp.asarray(value, dtype), jnp.zeros((), dtype)
    if isinstance(value, (int, float)):
        high, low = pairs.constant(value)
        return jnp.asarray(high), jnp.asarray(low)
    return pairs.split(jnp.asarray(value, dtype))


def _alpha_coefficients(alpha, dtype) -> tuple[Pair, Pair]:
    """(1 - alpha, 2 alpha - 1) as pairs: alpha_t = alpha z + (1 - alpha)(1 - z) is their
    (1 - alpha) + (2 alpha - 1) z, exact for a hard label even where alpha is not a float32 number
    (0.3); alpha=None weighs both classes 1."""
    if alpha is None:
        return _as_pair(1.0, dtype), _as_pair(0.0, dtype)
    return _as_pair(1 - alpha, dtype), _as_pair(2 * alpha - 1, dtype)


class _FocalTerms(NamedTuple):
    """The focal loss's pieces as pairs, with t = |x| and e = exp(-t): 1 - p_t = (u + v e)/(1 + e)
    and BCE = u t + log1p(e), where u = 1 - z, v = z for x >= 0 and u = z, v = 1 - z for x < 0."""

    shift: jax.Array  # int32, 0 or _FOCAL_SHIFT: u, e, bce and numerator are scaled by 2**shift
    u: Pair  # the weight of sigmoid(|x|) in 1 - p_t
    v: Pair  # the weight of sigmoid(-|x|) (u + v = 1), not scaled
    e: Pair  # exp(-|x|)
    d: Pair  # 1 + exp(-|x|), not scaled
    bce: Pair  # u |x| + log1p(exp(-|x|))
    numerator: Pair  # u + v exp(-|x|) = (1 - p_t)(1 + exp(-|x|))


def _powers_of_two(condition: jax.Array, exponent: int) -> tuple[jax.Array, jax.Array]:
    """(2**exponent, 2**-exponent) as float32 where `condition` holds, (1, 1) elsewhere."""
    return (
        jnp.where(condition, np.float32(2.0**exponent), np.float32(1)),
        jnp.where(condition, np.float32(2.0**-exponent), np.float32(1)),
    )


def _focal_terms(x: jax.Array, z: jax.Array) -> _FocalTerms:
    t = jnp.minimum(jnp.abs(x), jnp.finfo(x.dtype).max)  # ±inf: the caller sets the limits
    one_minus_z = pairs.from_sum(*pairs.two_sum(1, -z))  # 1 - z itself rounds for z < 1/2
    v = pairs.where(x >= 0, pairs.split(z), one_minus_z)
    # scaled only where u t < 2**-40, so u 2**64 t < 2**24 cannot overflow
    scaled = (jnp.abs(x) > _FOCAL_SCALED_FROM) & (jnp.where(x >= 0, one_minus_z[0], z) * t < 2.0**-40)
    up, down = _powers_of_two(scaled, _FOCAL_SHIFT)
    # z is scaled before it is split: the tail of a label near FLT_MIN would be subnormal
    u = pairs.where(x >= 0, pairs.times(one_minus_z, up), pairs.split(z * up))
    e = pairs.exp_neg(t, jnp.where(scaled, _FOCAL_SHIFT, 0))
    e_plain = pairs.times(e, down)
    d_head, d_tail = pairs.fast_two_sum(1, e_plain[0])
    log_term = pairs.where(scaled, e, pairs.log1p(e_plain))
    # u t as an exact product. A tiny u (a label z ~ 1e-38) would lose its low half to the
    # subnormal flush in the split, so for t >= 2**64 the factors trade 2**64 (same product).
    trade_up, trade_down = _powers_of_two(t >= 2.0**64, 64)
    linear = pairs.mul_float(pairs.times(u, trade_up), t * trade_down)
    return _FocalTerms(
        shift=jnp.where(scaled, _FOCAL_SHIFT, 0),
        u=u,
        v=v,
        e=e,
        d=pairs.from_sum(d_head, d_tail + e_plain[1]),
        bce=pairs.add(linear, log_term),
        numerator=pairs.add(u, pairs.mul(v, e)),
    )


def _modulator(miss: Pair, shift: jax.Array, gamma) -> tuple[Pair, jax.Array]:
    """(1 - p_t)**gamma as (mantissa pair, int32 exponent), from `miss` = (1 - p_t) 2**shift.

    Raising the mantissa (in [1/2, 1)) keeps the power from underflowing where the loss does not
    (1 - p_t = 1e-20 against a BCE of 1e30). Integer gamma in [0, 16] is raised by exact pair
    products; any other gamma by float32 pow, within a few ULP.
    """
    mantissa, exponent = pairs.normalized(miss)
    exponent = exponent - shift
    if _is_small_integer(gamma):
        return pairs.power(mantissa, int(gamma)), int(gamma) * exponent
    scaled_exponent = gamma * exponent.astype(jnp.float32)
    whole = jnp.floor(scaled_exponent)
    value = jnp.power(pairs.to_float(mantissa), gamma) * jnp.exp2(scaled_exponent - whole)
    return pairs.split(value), whole.astype(jnp.int32)


def _rounded_product(weight: Pair, factor: Pair, exponent: jax.Array) -> jax.Array:
    """weight * factor * 2**exponent, rounded once to float32. weight = alpha_t m**gamma is at most
    1 and its exponent is split off, so weight * factor underflows only where the result does."""
    return pairs.times_power_of_two(pairs.to_float(pairs.mul(weight, factor)), exponent)


def _focal_float32(x, z, alpha_neg: Pair, alpha_step: Pair, gamma) -> tuple[jax.Array, jax.Array]:
    r"""(loss, d loss / dx) for float32 x and z, from pairs rounded once.

    With the terms of `_FocalTerms`: loss = alpha_t m**gamma BCE with m = (u + v e)/(1 + e), and
    d loss/dx = sign(x) alpha_t m**gamma K / (1 + e), K = gamma (u - v) (e / (u + v e)) BCE + (u - v e),
    which is alpha_t m**gamma [gamma r BCE + sigmoid(x) - z] with r = d log(1 - p_t)/dx written out:
    no (1 - p_t)**(gamma - 1), which is infinite for 0 < gamma < 1 where p_t -> 1.
    """
    terms = _focal_terms(x, z)
    one = pairs.split(jnp.ones_like(z))
    alpha_t = pairs.add(alpha_neg, pairs.mul_float(alpha_step, z))
    modulator, modulator_exponent = _modulator(pairs.div(terms.numerator, terms.d), terms.shift, gamma)
    weight = pairs.mul(alpha_t, modulator)
    exponent = modulator_exponent - terms.shift
    value = _rounded_product(weight, terms.bce, exponent)
    # x = ±inf: the loss is +inf where the other class has weight (u > 0), 0 on the label's side
    limit = jnp.where((alpha_t[0] > 0) & (terms.u[0] > 0), jnp.full_like(x, jnp.inf), jnp.zeros_like(x))
    value = jnp.where(jnp.isinf(x), limit, value)

    one_minus_two_z = pairs.from_sum(*pairs.two_sum(1, -2 * z))
    u_minus_v = pairs.where(x >= 0, one_minus_two_z, pairs.negative(one_minus_two_z))
    # e / (u + v e) lies in [0, 2]; where u = 0 and e has underflowed, it is its limit 1/v = 1
    defined = terms.numerator[0] > 0
    ratio = pairs.where(defined, pairs.div(terms.e, pairs.where(defined, terms.numerator, one)), one)
    focus = pairs.mul(pairs.mul(pairs.mul(u_minus_v, ratio), terms.bce), _as_pair(float(gamma), x.dtype))
    slope = pairs.add(terms.u, pairs.negative(pairs.mul(terms.v, terms.e)))  # (sigmoid(x) - z)(1 + e)
    gradient = _rounded_product(weight, pairs.div(pairs.add(focus, slope), terms.d), exponent)
    return value, jnp.where(x >= 0, gradient, -gradient)


def _focal_direct(x, z, alpha_t, gamma) -> tuple[jax.Array, jax.Array]:
    """(loss, d loss / dx) by the plain formula, for float64 inputs (pairs are float32): its few
    float64 ULP of error are far below float32's."""
    sig_pos, sig_neg = stable_sigmoid(x), stable_sigmoid(-x)
    # 1 - p_t with 1 - sigmoid(x) = sigmoid(-x) exactly (no cancellation where sigmoid(x) is 1)
    miss = z * sig_neg + (1 - z) * sig_pos
    modulator = lax.integer_pow(miss, int(gamma)) if _is_small_integer(gamma) else jnp.power(miss, gamma)
    ce = _bce_value(x, z)
    # miss**gamma can underflow to 0 while miss > 0: the term is then still inf where ce is
    focused = jnp.where(miss == 0, jnp.zeros_like(ce), jnp.where(jnp.isinf(ce), ce, modulator * ce))
    hard_limit = jnp.where(z > 0.5, -sig_pos, sig_neg)  # d log(miss)/dx where miss underflows to 0
    safe_miss = jnp.where(miss > 0, miss, jnp.ones_like(miss))
    log_slope = jnp.where(miss > 0, sig_pos * sig_neg * (1 - 2 * z) / safe_miss, hard_limit)
    inner = gamma * _times(log_slope, ce) + _bce_gradient(x, z)  # log_slope is 0 wherever ce is inf
    return _times(alpha_t, focused), _times(alpha_t, modulator * inner)


# Compiled once per shape and gamma, also when called eagerly or under an eager jax.grad: the pair
# arithmetic is a few hundred small operations, slow to dispatch one by one.
@functools.partial(jax.jit, static_argnums=(4,))
def _focal_value_and_gradient(x, z, alpha_neg: Pair, alpha_step: Pair, gamma):
    if x.dtype == jnp.float32:
        return _focal_float32(x, z, alpha_neg, alpha_step, gamma)
    return _focal_direct(x, z, alpha_neg[0] + alpha_step[0] * z, gamma)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))  # gamma stays a Python number: exact powers
def _focal(x, z, alpha_neg, alpha_step, gamma):
    return _focal_value_and_gradient(x, z, alpha_neg, alpha_step, gamma)[0]


@_focal.defjvp
def _focal_jvp(gamma, primals, tangents):
    value, gradient = _focal_value_and_gradient(*primals, gamma)
    return value, gradient * tangents[0]  # labels and alpha enter through stop_gradient


def sigmoid_focal_loss(
    logits, labels, *, alpha: float | None = 0.25, gamma: float = 2.0, validate: bool = False
) -> jax.Array:
    r"""Sigmoid focal loss (Lin et al. 2017), finite in value and gradient for every gamma >= 0.

    With p = sigma(x), 1 - p_t = z(1-p) + (1-z)p and alpha_t = alpha z + (1-alpha)(1-z):

    .. math::
        \mathrm{FL}(x, z) = \alpha_t (1 - p_t)^\gamma\, \ell(x, z),

    where l is `sigmoid_binary_cross_entropy`. With e = exp(-|x|), 1 - p_t is formed as
    (u + v e)/(1 + e), u and v the label weights of sigma(|x|) and sigma(-|x|) (no cancellation),
    and the gradient is written as alpha_t (1-p_t)^gamma [gamma r l + sigma(x) - z] with
    r = d log(1-p_t)/dx in [-1, 1]: the naive form's gamma (1-p_t)^(gamma-1) is infinite as
    p -> z for 0 < gamma < 1, this one is not. Labels, alpha and gamma are not differentiated.

    Accuracy (float32, and 16-bit inputs computed in float32): for integer gamma in [0, 16] and
    any alpha, the loss is within 2 ULP of the exact value for hard labels and 3 ULP for soft
    ones, and its gradient within 2 ULP (hard) or 2 ULP of the size of its terms (soft), wherever
    the result is a normal float32 (measured: 0.5 ULP, gradient 1 ULP). Every factor is formed as
    a float32 pair (about 35 bits, no float64; `nanlab._float_pairs`) and rounded once, which
    costs about 3x the time of the plain float32 formula (CPU, jit, gradient of 1e6 elements).
    Other gamma (0.5, 2.5) raise 1 - p_t with float32 pow and are within about 4 ULP. float64
    inputs use the plain formula in float64.

    Args:
      logits: floating-point array (16-bit computed in float32).
      labels: same shape, values in [0, 1].
      alpha: weight of the positive class in [0, 1], or None for no class weighting.
      gamma: focusing exponent >= 0 (0 gives alpha-weighted cross-entropy).
      validate: check that concrete labels lie in [0, 1].

    Returns:
      The per-element loss with the logits' shape.

    References:
      Lin, Goyal, Girshick, He, Dollár, "Focal Loss for Dense Object Detection", ICCV 2017.
    """
    logits = _check_float("logits", logits)
    labels = jnp.asarray(labels)
    _check_same_shape(logits, "labels", labels)
    _check_python_scalar_range("gamma", gamma, 0.0, float("inf"))
    if alpha is not None:
        _check_python_scalar_range("alpha", alpha, 0.0, 1.0)
    if validate:
        _check_unit_interval("labels", labels)
    dtype = _compute_dtype(logits)
    alpha_neg, alpha_step = _alpha_coefficients(alpha, dtype)
    return _focal(
        logits.astype(dtype),
        lax.stop_gradient(labels.astype(dtype)),
        lax.stop_gradient(alpha_neg),
        lax.stop_gradient(alpha_step),
        gamma,
    )


def _log_softmax_with_infs(x: jax.Array, axis: int) -> jax.Array:
    r"""log softmax(x) along `axis`, defined for -inf (masked) and +inf logits.

    * -inf logits have probability 0 (log-probability -inf) and never produce NaN;
    * if a row has +inf logits, they share all the probability equally (the limit of softmax);
    * a row whose logits are all -inf has no probable class: every log-probability is -inf.
    """
    top = jnp.max(x, axis=axis, keepdims=True)
    zeros, minus_inf = jnp.zeros_like(x), jnp.full_like(x, -jnp.inf)
    top_finite = jnp.where(jnp.isfinite(top), top, jnp.zeros_like(top))  # avoids inf - inf when shifting
    shifted = jnp.where(
        jnp.isposinf(top),
        jnp.where(jnp.isposinf(x), zeros, minus_inf),  # +inf entries share the mass equally
        x - top_finite,  # the max-shift keeps exp() <= 1
    )
    log_total = jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))
    return jnp.where(jnp.isneginf(log_total), minus_inf, shifted - log_total)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _softmax_ce(x, z, axis):
    log_p = _log_softmax_with_infs(x, axis)
    return -jnp.sum(_times(z, log_p), axis=axis)


@_softmax_ce.defjvp
def _softmax_ce_jvp(axis, primals, tangents):
    x, z = primals
    dx, _ = tangents  # labels enter through stop_gradient
    log_p = _log_softmax_with_infs(x, axis)
    value = -jnp.sum(_times(z, log_p), axis=axis)
    # d/dx = softmax(x) * sum(z) - z: finite, 0 on masked logits, shared on +inf logits.
    grad = jnp.exp(log_p) * jnp.sum(z, axis=axis, keepdims=True) - z
    return value, jnp.sum(grad * dx, axis=axis)


def softmax_cross_entropy(logits, labels, *, axis: int = -1, validate: bool = False) -> jax.Array:
    r"""Softmax cross-entropy -sum_k z_k log softmax(x)_k with one-hot or soft labels.

    Stable with -inf logits used as masks (a masked class with label 0 contributes exactly 0, not
    0 * -inf = NaN) and with +inf logits (they share the probability; the loss is finite when the
    labels sit on them). The gradient softmax(x) sum(z) - z is finite for every input. Labels are
    not differentiated.

    Args:
      logits: floating-point array (..., K).
      labels: same shape, non-negative; rows usually sum to 1.
      axis: the class axis.
      validate: check that concrete labels lie in [0, 1].

    Returns:
      Per-example loss with the class axis removed.

    References:
      optax `softmax_cross_entropy`; Bridle, "Probabilistic interpretation of feedforward
      classification network outputs", 1990.
    """
    logits = _check_float("logits", logits)
    labels = jnp.asarray(labels)
    _check_same_shape(logits, "labels", labels)
    if validate:
        _check_unit_interval("labels", labels)
    dtype = _compute_dtype(logits)
    return _softmax_ce(logits.astype(dtype), lax.stop_gradient(labels.astype(dtype)), axis)


def softmax_cross_entropy_with_integer_labels(
    logits, labels, *, axis: int = -1, validate: bool = False
) -> jax.Array:
    """Softmax cross-entropy with class indices: -log softmax(x)[label].

    Same stability as `softmax_cross_entropy` (it is that function on one_hot(labels)).

    Args:
      logits: floating-point array (..., K), class axis last by default.
      labels: integer array of the logits' shape without the class axis.
      axis: the class axis.
      validate: check that concrete labels lie in [0, K).

    Returns:
      Per-example loss with the labels' shape.
    """
    logits = _check_float("logits", logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    axis = operator.index(axis) % logits.ndim
    expected = logits.shape[:axis] + logits.shape[axis + 1 :]
    if labels.shape != expected:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must be the logits shape without the class "
            f"axis, {tuple(expected)}"
        )
    num_classes = logits.shape[axis]
    if validate:
        host = np.asarray(labels)
        outside = (host < 0) | (host >= num_classes)
        if np.any(outside):
            raise ValueError(
                f"labels must lie in [0, {num_classes}), got {host[outside].ravel()[0]!r}"
            )
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=_compute_dtype(logits), axis=axis)
    return softmax_cross_entropy(logits, one_hot, axis=axis)


# ----------------------------------------------------------------------------- textbook forms


def naive_sigmoid_binary_cross_entropy(logits, labels) -> jax.Array:
    r"""UNSTABLE textbook form -(z log p + (1-z) log(1-p)), p = sigmoid(x). For reproduction only.

    p rounds to exactly 1 for x > ~17 (and to 0 below ~-88.7), so log(1-p) = -inf and
    (1-z) * -inf is NaN for z = 1, +inf for z < 1; the gradient goes non-finite at the same
    points. Use `sigmoid_binary_cross_entropy` instead.

    Args:
      logits: floating-point array.
      labels: same shape, in [0, 1].

    Returns:
      Per-element loss (with NaN/inf where the form breaks down).
    """
    logits = _check_float("logits", logits)
    labels = jnp.asarray(labels, logits.dtype)
    _check_same_shape(logits, "labels", labels)
    p = jax.nn.sigmoid(logits)
    return -(labels * jnp.log(p) + (1 - labels) * jnp.log(1 - p))


def naive_sigmoid_focal_loss(logits, labels, *, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    r"""UNSTABLE textbook focal loss alpha_t (1-p_t)^gamma CE on p = sigmoid(x). Reproduction only.

    Inherits the naive cross-entropy's NaN, and for 0 < gamma < 1 its gradient
    gamma (1-p_t)^(gamma-1) is infinite where p_t rounds to 1. Use `sigmoid_focal_loss`.

    Args:
      logits: floating-point array.
      labels: same shape, in [0, 1].
      alpha: positive-class weight.
      gamma: focusing exponent.

    Returns:
      Per-element loss.
    """
    logits = _check_float("logits", logits)
    labels = jnp.asarray(labels, logits.dtype)
    _check_same_shape(logits, "labels", labels)
    p = jax.nn.sigmoid(logits)
    ce = naive_sigmoid_binary_cross_entropy(logits, labels)
    p_t = p * labels + (1 - p) * (1 - labels)
    alpha_t = alpha * labels + (1 - alpha) * (1 - labels)
    return alpha_t * (1 - p_t) ** gamma * ce


def by_name(name: str):
    """The per-element loss called `name` (a name of `nanlab.config.LOSSES`, e.g. from --loss)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return globals()[name]
