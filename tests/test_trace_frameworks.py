"""Module paths in every JAX framework: Flax linen, Flax NNX, Equinox and Keras 3 (JAX backend).

Each framework builds the same model, net -> encoder -> (dense, norm) -> head, with one planted fault
in the `norm` submodule:

- forward: x / sum(x * x) at x = 0 is 0/0 in the forward pass;
- backward: x * sqrt(sum(x * x)) at x = 0 is finite (0), but the gradient of sqrt at 0 is
  0.5/sqrt(0) = inf, so only the backward pass goes non-finite.

Every dense layer has no bias, so a zero input stays zero up to `norm`. The expected module path is
the framework's own: linen's name stack (with the root class), NNX's attribute path, Equinox's
pytree path, Keras's layer names.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import equinox as eqx  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from nanlab.trace import _frameworks, localize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

X = jnp.zeros((2, 3))


def planted(x, fault):
    if fault == "forward":
        return x / jnp.sum(x * x, -1, keepdims=True)
    return x * jnp.sqrt(jnp.sum(x * x, -1, keepdims=True))


# ----------------------------------------------------------------------------------------- linen

class LinenNorm(nn.Module):
    fault: str

    @nn.compact
    def __call__(self, x):
        return planted(x, self.fault)


class LinenBlock(nn.Module):
    fault: str

    @nn.compact
    def __call__(self, x):
        return LinenNorm(self.fault, name="norm")(nn.Dense(3, use_bias=False, name="dense")(x))


class LinenNet(nn.Module):
    fault: str

    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, use_bias=False, name="head")(LinenBlock(self.fault, name="encoder")(x))


def linen_case(fault):
    model = LinenNet(fault)
    params = model.init(jax.random.key(0), X)["params"]
    return (lambda p, x: jnp.sum(model.apply({"params": p}, x))), params


# ------------------------------------------------------------------------------------------- NNX

class NNXNorm(nnx.Module):
    def __init__(self, fault):
        self.fault = fault

    def __call__(self, x):
        return planted(x, self.fault)


class NNXBlock(nnx.Module):
    def __init__(self, fault, rngs):
        self.dense = nnx.Linear(3, 3, use_bias=False, rngs=rngs)
        self.norm = NNXNorm(fault)

    def __call__(self, x):
        return self.norm(self.dense(x))


class NNXNet(nnx.Module):
    def __init__(self, fault, rngs):
        self.encoder = NNXBlock(fault, rngs)
        self.head = nnx.Linear(3, 1, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.head(self.encoder(x))


def nnx_case(fault):
    graphdef, state = nnx.split(NNXNet(fault, nnx.Rngs(0)))
    return (lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x))), state


# --------------------------------------------------------------------------------------- Equinox

class EqxNorm(eqx.Module):
    fault: str = eqx.field(static=True)

    def __call__(self, x):
        return planted(x, self.fault)


class EqxBlock(eqx.Module):
    dense: eqx.nn.Linear
    norm: EqxNorm

    def __init__(self, fault, key):
        self.dense = eqx.nn.Linear(3, 3, use_bias=False, key=key)
        self.norm = EqxNorm(fault)

    def __call__(self, x):
        return self.norm(self.dense(x))


class EqxNet(eqx.Module):
    encoder: EqxBlock
    head: eqx.nn.Linear

    def __init__(self, fault, key):
        self.encoder = EqxBlock(fault, key)
        self.head = eqx.nn.Linear(3, 1, use_bias=False, key=key)

    def __call__(self, x):
        return self.head(self.encoder(x))


def eqx_case(fault):
    params, static = eqx.partition(EqxNet(fault, jax.random.key(0)), eqx.is_array)

    def loss(p, x):
        return jnp.sum(jax.vmap(eqx.combine(p, static))(x))

    return loss, params


# ----------------------------------------------------------------------------------------- Keras

class KerasNorm(keras.layers.Layer):
    def __init__(self, fault, **kwargs):
        super().__init__(**kwargs)
        self.fault = fault

    def call(self, x):
        return planted(x, self.fault)


def keras_case(fault):
    inp = keras.Input((3,))
    h = keras.layers.Dense(3, use_bias=False, name="dense")(inp)
    h = KerasNorm(fault, name="norm")(h)
    encoder = keras.Model(inp, h, name="encoder")
    inp2 = keras.Input((3,))
    model = keras.Model(inp2, keras.layers.Dense(1, use_bias=False, name="head")(encoder(inp2)), name="net")
    trainable = [v.value for v in model.trainable_variables]
    fixed = [v.value for v in model.non_trainable_variables]

    def loss(tv, x):
        return jnp.sum(model.stateless_call(tv, fixed, x)[0])

    return loss, trainable


CASES = {
    "linen": (linen_case, "LinenNet/encoder/norm"),
    "nnx": (nnx_case, "encoder/norm"),
    "equinox": (eqx_case, "encoder.norm"),
    "keras": (keras_case, "encoder/norm"),
}


@pytest.mark.parametrize("framework", sorted(CASES))
def test_forward_fault_names_the_submodule(framework):
    build, path = CASES[framework]
    loss, params = build("forward")
    assert np.isnan(loss(params, X))
    report = localize(loss, params, X)
    o = report.origin
    assert (o.primitive, o.module, o.phase, o.cause) == ("div", path, "forward", "division-by-zero"), str(report)
    assert o.source.startswith("tests/test_trace_frameworks.py:") and "(planted)" in o.source


@pytest.mark.parametrize("framework", sorted(CASES))
def test_backward_only_fault_names_the_submodule(framework):
    build, path = CASES[framework]
    loss, params = build("backward")
    assert np.isfinite(loss(params, X))
    report = localize(jax.value_and_grad(loss), params, X)
    o = report.origin
    assert (o.module, o.phase, o.forward_primitive) == (path, "backward", "sqrt"), str(report)
    assert o.cause == "sqrt-at-zero", str(report)
    assert all(e.phase == "backward" for e in report.events), str(report)


def test_module_classes_are_restored_after_tracing_and_on_error():
    calls = {cls: cls.__dict__["__call__"] for cls in (NNXNet, NNXBlock, EqxNet, EqxBlock)}
    model = NNXNet("forward", nnx.Rngs(0))
    localize(lambda x: model(x), X)
    with pytest.raises(TypeError):
        localize(lambda x: model(x, 1), X)  # fails while tracing, inside the wrapped __call__
    assert {cls: cls.__dict__["__call__"] for cls in calls} == calls


def test_child_names_follow_each_framework():
    parent = NNXNet("forward", nnx.Rngs(0))
    assert _frameworks.child_name("nnx", parent, parent.encoder) == "encoder"
    seq = nnx.Sequential(nnx.Linear(1, 1, rngs=nnx.Rngs(0)), NNXNorm("forward"))
    assert _frameworks.child_name("nnx", seq, seq.layers[1]) == "layers/1"
    eparent = EqxNet("forward", jax.random.key(0))
    assert _frameworks.child_name("equinox", eparent, eparent.head) == ".head"
    assert _frameworks.child_name("equinox", eparent, NNXNorm("x")) is None
    assert _frameworks.join_scopes([".encoder", ".layers[0]", ".norm"]) == "encoder.layers[0].norm"
    assert _frameworks.join_scopes(["Net", "encoder"]) == "Net/encoder"


def test_nnx_list_items_are_named_by_index():
    class Stack(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(3, 3, use_bias=False, rngs=rngs), NNXNorm("forward")])

        def __call__(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Stack(nnx.Rngs(0))
    report = localize(lambda x: model(x), X)
    assert (report.origin.primitive, report.origin.module) == ("div", "layers/1"), str(report)
