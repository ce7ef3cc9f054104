"""Tests of nanlab.models.conv_tuning: every choice it can make is exact, it keeps the fastest, the
cache round-trips per machine, and an active table reaches the model's convolutions."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanlab.models import conv as conv_lib
from nanlab.models import conv_tuning
from nanlab.models.conv import Conv, conv

from tests.models.test_conv import SHAPE_CASES, _assert_close, _case_id, _operands


@pytest.fixture(autouse=True)
def no_active_table():
    conv_tuning.activate({})
    yield
    conv_tuning.activate({})


def _key(kernel_size, strides, padding, hw, batch=2, cin=3, cout=4, dtype=jnp.float32):
    return conv_lib.conv_key((batch, *hw, cin), (*kernel_size, cin, cout), strides, padding, dtype)


def test_key_round_trips():
    key = _key((3, 1), (2, 2), "VALID", (9, 8), dtype=jnp.bfloat16)
    assert key == "x2x9x8x3-k3x1x3x4-s2x2-VALID-bfloat16"
    assert conv_tuning.parse_key(key) == ((2, 9, 8, 3), (3, 1, 3, 4), (2, 2), "VALID", "bfloat16")


def test_candidates_per_kernel_shape():
    assert conv_tuning.candidates(_key((1, 1), (1, 1), "SAME", (5, 6))) == ("xla", "fast")
    assert conv_tuning.candidates(_key((3, 3), (1, 1), "SAME", (5, 6))) == (
        "xla", "fast:xla", "fast:im2col", "fast:taps", "fast:swap")


@pytest.mark.parametrize("case", SHAPE_CASES, ids=_case_id)
def test_every_choice_equals_xla_in_value_and_gradients(case):
    kernel_size, strides, padding, hw = case
    x, kernel, cotangent = _operands(kernel_size, strides, padding, hw)
    key = conv_lib.conv_key(x.shape, kernel.shape, strides, padding, x.dtype)

    def value_and_grads(impl, kernel_grad=None):
        y, vjp = jax.vjp(lambda a, k: conv(a, k, strides, padding, impl, kernel_grad=kernel_grad), x, kernel)
        return (y, *vjp(cotangent))

    expected = value_and_grads("xla")
    for choice in conv_tuning.candidates(key):
        impl, _, kernel_grad = choice.partition(":")
        actual = value_and_grads(impl, kernel_grad or None)
        for name, a, e in zip(("value", "dx", "dkernel"), actual, expected):
            assert a.shape == e.shape, (choice, name)
            _assert_close(a, e, f"{choice} {name}")


def test_tune_keeps_the_fastest_choice_per_key():
    keys = [_key((3, 3), (1, 1), "SAME", (7, 6)), _key((1, 1), (1, 1), "SAME", (5, 6))]
    costs = {(keys[0], "fast:swap"): 1.0, (keys[0], "xla"): 3.0, (keys[1], "xla"): 0.5}
    seen = []
    table = conv_tuning.tune(keys + keys[:1], timer=lambda k, c: costs.get((k, c), 2.0),
                             progress=lambda done, total, key: seen.append((done, total)))
    assert table == {keys[0]: "fast:swap", keys[1]: "xla"}
    assert seen == [(1, 2), (2, 2)]  # a repeated key is timed once


def test_time_choice_measures_a_real_convolution():
    key = _key((3, 3), (1, 1), "SAME", (7, 6))
    seconds = conv_tuning.time_choice(key, "fast:taps", repeats=2)
    assert 0 < seconds < 5
    table = conv_tuning.tune([key], repeats=1)
    assert table[key] in conv_tuning.candidates(key)


def test_cache_round_trips_per_machine_and_survives_garbage(tmp_path):
    path = tmp_path / "conv-tuning.json"
    assert conv_tuning.load(path, "m1") == {}
    conv_tuning.save(path, "m1", {"a": "xla"})
    conv_tuning.save(path, "m2", {"a": "fast:taps"})
    conv_tuning.save(path, "m1", {"b": "fast"})
    assert conv_tuning.load(path, "m1") == {"a": "xla", "b": "fast"}
    assert conv_tuning.load(path, "m2") == {"a": "fast:taps"}
    data = json.loads(path.read_text())
    data["m1"]["c"] = "fast:warp"  # a choice this version does not know is ignored
    path.write_text(json.dumps(data))
    assert conv_tuning.load(path, "m1") == {"a": "xla", "b": "fast"}
    path.write_text("{not json")
    assert conv_tuning.load(path, "m1") == {}
    conv_tuning.save(path, "m1", {"d": "xla"})
    assert conv_tuning.load(path, "m1") == {"d": "xla"}
    assert [p.name for p in tmp_path.iterdir()] == ["conv-tuning.json"]  # no temporary file left


def test_default_path_follows_the_env_var(monkeypatch, tmp_path):
    monkeypatch.setenv(conv_tuning.ENV_VAR, "off")
    assert conv_tuning.default_path() is None
    monkeypatch.setenv(conv_tuning.ENV_VAR, str(tmp_path / "t.json"))
    assert conv_tuning.default_path() == tmp_path / "t.json"
    monkeypatch.delenv(conv_tuning.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert conv_tuning.default_path() == tmp_path / "xdg" / "nanlab" / "conv-tuning.json"


class _TwoConvs(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = Conv(4, (1, 1), impl="tuned")(x)
        return Conv(4, (3, 3), impl="tuned")(nn.relu(x))


def _primitives(fn, *args):
    # A fresh function per call: JAX reuses a cached trace of the same function object.
    return {e.primitive.name for e in jax.make_jaxpr(lambda *a: fn(*a))(*args).eqns}


def test_an_active_table_reaches_the_model_and_no_table_means_fast():
    model = _TwoConvs()
    x = jnp.ones((2, 6, 6, 3))
    params = model.init(jax.random.key(0), x)
    keys = conv_tuning.conv_keys_of(lambda p, x: model.apply(p, x), params, x)
    assert len(keys) == 2 and keys[0].startswith("x2x6x6x3-k1x1x3x4")
    # No table: "tuned" is "fast", whose 1x1 is a channel matmul (no convolution primitive).
    one_by_one = lambda p, x: Conv(4, (1, 1), impl="tuned").apply(p, x)  # noqa: E731
    small = Conv(4, (1, 1)).init(jax.random.key(0), x)
    assert "conv_general_dilated" not in _primitives(one_by_one, small, x)
    conv_tuning.activate({keys[0]: "xla"})
    assert "conv_general_dilated" in _primitives(one_by_one, small, x)
    np.testing.assert_allclose(one_by_one(small, x), Conv(4, (1, 1), impl="xla").apply(small, x), rtol=1e-6)


def test_ensure_tuned_times_once_then_reads_the_cache(tmp_path):
    model = _TwoConvs()
    x = jnp.ones((2, 6, 6, 3))
    params = model.init(jax.random.key(0), x)
    apply = lambda p, x: model.apply(p, x)  # noqa: E731
    timed = []

    def timer(key, choice):
        timed.append((key, choice))
        return 1.0 if choice == "xla" else 2.0

    path = tmp_path / "conv-tuning.json"
    table, fresh = conv_tuning.ensure_tuned(apply, params, x, path=path, timer=timer)
    assert fresh == 2 and set(table.values()) == {"xla"} and conv_tuning.active() == table
    assert len(timed) == 2 + 5  # every candidate of the 1x1 and of the 3x3
    conv_tuning.activate({})
    again, fresh = conv_tuning.ensure_tuned(apply, params, x, path=path, timer=timer)
    assert fresh == 0 and again == table and len(timed) == 7 and conv_tuning.active() == table


def test_a_cache_that_cannot_be_written_leaves_no_temporary_and_the_picks_active(tmp_path, monkeypatch):
    model = _TwoConvs()
    x = jnp.ones((2, 6, 6, 3))
    params = model.init(jax.random.key(0), x)
    conv_tuning.activate({})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conv_tuning.json, "dump", full_disk)
    path = tmp_path / "conv-tuning.json"
    try:
        with pytest.raises(OSError, match="No space left"):
            conv_tuning.ensure_tuned(lambda p, x: model.apply(p, x), params, x, path=path,
                                     timer=lambda key, choice: 1.0 if choice == "xla" else 2.0)
        assert len(conv_tuning.active()) == 2  # tuned and in use for this process
        assert list(tmp_path.iterdir()) == []  # neither the cache nor a half-written temporary
    finally:
        conv_tuning.activate({})


def test_picks_are_timed_and_cached_per_convolution_library(tmp_path, monkeypatch):
    """A table timed for one library (`conv.LIBRARIES`) is not another's: the eigen picks are timed
    with the eigen options and cached under their own machine key, beside the default's."""
    model = _TwoConvs()
    x = jnp.ones((2, 6, 6, 3))
    params = model.init(jax.random.key(0), x)
    apply = lambda p, x: model.apply(p, x)  # noqa: E731
    libraries_timed = []

    def time_choice(key, choice, *, repeats=3, library="default"):
        libraries_timed.append(library)
        return 1.0 if (choice == "xla") == (library == "default") else 2.0

    monkeypatch.setattr(conv_tuning, "time_choice", time_choice)
    path = tmp_path / "conv-tuning.json"
    default, _ = conv_tuning.ensure_tuned(apply, params, x, path=path)
    eigen, fresh = conv_tuning.ensure_tuned(apply, params, x, path=path, library="eigen")
    assert set(libraries_timed) == {"default", "eigen"} and fresh == 2
    assert set(default.values()) == {"xla"} and "xla" not in eigen.values()
    data = json.loads(path.read_text())
    assert set(data) == {conv_tuning.machine_id(), conv_tuning.machine_id("eigen")}
    assert conv_tuning.machine_id("eigen").endswith("| conv library eigen")
    with pytest.raises(ValueError, match="'mkl'"):
        conv_tuning.machine_id("mkl")


