"""Float32 pairs: a value carried as an unevaluated sum head + tail of two float32 numbers.

nanlab uses pairs where a float32 formula multiplies several rounded factors, each off by up to an
ULP, and the errors add up (the focal loss's alpha_t (1 - p_t)**gamma BCE): every factor is formed
as a pair and the result is rounded once. There is no float64 anywhere (TPUs have none).

The head keeps at most 12 significant bits and the tail is below 2**-11 of it, so a pair carries
about 35 bits (the tail's rounding, 2**-35 of the value). Keeping the head short is Dekker's split
(1971) done once per result instead of inside every product: the product of two heads then fits
in float32's 24 bits and is exact, so a pair product is a handful of float32 operations.

Two compiler rewrites would silently break the exact steps; both are guarded:

* XLA's algebraic simplifier reassociates sums with constants and rewrites (1 + e) - 1 as e, which
  makes an error term 0. The rounded sum of each error-free sum goes through
  `lax.optimization_barrier`, which XLA drops after simplification (no run-time cost on CPU).
* XLA contracts a*b + c into one fused multiply-add on CPU and GPU, with a*b not rounded. Every
  product that enters an exact step here is itself exact (a product of heads), so a contraction
  gives the same result as the separate operations.

There is no division either (see `_reciprocal`): XLA's fusion keeps divisions out of the one
fused kernel that the rest becomes, which made the focal loss several times slower.

XLA flushes subnormal numbers to zero, so a tail below FLT_MIN is lost: callers keep pairs above
~2**-100 where their precision matters (scaling by powers of two where a value can be smaller).

References:
  Dekker, "A floating-point technique for extending the available precision", Numer. Math. 18, 1971.
  Knuth, The Art of Computer Programming vol. 2, section 4.2.2 (TwoSum).
  Tang, "Table-driven implementation of the exponential function in IEEE floating-point
  arithmetic", ACM TOMS 15(2), 1989 (the argument reduction of `exp_neg`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Pair = tuple[jax.Array, jax.Array]

_HEAD_MASK = np.uint32(0xFFFFF000)  # sign, exponent and the top 11 stored bits: 12 significant bits


def constant(value: float) -> tuple[np.float32, np.float32]:
    """A Python float (a double) as a pair: its 12-bit head, and the rest rounded to float32."""
    high = (np.float32(value).view(np.uint32) & _HEAD_MASK).view(np.float32)
    return high, np.float32(value - float(high))


# ----------------------------------------------------------------------------- exact steps


def _rounded(value: jax.Array) -> jax.Array:
    """`value` as an opaque operand, so that XLA cannot cancel it against its own terms."""
    return lax.optimization_barrier(value)


def two_sum(a, b) -> tuple[jax.Array, jax.Array]:
    """a + b exactly, as the rounded sum and its error, for any a and b (Knuth's TwoSum)."""
    total = _rounded(a + b)
    b_part = total - a
    a_part = total - b_part
    return total, (a - a_part) + (b - b_part)


def fast_two_sum(a, b) -> tuple[jax.Array, jax.Array]:
    """a + b exactly, for |a| >= |b| or a = 0 (Dekker's Fast2Sum): total - a is then exact (Sterbenz)."""
    total = _rounded(a + b)
    return total, b - (total - a)


def head(value: jax.Array) -> jax.Array:
    """value truncated to its top 12 significant bits (a mask on the bit pattern: it cannot round
    up to inf near FLT_MAX, and the compiler cannot rewrite it). value - head(value) is exact."""
    bits = lax.bitcast_convert_type(value, jnp.uint32) & _HEAD_MASK
    return lax.bitcast_convert_type(bits, jnp.float32)


def split(value: jax.Array) -> Pair:
    """A float32 as an exact pair."""
    high = head(value)
    return high, value - high


def from_sum(total: jax.Array, rest: jax.Array) -> Pair:
    """total + rest as a pair, for a rest below ~2**-11 of total: total - head(total) is exact and
    adding rest rounds at 2**-35 of the value."""
    high = head(total)
    return high, (total - high) + rest


def to_float(p: Pair) -> jax.Array:
    """The pair rounded to float32 (once)."""
    return p[0] + p[1]


# ----------------------------------------------------------------------------- arithmetic


def where(condition: jax.Array, p: Pair, q: Pair) -> Pair:
    return jnp.where(condition, p[0], q[0]), jnp.where(condition, p[1], q[1])


def negative(p: Pair) -> Pair:
    return -p[0], -p[1]


def times(p: Pair, power_of_two: jax.Array) -> Pair:
    """p * power_of_two, for a float32 power of two: exact wherever both parts stay normal."""
    return p[0] * power_of_two, p[1] * power_of_two


def add(p: Pair, q: Pair) -> Pair:
    """p + q, to about 2**-34 of |p| + |q|: the heads are summed exactly, the tails rounded."""
    total, error = two_sum(p[0], q[0])
    return from_sum(total, error + (p[1] + q[1]))


def mul(p: Pair, q: Pair) -> Pair:
    """p * q, to about 2**-34 relative: the product of the heads is exact (12 + 12 bits)."""
    cross = p[0] * q[1] + p[1] * q[0] + p[1] * q[1]
    return from_sum(p[0] * q[0], cross)


def mul_float(p: Pair, b: jax.Array) -> Pair:
    """p * b for a float32 b."""
    return mul(p, split(b))


def _reciprocal(x: jax.Array) -> jax.Array:
    """1/x for float32 x > 0, to about 2**-23, with no division.

    XLA keeps a division (an "expensive" operation) that has several users out of the fused
    kernel: it becomes a separate pass over memory, and the operations feeding it are recomputed
    in every kernel that needs them. Multiplications fuse into one kernel. The guess, from the bit
    pattern (the exponent negated, the mantissa linearly), is within 1/16; each of Newton's steps
    g (2 - x g) squares the relative error: 1/16 -> 4e-3 -> 2e-5 -> 2e-10, below float32's rounding.
    """
    bits = np.int32(0x7EF00000) - lax.bitcast_convert_type(x, jnp.int32)
    guess = lax.bitcast_convert_type(bits, jnp.float32)
    for _ in range(3):
        guess = guess * (2 - x * guess)
    return guess


def div(p: Pair, q: Pair) -> Pair:
    """p / q for q > 0, to about 2**-34 relative: a 12-bit quotient, then the exact remainder
    divided again."""
    reciprocal = _reciprocal(q[0] + q[1])
    quotient = head((p[0] + p[1]) * reciprocal)
    # quotient * q[0] is exact (12 + 12 bits) and within a factor 2 of p[0]: the difference is exact
    remainder = (p[0] - quotient * q[0]) + (p[1] - quotient * q[1])
    return quotient, remainder * reciprocal


def power(p: Pair, exponent: int) -> Pair:
    """p**exponent for a Python integer >= 0, by binary powering: 2 log2(exponent) products."""
    result = None
    while exponent:
        if exponent & 1:
            result = p if result is None else mul(result, p)
        exponent >>= 1
        if exponent:
            p = mul(p, p)
    if result is None:  # p**0 = 1, also for p = 0
        return jnp.ones_like(p[0]), jnp.zeros_like(p[0])
    return result


# ----------------------------------------------------------------------------- exponents


def _power_of_two(exponent: jax.Array) -> jax.Array:
    """2.0**exponent for int32 exponents in [-126, 127], built from its bit pattern (exact)."""
    return lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)


