"""One equation on concrete CPU values, with as few XLA compilations as the replay can get away with.

An eager replay of a train step binds every equation alone. Compiling one program per distinct
(primitive, parameters, shapes) is most of its time on a CPU: InceptionV3's step at width 0.125
has ~950 distinct one-equation programs, ~1,130 at full size, each compiled in 20-100 ms. Two
kinds of equation need no program of their own shape:

- data movement (reshape, broadcast, transpose, slice, concatenate, pad, ...): no arithmetic, so
  numpy on the host buffer gives the same bits, NaN payloads, signed zeros and subnormals
  included, with no compilation at all;
- elementwise arithmetic (add, mul, exp, convert_element_type, comparisons, ...): the value of each
  element depends on that element alone, so the operands are flattened, zero-padded to a
  power-of-two length and run through one program per (primitive, parameters, dtypes, length).
  The arithmetic stays XLA's own: its CPU code flushes subnormals to zero and uses its own exp/log
  approximations, which numpy would not reproduce. The padded tail computes garbage (1/0 and
  such) that is sliced off before anyone sees it.

Everything else (convolutions, dot products, reductions, gathers, RNG, ...) goes to
`_jax.bind_eager`, one program per shape. Values on an accelerator, spread over several devices,
or of dtypes numpy cannot hold, go there too: the fast paths are for single-device CPU values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from nanlab.compile_cache import RUN_ONCE_OPTIONS
from nanlab.trace import _jax

__all__ = ["ELEMENTWISE", "MOVES", "evaluate"]


def _reshape(x: np.ndarray, *, new_sizes, dimensions=None, **_) -> np.ndarray:
    if dimensions is not None:  # lax.reshape's optional transpose before the row-major reshape
        x = np.transpose(x, dimensions)
    return np.reshape(x, new_sizes)


def _broadcast_in_dim(x: np.ndarray, *, shape, broadcast_dimensions, **_) -> np.ndarray:
    expanded = [1] * len(shape)
    for axis, size in zip(broadcast_dimensions, np.shape(x)):
        expanded[axis] = size
    return np.broadcast_to(np.reshape(x, expanded), shape)


def _slice(x: np.ndarray, *, start_indices, limit_indices, strides=None, **_) -> np.ndarray:
    strides = strides or (1,) * len(start_indices)
    return x[tuple(slice(s, e, k) for s, e, k in zip(start_indices, limit_indices, strides))]


def _pad(x: np.ndarray, value: np.ndarray, *, padding_config, **_) -> np.ndarray | None:
    if any(lo < 0 or hi < 0 or interior for lo, hi, interior in padding_config):
        return None  # negative (cropping) or interior padding: left to XLA
    shape = tuple(lo + n + hi for n, (lo, hi, _) in zip(x.shape, padding_config))
    out = np.full(shape, value, dtype=x.dtype)
    out[tuple(slice(lo, lo + n) for n, (lo, _, _) in zip(x.shape, padding_config))] = x
    return out


def _split(x: np.ndarray, *, sizes, axis, **_) -> list[np.ndarray]:
    return np.split(x, np.cumsum(sizes)[:-1], axis=axis)


# Primitive name -> numpy function of (operands..., **params) giving the output (a list for
# several outputs), or None to fall back to XLA. Copies only: no rounding anywhere.
MOVES: dict[str, Callable[..., Any]] = {
    "reshape": _reshape,
    "broadcast_in_dim": _broadcast_in_dim,
    "transpose": lambda x, *, permutation, **_: np.transpose(x, permutation),
    "squeeze": lambda x, *, dimensions, **_: np.squeeze(x, axis=tuple(dimensions)),
    "rev": lambda x, *, dimensions, **_: np.flip(x, axis=tuple(dimensions)),
    "slice": _slice,
    "concatenate": lambda *xs, dimension, **_: np.concatenate(xs, axis=dimension),
    "stack": lambda *xs, axis, **_: np.stack(xs, axis=axis),
    "split": _split,
    "pad": _pad,
    "copy": lambda x, **_: x,
    "copy_p": lambda x, **_: x,
}

# Primitives whose every output element is a function of the operands' elements at the same index,
# after broadcasting: lax broadcasts scalars (`mul x 2.0:f32[]`) and size-1 dimensions
# (`add x:f32[2,35,35,8] b:f32[1,1,1,8]`, a BatchNorm shift), which numpy copies out exactly.
ELEMENTWISE = frozenset({
    "abs", "acos", "acosh", "add", "add_any", "and", "asin", "asinh", "atan", "atan2", "atanh", "cbrt", "ceil",
    "clamp", "convert_element_type", "cos", "cosh", "digamma", "div", "eq", "erf", "erf_inv", "erfc", "exp",
    "exp2", "expm1", "floor", "ge", "gt", "imag", "integer_pow", "is_finite", "le", "lgamma", "log", "log1p",
    "logistic", "lt", "max", "min", "mul", "ne", "neg", "nextafter", "not", "or", "pow", "real", "reduce_precision",
    "rem", "round", "rsqrt", "select_n", "shift_left", "shift_right_arithmetic", "shift_right_logical", "sign",
    "sin", "sinh", "sqrt", "square", "sub", "tan", "tanh", "xor",
})

_MIN_LENGTH = 8  # the shortest padded length: small vectors share one program per primitive


def evaluate(eqn: Any, values: Sequence[Any]) -> list[Any]:
    """The outputs of `eqn` on concrete values: equal, bit for bit, to `_jax.bind_eager`'s."""
    name = eqn.primitive.name
    if name in MOVES or name in ELEMENTWISE:
        device = _single_cpu_device(values)
        if device is not None:
            host = [np.asarray(v) for v in values]
            outs = _move(name, host, eqn.params) if name in MOVES else _elementwise(eqn, host)
            if outs is not None:
                return [jax.device_put(o, device) for o in outs]
    return _jax.bind_eager(eqn, values)