def test_time_choice_compiles_for_the_library():
    key = _key((3, 3), (1, 1), "SAME", (7, 6), cin=32, cout=24)
    assert 0 < conv_tuning.time_choice(key, "xla", repeats=1, library="eigen") < 5
    x, kernel, cotangent, strides, padding = conv_tuning._operands(key)
    for library, fusions in (("eigen", False), ("default", True)):
        text = conv_tuning._train_pass("xla", strides, padding, library).lower(x, kernel, cotangent).compile().as_text()
        assert ("%ynn_fusion" in text) == (fusions and jax.__version_info__ >= (0, 10, 0)), library


def test_fastest_times_every_run_interleaved_and_keeps_the_least_median():
    calls, now = [], [0.0]
    cost = {"a": 3.0, "b": 1.0, "c": 2.0}

    def run(name):
        def call():
            calls.append(name)
            now[0] += cost[name]
        return call

    name, medians = conv_tuning.fastest({n: run(n) for n in cost}, rounds=2, clock=lambda: now[0])
    assert name == "b" and medians == cost
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * 2  # one untimed call each, then in turn
    with pytest.raises(ValueError, match="at least one"):
        conv_tuning.fastest({})


def test_program_library_is_measured_once_then_read_from_the_cache(tmp_path, monkeypatch):
    path = tmp_path / "conv-tuning.json"
    built = []

    def time_program(library):
        built.append(library)
        return lambda: None

    monkeypatch.setattr(conv_tuning, "fastest", lambda runs, rounds: ("eigen", {"default": 2.0, "eigen": 1.0}))
    assert conv_tuning.ensure_program_library("train | m", time_program, path=path) == \
        ("eigen", {"default": 2.0, "eigen": 1.0})
    assert built == list(conv_lib.LIBRARIES)
    assert conv_tuning.ensure_program_library("train | m", time_program, path=path) == ("eigen", None)
    assert built == list(conv_lib.LIBRARIES)  # nothing built or timed the second time
    data = json.loads(path.read_text())
    assert data[f"{conv_tuning.machine_id()} | programs"] == {"train | m": "eigen"}
    # The formulation table of the same machine does not take program picks for formulations.
    assert conv_tuning.load(path, conv_tuning.machine_id()) == {}


