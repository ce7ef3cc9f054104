"""`nanlab.guard`: the asynchronous check, the failure modes, the step's own flag, and bad use.

The framework loops (linen, NNX, Equinox, optax) are in test_guard_frameworks.py; these tests use
its optax and linen setups, whose submodule 'risky' takes a log of a negative on a planted batch.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanlab.guard import GuardedStep, NonFiniteError, guard
from tests.test_guard_frameworks import (
    FAILING_CALL,
    NUM_CALLS,
    assert_same_tree,
    linen_setup,
    make_batches,
    optax_setup,
    run_guarded,
    state_after,
)


def batches_failing_at(*calls: int):
    """NUM_CALLS batches whose calls `calls` carry the forward fault (log of a negative)."""
    clean, bad = make_batches("forward", failing_call=-1), make_batches("forward", failing_call=calls[0])
    return [bad[calls[0]] if call in calls else batch for call, batch in enumerate(clean)]


def all_finite(tree) -> bool:
    return all(bool(np.isfinite(np.asarray(leaf)).all()) for leaf in jax.tree.leaves(tree)
               if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact))


# -------------------------------------------------------------------------- the asynchronous check


@pytest.mark.parametrize("check_every", [1, 3, 10])
def test_check_every_names_the_same_call_and_state(check_every):
    state, step = optax_setup()
    batches = make_batches("forward")
    expected = state_after(step, state, batches[:FAILING_CALL])
    error = run_guarded(step, state, batches, check_every=check_every)
    assert error.step == FAILING_CALL
    assert_same_tree(error.inputs[0], expected)


def test_a_failure_at_the_last_call_is_found_by_check():
    state, step = optax_setup()
    batches = make_batches("forward", failing_call=NUM_CALLS - 1)
    guarded = guard(step, donate_argnums=0, verbose=False)
    for batch in batches:
        state, metrics = guarded(state, batch)  # the last call's flag is not read yet
    assert np.isnan(metrics["loss"])
    with pytest.raises(NonFiniteError) as caught:
        guarded.check()
    assert caught.value.step == NUM_CALLS - 1


def test_failure_is_printed_and_written_to_report_json(tmp_path, capsys):
    state, step = optax_setup()
    guarded = guard(step, donate_argnums=0, workdir=tmp_path / "run")
    with pytest.raises(NonFiniteError) as caught:
        for batch in make_batches("forward"):
            state, _ = guarded(state, batch)
    payload = json.loads((tmp_path / "run" / "report.json").read_text())
    assert payload["step"] == FAILING_CALL
    assert payload["report"]["origin"]["cause"] == "log-of-negative"
    assert payload["verdict"]["cause"] == caught.value.verdict.cause
    out = capsys.readouterr().out
    assert f"non-finite at call {FAILING_CALL}" in out and "verdict:" in out
    assert isinstance(caught.value, FloatingPointError)  # caught by handlers written for jax_debug_nans
    assert caught.value.seconds > 0


def test_metrics_returned_by_the_step_become_the_history_for_diagnose():
    """SGD far too fast on a quadratic: |w| grows 9x a call until (w x)^2 overflows. The origin alone
    (an overflow at top level) explains nothing; the grad norms the step returned do."""

    def step(w, x):
        loss, grad = jax.value_and_grad(lambda w: jnp.mean((w * x) ** 2))(w)
        return w - 5.0 * grad, {"loss": loss, "grad_norm": jnp.abs(grad)}

    def first_error(**options):
        w, guarded = jnp.float32(1.0), guard(step, verbose=False, **options)
        with pytest.raises(NonFiniteError) as caught:
            for _ in range(40):
                w, _ = guarded(w, jnp.ones((4,), jnp.float32))
        return caught.value

    from_metrics = first_error()
    assert from_metrics.report.origin.cause == "overflow"
    assert from_metrics.verdict.cause == "exploding-gradients", from_metrics.verdict
    assert first_error(history=[]).verdict.cause == "unknown"


def test_a_replay_hook_presents_the_failure_instead_of_the_default(tmp_path, capsys):
    # What `python -m nanlab.train` does: the hook gets the failing call's index, its exact inputs
    # and its metrics, and the guard raises the error the hook returns; nothing of its own is printed.
    state, step = optax_setup()
    batches = make_batches("forward")
    expected = state_after(step, state, batches[:FAILING_CALL])
    heard = []

    def replay(index, inputs, aux):
        heard.append((index, inputs, aux))
        return NonFiniteError("a report", "a verdict", step=100 + index, inputs=inputs, payload={"mine": True})

    error = run_guarded(step, state, batches, replay=replay, workdir=tmp_path / "run")
    assert [index for index, _, _ in heard] == [FAILING_CALL]
    _, inputs, aux = heard[0]
    assert_same_tree(inputs[0], expected)
    assert_same_tree(inputs[1], batches[FAILING_CALL])
    assert np.isnan(aux["loss"])
    assert error.step == 100 + FAILING_CALL and error.payload == {"mine": True}
    assert not (tmp_path / "run").exists()  # the default replay (and its report.json) did not run
    assert capsys.readouterr().out == ""
    with pytest.raises(TypeError, match="replay must be a callable"):
        guard(step, replay="yes")


# ------------------------------------------------------------------------------- on_failure modes


def trace_run(step, state, batches, **options):
    """Run guarded over `batches`; return (guarded, the states it returned, the final state)."""
    guarded = guard(step, donate_argnums=0, verbose=False, **options)
    seen = []
    for batch in batches:
        state, _ = guarded(state, batch)
        seen.append(jax.device_get(state))
    state, _ = guarded.check()  # held calls run again after a late failure: use what check returns
    seen.append(jax.device_get(state))
    return guarded, seen, state


@pytest.mark.parametrize("check_every", [1, 2])
def test_skip_drops_bad_updates_everywhere_and_counts_them(check_every):
    """Params, Adam's moments and BatchNorm's statistics never see the two bad batches: the run
    ends exactly where a run without them ends; one event is reported, two are counted."""
    state, step = linen_setup()
    bad_calls = (2, 5)
    batches = batches_failing_at(*bad_calls)
    expected = state_after(step, state, [b for call, b in enumerate(batches) if call not in bad_calls])
    guarded, seen, final = trace_run(step, state, batches, on_failure="skip", check_every=check_every)
    assert all(all_finite((s.params, s.opt_state, s.batch_stats)) for s in seen)
    assert guarded.skipped == 2
    assert [e.step for e in guarded.events] == [2]
    assert guarded.events[0].report.origin.module == "LinenNet/risky"
    assert_same_tree(jax.device_get(final), jax.device_get(expected))


def test_a_callable_hears_every_failure_and_training_goes_on():
    state, step = optax_setup()
    bad_calls = (1, 6)
    batches = batches_failing_at(*bad_calls)
    expected = state_after(step, state, [b for call, b in enumerate(batches) if call not in bad_calls])
    heard = []
    guarded, _, final = trace_run(step, state, batches, on_failure=heard.append, check_every=3)
    assert [e.step for e in heard] == list(bad_calls)
    assert all(e.report.origin.cause == "log-of-negative" for e in heard)
    assert guarded.skipped == 2
    assert_same_tree(jax.device_get(final), jax.device_get(expected))


# ---------------------------------------------------------------------------------- shapes of step


def test_a_step_returning_only_its_state():
    state, step = optax_setup()
    bare = lambda state, batch: step(state, batch)[0]  # noqa: E731
    error = run_bare(bare, state, make_batches("forward"))
    assert error.step == FAILING_CALL


def run_bare(step, state, batches):
    guarded = guard(step, donate_argnums=0, verbose=False)
    with pytest.raises(NonFiniteError) as caught:
        for batch in batches:
            state = guarded(state, batch)
        guarded.check()
    return caught.value


@pytest.mark.parametrize("bare", [pytest.param(False, marks=pytest.mark.slow), True])
def test_a_program_loaded_from_a_store_is_guarded_and_replayed_the_same(tmp_path, bare):
    # jit= a ProgramStore's: the second guard runs the stored program without tracing the body,
    # so whether the step returns its state alone is learned from the first call's outputs (a
    # (state, aux) step's stored program is also run by the train CLI's tests in the default suite).
    from nanlab.program_store import ProgramStore

    initial, step = optax_setup()
    fn = (lambda state, batch: step(state, batch)[0]) if bare else step
    errors = []
    for _ in range(2):
        store = ProgramStore(tmp_path, {"test": "guard"})
        guarded = guard(fn, donate_argnums=0, verbose=False, jit=store.jit("step"))
        state = jax.tree.map(jnp.copy, initial)
        with pytest.raises(NonFiniteError) as caught:
            for batch in make_batches("forward"):
                outputs = guarded(state, batch)
                state = outputs if bare else outputs[0]
            guarded.check()
        errors.append((store.sources, caught.value))
    (first_source, first), (second_source, second) = errors
    assert first_source == {"step": "traced"} and second_source == {"step": "stored"}
    assert first.step == second.step == FAILING_CALL
    assert second.report.origin.cause == first.report.origin.cause == "log-of-negative"
    assert_same_tree(second.inputs[0], first.inputs[0])


@pytest.mark.parametrize("stored", [False, True])
def test_prepare_compiles_ahead_and_the_first_call_takes_it(tmp_path, stored):
    # From shapes alone, before any state exists (the train CLI prepares its step while the init
    # compiles): the calls compile nothing more, and a failure is still caught and replayed.
    from nanlab.program_store import ProgramStore

    initial, step = optax_setup()
    jit = ProgramStore(tmp_path, {"test": "prepare"}).jit("step") if stored else None
    guarded = guard(step, donate_argnums=0, verbose=False, jit=jit)
    batches = make_batches("forward")
    as_shape = lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a))  # noqa: E731
    compiles = []
    record = lambda event, seconds, **kw: compiles.append(kw.get("fun_name")) if event.endswith("backend_compile_duration") else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(record)
    try:
        guarded.prepare(jax.tree.map(as_shape, initial), jax.tree.map(as_shape, batches[0]))
        state = jax.tree.map(jnp.copy, initial)
        with pytest.raises(NonFiniteError) as caught:
            for batch in batches:
                state = guarded(state, batch)[0]
            guarded.check()
    finally:
        jax.monitoring.unregister_event_duration_listener(record)
    assert [name for name in compiles if "body" in name or "stored_step" in name] == [
        "jit(stored_step)" if stored else "jit(body)"]  # the one compile: prepare's
    assert caught.value.step == FAILING_CALL
    assert caught.value.report.origin.cause == "log-of-negative"


def test_static_arguments_and_the_decorator_forms():
    state, step = optax_setup()

    @guard(static_argnums=2, verbose=False)
    def scaled(state, batch, scale: float):
        x, y = batch
        return step(state, (x * scale, y))

    with pytest.raises(NonFiniteError) as caught:
        for batch in make_batches("forward"):
            state, _ = scaled(state, batch, 1.0)
        scaled.check()
    assert caught.value.step == FAILING_CALL
    assert caught.value.report.origin.cause == "log-of-negative"
    assert isinstance(guard(step), GuardedStep) and guard(step).__name__ == "train_step"


def test_a_jitted_step_is_accepted():
    state, step = optax_setup()
    error = run_guarded(jax.jit(step), state, make_batches("backward"))
    assert error.step == FAILING_CALL
    assert error.report.origin.phase == "backward"


# ------------------------------------------------------------------- the step's own flag and gate


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        return nn.Dense(1, name="head")(jnp.log(x[:, :1] + 2.0) + nn.Dense(4, name="proj")(x))


def test_nanlab_train_step_hands_over_its_flag_and_gates_itself():
    """nanlab's own step: its flag (loss and gradients) and its lax.cond gate, through finite= and
    gate_kwarg=; the guard then adds no reduction and no gate of its own."""
    from nanlab.step import create_train_state, make_train_step

    tx = optax.sgd(0.1)
    train_step = make_train_step(Tiny(), lambda logits, labels: (logits - labels) ** 2, tx)
    state = create_train_state(Tiny(), tx, jnp.ones((8, 4)), seed=0)
    batches = make_batches("forward")
    expected = state_after(lambda s, b: train_step(s, b), state, batches[:FAILING_CALL])
    guarded = guard(train_step, donate_argnums=0, finite=lambda out: out[1].finite,
                    gate_kwarg="apply_update", verbose=False)
    lowered = guarded.lower(state, batches[0]).as_text()
    with pytest.raises(NonFiniteError) as caught:
        for batch in batches:
            state, stats = guarded(state, batch)
    assert caught.value.step == FAILING_CALL
    assert_same_tree(caught.value.inputs[0], expected)
    assert caught.value.report.origin.cause == "log-of-negative"
    assert "stablehlo.case" in lowered or "stablehlo.if" in lowered  # the step's own lax.cond gate


# ---------------------------------------------------------------------------------------- bad use


def test_bad_use_gets_clear_errors():
    state, step = optax_setup()
    batch = make_batches("forward")[0]
    with pytest.raises(TypeError, match="callable"):
        guard(42)
    with pytest.raises(ValueError, match="only the state"):
        guard(step, donate_argnums=(0, 1))
    with pytest.raises(ValueError, match="check_every"):
        guard(step, check_every=0)
    with pytest.raises(ValueError, match="on_failure"):
        guard(step, on_failure="ignore")
    with pytest.raises(TypeError, match="no floating-point arrays"):
        guard(lambda s, b: {"n": s["n"] + 1})({"n": jnp.int32(0)}, batch)
    with pytest.raises(TypeError, match="must return its state"):
        guard(lambda s, b: {"other": b[0]})(state, batch)
    with pytest.raises(TypeError, match=r"argument 1 .* str .*\[1\]"):
        guard(step)(state, (batch[0], "labels"))
    with pytest.raises(TypeError, match="positional"):
        guard(step)(state, batch=batch)
