"""Cause rules: one word for how a non-finite value was born, from the primitive and its operands.

`classify` reads three tables, each keyed by primitive name:

- `PROPAGATION_RULES`: a non-root equation (a non-finite operand came in) that made a new NaN;
  otherwise the event is 'propagated'.
- `ROOT_RULES`: a root (every operand finite) of that primitive.
- `DERIVATIVE_RULES`: a backward root, keyed by the forward primitive whose derivative it computes.

A rule takes the operand summaries and the output's summary (see `summarize`) and returns a word
from `CAUSES`, or None to fall through to the generic rules: any non-finite operand of a root is a
constant ('non-finite-constant'), accumulating primitives overflow, a new NaN is 'invalid-operation',
anything else 'overflow'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# The cause vocabulary: one word per way a non-finite value is born, with the explanation the report prints.
CAUSES: dict[str, str] = {
    "log-of-zero": "log of 0 is -inf (its gradient 1/x is inf there)",
    "log-of-negative": "log of a negative number is NaN",
    "division-by-zero": "x/0 is +-inf and 0/0 is NaN (also rsqrt(0) = 1/sqrt(0))",
    "zero-times-inf": "0 * inf is NaN",
    "inf-minus-inf": "inf - inf (or inf + -inf) is NaN",
    "inf-divided-by-inf": "inf / inf is NaN",
    "overflow": "a finite computation exceeded the dtype's largest value (exp, square, matmul, sum, ...)",
    "sqrt-of-negative": "sqrt (or rsqrt) of a negative number is NaN",
    "sqrt-at-zero": "the gradient of sqrt at 0 is 0.5/sqrt(0) = inf",
    "invalid-power": "pow of a negative base to a non-integer exponent is NaN, 0 to a negative power is inf",
    "domain-error": "a function evaluated outside its domain (acos/asin beyond [-1, 1], atanh beyond (-1, 1), ...)",
    "invalid-operation": "a finite input gave a NaN in a primitive without a more specific rule",
    "non-finite-constant": "a NaN or Inf written into the program as a constant (e.g. a -inf mask), or computed from constants only",
    "nan-input": "an argument of the function already held a NaN",
    "inf-input": "an argument of the function already held an Inf",
    "propagated": "a non-finite input passed through (not where it was created)",
    "none": "no non-finite value",
}

# Forward primitives whose derivative is singular somewhere; preferred when naming the forward
# equation behind a backward event.
_SINGULAR_DERIVATIVE = frozenset({
    "log", "log1p", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow", "div", "exp", "exp2", "expm1",
    "logistic", "tanh", "atan2", "acos", "asin", "atanh", "acosh", "lgamma", "digamma", "erf_inv",
    "custom_jvp_call", "custom_vjp_call", "max", "min", "abs", "sign",
})

# Primitives that only multiply and add their operands: from finite operands, non-finite means overflow.
_ACCUMULATING = frozenset({"mul", "add", "add_any", "sub", "neg", "reduce_sum", "cumsum", "dot_general",
                           "conv_general_dilated"})

Summary = dict[str, Any]
Rule = Callable[[Sequence[Summary], Summary], "str | None"]


def _any_inf(s: Summary) -> bool:
    return s["posinf"] + s["neginf"] > 0


def _has_negative(s: Summary) -> bool:
    return s["min"] is not None and s["min"] < 0


def _first(inputs: Sequence[Summary], output: Summary) -> Summary:
    return inputs[0] if inputs else output


def _always(cause: str) -> Rule:
    return lambda inputs, output: cause


def _register(table: dict[str, Rule], names: Sequence[str], rule: Rule) -> None:
    for name in names:
        if name in table:
            raise ValueError(f"two cause rules for {name!r}")
        table[name] = rule


# -- a non-root equation that made a new NaN from non-finite operands --------------------------------

def _div_propagation(inputs: Sequence[Summary], output: Summary) -> str | None:
    if len(inputs) != 2:
        return None
    if _any_inf(inputs[0]) and _any_inf(inputs[1]):
        return "inf-divided-by-inf"
    return "division-by-zero" if inputs[1]["zeros"] else None


PROPAGATION_RULES: dict[str, Rule] = {}
_register(PROPAGATION_RULES, ("sub", "add", "add_any", "reduce_sum", "cumsum"), _always("inf-minus-inf"))
_register(PROPAGATION_RULES, ("mul", "dot_general", "conv_general_dilated", "reduce_prod"),
          _always("zero-times-inf"))
_register(PROPAGATION_RULES, ("div",), _div_propagation)


# -- a root: every operand finite -----------------------------------------------------------------------

def _log(inputs: Sequence[Summary], output: Summary) -> str:
    return "log-of-negative" if _has_negative(_first(inputs, output)) and output["nan"] else "log-of-zero"


def _divide(inputs: Sequence[Summary], output: Summary) -> str | None:
    if len(inputs) != 2:
        return None
    return "division-by-zero" if inputs[1]["zeros"] else "overflow"


ROOT_RULES: dict[str, Rule] = {}
# Products and sums of finite operands can only leave the finite range by overflowing, whichever
# forward function's derivative they belong to (huge activations times an rsqrt's derivative, or
# summed in a BatchNorm's backward pass, is still an overflow); a NaN from them comes from partial
# sums that overflowed to +inf and -inf inside the accumulation. Checked before the derivative rules.
_register(ROOT_RULES, sorted(_ACCUMULATING), _always("overflow"))
_register(ROOT_RULES, ("log",), _log)
_register(ROOT_RULES, ("log1p",), lambda inputs, output: "log-of-negative" if output["nan"] else "log-of-zero")
_register(ROOT_RULES, ("sqrt", "cbrt"), _always("sqrt-of-negative"))
_register(ROOT_RULES, ("rsqrt",),
          lambda inputs, output: "sqrt-of-negative" if output["nan"] else "division-by-zero")
_register(ROOT_RULES, ("div", "rem"), _divide)
_register(ROOT_RULES, ("pow",), _always("invalid-power"))
_register(ROOT_RULES, ("integer_pow",),
          lambda inputs, output: "division-by-zero" if _first(inputs, output)["zeros"] else "overflow")
_register(ROOT_RULES, ("acos", "asin", "atanh", "acosh", "lgamma", "digamma", "erf_inv", "igamma"),
          _always("domain-error"))


# -- a backward root, named after the forward function whose derivative it computes --------------------

def _at_zero(cause: str) -> Rule:
    return lambda inputs, output: cause if any(s["zeros"] for s in inputs) else None


DERIVATIVE_RULES: dict[str, Rule] = {}
_register(DERIVATIVE_RULES, ("sqrt", "rsqrt", "cbrt"), _at_zero("sqrt-at-zero"))
_register(DERIVATIVE_RULES, ("log", "log1p"), _at_zero("log-of-zero"))
_register(DERIVATIVE_RULES, ("pow",), _always("invalid-power"))


def classify(primitive: str, inputs: Sequence[dict[str, Any]], output: dict[str, Any], *, root: bool,
             forward_primitive: str = "") -> str:
    """Name the cause of one non-finite output from the primitive and its operand summaries.

    Args:
      primitive: JAX primitive name of the equation.
      inputs: summaries (see `summarize`) of its operands.
      output: summary of the non-finite output.
      root: True when no operand carried a non-finite value from earlier equations or arguments.
      forward_primitive: for backward events, the forward primitive whose derivative this is.

    Returns:
      A word from `CAUSES`.
    """
    if not root:
        made_nan = output["nan"] > 0 and not any(s["nan"] for s in inputs)
        rule = PROPAGATION_RULES.get(primitive)
        return (rule(inputs, output) if made_nan and rule else None) or "propagated"
    if any(s["nan"] or _any_inf(s) for s in inputs):
        return "non-finite-constant"
    if primitive in _ACCUMULATING:
        return ROOT_RULES[primitive](inputs, output)
    derivative = DERIVATIVE_RULES.get(forward_primitive)
    cause = derivative(inputs, output) if derivative else None
    if cause is None:
        rule = ROOT_RULES.get(primitive)
        cause = rule(inputs, output) if rule else None
    if cause is not None:
        return cause
    if output["nan"] and not _any_inf(output):
        return "invalid-operation"
    return "overflow"