def times_power_of_two(value: jax.Array, exponent: jax.Array) -> jax.Array:
    """value * 2**exponent, exact whenever the result is a normal float32; exponent is int32.

    2**exponent itself may lie outside float32's range, so it is applied as two powers of two of
    the same sign: the intermediate lies between value and the result, and under- or overflows
    only if the result does. Exponents beyond ±252 are clamped (the result is then 0 or inf).
    """
    exponent = jnp.clip(exponent, -252, 252).astype(jnp.int32)  # int32 also under jax_enable_x64
    first = exponent >> 1  # floor(exponent / 2): both halves in [-126, 126]
    return value * _power_of_two(first) * _power_of_two(exponent - first)


def normalized(p: Pair) -> tuple[Pair, jax.Array]:
    """(m, E) with p = m * 2**E and 1/2 <= |m| < 1 for |p| >= 2**-127 (0 stays 0): a power of such
    mantissas cannot underflow, and the exponents are added as integers. int32 E."""
    biased = (lax.bitcast_convert_type(p[0], jnp.int32) >> 23) & 0xFF
    exponent = jnp.clip(biased - 126, -126, 126)
    return times(p, _power_of_two(-exponent)), exponent


# ----------------------------------------------------------------------------- exp and log1p


def _leading_bits(value: float, bits: int) -> float:
    """value truncated to its leading `bits` significant bits (exact as a float32)."""
    mantissa, exponent = math.frexp(value)
    return math.ldexp(math.floor(mantissa * 2**bits), exponent - bits)


def _table(index: jax.Array, entries) -> Pair:
    """entries[index] for a handful of constant pairs, as selects (on CPU much cheaper than a
    gather, which XLA runs element by element)."""
    heads = [jnp.full(index.shape, high, jnp.float32) for high, _ in entries]
    tails = [jnp.full(index.shape, low, jnp.float32) for _, low in entries]
    return lax.select_n(index, *heads), lax.select_n(index, *tails)


def _horner(x: jax.Array, coefficients) -> jax.Array:
    result = jnp.full_like(x, coefficients[0])
    for coefficient in coefficients[1:]:
        result = result * x + coefficient
    return result


