"""nanlab.trace._eager: data movement on the host and flattened elementwise programs give bind_eager's bits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from nanlab.trace import _eager, _jax

# Every float32 class the replay must carry unchanged: signed zeros, subnormals (which XLA's CPU
# code flushes to zero in arithmetic), the extremes, infinities and a NaN.
SPECIAL = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 1e-45, -1e-40, 3.4e38,
                    -3.4e38, 1e-20, 0.5, 2.0, 88.7, -103.9, 7.0, -2.5, 1e30, 3.0], np.float32).reshape(4, 5)
OTHER = np.roll(SPECIAL.reshape(-1), 7).reshape(4, 5)

MOVE_CASES = {
    "reshape": lambda x, y: x.reshape(2, 10),
    "broadcast_in_dim": lambda x, y: jnp.broadcast_to(x[:, None, :], (4, 3, 5)),
    "transpose": lambda x, y: x.T,
    "squeeze": lambda x, y: lax.squeeze(x[None], (0,)),
    "rev": lambda x, y: lax.rev(x, (1,)),
    "slice": lambda x, y: x[1:3, ::2],
    "concatenate": lambda x, y: jnp.concatenate([x, y], axis=1),
    "pad": lambda x, y: lax.pad(x, jnp.float32(-0.0), [(1, 2, 0), (0, 3, 0)]),
    "copy": lambda x, y: jnp.array(x, copy=True),
    "stack": lambda x, y: jnp.stack([x, y, x], axis=1),
}
ELEMENTWISE_CASES = {
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,  # 1e-20 * 1e-20 and subnormal operands: flushed by XLA, not by numpy
    "div": lambda x, y: x / y,
    "max": jnp.maximum,
    "exp": lambda x, y: jnp.exp(x),
    "log": lambda x, y: jnp.log(x),
    "log1p": lambda x, y: jnp.log1p(x),
    "tanh": lambda x, y: jnp.tanh(x),
    "logistic": lambda x, y: jax.nn.sigmoid(x),
    "sqrt": lambda x, y: jnp.sqrt(x),
    "rsqrt": lambda x, y: lax.rsqrt(x),
    "integer_pow": lambda x, y: x ** 3,
    "pow": lambda x, y: lax.pow(x, y),
    "sin": lambda x, y: jnp.sin(x),
    "erf": lambda x, y: lax.erf(x),
    "sign": lambda x, y: jnp.sign(x),
    "is_finite": lambda x, y: jnp.isfinite(x),
    "select_n": lambda x, y: lax.select(x > y, x, y),
    "convert_element_type": lambda x, y: x.astype(jnp.bfloat16),
    "rem": lambda x, y: lax.rem(x, y),
    "clamp": lambda x, y: lax.clamp(np.float32(-1.5), x, np.float32(2.5)),  # scalar bounds
    "scalar operand": lambda x, y: lax.mul(x, np.float32(3.0)),
    "size-1 dimension": lambda x, y: lax.add(x, y[:1, :]),  # lax broadcasts [1, 5] over [4, 5]
}


def _bits(x) -> np.ndarray:
    a = np.asarray(x)
    return a.view(np.dtype(f"u{a.dtype.itemsize}")) if a.dtype.kind in "fc" or a.dtype.name == "bfloat16" else a


def _replay(fn, *args, evaluate):
    """Evaluate fn's jaxpr equation by equation with `evaluate`; return every equation's outputs."""
    closed = jax.make_jaxpr(fn)(*args)
    env = {v: jnp.asarray(a) for v, a in zip(closed.jaxpr.invars, args)}
    env.update(zip(closed.jaxpr.constvars, closed.consts))
    results = []
    for eqn in closed.jaxpr.eqns:
        values = [v.val if hasattr(v, "val") else env[v] for v in eqn.invars]
        outs = evaluate(eqn, values)
        results.append((eqn.primitive.name, outs))
        env.update(zip(eqn.outvars, outs))
    return results


def _assert_same_bits(fn, name, *args, monkeypatch):
    name = {"scalar operand": "mul", "size-1 dimension": "add"}.get(name, name)
    reference = _replay(fn, *args, evaluate=_jax.bind_eager)
    assert name in [n for n, _ in reference], f"{name} not in the jaxpr: {[n for n, _ in reference]}"
    per_shape = []  # primitives that went to the one-program-per-shape fallback
    original = _jax.bind_eager
    monkeypatch.setattr(_eager._jax, "bind_eager",
                        lambda eqn, values: per_shape.append(eqn.primitive.name) or original(eqn, values))
    fast = _replay(fn, *args, evaluate=_eager.evaluate)
    assert name not in per_shape, f"{name} fell back to the per-shape program"
    for (n, ref_outs), (_, outs) in zip(reference, fast):
        for r, o in zip(ref_outs, outs):
            assert np.asarray(o).dtype == np.asarray(r).dtype and np.shape(o) == np.shape(r), n
            np.testing.assert_array_equal(_bits(o), _bits(r), err_msg=n)


@pytest.mark.parametrize("name", sorted(MOVE_CASES))
def test_moves_give_the_same_bits_without_compiling(name, monkeypatch):
    _assert_same_bits(MOVE_CASES[name], name, SPECIAL, OTHER, monkeypatch=monkeypatch)


@pytest.mark.parametrize("name", sorted(ELEMENTWISE_CASES))
def test_elementwise_gives_the_same_bits_as_the_per_shape_program(name, monkeypatch):
    _assert_same_bits(ELEMENTWISE_CASES[name], name, SPECIAL, OTHER, monkeypatch=monkeypatch)


@pytest.mark.parametrize("name", ["add", "mul", "exp", "convert_element_type", "transpose", "concatenate"])
def test_bfloat16_operands(name, monkeypatch):
    cases = {**MOVE_CASES, **ELEMENTWISE_CASES, "convert_element_type": lambda x, y: x.astype(jnp.float32)}
    x, y = SPECIAL.astype(jnp.bfloat16), OTHER.astype(jnp.bfloat16)
    _assert_same_bits(cases[name], name, x, y, monkeypatch=monkeypatch)


def test_the_flush_of_subnormals_is_xlas():
    # The reason arithmetic is not done in numpy: numpy keeps 1e-20 * 1e-20 = 1e-40 (subnormal),
    # XLA's CPU code flushes it to zero. The replay must see what the compiled step saw.
    closed = jax.make_jaxpr(lambda x: x * x)(np.float32(0))
    (out,) = _eager.evaluate(closed.jaxpr.eqns[0], [np.float32(1e-20)] * 2)
    assert np.float32(1e-20) * np.float32(1e-20) != 0
    assert float(out) == 0.0


def test_negative_padding_falls_back_to_xla(monkeypatch):
    closed = jax.make_jaxpr(lambda x: lax.pad(x, jnp.float32(0), [(-1, 2, 0), (1, 0, 1)]))(SPECIAL)
    eqn = closed.jaxpr.eqns[-1]
    assert eqn.primitive.name == "pad"
    calls = []
    original = _jax.bind_eager
    monkeypatch.setattr(_eager._jax, "bind_eager", lambda e, v: calls.append(e) or original(e, v))
    (out,) = _eager.evaluate(eqn, [jnp.asarray(SPECIAL), np.float32(0)])
    assert calls == [eqn]
    np.testing.assert_array_equal(_bits(out), _bits(lax.pad(SPECIAL, np.float32(0), [(-1, 2, 0), (1, 0, 1)])))


class _Compilations:
    def __init__(self):
        self.count, self.active = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event, duration, **_):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


def test_one_program_serves_every_shape_of_a_padded_length():
    counter = _Compilations()
    shapes = [(3, 5), (4, 4), (2, 7), (13,), (1, 1, 11)]  # 15, 16, 14, 13 and 11 elements: length 16
    closed = [jax.make_jaxpr(lambda x, y: x * y + 1.25)(np.ones(s, np.float32), np.ones(s, np.float32))
              for s in shapes]
    rng = np.random.default_rng(0)
    operands = [[rng.standard_normal(s).astype(np.float32) for _ in range(2)] for s in shapes]
    on_device = [[jax.device_put(x) for x in pair] for pair in operands]
    counter.active = True
    for c, s, (x, y), pair in zip(closed, shapes, operands, on_device):
        (out,) = _eager.evaluate(c.jaxpr.eqns[0], pair)
        np.testing.assert_array_equal(np.asarray(out), x * y)  # one rounding: exact in numpy too
        assert np.shape(out) == s
    counter.active = False
    # The five shapes share one multiply program; the per-shape path would compile five.
    assert counter.count <= 1


def test_only_concrete_single_device_values_take_the_fast_path(monkeypatch):
    calls = []
    original = _jax.bind_eager
    monkeypatch.setattr(_eager._jax, "bind_eager", lambda e, v: calls.append(e) or original(e, v))
    closed = jax.make_jaxpr(lambda x: x + x)(np.ones(3, np.float32))
    tracer_like = object()
    assert _eager._single_cpu_device([tracer_like]) is None
    (out,) = _eager.evaluate(closed.jaxpr.eqns[0], [jnp.ones(3)] * 2)
    assert calls == [] and np.asarray(out).tolist() == [2.0, 2.0, 2.0]