def _single_cpu_device(values: Sequence[Any]) -> Any:
    """The one CPU device every array operand lives on (the default CPU device for host values), else None."""
    device = None
    for v in values:
        if isinstance(v, jax.Array):
            devices = v.devices()
            if len(devices) != 1:
                return None
            (d,) = devices
            if d.platform != "cpu" or (device is not None and d != device):
                return None
            device = d
        elif not isinstance(v, (np.ndarray, np.generic, int, float, bool, complex)):
            return None  # tracers and other objects: JAX's own bind
    if device is None:
        device = jax.local_devices(backend="cpu")[0] if jax.default_backend() == "cpu" else None
    return device


def _move(name: str, host: list[np.ndarray], params: dict[str, Any]) -> list[np.ndarray] | None:
    out = MOVES[name](*host, **params)
    if out is None:
        return None
    return [np.ascontiguousarray(o) for o in out] if isinstance(out, list) else [np.ascontiguousarray(out)]


def _elementwise(eqn: Any, host: list[np.ndarray]) -> list[np.ndarray] | None:
    try:
        shape = np.broadcast_shapes(*(h.shape for h in host))
    except ValueError:
        return None  # not numpy-broadcastable: JAX's own rules, the per-shape program
    size = int(np.prod(shape, dtype=np.int64))
    length = max(_MIN_LENGTH, 1 << max(size - 1, 0).bit_length())
    # Scalars stay scalars: the primitive broadcasts them over the padded vector as over the array.
    flat = [h if h.shape == () and shape != () else _padded(np.broadcast_to(h, shape), length) for h in host]
    params = eqn.primitive.get_bind_params(eqn.params)
    try:
        program = _flat_program(eqn.primitive, tuple(sorted(params.items())))
    except TypeError:  # unhashable parameters
        return None
    with eqn.ctx.manager:
        raw = program(*flat)
    outs = raw if eqn.primitive.multiple_results else [raw]
    return [np.asarray(o)[:size].reshape(shape) for o in outs]


def _padded(x: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=x.dtype)
    out[:x.size] = x.reshape(-1)
    return out


@functools.lru_cache(maxsize=4096)
def _flat_program(primitive: Any, params: tuple) -> Callable[..., Any]:
    # jit keys its executables by the operands' shapes and dtypes: one compile per padded length.
    kwargs = dict(params)
    return jax.jit(lambda *values: primitive.bind(*values, **kwargs), compiler_options=RUN_ONCE_OPTIONS)
