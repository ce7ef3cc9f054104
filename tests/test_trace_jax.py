"""Tests of nanlab.trace._jax, the localizer's JAX adapter, on whichever JAX runs the suite.

Each internal that changed between jax 0.10.2 and 0.12 is tested twice: on a real equation of the
running JAX, and on stand-in equations shaped like both the old and the new form, so both branches of
the adapter run whatever JAX is installed. CI runs this file on jax 0.10.2 (Python 3.11) and on the
newest JAX (Python 3.12).
"""

import types

import jax
import jax.numpy as jnp
import pytest
from jax.extend import core as jcore
from jax.extend.core import primitives

from nanlab.trace import _jax, localize

JAX_VERSION = tuple(int(p) for p in jax.__version__.split(".")[:3])


def _scan_eqn(jaxpr):
    return next(e for e in jaxpr.eqns if e.primitive.name == _jax.SCAN)


class _FlatPart:
    """Stand-in for one part of jax >= 0.11's FlatTree: only `.vals` (its leaves) is read."""

    def __init__(self, n):
        self.vals = (None,) * n


class _FlatTree:
    def __init__(self, *sizes):
        self.parts = tuple(_FlatPart(n) for n in sizes)

    def unpack(self):
        return self.parts


@pytest.mark.parametrize(
    "params",
    [
        {"num_consts": 2, "num_carry": 3},  # jax <= 0.10
        {"ft_in": _FlatTree(2, 3, 4), "ft_out": _FlatTree(3, 4)},  # jax >= 0.11
    ],
    ids=["num_consts", "ft_in"],
)
def test_scan_counts_read_both_param_forms(params):
    assert _jax.scan_counts(params) == (2, 3)


def test_scan_counts_of_a_real_scan_split_its_operands():
    w = jnp.arange(3.0)

    def f(xs):
        def body(carry, x):
            # Two carries as a dict, one closed-over constant, one scanned input.
            return {"p": carry["p"] * x + w, "q": carry["q"] * 2.0 + x}, carry["p"] - x

        return jax.lax.scan(body, {"p": xs[0], "q": xs[1]}, xs)

    closed = jax.make_jaxpr(f)(jnp.ones((4, 3)))
    jaxpr, _ = _jax.open_jaxpr(closed)
    eqn = _scan_eqn(jaxpr)
    n_consts, n_carry = _jax.scan_counts(eqn.params)
    assert n_carry == 2
    assert n_consts + n_carry + 1 == len(eqn.invars)  # the rest is the one scanned input


def test_open_jaxpr_reads_the_running_jax_and_the_pre_0_11_wrapper():
    closed = jax.make_jaxpr(lambda x: jnp.sin(x) * jnp.arange(3.0))(jnp.ones(3))
    jaxpr, consts = _jax.open_jaxpr(closed)
    assert isinstance(jaxpr, jcore.Jaxpr)
    assert len(consts) == len(jaxpr.constvars)
    # jax < 0.11 shape: a wrapper that is not a Jaxpr, holding one and the consts.
    wrapper = types.SimpleNamespace(jaxpr=jaxpr, consts=tuple(consts))
    assert _jax.is_jaxpr(wrapper)
    assert _jax.open_jaxpr(wrapper) == (jaxpr, list(consts))
    assert not _jax.is_jaxpr(types.SimpleNamespace(jaxpr=None))


def test_call_table_holds_the_running_jax_names():
    names = set(_jax.CALL_BODIES)
    assert {"jit", "custom_jvp_call", "custom_vjp_call"} <= names
    expected_call = "eval_jaxpr" if JAX_VERSION >= (0, 11, 2) else "closed_call"
    assert primitives.closed_call_p.name == expected_call
    assert expected_call in names


@pytest.mark.parametrize("name", sorted(_jax.CALL_BODIES))
def test_call_body_enters_every_call_like_primitive(name):
    body = jax.make_jaxpr(jnp.log)(1.0)
    eqn = types.SimpleNamespace(primitive=types.SimpleNamespace(name=name),
                                params={_jax.CALL_BODIES[name]: body})
    inner, _ = _jax.call_body(eqn)
    assert [e.primitive.name for e in inner.eqns] == ["log"]


def test_call_body_is_none_for_a_leaf_or_a_missing_body():
    leaf = types.SimpleNamespace(primitive=types.SimpleNamespace(name="log"), params={})
    assert _jax.call_body(leaf) is None
    jit_without_body = types.SimpleNamespace(primitive=types.SimpleNamespace(name="jit"), params={})
    assert _jax.call_body(jit_without_body) is None


def _grad_of_checkpointed_scan(xs):
    def body(carry, x):
        return carry * jnp.log(x), None

    def f(xs):
        return jax.lax.scan(jax.checkpoint(body), 1.0, xs)[0]

    return jax.grad(lambda xs: jax.checkpoint(f)(xs))(xs)


def test_grad_of_a_checkpointed_scan_is_localized_inside_the_call():
    # The partial evaluation of a checkpointed scan emits a call equation (closed_call before jax
    # 0.11.2, eval_jaxpr since): the replay must enter it to name the log at fault.
    closed = jax.make_jaxpr(_grad_of_checkpointed_scan)(jnp.ones(3))
    jaxpr, _ = _jax.open_jaxpr(closed)
    names, stack = set(), [jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            names.add(eqn.primitive.name)
            stack.extend(jcore.jaxprs_in_params(eqn.params))
    assert primitives.closed_call_p.name in names
    report = localize(_grad_of_checkpointed_scan, jnp.array([1.0, 0.0, 2.0]))
    assert report.found
    assert report.origin.primitive != primitives.closed_call_p.name
    assert report.origin.phase == "backward"
    assert report.origin.forward_primitive == "log"
    assert report.origin.iterations == [{"loop": "scan", "index": 1}]
    assert report.cause == "log-of-zero"
