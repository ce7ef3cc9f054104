"""Static analysis of a jaxpr before and during replay: liveness (the phase), segments, signatures.

Everything here reads a jaxpr only, never values (but `_returns_constant`, which checks a body's
constants); the caches are keyed by `_JaxprKey` and cleared by `localize` after each call.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from jax.extend import core as jcore

from nanlab.trace import _jax
from nanlab.trace._values import _finite


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
        if in_transpose or "transpose" in _jax.transforms(_jax.name_stack_elements(eqn.source_info)):
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


@functools.lru_cache(maxsize=4096)
def _last_use(jaxpr_ref: Any) -> dict[int, list[Any]]:
    """Equation index -> the variables it reads last (outputs of the jaxpr excluded): freed after it."""
    jaxpr = jaxpr_ref()
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
