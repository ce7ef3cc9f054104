"""Localize the first NaN or Inf of any JAX function, equation by equation.

`localize(fn, *args)` traces `fn` to a jaxpr, then evaluates that jaxpr eagerly, one equation at a
time (each primitive's own `bind`), checking every floating output for NaN and Inf. It descends into
jit, eval_jaxpr (closed_call before jax 0.11.2), custom_jvp, custom_vjp, remat/checkpoint, cond (the
branch taken), scan and while loops (the iteration is named), and shard_map and pmap (the body is
replayed for all shards at once, vmapped over the mesh axes so collectives work, and the event names
the shard: mesh coordinates and device). The JAX internals it reads are all in
`nanlab/trace/_jax.py`, which handles jax 0.10.2 through 0.12.x. When `fn` takes a gradient inside (a train step), the transposed equations of the
backward pass are part of the same jaxpr and are replayed too.

Vocabulary of a `Report` (and of `Report.to_dict()`, JSON; other tools read these keys):

| key            | meaning |
| ---            | --- |
| `found`        | bool: some value was NaN or Inf (after the allow-list) |
| `cause`        | one word from `CAUSES` (below) for the origin; 'none' when nothing was found |
| `origin`       | event: the first equation whose output is non-finite while none of its inputs carried a non-finite value from the arguments or an earlier equation — where the trouble was created. Among several such roots, the first whose non-finite value reaches a non-finite output of `fn` wins; if none reaches an output, the first root. `null` when the trouble came in through the arguments (see `bad_inputs`) |
| `first_nan`    | event: the first equation whose output holds a NaN (often after the origin: log(0) = -inf, then 0 * -inf = NaN) |
| `bad_inputs`   | list of argument paths (`jax.tree_util.keystr` of the positional-argument tuple, e.g. `[1]['x']`) non-finite on entry |
| `events`       | list of events: every root and the first `max_events` non-finite equations, in evaluation order. A NaN or Inf computed from constants only is folded (not an event) unless it reaches an output of `fn`; then the equation that made it is a root with cause 'non-finite-constant' (a `cond` branch or `jit` body returning `jnp.nan` is named by that `cond`/`jit`) |
| `num_events`   | int: all equations with a non-finite output, recorded or not |
| `num_equations`| int: equations evaluated (loop bodies count once per iteration) |
| `seconds`      | float: wall time of the localization |

Each event is a dict with keys: `index` (evaluation order), `primitive` (JAX's name), `module` (the Flax
module path from the name stack, '' at top level), `phase` ('forward': the function's primal
computation; 'backward': exists only for the gradient — transposed equations and the derivative
coefficients computed during linearization, such as 0.5/sqrt(0); 'update': computed after the gradient
from gradient values outside any differentiation, e.g. the optimizer), `source` (user file:line
(function)), `kind` ('nan' or 'inf'), `cause`, `root` (bool: created here), `iterations` (list of
{'loop': 'scan'|'while', 'index': int} from the outermost loop in; a vmapped while loop whose predicate is
batched also has 'lanes': the lanes still running at that iteration, each of which is at that same
iteration, as XLA runs the body while any lane runs and keeps finished lanes' carry), `forward_primitive` and
`forward_source` (for backward events: the forward equation whose derivative produced it, '' when not
found), `inputs` and `outputs` (summaries: shape, dtype, min and max over the finite entries (null when
there are none), nan, posinf, neginf, zeros), and `shard`, present only for events inside a shard_map or
pmap body: {'mesh': {axis: index} of the first shard holding a non-finite value, 'device': its device
id, 'shards': every such shard}; the operand summaries are then that shard's blocks.

The allow-list (`allow=`) takes a glob pattern over module paths (or a list of them), or a predicate
`event -> bool`; an allowed event, and any later event whose non-finite inputs all came from allowed
events, is not reported (intentional -inf attention masks).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from nanlab.trace import _frameworks, _jax, _shards

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
_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (jax, np)
) + tuple(
    os.sep + name + os.sep for name in ("site-packages", "jaxlib", "flax", "optax", "orbax")
)
# Scope names that name-stack machinery pushes and that are not Flax modules.
_NON_MODULE_SCOPES = frozenset({"rematted_computation", "checkpoint", "remat"})


# --------------------------------------------------------------------------------------------- summaries

def summarize(x: Any) -> dict[str, Any]:
    """Summarize an array for a report: shape, dtype, finite min/max and special-value counts.

    Args:
      x: an array (jax or numpy) or a Python scalar.

    Returns:
      dict with keys shape, dtype, min, max (over the finite entries; None when there are none or the
      dtype is not numeric), nan, posinf, neginf, zeros (counts; 0 for non-float dtypes).
    """
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return {"shape": list(x.shape), "dtype": str(dtype), "min": None, "max": None,
                "nan": 0, "posinf": 0, "neginf": 0, "zeros": 0}
    a = np.asarray(x)
    out: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype), "min": None, "max": None,
                           "nan": 0, "posinf": 0, "neginf": 0, "zeros": 0}
    is_float = jnp.issubdtype(a.dtype, jnp.inexact)  # jax's dtype tree knows bfloat16 and fp8
    if a.dtype == bool or not (is_float or np.issubdtype(a.dtype, np.number)):
        return out
    if np.issubdtype(a.dtype, np.complexfloating):
        a = np.abs(a)  # magnitudes: a complex value is non-finite when its modulus is
    if is_float:
        a = a.astype(np.float64)  # numpy has no reductions for bfloat16/fp8; float64 holds them exactly
        finite = np.isfinite(a)
        out["nan"] = int(np.isnan(a).sum())
        out["posinf"] = int(np.isposinf(a).sum())
        out["neginf"] = int(np.isneginf(a).sum())
        vals = a[finite]
    else:
        vals = a.reshape(-1)
    out["zeros"] = int((vals == 0).sum())
    if vals.size:
        out["min"] = float(vals.min())
        out["max"] = float(vals.max())
    return out


def _format_summary(s: dict[str, Any]) -> str:
    shape = "x".join(str(d) for d in s["shape"]) or "scalar"
    text = f"{s['dtype']}[{shape}] min={_fmt(s['min'])} max={_fmt(s['max'])} zeros={s['zeros']}"
    specials = [f"{k}={s[k]}" for k in ("nan", "posinf", "neginf") if s[k]]
    return text + (" " + " ".join(specials) if specials else "")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def _is_float(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return isinstance(x, (float, complex))
    return jax.dtypes.issubdtype(dtype, jnp.inexact)


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
    # One fused reduction per value: only a scalar bool crosses to the host, never the array.
    return jnp.isfinite(x).all()


@jax.jit
def _any_nan(x: jax.Array) -> jax.Array:
    return jnp.isnan(x).any()


def _aval_key(x: Any) -> tuple:
    """Shape, dtype and weak type: what decides whether a compiled segment can be reused."""
    return (np.shape(x), str(getattr(x, "dtype", type(x).__name__)), bool(getattr(x, "weak_type", False)))


def _finite(x: Any) -> bool:
    if not _is_float(x):
        return True
    if isinstance(x, (float, complex, np.ndarray, np.generic)):
        return bool(np.isfinite(x).all())
    if _on_host(x) and x.dtype in _NUMPY_FLOATS:
        # A CPU array is already in host memory: numpy checks it without compiling one more
        # program per shape (a quarter of all compilations in InceptionV3's eager replay).
        return bool(np.isfinite(np.asarray(x)).all())
    return bool(_all_finite(x))


_NUMPY_FLOATS = frozenset(np.dtype(t) for t in (np.float16, np.float32, np.float64, np.complex64, np.complex128))


def _on_host(x: Any) -> bool:
    try:
        return all(d.platform == "cpu" for d in x.devices())
    except (AttributeError, TypeError):  # tracers and other non-committed values
        return False


def _has_nan(x: Any) -> bool:
    if isinstance(x, (float, complex, np.ndarray, np.generic)):
        return bool(np.isnan(x).any())
    return bool(_any_nan(x))


# ---------------------------------------------------------------------------------------------- events

@dataclasses.dataclass
class Event:
    """One equation whose output holds a NaN or an Inf. Fields are documented in the module docstring."""

    index: int
    primitive: str
    module: str
    phase: str
    source: str
    kind: str
    cause: str
    root: bool
    iterations: list[dict[str, Any]]
    forward_primitive: str = ""
    forward_source: str = ""
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    shard: dict[str, Any] | None = None  # inside shard_map/pmap only

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (keys as in the module docstring; 'shard' only inside shard_map)."""
        d = dataclasses.asdict(self)
        if d["shard"] is None:
            del d["shard"]
        return d

    def where(self) -> str:
        """One line: primitive, phase, module, loop iterations and source."""
        loops = "".join(f" {it['loop']} iteration {it['index']}" for it in self.iterations)
        module = self.module or "<top level>"
        if self.shard is not None:
            coords = ", ".join(f"{a}={i}" for a, i in self.shard["mesh"].items())
            loops += f" on shard ({coords}) device {self.shard['device']}"
        text = f"{self.primitive} ({self.phase}) in module '{module}'{loops} at {self.source or '?'}"
        if self.phase == "backward" and self.forward_primitive:
            text += f" — the gradient of {self.forward_primitive}"
            if self.forward_source and self.forward_source != self.source:
                text += f" at {self.forward_source}"
        return text


