"""Tests of nanlab.program_store: programs kept between runs skip tracing, and never run for other inputs."""

import pickle
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanlab import program_store
from nanlab.program_store import ProgramStore


def _step(traces):
    """A step ``(state, batch) -> (state, metrics)`` whose traces are counted in `traces`."""

    def step(state, batch):
        traces.append(1)
        new = {"w": state["w"] - 0.1 * batch.mean(axis=0), "count": state["count"] + 1}
        return new, {"loss": jnp.sum(new["w"] ** 2)}

    return step


def _args(size=3):
    state = {"w": jnp.arange(size, dtype=jnp.float32), "count": jnp.zeros((), jnp.int32)}
    return state, jnp.ones((4, size), jnp.float32)


def test_a_second_store_runs_the_program_without_tracing_it(tmp_path):
    traces, warnings = [], []
    first = ProgramStore(tmp_path, {"run": 1}, warn=warnings.append).jit("step")(_step(traces))
    expected = first(*_args())
    assert first.source == "traced" and len(traces) == 1
    assert len(list(tmp_path.glob("step-*" + program_store.SUFFIX))) == 1

    again = ProgramStore(tmp_path, {"run": 1}, warn=warnings.append)
    second = again.jit("step")(_step(traces))
    outputs = second(*_args())
    assert second.source == "stored" and again.sources == {"step": "stored"}
    assert len(traces) == 1  # the function was not traced again
    jax.tree.map(np.testing.assert_array_equal, outputs, expected)
    assert jax.tree.structure(outputs) == jax.tree.structure(expected)
    assert warnings == []


def test_prefetch_loads_in_the_background_and_the_call_takes_it(tmp_path):
    traces = []
    ProgramStore(tmp_path, {}).jit("step")(_step(traces))(*_args())
    store = ProgramStore(tmp_path, {})
    store.prefetch("step")
    store.prefetch("absent")  # no entry: nothing to load, no error
    program = store.jit("step")(_step(traces))
    program(*_args())
    assert program.source == "stored" and len(traces) == 1


def test_the_key_covers_the_description_the_parts_and_the_source(tmp_path):
    store = ProgramStore(tmp_path, {"lr": 0.1})
    assert store.path("step") == ProgramStore(tmp_path, {"lr": 0.1}).path("step")
    assert store.path("step") != ProgramStore(tmp_path, {"lr": 0.2}).path("step")
    assert store.path("step") != store.path("step", conv_library="eigen")
    assert store.path("step") != store.path("eval")

    package = tmp_path / "package"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    before = program_store.source_digest(package)
    (package / "a.py").write_text("x = 2\n")
    assert program_store.source_digest(package) != before


def test_other_argument_shapes_are_traced_and_stored_in_its_place(tmp_path):
    traces = []
    ProgramStore(tmp_path, {}).jit("step")(_step(traces))(*_args(3))
    program = ProgramStore(tmp_path, {}).jit("step")(_step(traces))
    state, batch = _args(5)
    outputs = program(state, batch)
    assert program.source == "traced" and len(traces) == 2
    np.testing.assert_allclose(outputs[0]["w"], np.arange(5) - 0.1, rtol=1e-6)
    third = ProgramStore(tmp_path, {}).jit("step")(_step(traces))
    third(*_args(5))
    assert third.source == "stored" and len(traces) == 2


def test_a_program_jitted_otherwise_is_not_taken(tmp_path):
    traces = []
    ProgramStore(tmp_path, {}).jit("step")(_step(traces))(*_args())
    program = ProgramStore(tmp_path, {}).jit("step")(_step(traces), donate_argnums=0)
    program(*_args())
    assert program.source == "traced"


def test_later_calls_of_other_types_go_through_jax_jit(tmp_path):
    traces = []
    program = ProgramStore(tmp_path, {}).jit("step")(_step(traces))
    program(*_args(3))
    outputs = program(*_args(4))  # a second shape: jax.jit traces it, as it would
    assert outputs[0]["w"].shape == (4,) and len(traces) == 2


def test_an_unreadable_entry_is_one_warning_and_a_trace(tmp_path):
    traces, warnings = [], []
    store = ProgramStore(tmp_path, {}, warn=warnings.append)
    store.path("step").parent.mkdir(parents=True, exist_ok=True)
    store.path("step").write_bytes(b"not a program")
    program = store.jit("step")(_step(traces))
    state, batch = _args()
    outputs = program(state, batch)
    assert program.source == "traced"
    assert len(warnings) == 1 and "unreadable" in warnings[0]
    np.testing.assert_allclose(outputs[0]["w"], np.arange(3) - 0.1, rtol=1e-6)
    again = ProgramStore(tmp_path, {}).jit("step")(_step(traces))
    again(*_args())
    assert again.source == "stored"  # the entry was written over


