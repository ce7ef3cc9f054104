"""Values under replay: finiteness checks, and what the evaluators carry with each value and equation."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
    """Where an equation sits: composed name stack, phase of the enclosing call, loop iterations, frames.

    `shard` and `segment` also say how it is evaluated: for all shards at once, or traced into a
    compiled segment (a `_SegmentTracer`, which records its flags) instead of bound eagerly.
    """

    stack: tuple[Any, ...] = ()
    phase: str = ""  # '' at top level; an enclosing call's phase when it fixes the inner one
    iterations: tuple[tuple[str, int], ...] = ()
    frames: tuple[tuple[str, int, str], ...] = ()
    shard: _Shard | None = None  # inside a shard_map body: values hold one block per shard
    segment: Any = None  # the _SegmentTracer while tracing a compiled segment, else None


@dataclasses.dataclass(frozen=True)
class _Shard:
    """A shard_map body being replayed: every shard at once, blocks stacked in leading mesh dimensions."""

    axes: tuple[str, ...]  # the manual mesh axes, in mesh order (one leading dimension each)
    sizes: tuple[int, ...]
    params: Any  # the shard_map equation's params (for the mesh's devices)

    def stacked(self, value: Any, aval: Any) -> bool:
        return np.ndim(value) == len(getattr(aval, "shape", ())) + len(self.axes)
