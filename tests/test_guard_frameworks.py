"""`nanlab.guard` around a user's own loop in each framework: Flax linen, Flax NNX, Equinox, optax.

Every loop trains the same small network, ``Net = risky -> head``, whose submodule ``risky`` holds
two planted faults that fire only on a chosen batch:

- forward: ``log(x[:, :1] + 2)``; the planted batch has x = -3, a log of a negative (NaN);
- backward only: ``sqrt(h * h)`` with ``h = x @ W`` (no bias); the planted batch is all zeros, so
  h = 0 and the forward value |h| = 0 is finite while its gradient 0.5/sqrt(0) * 2h = inf * 0 is NaN.

Each test asserts the failing call's index, that the state the error carries is exactly the state
after the calls before it (computed by a plain jitted loop: the replay is exact although the state
was donated), and what the report says: primitive, phase, cause, source function, and the module
path as the user wrote it (linen's `LinenNet/risky`, NNX's attribute path and Equinox's pytree path
`risky`).
"""

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

from nanlab.guard import NonFiniteError, guard

FAILING_CALL = 4
NUM_CALLS = 8
FEATURES = 4


def make_batches(plant: str, failing_call: int = FAILING_CALL) -> list[tuple[jax.Array, jax.Array]]:
    """NUM_CALLS batches (x in [0.5, 1.5], y normal); the one at `failing_call` carries the fault."""
    rng = np.random.default_rng(0)
    batches = []
    for call in range(NUM_CALLS):
        x = rng.uniform(0.5, 1.5, (8, FEATURES)).astype(np.float32)
        if call == failing_call:
            x = np.full_like(x, -3.0) if plant == "forward" else np.zeros_like(x)
        batches.append((jnp.asarray(x), jnp.asarray(rng.normal(size=(8, 1)).astype(np.float32))))
    return batches


def run_guarded(step, state, batches, **options):
    """Run the guarded loop over `batches`; return the NonFiniteError it raised (fail if none)."""
    guarded = guard(step, donate_argnums=0, verbose=False, **options)
    with pytest.raises(NonFiniteError) as caught:
        for batch in batches:
            state, _ = guarded(state, batch)
        guarded.check()
    return caught.value


def state_after(step, state, batches):
    """The state after `batches` through a plain jitted, undonated loop (the reference)."""
    plain = jax.jit(step)
    for batch in batches:
        state, _ = plain(state, batch)
    return state


def assert_same_tree(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def assert_origin(error, plant, function):
    origin = error.report.origin
    assert error.step == FAILING_CALL
    assert origin is not None, str(error.report)
    assert function in origin.source, origin.source
    if plant == "forward":
        assert (origin.primitive, origin.phase, origin.cause) == ("log", "forward", "log-of-negative")
    else:
        # 0.5/sqrt(0): the derivative coefficient of sqrt, computed for the gradient only.
        assert (origin.primitive, origin.phase, origin.cause) == ("div", "backward", "sqrt-at-zero"), str(error.report)
        assert origin.forward_primitive == "sqrt", str(error.report)


def assert_report_inputs(error, batches):
    assert_same_tree(error.inputs[1], batches[FAILING_CALL])  # the failing batch is kept too


# ------------------------------------------------------------------------------------- Flax linen


class LinenRisky(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(FEATURES, use_bias=False, name="proj")(x)
        return jnp.sqrt(h * h) + jnp.log(x[:, :1] + 2.0)


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        h = LinenRisky(name="risky")(x)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="norm")(h)
        return nn.Dense(1, name="head")(h)


class LinenState(train_state.TrainState):
    batch_stats: dict


def linen_setup():
    model = LinenNet()
    variables = model.init(jax.random.key(0), jnp.ones((8, FEATURES)), train=False)
    state = LinenState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=optax.adam(1e-2))

    def train_step(state, batch):
        x, y = batch

        def loss_fn(params):
            pred, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, x,
                                           mutable=["batch_stats"])
            return jnp.mean((pred - y) ** 2), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
        return state, {"loss": loss}

    return state, train_step


@pytest.mark.parametrize("plant", ["forward", "backward"])
def test_linen_train_state_loop(plant):
    state, train_step = linen_setup()
    batches = make_batches(plant)
    expected = state_after(train_step, state, batches[:FAILING_CALL])  # before the guard donates `state`
    error = run_guarded(train_step, state, batches)
    assert_origin(error, plant, "LinenRisky.__call__")
    assert error.report.origin.module == "LinenNet/risky"
    assert_same_tree(error.inputs[0], expected)
    assert_report_inputs(error, batches)


# --------------------------------------------------------------------------------------- Flax NNX


class NNXRisky(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.proj = nnx.Linear(FEATURES, FEATURES, use_bias=False, rngs=rngs)

    def __call__(self, x):
        h = self.proj(x)
        return jnp.sqrt(h * h) + jnp.log(x[:, :1] + 2.0)


class NNXNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.risky = NNXRisky(rngs)
        self.head = nnx.Linear(FEATURES, 1, rngs=rngs)

    def __call__(self, x):
        return self.head(self.risky(x))


def nnx_setup():
    model = NNXNet(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))

    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        x, y = batch
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": loss}

    return state, train_step


