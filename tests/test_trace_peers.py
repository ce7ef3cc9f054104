"""Peer suite: JAX's own NaN/Inf checker tests, replayed through nanlab.trace.localize.

Each case names the test it mirrors (jax-ml/jax tests/debug_nans_test.py, classes DebugNaNsTest and
DebugInfsTest; the checkify float_checks example in the docstring of jax/_src/checkify.py; Flax's
tests/nnx/transforms_test.py TestCheckify.test_basic). A case JAX flags must be `found`, naming the
primitive and kind JAX names (arguments in `bad_inputs` when JAX blames the input); a case JAX
passes must not be found, unless nanlab reports a masked value on purpose, which the case says.

Cases needing 2+ devices (testPjit, the 2-device half of testShardMap/testPmap) are covered by
tests/test_trace_shard_map.py in subprocesses; here shard_map and pmap run on this process's device.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import shard_map
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanlab.trace import localize

A = jnp.array([[1.0, 2.0], [2.0, 3.0]])
ZERO = jnp.array(0.0)


def _cond(value):
    @jax.jit
    def f(x):
        return jax.lax.cond(x == 1, lambda _: value, lambda _: 2.0, operand=None)
    return f


def _log_square(x):
    return jnp.log(x ** 2)


def _mesh1():
    return jax.make_mesh((1,), ("x",))


def _on_mesh1(values):
    # jax 0.10+ meshes are explicit: shard_map's inputs must already carry its in_specs.
    return jax.device_put(jnp.array(values), NamedSharding(_mesh1(), P("x")))


def _grad_pmap(x, ct):
    return jax.vjp(jax.pmap(jax.jit(_log_square)), x)[1](ct)


def _grad_shard_map(x, ct):
    f = shard_map(jax.jit(_log_square), mesh=_mesh1(), in_specs=P("x"), out_specs=P("x"))
    return jax.vjp(f, x)[1](ct)


def _deoptimized_literal(x):
    y = x + 2
    return jnp.nan, y


def _nnx_checkify_case():
    from flax import nnx

    class Foo(nnx.Module):
        def __init__(self, a):
            self.a = nnx.Param(a)

    def f(m):
        y = jnp.sin(m.a[...])  # the error checkify names
        return m.a[...] + y

    return f, Foo(jnp.array(jnp.inf))


# (name, the JAX test mirrored, fn, args, expected): expected None = JAX passes; else a dict of
# primitive/kind of the event JAX names ('origin' or 'first_nan'), or bad_inputs/cause.
CASES = [
    ("tanh", "DebugNaNsTest.testSingleResultPrimitiveNoNaN", jnp.tanh, (A,), None),
    ("eigh", "DebugNaNsTest.testMultipleResultPrimitiveNoNaN", lambda a: jnp.linalg.eigh(a)[0], (A,), None),
    ("jit tanh", "DebugNaNsTest.testJitComputationNoNaN", jax.jit(jnp.tanh), (A,), None),
    ("jit 0/x", "DebugNaNsTest.testJitComputationNaN", jax.jit(lambda x: 0.0 / x), (ZERO,),
     {"origin": ("div", "nan")}),
    ("jit 0/x, context manager", "DebugNaNsTest.testJitComputationNaNContextManager",
     jax.jit(lambda x: 0.0 / x), (ZERO,), {"origin": ("div", "nan")}),
    ("0/A", "DebugNaNsTest.testSingleResultPrimitiveNaN", lambda a: 0.0 / a, (ZERO,), {"origin": ("div", "nan")}),
    ("cond returns nan", "DebugNaNsTest.testCallDeoptimized", _cond(np.nan), (1,),
     {"origin": ("cond", "nan"), "cause": "non-finite-constant"}),
    ("cond finite branch", "DebugNaNsTest.testCallDeoptimized (f(2), the warm-up call)", _cond(np.nan), (2,), None),
    ("shard_map 0/x", "DebugNaNsTest.testShardMap",
     shard_map(lambda x: 0.0 / x, mesh=_mesh1(), in_specs=P("x"), out_specs=P("x")), (_on_mesh1([0.0]),),
     {"origin": ("div", "nan")}),
    ("shard_map finite", "DebugNaNsTest.testShardMap (f(jnp.array([1.])))",
     shard_map(lambda x: 0.0 / x, mesh=_mesh1(), in_specs=P("x"), out_specs=P("x")), (_on_mesh1([1.0]),), None),
    ("pmap 0/x", "DebugNaNsTest.testPmap", jax.pmap(lambda x: 0.0 / x), (jnp.array([0.0]),),
     {"origin": ("div", "nan")}),
    ("pmap finite", "DebugNaNsTest.testPmapNoNaN", jax.pmap(lambda x: 0.0 / x), (jnp.array([1.0]),), None),
    ("grad of pmap", "DebugNaNsTest.testGradPmap", _grad_pmap, (jnp.zeros([1]), jnp.ones([1])),
     {"first_nan": ("mul", "nan"), "phase": "backward"}),
    ("grad of shard_map", "DebugNaNsTest.testGradShardMap", _grad_shard_map, (_on_mesh1([0.0]), _on_mesh1([1.0])),
     {"first_nan": ("mul", "nan"), "phase": "backward"}),
    ("jit with donation", "DebugNaNsTest.testDebugNansJitWithDonation",
     jax.jit(lambda x: 0.0 / x, donate_argnums=(0,)), (ZERO,), {"origin": ("div", "nan")}),
    ("pmap with donation", "DebugNaNsTest.testDebugNansPmapWithDonation",
     jax.pmap(lambda x: 0.0 / x, donate_argnums=(0,)), (jnp.zeros((1,)),), {"origin": ("div", "nan")}),
    ("x/y", "DebugNaNsTest.testDebugNansZeroDiv", lambda x, y: x / y, (ZERO, ZERO), {"origin": ("div", "nan")}),
    ("jit x/y", "DebugNaNsTest.testDebugNansZeroDiv (jitted)", jax.jit(lambda x, y: x / y), (ZERO, ZERO),
     {"origin": ("div", "nan")}),
    ("nan input", "DebugNaNsTest.testDebugNansInput", jax.jit(lambda x: x * 3.0), (np.nan,),
     {"bad_inputs": ["[0]"], "cause": "nan-input"}),
    ("tanh (infs)", "DebugInfsTest.testSingleResultPrimitiveNoInf", jnp.tanh, (A,), None),
    ("eigh (infs)", "DebugInfsTest.testMultipleResultPrimitiveNoInf", lambda a: jnp.linalg.eigh(a)[0], (A,), None),
    ("jit tanh (infs)", "DebugInfsTest.testJitComputationNoInf", jax.jit(jnp.tanh), (A,), None),
    ("1/A", "DebugInfsTest.testSingleResultPrimitiveInf", lambda a: 1.0 / a, (ZERO,), {"origin": ("div", "inf")}),
    ("cond returns inf", "DebugInfsTest.testCallDeoptimized", _cond(np.inf), (1,),
     {"origin": ("cond", "inf"), "cause": "non-finite-constant"}),
    ("grad of jit x/x", "DebugInfsTest.testDebugNansDoesntCorruptCaches", jax.grad(jax.jit(lambda x: jnp.divide(x, x))),
     # JAX names the first NaN (the forward 0/0); nanlab's origin is the root reaching the gradient,
     # the derivative's y**-2 = inf at 0, and its first_nan is JAX's div.
     (0.0,), {"first_nan": ("div", "nan")}),
    ("jit returns a nan literal", "DebugInfsTest.testDebugNansDoesntReturnDeoptimizedResult",
     jax.jit(_deoptimized_literal), (3,), {"origin": ("jit", "nan"), "cause": "non-finite-constant"}),
    ("checkify sin(inf)", "checkify float_checks docstring example (jax/_src/checkify.py)",
     jax.jit(lambda x: x + jnp.sin(x)), (jnp.inf,), {"bad_inputs": ["[0]"], "first_nan": ("sin", "nan")}),
]


@pytest.mark.parametrize("name,mirrors,fn,args,expected", CASES, ids=[c[0] for c in CASES])
def test_peer_case(name, mirrors, fn, args, expected):
    report = localize(fn, *args)
    if expected is None:
        assert not report.found, f"{mirrors}: JAX passes, nanlab reported\n{report}"
        return
    assert report.found, f"{mirrors}: JAX flags it, nanlab did not"
    for key in ("origin", "first_nan"):
        if key in expected:
            event = getattr(report, key)
            assert event is not None, f"{mirrors}: no {key}\n{report}"
            assert (event.primitive, event.kind) == expected[key], f"{mirrors}\n{report}"
            if "phase" in expected:
                assert event.phase == expected["phase"], f"{mirrors}\n{report}"
    if "bad_inputs" in expected:
        assert report.bad_inputs == expected["bad_inputs"], f"{mirrors}\n{report}"
    if "cause" in expected:
        assert report.cause == expected["cause"], f"{mirrors}\n{report}"


def test_sinc_at_zero_raises_no_alarm():
    # Mirrors DebugNaNsTest.testSinc (regression for jax#6936): sinc(0) = 1, no NaN on the way.
    assert jnp.sinc(0.0) == 1.0
    assert not localize(jnp.sinc, 0.0).found
    assert not localize(jax.grad(jnp.sinc), 0.0).found


def test_nnx_checkify_case_names_sin_and_the_parameter():
    # Mirrors Flax tests/nnx/transforms_test.py TestCheckify.test_basic: 'nan generated by primitive: sin'.
    f, model = _nnx_checkify_case()
    report = localize(f, model)
    assert report.first_nan.primitive == "sin" and report.first_nan.kind == "nan", str(report)
    assert len(report.bad_inputs) == 1 and report.cause == "inf-input", str(report)