@dataclasses.dataclass
class Report:
    """What `localize` found. Keys and meaning are documented in the module docstring."""

    found: bool
    cause: str
    origin: Event | None
    first_nan: Event | None
    bad_inputs: list[str]
    events: list[Event]
    num_events: int
    num_equations: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serializable dict (documented keys)."""
        return {
            "found": self.found,
            "cause": self.cause,
            "origin": self.origin.to_dict() if self.origin else None,
            "first_nan": self.first_nan.to_dict() if self.first_nan else None,
            "bad_inputs": list(self.bad_inputs),
            "events": [e.to_dict() for e in self.events],
            "num_events": self.num_events,
            "num_equations": self.num_equations,
            "seconds": self.seconds,
        }

    def __str__(self) -> str:
        if not self.found:
            return (f"nanlab.trace: no NaN or Inf in {self.num_equations} equations "
                    f"({self.seconds:.1f} s)")
        lines = [f"nanlab.trace: non-finite values in {self.num_events} of {self.num_equations} "
                 f"equations ({self.seconds:.1f} s)",
                 f"cause: {self.cause} — {CAUSES.get(self.cause, '')}"]
        if self.bad_inputs:
            lines.append("non-finite on entry: " + ", ".join(self.bad_inputs))
        for title, event in (("origin", self.origin), ("first NaN", self.first_nan)):
            if event is None:
                continue
            if title == "first NaN" and event is self.origin:
                lines.append("first NaN: the origin itself")
                continue
            lines.append(f"{title}: {event.kind} from {event.where()}")
            lines.append(f"  cause: {event.cause}")
            for i, s in enumerate(event.inputs):
                lines.append(f"  input {i}: {_format_summary(s)}")
            for i, s in enumerate(event.outputs):
                lines.append(f"  output {i}: {_format_summary(s)}")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------- causes

# Primitives that only multiply and add their operands: from finite operands, non-finite means overflow.
_ACCUMULATING = frozenset({"mul", "add", "add_any", "sub", "neg", "reduce_sum", "cumsum", "dot_general",
                           "conv_general_dilated"})


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
    made_nan = output["nan"] > 0 and not any(s["nan"] for s in inputs)
    any_inf = lambda s: s["posinf"] + s["neginf"] > 0  # noqa: E731
    if not root:
        if made_nan and primitive in ("sub", "add", "add_any", "reduce_sum", "cumsum"):
            return "inf-minus-inf"
        if made_nan and primitive in ("mul", "dot_general", "conv_general_dilated", "reduce_prod"):
            return "zero-times-inf"
        if made_nan and primitive == "div" and len(inputs) == 2 and any_inf(inputs[0]) and any_inf(inputs[1]):
            return "inf-divided-by-inf"
        if made_nan and primitive == "div" and len(inputs) == 2 and inputs[1]["zeros"]:
            return "division-by-zero"
        return "propagated"
    if any(s["nan"] or any_inf(s) for s in inputs):
        return "non-finite-constant"
    has_negative = lambda s: s["min"] is not None and s["min"] < 0  # noqa: E731
    # Products and sums of finite operands can only leave the finite range by overflowing, whichever
    # forward function's derivative they belong to (huge activations times an rsqrt's derivative,
    # or summed in a BatchNorm's backward pass, is still an overflow); a NaN from them comes from
    # partial sums that overflowed to +inf and -inf inside the accumulation.
    if primitive in _ACCUMULATING:
        return "overflow"
    # A backward root produced by a singular derivative is named after the forward function at fault.
    if forward_primitive in ("sqrt", "rsqrt", "cbrt") and any(s["zeros"] for s in inputs):
        return "sqrt-at-zero"
    if forward_primitive in ("log", "log1p") and any(s["zeros"] for s in inputs):
        return "log-of-zero"
    if forward_primitive == "pow":
        return "invalid-power"
    first = inputs[0] if inputs else output
    if primitive == "log":
        return "log-of-negative" if has_negative(first) and output["nan"] else "log-of-zero"
    if primitive == "log1p":
        return "log-of-negative" if output["nan"] else "log-of-zero"
    if primitive in ("sqrt", "cbrt"):
        return "sqrt-of-negative"
    if primitive == "rsqrt":
        return "sqrt-of-negative" if output["nan"] else "division-by-zero"
    if primitive in ("div", "rem") and len(inputs) == 2:
        return "division-by-zero" if inputs[1]["zeros"] else "overflow"
    if primitive == "pow":
        return "invalid-power"
    if primitive == "integer_pow":
        return "division-by-zero" if first["zeros"] else "overflow"
    if primitive in ("acos", "asin", "atanh", "acosh", "lgamma", "digamma", "erf_inv", "igamma"):
        return "domain-error"
    if output["nan"] and not any_inf(output):
        return "invalid-operation"
    return "overflow"


# --------------------------------------------------------------------------------------- static analysis

_stack_elements = _jax.name_stack_elements


def _transforms(elements: Sequence[Any]) -> set[str]:
    return {e.name for e in elements if _jax.is_transform(e)}


def _module_path(elements: Sequence[Any]) -> str:
    scopes = [e.name for e in elements if _jax.is_scope(e) and e.name not in _NON_MODULE_SCOPES]
    return _frameworks.join_scopes(scopes)


def _user_frames(source_info: Any) -> tuple[tuple[str, int, str], ...]:
    """(file, line, function) of the frames outside jax, numpy and installed libraries, innermost first."""
    return tuple(
        (path, line, function) for path, line, function in _jax.traceback_frames(source_info)
        if not (any(d in path for d in _LIBRARY_DIRS) or path.startswith("<frozen"))
    )


def _format_frame(frame: tuple[str, int, str] | None) -> str:
    if frame is None:
        return ""
    path, line, function = frame
    try:
        path = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        pass
    return f"{path}:{line} ({function})"


def _inner_live(jaxpr: jcore.Jaxpr, out_live: Sequence[bool], in_transpose: bool) -> list[tuple[bool, ...]]:
    """Which outputs of each equation belong to the primal computation ('live').

    A value is primal-live when it reaches a live output of the jaxpr (or is a dead-end forward value,
    such as the unused loss inside `jax.grad`) through equations that are not transposed. Forward
    equations under a `jvp` scope whose outputs are not live exist only for the gradient: they are the
    derivative coefficients of linearization (e.g. 0.5/sqrt(x)).

    Returns:
      Per equation, a tuple of live flags for its outvars (all False for transposed equations).
    """
    live: set[Any] = {v for v, f in zip(jaxpr.outvars, out_live) if f and isinstance(v, jcore.Var)}
    used: set[Any] = set(v for v in jaxpr.outvars if isinstance(v, jcore.Var))
    for eqn in jaxpr.eqns:
        used.update(v for v in eqn.invars if isinstance(v, jcore.Var))
    flags: list[tuple[bool, ...]] = [()] * len(jaxpr.eqns)
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[i]
        if in_transpose or "transpose" in _transforms(_stack_elements(eqn.source_info)):
            flags[i] = (False,) * len(eqn.outvars)
            continue
        dead_end = all(isinstance(v, jcore.DropVar) or v not in used for v in eqn.outvars)
        out_flags = tuple(dead_end or v in live for v in eqn.outvars)
        flags[i] = out_flags
        if any(out_flags):
            live.update(v for v in eqn.invars if isinstance(v, jcore.Var))
    return flags


@functools.lru_cache(maxsize=4096)
def _cached_live(jaxpr_ref: Any, out_live: tuple[bool, ...], in_transpose: bool) -> list[tuple[bool, ...]]:
    return _inner_live(jaxpr_ref(), out_live, in_transpose)


# -------------------------------------------------------------------------------------------- evaluation

@dataclasses.dataclass
class _Value:
    """An evaluated value: `prov` is None when finite, else the ids of the roots it came from."""

    value: Any
    prov: frozenset | None
    grad: bool  # derived from gradient values (for the 'update' phase)
    slot: int | None = None  # while tracing a segment: the value's id in the segment's record list
    const: bool = False  # computed from literals and constants only, not from the arguments
    # For a non-finite constant value: the ids of the constant-only equations that made it (latent
    # roots, reported only when the value reaches an output of the function).
    cprov: frozenset | None = None


@dataclasses.dataclass
class _Context:
    """Where an equation sits: composed name stack, phase of the enclosing call, loop iterations, frames."""

    stack: tuple[Any, ...] = ()
    phase: str = ""  # '' at top level; an enclosing call's phase when it fixes the inner one
    iterations: tuple[tuple[str, int], ...] = ()
    frames: tuple[tuple[str, int, str], ...] = ()
    shard: _Shard | None = None  # inside a shard_map body: values hold one block per shard


@dataclasses.dataclass(frozen=True)
class _Shard:
    """A shard_map body being replayed: every shard at once, blocks stacked in leading mesh dimensions."""

    axes: tuple[str, ...]  # the manual mesh axes, in mesh order (one leading dimension each)
    sizes: tuple[int, ...]
    params: Any  # the shard_map equation's params (for the mesh's devices)

    def stacked(self, value: Any, aval: Any) -> bool:
        return np.ndim(value) == len(getattr(aval, "shape", ())) + len(self.axes)


@dataclasses.dataclass
class _Record:
    """One leaf equation traced inside a compiled segment (what the host needs to replay its flags)."""

    primitive: str
    module: str
    phase: str
    frames: tuple
    in_slots: list[int | None]
    float_slots: list[int]
    n_flags: int  # finite flags this equation adds to the segment's flag vector
    top: int  # index of the segment's top-level equation that holds this one
    const: bool  # all operands are constants: folded, never an event


# After an event that needed operand values, equations keep running eagerly until this many in a
# row record nothing new; then compiled segments resume.
_EAGER_WINDOW = 4


@functools.lru_cache(maxsize=4096)
def _leaf_count(jaxpr_ref: Any) -> int | None:
    """Leaf equations under a jaxpr with calls inlined; None if it holds control flow or unknown calls."""
    total = 0
    for eqn in jaxpr_ref().eqns:
        if eqn.primitive.name in _jax.CONTROL_FLOW:
            return None
        body = _jax.call_body(eqn)
        if body is not None:
            if _returns_constant(*body):
                return None
            inner = _leaf_count(_JaxprKey(body[0]))
            if inner is None:
                return None
            total += inner
        elif any(True for _ in jcore.jaxprs_in_params(eqn.params)):
            return None  # a higher-order primitive we do not descend into: keep it eager
        else:
            total += 1
    return total


def _returns_constant(jaxpr: jcore.Jaxpr, consts: Sequence[Any]) -> bool:
    """True when a body returns a non-finite literal or constant as is: the call is then run eagerly."""
    values = dict(zip(jaxpr.constvars, consts))
    for v in jaxpr.outvars:
        value = v.val if isinstance(v, jcore.Literal) else values.get(v)
        if value is not None and not _finite(value):
            return True
    return False


def _eqn_leaves(eqn: Any) -> int | None:
    if eqn.primitive.name in _jax.CONTROL_FLOW:
        return None
    body = _jax.call_body(eqn)
    if body is not None:
        return None if _returns_constant(*body) else _leaf_count(_JaxprKey(body[0]))
    return None if any(True for _ in jcore.jaxprs_in_params(eqn.params)) else 1


@functools.lru_cache(maxsize=4096)
def _segments(jaxpr_ref: Any, size: int) -> list[tuple[int, int, bool]]:
    """Split a jaxpr's equations into runs: (start, end, jittable), each jittable run <= `size` leaves.

    A call whose body is larger than `size` or holds control flow is its own non-jittable run: the
    interpreter descends into it and segments its body instead.
    """
    eqns = jaxpr_ref().eqns
    runs: list[tuple[int, int, bool]] = []
    start, leaves = 0, 0
    for i, eqn in enumerate(eqns):
        n = _eqn_leaves(eqn) if size > 0 else None
        if n is None or n > size:
            if i > start:
                runs.append((start, i, True))
            runs.append((i, i + 1, False))
            start, leaves = i + 1, 0
            continue
        if leaves + n > size:
            runs.append((start, i, True))
            start, leaves = i, 0
        leaves += n
    if start < len(eqns):
        runs.append((start, len(eqns), True))
    return runs


class _Interpreter:
    """Evaluate a jaxpr equation by equation, recording non-finite events."""

    def __init__(self, allow: Callable[[Event], bool] | None, max_events: int, segment_size: int):
        self.allow = allow
        self.max_events = max_events
        self.segment_size = segment_size
        self.mesh: Any = None  # the mesh of the function's shard_maps, a context outside their bodies
        self.tracing: list[_Record] | None = None  # the records of the segment being traced, if any
        self.slots = 0
        self.current_top = 0
        self.trace_flags: list[Any] = []
        self.segment_cache: dict[tuple, tuple[Callable, list[_Record], list[tuple]]] = {}
        self.counter = 0
        self.events: list[Event] = []
        self.root_events: dict[int, Event] = {}
        self.allowed_roots: set[int] = set()
        self.num_events = 0
        self.first_nan: Event | None = None
        self.const_roots: dict[int, Event] = {}  # latent roots: non-finite values made from constants
        self.forward_index: dict[tuple, list[tuple[str, str]]] = {}

    # -- jaxpr level --------------------------------------------------------------------------------

    def run(self, jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[_Value], ctx: _Context,
            out_live: Sequence[bool]) -> list[_Value]:
        env: dict[Any, _Value] = {}
        for v, c in zip(jaxpr.constvars, consts):
            # Constants carry no provenance: an equation turning a constant -inf into output is a root.
            env[v] = _Value(c, None, False, const=True)
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        in_transpose = "transpose" in _transforms(ctx.stack) or ctx.phase == "backward"
        ref = _JaxprKey(jaxpr)
        live = _cached_live(ref, tuple(bool(f) for f in out_live), in_transpose)
        last_use = self._last_use(jaxpr)
        if self.tracing is not None or ctx.shard is not None:  # inline everything / shards: eager
            self._eager_range(jaxpr, 0, len(jaxpr.eqns), env, ctx, live, {})
            return [self._read(env, v) for v in jaxpr.outvars]
        for start, end, jittable in _segments(_JaxprKey(jaxpr), self.segment_size):
            if jittable:
                self._run_range(jaxpr, start, end, env, ctx, live)
            else:
                self._eager_range(jaxpr, start, end, env, ctx, live, {})
            for i in range(start, end):
                for v in last_use.get(i, ()):
                    env.pop(v, None)  # free values after their last use: keeps eager memory near jit's
        return [self._read(env, v) for v in jaxpr.outvars]

    def _eager_range(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
                     live: list[tuple[bool, ...]], last_use: dict[int, list[Any]]) -> None:
        for i in range(start, end):
            eqn = jaxpr.eqns[i]
            invals = [self._read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, invals, ctx, live[i])
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o

    def _run_range(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
                   live: list[tuple[bool, ...]]) -> None:
        """Compiled segments, split around each equation whose event needs operand values."""
        while start < end:
            k = self._jit_segment(jaxpr, start, end, env, ctx, live)
            if k == end:
                return
            # Flags are deterministic, so the prefix before the event commits; then equations run
            # eagerly while they keep producing recorded events (after a first NaN, the next few
            # equations usually all do), and compiled segments resume for the rest.
            if k > start and self._jit_segment(jaxpr, start, k, env, ctx, live) != k:
                self._eager_range(jaxpr, start, k, env, ctx, live, {})
            quiet = 0
            while k < end and quiet < _EAGER_WINDOW:
                recorded = len(self.events) + len(self.root_events)
                self._eager_range(jaxpr, k, k + 1, env, ctx, live, {})
                quiet = 0 if len(self.events) + len(self.root_events) > recorded else quiet + 1
                k += 1
            start = k

    def _jit_segment(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
                     live: list[tuple[bool, ...]]) -> int:
        """Run eqns[start:end] as one compiled function that also returns every output's finite flags.

        Compiling a few hundred equations at once costs a fraction of compiling each alone (eager
        dispatch compiles one executable per primitive and shape). If the flags show an event that
        needs operand values (a root, or one of the first recorded events), nothing is committed and
        the caller replays the segment eagerly; otherwise provenance is updated from the flags alone.

        Returns:
          `end` when the segment's results were committed to `env`; else the index of the first
          equation whose event needs operand values (nothing committed).
        """
        eqns = jaxpr.eqns[start:end]
        defined = {v for e in eqns for v in e.outvars if not isinstance(v, jcore.DropVar)}
        in_vars: list[Any] = []
        for e in eqns:
            for v in e.invars:
                if isinstance(v, jcore.Var) and v not in defined and v not in in_vars:
                    in_vars.append(v)
        later = {v for e in jaxpr.eqns[end:] for v in e.invars if isinstance(v, jcore.Var)}
        later.update(v for v in jaxpr.outvars if isinstance(v, jcore.Var))
        out_vars = [v for v in defined if v in later]
        in_values = [env[v].value for v in in_vars]
        key = (id(jaxpr), start, end, tuple(live[start:end]), ctx.phase, ctx.frames,
               tuple((type(e).__name__, e.name) for e in ctx.stack),
               tuple((_aval_key(x), env[v].grad, env[v].const) for v, x in zip(in_vars, in_values)))
        cached = self.segment_cache.get(key)
        if cached is None:
            cached = self._compile_segment(jaxpr, start, end, env, ctx, live, in_vars, out_vars)
            self.segment_cache[key] = cached
        compiled, records, out_meta = cached
        outs, flags = compiled(*in_values)
        slot_prov = self._commit(records, np.asarray(flags), [env[v].prov for v in in_vars])
        if isinstance(slot_prov, int):
            return slot_prov
        for v, x, (slot, grad, const) in zip(out_vars, outs, out_meta):
            env[v] = _Value(x, slot_prov.get(slot) if slot is not None else None, grad, const=const)
        return end

    def _compile_segment(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value],
                         ctx: _Context, live: list[tuple[bool, ...]], in_vars: list[Any],
                         out_vars: list[Any]) -> tuple[Callable, list[_Record], list[tuple]]:
        """Trace eqns[start:end] into a jitted function; its records and output metadata come along.

        Cached by the caller, so a loop body's segment compiles once, not once per iteration.
        """
        records: list[_Record] = []
        out_meta: list[tuple[int | None, bool, bool]] = []

        def segment(*values: Any) -> tuple[list[Any], Any]:
            records.clear()
            out_meta.clear()
            self.tracing, self.slots, self.trace_flags = records, len(in_vars), []
            try:
                senv = {v: _Value(x, None, env[v].grad, k, env[v].const)
                        for k, (v, x) in enumerate(zip(in_vars, values))}
                for i in range(start, end):
                    self.current_top = i
                    self._eager_range(jaxpr, i, i + 1, senv, ctx, live, {})
            finally:
                self.tracing = None
            out_meta.extend((senv[v].slot, senv[v].grad, senv[v].const) for v in out_vars)
            flags, self.trace_flags = self.trace_flags, []
            stacked = jnp.stack(flags) if flags else jnp.zeros((0,), bool)
            return [senv[v].value for v in out_vars], stacked

        # Records and out_meta fill when jit traces `segment` (at its first call); a retrace refills
        # them identically.
        return jax.jit(segment), records, out_meta

    def _commit(self, records: list[_Record], flags: np.ndarray,
                in_provs: list[frozenset | None]) -> dict[int, frozenset] | int:
        """Propagate provenance through a compiled segment from its flags.

        Returns:
          slot -> provenance of the non-finite values, or (when an event needs operand values) the
          index of the top-level equation holding that event.
        """
        slot_prov: dict[int, frozenset] = {k: p for k, p in enumerate(in_provs) if p is not None}
        counter, num_events, forward = self.counter, self.num_events, []
        row = 0
        for rec in records:
            counter += 1
            rec_flags = flags[row:row + rec.n_flags]
            row += rec.n_flags
            bad = [slot for slot, finite in zip(rec.float_slots, rec_flags) if not finite]
            if rec.const:
                if bad:
                    return rec.top  # a non-finite constant: its latent root needs the operand values
                continue
            if rec.phase == "forward" and rec.frames:
                forward.append((rec.frames, (rec.primitive, rec.module)))
            if not bad:
                continue
            in_provs_rec = [slot_prov[s] for s in rec.in_slots if s is not None and s in slot_prov]
            if not in_provs_rec:
                return rec.top  # a root: the report needs its operand values
            prov = frozenset().union(*in_provs_rec)
            if not prov <= self.allowed_roots:
                if len(self.events) < self.max_events or self.first_nan is None:
                    return rec.top  # a recorded event: the report needs its operand values
                num_events += 1
            for slot in bad:
                slot_prov[slot] = prov
        self.counter, self.num_events = counter, num_events
        for key, entry in forward:
            self.forward_index.setdefault(key, []).append(entry)
        return slot_prov

    @staticmethod
    def _last_use(jaxpr: jcore.Jaxpr) -> dict[int, list[Any]]:
        last: dict[Any, int] = {}
        for i, eqn in enumerate(jaxpr.eqns):
            for v in eqn.invars:
                if isinstance(v, jcore.Var):
                    last[v] = i
        outs = {v for v in jaxpr.outvars if isinstance(v, jcore.Var)}
        by_eqn: dict[int, list[Any]] = {}
        for v, i in last.items():
            if v not in outs:
                by_eqn.setdefault(i, []).append(v)
        return by_eqn

    @staticmethod
    def _read(env: dict[Any, _Value], v: Any) -> _Value:
        if isinstance(v, jcore.Literal):
            return _Value(v.val, None, False, const=True)
        return env[v]

    # -- equation level -----------------------------------------------------------------------------

    def eqn(self, eqn: Any, invals: list[_Value], ctx: _Context, out_live: tuple[bool, ...]) -> list[_Value]:
        live = any(out_live)
        elements = ctx.stack + _stack_elements(eqn.source_info)
        transforms = _transforms(elements)
        grad_in = any(a.grad for a in invals)
        if ctx.phase in ("backward", "update"):
            phase = ctx.phase
        elif "transpose" in transforms or ("jvp" in transforms and not live):
            phase = "backward"
        elif "jvp" not in transforms and grad_in:
            phase = "update"
        else:
            phase = "forward"
        frames = _user_frames(eqn.source_info) or ctx.frames
        inner = _Context(elements, phase if phase != "forward" else "", ctx.iterations, frames, ctx.shard)
        name = eqn.primitive.name
        params = eqn.params
        if ctx.shard is not None and (name in _jax.CONTROL_FLOW or name == _jax.SHARD_MAP):
            # Per-shard branches and loops: bound whole for all shards (not descended).
            return self._leaf(eqn, invals, ctx, elements, phase, frames, grad_in)
        if name == _jax.SHARD_MAP:
            return self._shard_map(eqn, invals, inner, out_live)
        body = _jax.call_body(eqn)
        if body is not None:
            sub, consts = body
            n = len(sub.invars)
            outs = self.run(sub, consts, invals[len(invals) - n:], inner, list(out_live))
            if self.tracing is not None:  # segments never hold such calls (see _returns_constant)
                return outs
            return self._const_outputs(eqn, invals, outs, ctx, elements, phase, frames)
        if name == _jax.COND:
            index = int(np.asarray(invals[0].value))
            branches = params["branches"]
            index = min(max(index, 0), len(branches) - 1)  # lax.cond clamps the index the same way
            sub, consts = _jax.open_jaxpr(branches[index])
            outs = self.run(sub, consts, invals[1:], inner, list(out_live))
            if self.tracing is not None:  # segments never hold such calls (see _returns_constant)
                return outs
            return self._const_outputs(eqn, invals, outs, ctx, elements, phase, frames)
        if name == _jax.SCAN:
            return self._scan(eqn, invals, inner, out_live)
        if name == _jax.WHILE:
            return self._while(eqn, invals, inner, live)
        if self.tracing is not None:
            return self._trace_leaf(eqn, invals, ctx, elements, phase, frames, grad_in)
        return self._leaf(eqn, invals, ctx, elements, phase, frames, grad_in)

    def _trace_leaf(self, eqn: Any, invals: list[_Value], ctx: _Context, elements: tuple[Any, ...],
                    phase: str, frames: tuple, grad_in: bool) -> list[_Value]:
        """While tracing a segment: bind, and record the output's finite and NaN flags as extra results."""
        outs = _jax.bind(eqn, [a.value for a in invals])
        grad_out = grad_in or phase in ("backward", "update")
        const = all(a.const for a in invals)
        values, n_flags, float_slots = [], 0, []
        for o in outs:
            slot = self.slots
            self.slots += 1
            if _is_float(o):
                # One fused scalar reduction per output: the only data that leaves the device.
                self.trace_flags.append(jnp.isfinite(o).all())
                n_flags += 1
                float_slots.append(slot)
            values.append(_Value(o, None, grad_out, slot, const))
        self.tracing.append(_Record(
            primitive=eqn.primitive.name, module=_module_path(elements), phase=phase, frames=frames,
            in_slots=[a.slot for a in invals], float_slots=float_slots, n_flags=n_flags, top=self.current_top,
            const=const))
        return values

    def _scan(self, eqn: Any, invals: list[_Value], ctx: _Context, out_live: tuple[bool, ...]) -> list[_Value]:
        p = eqn.params
        body, consts = _jax.open_jaxpr(p["jaxpr"])
        n_consts, n_carry = _jax.scan_counts(p)
        length = p["length"]
        const_vals = invals[:n_consts]
        carry = invals[n_consts:n_consts + n_carry]
        xs = invals[n_consts + n_carry:]
        # Carries feed the next iteration, so they are live when any output is; ys map one to one.
        body_live = [any(out_live)] * n_carry + list(out_live[n_carry:])
        ys_steps: list[list[_Value]] = []
        for step in range(length):
            i = length - 1 - step if p["reverse"] else step
            x_i = [_Value(x.value[i], x.prov, x.grad, const=x.const) for x in xs]
            ictx = dataclasses.replace(ctx, iterations=ctx.iterations + (("scan", i),))
            outs = self.run(body, consts, const_vals + carry + x_i, ictx, body_live)
            carry, ys = outs[:n_carry], outs[n_carry:]
            ys_steps.append(ys)
        if p["reverse"]:
            ys_steps.reverse()
        stacked = []
        for k, y_aval in enumerate(eqn.outvars[n_carry:]):
            parts = [s[k] for s in ys_steps]
            if parts:
                value = jnp.stack([jnp.asarray(s.value) for s in parts])
            else:
                value = jnp.zeros(y_aval.aval.shape, y_aval.aval.dtype)
            provs = [s.prov for s in parts if s.prov is not None]
            prov = frozenset().union(*provs) if provs else None
            cprovs = [s.cprov for s in parts if s.cprov is not None]
            stacked.append(_Value(value, prov, any(s.grad for s in parts), const=all(s.const for s in parts),
                                  cprov=frozenset().union(*cprovs) if cprovs else None))
        return list(carry) + stacked

    def _while(self, eqn: Any, invals: list[_Value], ctx: _Context, live: bool) -> list[_Value]:
        p = eqn.params
        cond, cond_consts = _jax.open_jaxpr(p["cond_jaxpr"])
        body, body_consts = _jax.open_jaxpr(p["body_jaxpr"])
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cvals, bvals, carry = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
        i = 0
        while True:
            ictx = dataclasses.replace(ctx, iterations=ctx.iterations + ((("while", i),)))
            (keep_going,) = self.run(cond, cond_consts, cvals + carry, ictx, [live])
            pred = np.asarray(keep_going.value)
            if not pred.any():
                return carry
            if pred.ndim:
                # vmap with a batched predicate: XLA runs the body while any lane is running and keeps
                # the old carry in the finished lanes (the predicate's shape prefixes every carry's).
                lanes = tuple(int(k) for k in np.flatnonzero(pred.reshape(-1)))
                ictx = dataclasses.replace(ctx, iterations=ctx.iterations + (("while", i, lanes),))
                new = self.run(body, body_consts, bvals + carry, ictx, [live] * len(body.outvars))
                carry = [_select_lanes(pred, n, c) for n, c in zip(new, carry)]
            else:
                carry = self.run(body, body_consts, bvals + carry, ictx, [live] * len(body.outvars))
            i += 1

    def _leaf(self, eqn: Any, invals: list[_Value], ctx: _Context, elements: tuple[Any, ...], phase: str,
              frames: tuple, grad_in: bool) -> list[_Value]:
        self.counter += 1
        if ctx.shard is None:
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                outs = _jax.bind(eqn, [a.value for a in invals])
        else:
            stacked = [ctx.shard.stacked(a.value, v.aval) for a, v in zip(invals, eqn.invars)]
            outs = _jax.bind_per_shard(eqn, [a.value for a in invals], stacked, ctx.shard.axes,
                                       ctx.shard.sizes)
        module = _module_path(elements)
        grad_out = grad_in or phase in ("backward", "update")
        if all(a.const for a in invals):
            # Constant folding (e.g. jnp.var's NaN fill value, a broadcast -inf): not an event by
            # itself; an equation mixing it with the arguments' data into a non-finite value is.
            # A non-finite constant is a latent root, reported only if it reaches an output.
            bad = [k for k, o in enumerate(outs) if not _finite(o)]
            cprov = self._const_prov(eqn, invals, outs, bad, ctx, module, phase, frames) if bad else None
            return [_Value(o, None, grad_out, const=True, cprov=cprov if k in bad else None)
                    for k, o in enumerate(outs)]
        if phase == "forward" and frames:
            self.forward_index.setdefault(frames, []).append((eqn.primitive.name, module))
        bad = [k for k, o in enumerate(outs) if not _finite(o)]
        if not bad:
            return [_Value(o, None, grad_out) for o in outs]
        in_provs = [a.prov for a in invals if a.prov is not None]
        root = not in_provs
        if root:
            prov = frozenset({self.counter})
        else:
            prov = frozenset().union(*in_provs)
        allowed = bool(prov) and prov <= self.allowed_roots
        event = None
        if not allowed:
            self.num_events += 1
        need_kind = root or (self.first_nan is None and not allowed)
        detailed = root or (not allowed and len(self.events) < self.max_events)
        if need_kind or detailed:
            event = self._event(eqn, invals, outs, bad, ctx, module, phase, frames, root)
            if root and self.allow is not None and self.allow(event):
                self.allowed_roots.add(self.counter)
                allowed = True
                self.num_events -= 1
        if event is not None and not allowed:
            if root:
                self.root_events[self.counter] = event
            if detailed:
                self.events.append(event)
            if self.first_nan is None and event.kind == "nan":
                self.first_nan = event
        return [_Value(o, prov if k in bad else None, grad_out) for k, o in enumerate(outs)]

    def _const_prov(self, eqn: Any, invals: list[_Value], outs: list[Any], bad: list[int], ctx: _Context,
                    module: str, phase: str, frames: tuple) -> frozenset:
        """Latent roots behind a non-finite value computed from constants only (a new one if none)."""
        earlier = [a.cprov for a in invals if a.cprov is not None]
        if earlier:
            return frozenset().union(*earlier)
        event = self._event(eqn, invals, outs, bad, ctx, module, phase, frames, True)
        event.cause = "non-finite-constant"
        self.const_roots[event.index] = event
        return frozenset({event.index})

    def _const_outputs(self, eqn: Any, invals: list[_Value], outs: list[_Value], ctx: _Context,
                       elements: tuple[Any, ...], phase: str, frames: tuple) -> list[_Value]:
        """A call or cond whose body returns a non-finite literal or constant: that equation made it."""
        bad = [k for k, o in enumerate(outs) if o.const and o.cprov is None and not _finite(o.value)]
        if not bad:
            return outs
        self.counter += 1
        cprov = self._const_prov(eqn, invals, [o.value for o in outs], bad, ctx, _module_path(elements),
                                 phase, frames)
        return [dataclasses.replace(o, cprov=cprov) if k in bad else o for k, o in enumerate(outs)]

    def _shard_map(self, eqn: Any, invals: list[_Value], ctx: _Context, out_live: tuple[bool, ...]) -> list[_Value]:
        """Replay a shard_map (or pmap) body for all shards at once, each shard's block stacked."""
        p = eqn.params
        axes, sizes = _jax.shard_map_axes(p)
        shard = _Shard(axes, sizes, p)
        body, consts = _jax.open_jaxpr(p["jaxpr"])
        blocks = [dataclasses.replace(a, value=_shards.to_shards(a.value, spec, axes, sizes))
                  for a, spec in zip(invals, p["in_specs"])]
        outs = self.run(body, consts, blocks, dataclasses.replace(ctx, shard=shard), list(out_live))
        results = []
        for o, spec, v, g in zip(outs, p["out_specs"], body.outvars, eqn.outvars):
            value = _shards.from_shards(o.value, spec, axes, sizes, g.aval, shard.stacked(o.value, v.aval))
            if getattr(p["mesh"], "devices", None) is not None:
                # Laid out as shard_map lays out its results, for the equations that follow.
                value = jax.device_put(value, jax.sharding.NamedSharding(p["mesh"], spec))
            results.append(dataclasses.replace(o, value=value))
        return results

    def _event(self, eqn: Any, invals: list[_Value], outs: list[Any], bad: list[int], ctx: _Context,
               module: str, phase: str, frames: tuple, root: bool) -> Event:
        shard_info = None
        if ctx.shard is not None:
            # Name the first shard holding a bad value, and summarize that shard's operands.
            sh = ctx.shard
            coords = _first_bad_shard(outs[bad[0]], sh)
            shard_info = {"mesh": dict(zip(sh.axes, coords)),
                          "device": _jax.shard_map_device(sh.params, dict(zip(sh.axes, coords))),
                          "shards": [dict(zip(sh.axes, c)) for c in _bad_shards(outs, bad, sh)]}
            invals = [dataclasses.replace(a, value=np.asarray(a.value)[coords])
                      if sh.stacked(a.value, v.aval) else a for a, v in zip(invals, eqn.invars)]
            outs = [np.asarray(o)[coords] if sh.stacked(o, v.aval) else o for o, v in zip(outs, eqn.outvars)]
        inputs = [summarize(a.value) for a in invals]
        outputs = [summarize(o) for o in outs]
        first_bad = outputs[bad[0]]
        kind = "nan" if any(outputs[k]["nan"] for k in bad) else "inf"
        fwd_prim, fwd_source = ("", "")
        if phase == "backward":
            fwd_prim, fwd_source = self._forward_of(frames, eqn.primitive.name, module)
        cause = classify(eqn.primitive.name, inputs, first_bad, root=root, forward_primitive=fwd_prim)
        return Event(
            index=self.counter, primitive=eqn.primitive.name, module=module, phase=phase,
            source=_format_frame(frames[0] if frames else None), kind=kind, cause=cause, root=root,
            iterations=[_iteration(it) for it in ctx.iterations],
            forward_primitive=fwd_prim, forward_source=fwd_source, inputs=inputs, outputs=outputs,
            shard=shard_info)

    def _forward_of(self, frames: tuple, primitive: str, module: str) -> tuple[str, str]:
        """The forward equation at the same user source whose derivative a backward equation computes."""
        if not frames:
            return "", ""
        candidates = self.forward_index.get(frames, [])
        same_module = [p for p, m in candidates if m == module]
        if not same_module:
            # A custom_vjp backward rule runs at the call site; its forward rule's frames end there.
            for key, prims in self.forward_index.items():
                if len(key) > len(frames) and key[len(key) - len(frames):] == frames:
                    if any(m == module for _, m in prims):
                        return f"custom_vjp rule {key[0][2]}", _format_frame(key[0])
        pool = same_module or [p for p, _ in candidates]
        if not pool:
            return "", ""
        singular = [p for p in pool if p in _SINGULAR_DERIVATIVE]
        if singular:
            return singular[-1], _format_frame(frames[0])
        return (primitive if primitive in pool else pool[-1]), _format_frame(frames[0])


