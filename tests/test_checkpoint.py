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
from nanlab.checkpoint import CheckpointError, CheckpointMismatch, Checkpointer, CorruptCheckpoint, nonfinite_leaves
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
    with pytest.raises(CorruptCheckpoint, match=r"^checkpoint 1 in .*ck is corrupt: [a-z ]+"):
        Checkpointer(tmp_path / "ck").restore(_state())


def test_mismatch_names_the_array_and_both_shapes_before_reading_arrays(tmp_path):
    checkpointer = Checkpointer(tmp_path / "ck")
    checkpointer.save(4, _state())
    with pytest.raises(CheckpointMismatch) as caught:
        checkpointer.restore(_state(shape=(3, 5)))
    message = str(caught.value)
    assert message.count("\n") == 0 and len(message) < 200
    assert "checkpoint 4 does not match this run" in message
    assert "it holds params/dense/bias as float32[4], this run has float32[5]" in message
    assert "strict" not in message and "ArrayRestoreArgs" not in message  # no orbax internals


def _three_checkpoints(directory):
    checkpointer = Checkpointer(directory, keep=3)
    for step in (1, 2, 3):
        checkpointer.save(step, _state(step=step, value=float(step)))
    checkpointer.close()


def _file_roles(directory):
    """Each file of a checkpoint as a role that survives a new save: its path, or for the content-
    addressed data files (random names, and a number that varies between saves) their folder,
    'default/d/*', standing for every file in it. Role -> the files to damage."""
    roles: dict[str, list] = {}
    for path in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        relative = path.relative_to(directory)
        role = f"{relative.parent}/*" if relative.parent.name == "d" else str(relative)
        roles.setdefault(role, []).append(path)
    return roles


def _checkpoint_file_roles():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _three_checkpoints(Path(tmp))
        return sorted(_file_roles(Path(tmp) / "3"))


def _damage(path, how):
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"\x00garbage" * 8)


@pytest.mark.parametrize("how", ["deleted", "truncated", "garbage"])
@pytest.mark.parametrize("role", _checkpoint_file_roles())
def test_damaged_newest_checkpoint_falls_back_to_the_previous_intact_one(tmp_path, role, how):
    directory = tmp_path / "ck"
    _three_checkpoints(directory)
    for path in _file_roles(directory / "3")[role]:
        _damage(path, how)
    step, restored, skipped = Checkpointer(directory).restore_newest_intact(_state())
    # Never wrong values: either the damage did not touch what a restore reads (checkpoint 3
    # comes back whole) or checkpoint 3 is skipped, with a reason, for the intact checkpoint 2.
    if step == 3:
        assert skipped == [] and _equal(restored, _state(step=3, value=3.0))
    else:
        assert step == 2 and _equal(restored, _state(step=2, value=2.0))
        assert skipped in ([], [skipped[0]])
        assert all(line.startswith("checkpoint 3: ") for line in skipped)


def test_fallback_happens_for_a_damaged_data_file(tmp_path):
    # The arrays' data files are what a restore must read: damaging them is never silent.
    directory = tmp_path / "ck"
    _three_checkpoints(directory)
    for path in (directory / "3").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            _damage(path, "garbage")
    step, restored, skipped = Checkpointer(directory).restore_newest_intact(_state())
    assert step == 2 and _equal(restored, _state(step=2, value=2.0))
    assert len(skipped) == 1 and skipped[0].startswith("checkpoint 3: ")


def test_every_checkpoint_broken_is_one_clear_error(tmp_path):
    directory = tmp_path / "ck"
    _three_checkpoints(directory)
    for path in directory.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            _damage(path, "truncated")
    with pytest.raises(CheckpointError, match=r"^no intact checkpoint in .*ck \(checkpoint 3: .*; checkpoint 2: .*; "
                                              r"checkpoint 1: .*\)$"):
        Checkpointer(directory).restore_newest_intact(_state())


def test_fallback_does_not_hide_a_mismatch(tmp_path):
    directory = tmp_path / "ck"
    _three_checkpoints(directory)
    with pytest.raises(CheckpointMismatch, match="checkpoint 3 does not match this run"):
        Checkpointer(directory).restore_newest_intact(_state(shape=(3, 5)))


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


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    directory = tmp_path / "ck"
    checkpointer = Checkpointer(directory, keep=2)
    checkpointer.save(1, _state(step=1, value=1.0))
    checkpointer.save(10, _state(step=10, value=10.0))  # a neighbour whose name starts like step 1's
    real_save = checkpointer._manager.save

    def save_then_fail(step, *args, **kwargs):
        # The disk fills part-way: orbax has begun step 2's temporary folder when the write fails.
        (directory / f"{step}.orbax-checkpoint-tmp-1").mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointer._manager, "save", save_then_fail)
    with pytest.raises(CheckpointError) as caught:
        checkpointer.save(1, _state(step=1, value=1.0))
    message = str(caught.value)
    assert message == f"could not write checkpoint 1 in {directory}: No space left on device; checkpoint 10 is intact"
    assert sorted(p.name for p in directory.iterdir()) == ["1", "10"]
    monkeypatch.setattr(checkpointer._manager, "save", real_save)
    step, restored = Checkpointer(directory).restore(_state())
    assert step == 10 and _equal(restored, _state(step=10, value=10.0))
    _, restored = Checkpointer(directory).restore(_state(), step=1)
    assert _equal(restored, _state(step=1, value=1.0))
