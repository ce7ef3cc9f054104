"""Tests of nanlab.checkpoint: round trip, keep K, refusing non-finite states, clear errors, SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanlab import optim
from nanlab.checkpoint import CheckpointError, Checkpointer, nonfinite_leaves
from nanlab.step import TrainState


def _state(shape=(3, 4), step=0, value=1.0):
    tx = optim.make_tx("global_norm:1", "adam", 1e-3, skip_nonfinite=True)
    params = {"dense": {"kernel": jnp.full(shape, value), "bias": jnp.zeros(shape[-1])}}
    return TrainState(step=jnp.int32(step), params=params, batch_stats={"bn": {"mean": jnp.zeros(2)}},
                      opt_state=tx.init(params), rng=jax.random.PRNGKey(0))


def _equal(a, b):
    return all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_round_trip_and_keep_k(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck", keep=2)
    for step in (5, 10, 15):
        checkpointer.save(step, _state(step=step, value=float(step)))
    assert checkpointer.all_steps() == [10, 15]
    step, restored = checkpointer.restore(_state())
    assert step == 15 and _equal(restored, _state(step=15, value=15.0))
    assert type(restored.opt_state) is type(_state().opt_state)
    step, restored = checkpointer.restore(_state(), step=10)
    assert int(restored.step) == 10
    checkpointer.close()


def test_refuses_non_finite_state(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    bad = _state(value=float("nan"))
    with pytest.raises(CheckpointError, match=r"refusing to checkpoint a non-finite state at step 3: .*kernel"):
        checkpointer.save(3, bad)
    assert checkpointer.latest_step() is None
    assert nonfinite_leaves(_state()) == []
    assert nonfinite_leaves({"a": jnp.array([1.0, jnp.inf], jnp.bfloat16)}) == ["['a']"]


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        Checkpointer(tmp_path / "ck").restore(_state())


def test_mismatched_shape_is_a_clear_error(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    checkpointer.save(1, _state())
    with pytest.raises(CheckpointError, match="does not match this run"):
        checkpointer.restore(_state(shape=(3, 5)))


def test_mismatched_structure_is_a_clear_error(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    checkpointer.save(1, _state())
    other = _state().replace(batch_stats={})
    with pytest.raises(CheckpointError, match="does not match this run"):
        checkpointer.restore(other)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    checkpointer.save(1, _state())
    for path in (tmp_path / "ck" / "1").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or does not match"):
        Checkpointer(tmp_path / "ck").restore(_state())


_SAVER = textwrap.dedent(
    """
    import sys, jax.numpy as jnp
    from nanlab.checkpoint import Checkpointer
    from nanlab.step import TrainState
    import jax
    directory = sys.argv[1]
    checkpointer = Checkpointer(directory, keep=3)
    params = {"w": jnp.ones((256, 1024))}  # 1 MiB: each save takes a while
    step = 0
    while True:
        step += 1
        state = TrainState(step=jnp.int32(step), params={"w": params["w"] * step}, batch_stats={},
                           opt_state=(), rng=jax.random.PRNGKey(0))
        checkpointer.save(step, state)
        print(step, flush=True)
    """
)


def test_sigkill_mid_save_leaves_the_last_complete_checkpoint(tmp_path):
    directory = tmp_path / "ck"
    process = subprocess.Popen([sys.executable, "-c", _SAVER, str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        # Wait until a few checkpoints are complete, then kill while saves are in flight.
        deadline = time.time() + 120
        while time.time() < deadline:
            line = process.stdout.readline()
            if line and int(line) >= 3:
                break
        time.sleep(0.05)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    checkpointer = Checkpointer(directory)
    latest = checkpointer.latest_step()
    assert latest is not None and latest >= 3
    target = TrainState(step=jnp.int32(0), params={"w": jnp.zeros((256, 1024))}, batch_stats={}, opt_state=(),
                        rng=jax.random.PRNGKey(0))
    step, restored = checkpointer.restore(target)
    assert int(restored.step) == step
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.full((256, 1024), float(step)))
    # The torn save's temporary directory, if the kill left one, is gone or ignored.
    assert all(p.name.isdigit() for p in Path(directory).iterdir() if p.is_dir())