def test_a_store_that_cannot_be_written_warns_and_the_program_runs(tmp_path):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the directory should be")
    warnings = []
    program = ProgramStore(blocker / "programs", {}, warn=warnings.append).jit("step")(_step([]))
    outputs = program(*_args())
    assert program.source == "traced"
    assert len(warnings) == 1 and "could not store program step" in warnings[0]
    assert float(outputs[1]["loss"]) > 0
    assert not list(tmp_path.glob("**/.step-*"))  # no temporary left behind


def test_only_the_most_recent_entries_of_a_program_are_kept(tmp_path):
    store = ProgramStore(tmp_path, {})
    for variant in range(program_store.KEEP_PER_PROGRAM + 2):
        store.jit("step", variant=variant)(_step([]))(*_args())
    assert len(list(tmp_path.glob("step-*" + program_store.SUFFIX))) == program_store.KEEP_PER_PROGRAM
    assert not store.path("step", variant=0).exists() and store.path("step", variant=5).exists()


def test_donation_holds_for_a_stored_program(tmp_path):
    ProgramStore(tmp_path, {}).jit("step")(_step([]), donate_argnums=0)(*_args())
    program = ProgramStore(tmp_path, {}).jit("step")(_step([]), donate_argnums=0)
    state, batch = _args()
    program(state, batch)
    assert program.source == "stored"
    assert state["w"].is_deleted() and not batch.is_deleted()


def test_traced_arguments_go_through_jax_jit(tmp_path):
    traces = []
    program = ProgramStore(tmp_path, {}).jit("step")(_step(traces))
    shapes = jax.eval_shape(program, *_args())
    assert shapes[0]["w"].shape == (3,)
    assert program.source is None and not list(tmp_path.iterdir())  # nothing compiled or stored


def test_static_arguments_and_several_devices_are_refused(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no static arguments"):
        ProgramStore(tmp_path, {}).jit("step")(_step([]), static_argnums=(1,))
    monkeypatch.setattr(jax, "device_count", lambda: 4)
    with pytest.raises(ValueError, match="single-device processes; this one has 4 devices"):
        ProgramStore(tmp_path, {})


def test_prepare_exports_from_shapes_and_compiles_in_the_background(tmp_path):
    traces, compiled_in = [], []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **kw: compiled_in.append((kw.get("fun_name"), threading.current_thread().name))
        if event == "/jax/core/compile/backend_compile_duration" else None)
    store = ProgramStore(tmp_path, {})
    program = store.jit("step")(_step(traces), donate_argnums=0)
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _args())
    shapes = program.prepare(*specs)
    assert len(traces) == 1 and program.source == "traced"
    assert jax.tree.map(lambda s: (s.shape, s.dtype), shapes) == (
        {"w": ((3,), jnp.float32), "count": ((), jnp.int32)}, {"loss": ((), jnp.float32)})
    outputs = program(*_args())  # the executable compiled in the background: no second trace
    assert len(traces) == 1
    assert [thread for name, thread in compiled_in if name == "jit(stored_step)"] == ["nanlab-compile_0"]
    jax.tree.map(np.testing.assert_array_equal, outputs, jax.jit(_step([]))(*_args()))

    again = ProgramStore(tmp_path, {}).jit("step")(_step(traces), donate_argnums=0)
    assert jax.tree.structure(again.prepare(*specs)) == jax.tree.structure(shapes)
    assert again.source == "stored" and len(traces) == 1  # shapes from the entry, nothing traced
    again(*_args())
    assert len(traces) == 1


def test_a_stored_export_that_does_not_compile_is_one_warning_and_a_trace(tmp_path):
    traces, warnings = [], []
    ProgramStore(tmp_path, {}).jit("step")(_step(traces))(*_args())
    path = ProgramStore(tmp_path, {}).path("step")
    entry = program_store._Entry(*pickle.loads(path.read_bytes()))
    for how in ("call", "prefetch", "prepare"):
        path.write_bytes(pickle.dumps(tuple(entry._replace(exported=b"\x00" * 64))))
        store = ProgramStore(tmp_path, {}, warn=warnings.append)
        if how == "prefetch":
            store.prefetch("step")
        program = store.jit("step")(_step(traces))
        if how == "prepare":
            program.prepare(*_args())
        outputs = program(*_args())
        assert program.source == "traced", how
        assert len(warnings) == 1 and "unreadable" in warnings[0], how
        np.testing.assert_allclose(outputs[0]["w"], np.arange(3) - 0.1, rtol=1e-6)
        warnings.clear()