def test_a_program_pick_that_cannot_be_cached_is_still_returned(tmp_path, monkeypatch):
    monkeypatch.setattr(conv_tuning, "fastest", lambda runs, rounds: ("eigen", {"default": 2.0, "eigen": 1.0}))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conv_tuning, "save", full_disk)
    with pytest.raises(conv_tuning.CachedPickError) as caught:
        conv_tuning.ensure_program_library("eval | m", lambda library: (lambda: None), path=tmp_path / "c.json")
    assert caught.value.library == "eigen" and caught.value.strerror == "No space left on device"


def test_a_full_disk_at_flush_leaves_no_temporary(tmp_path, monkeypatch):
    """A small JSON file hits a full disk when its buffer is flushed, not in json.dump: the
    temporary file is removed all the same and the earlier cache file stays."""
    import tempfile

    path = tmp_path / "conv-tuning.json"
    conv_tuning.save(path, "m", {"k": "xla"})
    real = tempfile.NamedTemporaryFile

    class FullDisk:
        def __init__(self, *args, **kwargs):
            self._file = real(*args, **kwargs)
            self.name = self._file.name

        def write(self, text):
            return self._file.write(text)

        def flush(self):
            raise OSError(28, "No space left on device")

        def close(self):
            self._file.close()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._file.close()

    monkeypatch.setattr(conv_tuning.tempfile, "NamedTemporaryFile", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        conv_tuning.save(path, "m", {"k": "fast"})
    assert list(tmp_path.iterdir()) == [path]
    assert conv_tuning.load(path, "m") == {"k": "xla"}