def _bad_shards(outs: Sequence[Any], bad: Sequence[int], shard: _Shard) -> list[tuple[int, ...]]:
    found: list[tuple[int, ...]] = []
    for c in np.ndindex(*shard.sizes):
        if any(not _finite(np.asarray(outs[k])[c]) for k in bad) and c not in found:
            found.append(c)
    return found


def _first_bad_shard(out: Any, shard: _Shard) -> tuple[int, ...]:
    for c in np.ndindex(*shard.sizes):
        if not _finite(np.asarray(out)[c]):
            return c
    return (0,) * len(shard.sizes)


def _iteration(it: tuple) -> dict[str, Any]:
    """A loop iteration for an event: the loop, the index, and (vmapped while) the running lanes."""
    out: dict[str, Any] = {"loop": it[0], "index": it[1]}
    if len(it) > 2:
        out["lanes"] = list(it[2])
    return out


def _select_lanes(pred: np.ndarray, new: _Value, old: _Value) -> _Value:
    """The carry after one step of a while loop with a batched predicate: new where running, else old."""
    mask = jnp.reshape(pred, pred.shape + (1,) * (np.ndim(new.value) - pred.ndim))
    value = jnp.where(mask, new.value, old.value)
    kept = [v for v, in_use in ((new, True), (old, not pred.all())) if in_use]
    prov = [v.prov for v in kept if v.prov is not None]
    cprov = [v.cprov for v in kept if v.cprov is not None]
    finite = _finite(value)
    return _Value(value, frozenset().union(*prov) if prov and not finite else None, new.grad or old.grad,
                  const=new.const and old.const,
                  cprov=frozenset().union(*cprov) if cprov and not finite else None)