@pytest.mark.parametrize("plant", ["forward", "backward"])
def test_nnx_loop(plant):
    state, train_step = nnx_setup()
    batches = make_batches(plant)
    expected = state_after(train_step, state, batches[:FAILING_CALL])  # before the guard donates `state`
    error = run_guarded(train_step, state, batches)
    assert_origin(error, plant, "NNXRisky.__call__")
    assert error.report.origin.module == "risky"  # NNX: the attribute path from the top module
    assert_same_tree(error.inputs[0], expected)
    assert_report_inputs(error, batches)


def test_nnx_state_is_restored_although_nnx_mutates_its_inputs():
    """nnx.merge reuses the State's Variables and the optimizer updates them in place: the gate
    must still return the values the call received, not the mutated ones."""
    state, train_step = nnx_setup()
    batches = make_batches("forward", failing_call=0)
    expected = jax.tree.map(np.array, state)  # a host copy: the guard donates `state`
    error = run_guarded(train_step, state, batches)
    assert error.step == 0
    assert_same_tree(error.inputs[0], expected)


# ------------------------------------------------------------------------------------------ Equinox


class EqxRisky(eqx.Module):
    proj: eqx.nn.Linear

    def __call__(self, x):
        h = jax.vmap(self.proj)(x)
        return jnp.sqrt(h * h) + jnp.log(x[:, :1] + 2.0)


class EqxNet(eqx.Module):
    risky: EqxRisky
    head: eqx.nn.Linear

    def __call__(self, x):
        return jax.vmap(self.head)(self.risky(x))


def equinox_setup():
    k1, k2 = jax.random.split(jax.random.key(0))
    model = EqxNet(EqxRisky(eqx.nn.Linear(FEATURES, FEATURES, use_bias=False, key=k1)),
                   eqx.nn.Linear(FEATURES, 1, key=k2))
    tx = optax.adam(1e-2)
    params, static = eqx.partition(model, eqx.is_array)
    state = (params, tx.init(params))

    @eqx.filter_jit
    def train_step(state, batch):
        params, opt_state = state
        x, y = batch

        def loss_fn(params):
            return jnp.mean((eqx.combine(params, static)(x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (eqx.apply_updates(params, updates), opt_state), {"loss": loss}

    return state, train_step


@pytest.mark.parametrize("plant", ["forward", "backward"])
def test_equinox_loop(plant):
    state, train_step = equinox_setup()
    batches = make_batches(plant)
    expected = state_after(train_step, state, batches[:FAILING_CALL])  # before the guard donates `state`
    error = run_guarded(train_step, state, batches)
    assert_origin(error, plant, "EqxRisky.__call__")
    assert error.report.origin.module == "risky"  # Equinox: the pytree path from the top module
    assert_same_tree(error.inputs[0], expected)
    assert_report_inputs(error, batches)


def test_equinox_model_with_non_array_leaves_is_refused_clearly():
    k1, k2 = jax.random.split(jax.random.key(0))
    model = EqxNet(EqxRisky(eqx.nn.Linear(FEATURES, FEATURES, use_bias=False, key=k1)),
                   eqx.nn.Linear(FEATURES, 1, key=k2))
    model = eqx.tree_at(lambda m: m.head, model, replace_fn=lambda head: (head, jax.nn.gelu))

    def train_step(model, batch):
        return model, {"loss": jnp.zeros(())}

    with pytest.raises(TypeError, match=r"argument 0 .* eqx.partition"):
        guard(train_step)(model, make_batches("forward")[0])


# -------------------------------------------------------------------------------------- plain optax


def risky_forward(params, x):
    h = x @ params["risky"]["proj"]
    h = jnp.sqrt(h * h) + jnp.log(x[:, :1] + 2.0)
    return h @ params["head"]["w"] + params["head"]["b"]


def optax_setup():
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"risky": {"proj": jax.random.normal(k1, (FEATURES, FEATURES))},
              "head": {"w": jax.random.normal(k2, (FEATURES, 1)), "b": jnp.zeros((1,))}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    state = {"params": params, "opt_state": tx.init(params)}

    def train_step(state, batch):
        x, y = batch
        loss, grads = jax.value_and_grad(lambda p: jnp.mean((risky_forward(p, x) - y) ** 2))(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, {"loss": loss}

    return state, train_step


@pytest.mark.parametrize("plant", ["forward", "backward"])
def test_optax_loop(plant):
    state, train_step = optax_setup()
    batches = make_batches(plant)
    expected = state_after(train_step, state, batches[:FAILING_CALL])  # before the guard donates `state`
    error = run_guarded(train_step, state, batches)
    assert_origin(error, plant, "risky_forward")
    assert error.report.origin.module == ""
    assert_same_tree(error.inputs[0], expected)
    assert_report_inputs(error, batches)
