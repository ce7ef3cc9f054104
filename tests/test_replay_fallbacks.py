"""`nanlab.trace.reproduce`: when the op-by-op replay of a failed call finds nothing, the fallbacks.

The mismatch is real, not mocked, where this CPU can make one: XLA's algebraic simplifier rewrites
``(a / b) / c`` into ``a / (b * c)``, so with a = b = c = 1e-30 the compiled program computes
1e-30 / 0 = inf (b * c underflows) while the op-by-op replay, whose one-primitive programs are
compiled without optimization passes, computes (1) / 1e-30 = 1e30, finite. The CPU-backend replay
can only differ from the first one on another device, so that case, and "no replay finds it",
inject the mismatch at the replay boundary: `nanlab.trace.localize` is wrapped so that the chosen
replays see finite stand-in values.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanlab.trace
from nanlab import train
from nanlab.guard import NonFiniteError, guard
from nanlab.trace import localize, reproduce
from nanlab.trace._reproduce import ADVICE
from tests.test_trace import NormNet, mse_step
from tests.test_train import _argv

TINY = np.float32(1e-30)


def rewritten_division(a, b, c):
    return a / b / c  # compiled: a / (b * c) = 1e-30 / 0 = inf; op by op: 1 / 1e-30 = 1e30


def test_the_compiled_division_overflows_where_op_by_op_does_not():
    # The premise of the tests below, on this JAX: the two kinds of program differ.
    args = [jnp.asarray(TINY)] * 3
    assert np.isinf(np.asarray(jax.jit(rewritten_division)(*args)))
    assert not localize(rewritten_division, *args).found
    report = localize(rewritten_division, *args, replay="compiled-segments")
    assert report.found and report.replay == "compiled-segments"
    assert (report.origin.primitive, report.origin.cause, report.origin.kind) == ("div", "overflow", "inf")
    assert "rewritten_division" in report.origin.source
    # The operands are the compiled program's values: its first division gave 1, its second inf.
    assert report.origin.inputs[0]["max"] == 1.0 and report.origin.outputs[0]["posinf"] == 1


def test_compiled_segments_replay_agrees_with_op_by_op_when_both_find_it():
    model = NormNet()
    x = jnp.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    params = model.init(jax.random.key(0), x)["params"]
    fn = lambda p, x, y: mse_step(model, p, x, y)  # noqa: E731
    compiled = localize(fn, params, x, jnp.zeros((2, 1)), segment_size=4, replay="compiled-segments")
    eager = localize(fn, params, x, jnp.zeros((2, 1)), segment_size=0)
    assert compiled.found and compiled.replay == "compiled-segments" and eager.replay == "op-by-op"
    assert compiled.to_dict()["origin"] == eager.to_dict()["origin"]
    assert (compiled.num_events, compiled.num_equations) == (eager.num_events, eager.num_equations)
    assert [e.index for e in compiled.events] == [e.index for e in eager.events]


def test_compiled_segments_replay_needs_segments():
    with pytest.raises(ValueError, match="segment_size > 0"):
        localize(rewritten_division, TINY, TINY, TINY, replay="compiled-segments", segment_size=0)
    with pytest.raises(ValueError, match="replay must be one of"):
        localize(rewritten_division, TINY, TINY, TINY, replay="fused")


# ---------------------------------------------------------------------------------- reproduce


def test_the_normal_case_is_found_op_by_op_and_tries_nothing_else():
    report = reproduce(lambda x: jnp.sum(jnp.log(x)), jnp.array([0.0, 1.0]))
    assert report.found and report.replay == "op-by-op"
    assert [r["name"] for r in report.replays] == ["op-by-op"] and report.replays[0]["found"] is True
    assert report.advice == []
    assert "reproduced by" not in str(report)


def test_op_by_op_finds_nothing_then_compiled_segments_finds_it():
    report = reproduce(rewritten_division, TINY, TINY, TINY)
    assert report.found and report.replay == "compiled-segments"
    assert [(r["name"], r["found"]) for r in report.replays] == [("op-by-op", False), ("compiled-segments", True)]
    assert report.origin.primitive == "div" and report.advice == []
    assert "reproduced by the compiled-segments replay: op-by-op found nothing; compiled-segments found it" \
        in str(report)
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["replay"] == "compiled-segments" and d["advice"] == []


def finite_stand_in(*args, **kwargs):
    return jnp.sum(jnp.zeros(3))


def finite_on(monkeypatch, *, replays=("op-by-op", "compiled-segments"), on_cpu_device=False):
    """Make `localize` replay a finite stand-in function for `replays` (on the CPU device too if asked).

    Returns the list of (replay, device) pairs `localize` was called with.
    """
    real, calls = nanlab.trace.localize, []

    def fake(fn, *args, replay="op-by-op", device=None, **options):
        calls.append((replay, device))
        if replay in replays and (device is None or on_cpu_device):
            fn = finite_stand_in  # what this replay computes is finite
        return real(fn, *args, replay=replay, device=device, **options)

    monkeypatch.setattr(nanlab.trace, "localize", fake)
    return calls


def test_the_cpu_replay_runs_when_the_call_ran_on_another_device(monkeypatch):
    calls = finite_on(monkeypatch)
    monkeypatch.setattr("nanlab.trace._reproduce._platform", lambda args: "gpu")
    report = reproduce(lambda x: jnp.sum(jnp.log(x)), jnp.array([0.0, 1.0]))
    assert report.found and report.replay == "cpu-op-by-op"
    assert [(r["name"], r["found"]) for r in report.replays] == [
        ("op-by-op", False), ("compiled-segments", False), ("cpu-op-by-op", True)]
    assert calls[-1] == ("op-by-op", jax.devices("cpu")[0])
    assert (report.origin.primitive, report.origin.cause) == ("log", "log-of-zero")


def test_on_the_cpu_the_cpu_replay_is_skipped_as_the_same_as_op_by_op(monkeypatch):
    calls = finite_on(monkeypatch)
    report = reproduce(lambda x: jnp.sum(jnp.log(x)), jnp.array([0.0, 1.0]))
    assert [c[0] for c in calls] == ["op-by-op", "compiled-segments"]  # no third replay
    assert report.replays[-1] == {"name": "cpu-op-by-op",
                                  "skipped": "the call ran on the CPU: the same replay as op-by-op"}


def test_when_no_replay_finds_it_the_report_says_so_with_what_to_try(monkeypatch):
    finite_on(monkeypatch, on_cpu_device=True)
    monkeypatch.setattr("nanlab.trace._reproduce._platform", lambda args: "gpu")
    report = reproduce(lambda x: jnp.sum(jnp.log(x)), jnp.array([0.0, 1.0]))
    assert not report.found and report.replay is None and report.cause == "none"
    assert [(r["name"], r["found"]) for r in report.replays] == [
        ("op-by-op", False), ("compiled-segments", False), ("cpu-op-by-op", False)]
    text = str(report)
    assert text.startswith("nanlab.trace: the call went non-finite, but no replay reproduced it")
    for needle in ("jax_debug_nans", "--xla_cpu_enable_fast_math=false", "--xla_gpu_enable_fast_min_max=false",
                   "--xla_gpu_deterministic_ops=true"):
        assert needle in text
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert d["replay"] is None and d["advice"] == list(ADVICE)


def test_a_plain_localize_that_finds_nothing_gives_no_advice():
    report = localize(lambda x: x * 2.0, jnp.ones(3))
    assert report.replay is None and report.advice == []
    assert str(report).startswith("nanlab.trace: no NaN or Inf in")


# ------------------------------------------------------------------------------ through the guard


def division_step(state, x):
    """A step whose jitted update overflows only because XLA rewrites it (see the module docstring)."""
    w = rewritten_division(state["w"], x, x)
    return {"w": w}, {"w_mean": jnp.mean(w)}


def test_guard_reports_the_replay_that_reproduced_a_compiled_only_failure(tmp_path, capsys):
    guarded = guard(division_step, on_failure="raise", workdir=tmp_path)
    state = {"w": jnp.full((2,), TINY)}
    with pytest.raises(NonFiniteError) as caught:
        guarded(state, jnp.full((2,), TINY))
        guarded.check()
    error = caught.value
    assert error.report.replay == "compiled-segments"
    assert error.report.origin.primitive == "div"
    assert error.payload["report"]["replay"] == "compiled-segments"
    assert json.loads((tmp_path / "report.json").read_text())["report"]["replay"] == "compiled-segments"
    assert "reproduced by the compiled-segments replay" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["op-by-op", "none"])
def test_guard_report_json_names_the_replay_or_says_none_did(tmp_path, capsys, monkeypatch, case):
    if case == "none":
        finite_on(monkeypatch)
    guarded = guard(lambda s, x: ({"w": s["w"] * jnp.log(x)}, {}), on_failure="raise", workdir=tmp_path)
    with pytest.raises(NonFiniteError) as caught:
        guarded({"w": jnp.ones(2)}, jnp.zeros(2))
        guarded.check()
    written = json.loads((tmp_path / "report.json").read_text())["report"]
    out = capsys.readouterr().out
    if case == "op-by-op":
        assert caught.value.report.replay == written["replay"] == "op-by-op"
        assert written["advice"] == []
    else:
        assert caught.value.report.replay is None and written["replay"] is None
        assert written["advice"] == list(ADVICE)
        assert "no replay reproduced it" in out and "what to try:" in out


# ------------------------------------------------------------------------------ through the train CLI


@pytest.mark.parametrize("case", ["op-by-op", "compiled-segments"])
def test_train_report_json_names_the_replay(tmp_path, capsys, monkeypatch, case):
    if case == "compiled-segments":
        finite_on(monkeypatch, replays=("op-by-op",))  # the op-by-op replay misses it
    workdir = tmp_path / "run"
    code = train.main(_argv(workdir, scenario="naive-loss", steps=10, batch_size=8, num_train=64,
                            num_val=16, log_every=1))
    out = capsys.readouterr().out
    assert code == 3
    report = json.loads((workdir / "report.json").read_text())
    assert report["report"]["found"] is True and report["report"]["replay"] == case
    assert report["verdict"]["cause"] == "unstable-loss"
    names = [r["name"] for r in report["report"]["replays"]]
    assert names == (["op-by-op"] if case == "op-by-op" else ["op-by-op", "compiled-segments"])
    assert ("reproduced by the compiled-segments replay" in out) == (case == "compiled-segments")