class _JaxprKey:
    """Hashable handle to a jaxpr for the analysis caches (equal only to a handle of the same object)."""

    def __init__(self, jaxpr: jcore.Jaxpr):
        self.jaxpr = jaxpr

    def __call__(self) -> jcore.Jaxpr:
        return self.jaxpr

    def __hash__(self) -> int:
        return id(self.jaxpr)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _JaxprKey) and other.jaxpr is self.jaxpr


# ----------------------------------------------------------------------------------------------- public

# Compiling costs per program: one eager primitive costs about five kernels of a compiled segment
# (measured on InceptionV3's train step), and a segment compiles ~2 kernels per equation (the
# equation and its finite flag). Eager wins when distinct equations are few.
_AUTO_UNIQUE_FRACTION = 0.3
_AUTO_SEGMENT_SIZE = 128


def _signature_counts(jaxpr: jcore.Jaxpr) -> tuple[int, int]:
    """(leaf equations, distinct (primitive, params, input types) among them), calls inlined."""
    signatures: set[tuple] = set()
    total = 0
    stack = [jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            subs = list(jcore.jaxprs_in_params(eqn.params))
            if subs:
                stack.extend(subs)
                continue
            total += 1
            params = tuple(sorted((k, repr(v)) for k, v in eqn.params.items()))
            signatures.add((eqn.primitive.name, params, tuple(str(v.aval) for v in eqn.invars)))
    return total, len(signatures)


def _allow_predicate(allow: Any) -> Callable[[Event], bool] | None:
    if allow is None:
        return None
    if callable(allow):
        return allow
    if isinstance(allow, str):
        patterns = [allow]
    elif isinstance(allow, (list, tuple)) and all(isinstance(p, str) for p in allow):
        patterns = list(allow)
    else:
        raise TypeError(f"allow must be a glob pattern, a list of patterns or a predicate, got {allow!r}")
    return lambda event: any(fnmatch.fnmatchcase(event.module, p) for p in patterns)


def localize(fn: Callable[..., Any], *args: Any, allow: Any = None, max_events: int = 8,
             segment_size: int | str = "auto", **kwargs: Any) -> Report:
    """Replay `fn(*args, **kwargs)` equation by equation and report the first NaN or Inf.

    Args:
      fn: any JAX-traceable function (a jitted train step included); its gradient, if it takes one,
        is replayed too.
      *args: positional arguments (pytrees of arrays); traced, so their values are what is checked.
      allow: None, a glob pattern over Flax module paths (e.g. '*/attention*'), a list of patterns, or
        a predicate `Event -> bool`: events it accepts (and values derived only from them) are not
        reported.
      max_events: how many non-root events to record in detail (roots are always recorded).
      segment_size: runs of up to this many equations are compiled together and checked through
        per-equation flags; a run whose flags show a new event is replayed one equation at a time.
        0 replays everything one equation at a time: one compilation per distinct (primitive,
        parameters, shapes), which repeated layers share. "auto" (the default) picks 0 when
        distinct equations are under `_AUTO_UNIQUE_FRACTION` of all (deep networks of repeated
        blocks: InceptionV3's train step has ~1,300 distinct among ~10,400), else 128.
      **kwargs: closed over as static (not traced), e.g. `train=True`.

    Returns:
      A `Report` (see the module docstring for its keys).

    Raises:
      TypeError: `fn` is not callable or `allow` has the wrong type.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if not isinstance(max_events, int) or max_events < 0:
        raise ValueError(f"max_events must be a non-negative int, got {max_events!r}")
    if segment_size != "auto" and (not isinstance(segment_size, int) or segment_size < 0):
        raise ValueError(f"segment_size must be 'auto' or a non-negative int, got {segment_size!r}")
    predicate = _allow_predicate(allow)
    start = time.perf_counter()

    def target(*positional: Any) -> Any:
        # A fresh function object per call: JAX caches traces by function, and a trace cached
        # earlier (the user's own jit of `fn`) ran without the module scopes pushed below.
        return fn(*positional, **kwargs)

    with _frameworks.module_scopes():  # NNX and Equinox submodule calls push their paths
        jaxpr, consts = _jax.open_jaxpr(jax.make_jaxpr(target)(*args))
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(args)
    meshes = _jax.shard_map_meshes(jaxpr)
    if meshes:
        # Replayed eagerly, all shards at once (see `_Interpreter._shard_map`).
        segment_size = 0
    elif segment_size == "auto":
        leaves, unique = _signature_counts(jaxpr)
        segment_size = 0 if unique < _AUTO_UNIQUE_FRACTION * leaves else _AUTO_SEGMENT_SIZE
    interp = _Interpreter(predicate, max_events, segment_size)
    inputs: list[_Value] = []
    bad_inputs: list[str] = []
    input_roots: dict[int, str] = {}
    for k, (path, leaf) in enumerate(leaves_with_paths):
        if _finite(leaf):
            inputs.append(_Value(leaf, None, False))
            continue
        key = -(k + 1)  # negative ids: arguments, ordered before every equation
        input_roots[key] = "nan-input" if _has_nan(leaf) else "inf-input"
        bad_inputs.append(jax.tree_util.keystr(path))
        inputs.append(_Value(leaf, frozenset({key}), False))
    try:
        # The mesh as a context: equations around an explicitly sharded shard_map (reshard, ...) need it.
        interp.mesh = meshes[0] if len(meshes) == 1 else None
        with jax.debug_nans(False), jax.debug_infs(False):  # we want the values, not an exception
            outs = interp.run(jaxpr, consts, inputs, _Context(), [True] * len(jaxpr.outvars))
    finally:
        for cache in (_cached_live, _leaf_count, _segments):
            cache.cache_clear()  # the keys hold this function's jaxprs alive
    reaching = set().union(*[o.prov for o in outs if o.prov is not None]) - interp.allowed_roots
    # A non-finite output computed from constants only (a cond branch or a jitted function returning
    # jnp.nan) is always reported, with the equation that made it.
    const_reaching = set().union(*[o.cprov for o in outs if o.cprov is not None and not _finite(o.value)])
    const_events = [interp.const_roots[r] for r in sorted(const_reaching)]
    events = interp.events
    if const_events:
        events = sorted(events + const_events, key=lambda e: e.index)
        reaching |= const_reaching
    roots = {**interp.root_events, **{e.index: e for e in const_events}}
    origin, cause = _choose_origin(roots, input_roots, reaching)
    literal_out = any(o.const and o.cprov is None and not _finite(o.value) for o in outs)
    if origin is None and not bad_inputs and literal_out:
        cause = "non-finite-constant"  # the function returns a NaN/Inf literal: no equation made it
    first_nan = interp.first_nan or next((e for e in const_events if e.kind == "nan"), None)
    found = bool(roots or bad_inputs or interp.num_events or literal_out)
    return Report(
        found=found, cause=cause if found else "none", origin=origin, first_nan=first_nan,
        bad_inputs=bad_inputs, events=events, num_events=interp.num_events + len(const_events),
        num_equations=interp.counter, seconds=time.perf_counter() - start)


def _choose_origin(roots: dict[int, Event], input_roots: dict[int, str],
                   reaching: set[int]) -> tuple[Event | None, str]:
    """Pick the origin: the earliest root reaching a non-finite output, else the earliest root."""
    ordered = sorted(set(roots) | set(input_roots))  # arguments (negative ids) come first
    preferred = [r for r in ordered if r in reaching] or ordered
    if not preferred:
        return None, "none"
    first = preferred[0]
    if first in input_roots:
        return None, input_roots[first]
    return roots[first], roots[first].cause