_QUARTER_LN2 = math.log(2) / 4
# ln(2)/4 = C1 + C2 + C3 (Cody and Waite's split): C1 and C2 have 14 bits, so k * C1 and k * C2 are
# exact for the k < 2**10 of y <= 150, and C3 carries the next 24 bits (52 in all).
_LN2_C1 = _leading_bits(_QUARTER_LN2, 14)
_LN2_C2 = _leading_bits(_QUARTER_LN2 - _LN2_C1, 14)
_LN2_C3 = float(np.float32(_QUARTER_LN2 - _LN2_C1 - _LN2_C2))
_EXP2_QUARTERS = tuple(constant(2.0 ** (-j / 4)) for j in range(4))  # 2**(-j/4), j = 0..3
# exp(-r) = 1 - r + r**2/2 + r**3 P(r): the Taylor coefficients of P = -1/6 + r/24 - ..., highest
# first (through r**7: |r| <= ln(2)/8 leaves r**8/8! < 2**-38)
_EXP_TAIL = tuple((-1) ** n / math.factorial(n) for n in range(7, 2, -1))
_EXP_NEG_MAX = 150.0  # exp(-150) * 2**64 < 2**-152: 0 in float32 even when scaled


def exp_neg(y: jax.Array, shift: jax.Array) -> Pair:
    """exp(-y) * 2**shift as a pair, to about 2**-33 relative, for float32 y >= 0 and int32 shift.

    y = (4i + j) ln(2)/4 + r with |r| <= ln(2)/8: exp(-y) = 2**-i 2**(-j/4) exp(-r), with 2**(-j/4)
    a constant pair and exp(-r) a Taylor series whose leading terms are exact. `shift` (0 or 64 in
    nanlab) keeps results near FLT_MIN out of the flushed subnormal range; y beyond 150 is treated
    as 150, where the result is 0 anyway.
    """
    y = jnp.minimum(y, _EXP_NEG_MAX)
    k = jnp.round(y * (1 / _QUARTER_LN2))
    # y - k C1 is exact (Sterbenz: y and k C1 agree within a factor 2), k C2 is exact (14 + 10 bits)
    r, r_error = two_sum(y - k * _LN2_C1, -(k * _LN2_C2))
    r_error = r_error - k * _LN2_C3  # below 2**-21: exp(-r - r_error) = exp(-r)(1 - r_error)
    # exp(-r) = (1 - r) + r_head**2/2 + the rest: the first two exact, the rest below 2**-13
    r_head, r_rest = split(r)
    total, error = fast_two_sum(1, -r)
    total, half_square_error = fast_two_sum(total, 0.5 * (r_head * r_head))
    rest = r_rest * (r_head + 0.5 * r_rest) + r * r * r * _horner(r, _EXP_TAIL)
    exp_r = from_sum(total, (error + half_square_error + rest) - r_error * total)
    k = k.astype(jnp.int32)
    result = mul(_table(k & 3, _EXP2_QUARTERS), exp_r)
    scale = shift - (k >> 2)
    return times_power_of_two(result[0], scale), times_power_of_two(result[1], scale)


_LOG1P_QUARTERS = tuple(constant(math.log1p(j / 4)) for j in range(5))  # log(1 + j/4), j = 0..4
# log1p(v) = v - v**2/2 + v**3 P(v): the coefficients of P = 1/3 - v/4 + ..., highest first (through
# v**12: |v| <= 1/8 leaves v**13/13 < 2**-39 relative to v)
_LOG1P_TAIL = tuple((-1) ** (n + 1) / n for n in range(12, 2, -1))


def log1p(p: Pair) -> Pair:
    """log(1 + p) as a pair for 0 <= p <= 1, to about 2**-30 relative.

    1 + p = (1 + c)(1 + v) with c = j/4 nearest to p, so |v| <= 1/8: log(1 + c) is a constant pair
    and log1p(v) a series whose leading terms v - v**2/2 are exact in the heads. For p < 1/8,
    c = 0 and v = p, so a small p keeps its full relative accuracy.
    """
    j = jnp.round(p[0] * 4)
    c = j * 0.25
    # p[0] - c is exact (Sterbenz); the pair's head may be 0, and the division renormalizes it
    v_head, v_tail = div((p[0] - c, p[1]), (1 + c, jnp.zeros_like(c)))
    # v - v**2/2 = (v_head - v_head**2/2) + v_tail - v_tail (v_head + v_tail/2), the first exact
    head_sum, head_error = fast_two_sum(v_head, -0.5 * (v_head * v_head))
    v = v_head + v_tail
    rest = (head_error + v_tail - v_tail * (v_head + 0.5 * v_tail)) + v * v * v * _horner(v, _LOG1P_TAIL)
    series = from_sum(head_sum, rest)
    return add(_table(j.astype(jnp.int32), _LOG1P_QUARTERS), series)
