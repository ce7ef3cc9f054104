"""Fault injection on `python -m nanlab.train`: signals, kills, a full disk and broken checkpoints.

Each case stops or damages a run of the 3-conv model, then checks what a user gets: the exit code,
one line on stderr, only complete checkpoints, and a `--resume` whose metrics equal those of a run
that was never disturbed (timing columns aside). Runs that must be a separate process (signals,
SIGKILL) are subprocesses sharing tests/test_train.py's compilation cache.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from nanlab import runlog, train
from tests.test_train import _argv, _rows_without_timing, _subprocess_env, compilation_cache  # noqa: F401

STEPS = 40
FLAGS = dict(steps=STEPS, checkpoint_every=10)


# A checkpoint every step (keep 2: every save also prunes), so that a kill lands in or right after a
# save or a prune.
EVERY_STEP = dict(FLAGS, checkpoint_every=1, keep_checkpoints=2)


def _reference_rows(tmp_path_factory, flags):
    workdir = tmp_path_factory.mktemp("reference") / "run"
    assert train.main(_argv(workdir, **flags)) == 0
    return _rows_without_timing(workdir / "metrics.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The undisturbed run's metrics rows (timing aside)."""
    return _reference_rows(tmp_path_factory, FLAGS)


@pytest.fixture(scope="module")
def reference_every_step(tmp_path_factory):
    """The same with a checkpoint (and so a metrics row) after every step."""
    return _reference_rows(tmp_path_factory, EVERY_STEP)


def _start(workdir, **flags):
    return subprocess.Popen([sys.executable, "-m", "nanlab.train", *_argv(workdir, **{**FLAGS, **flags})],
                            env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir, step, process, timeout=300):
    """Until metrics.jsonl holds a row at `step` or later (the run is past that point)."""
    deadline = time.time() + timeout
    path = workdir / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None:
        if path.exists() and any(r["step"] >= step for r in runlog.read_metrics(path)):
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {step} (exit {process.poll()})")


def _checkpoint_dirs(workdir):
    return sorted(p.name for p in (workdir / "checkpoints").iterdir())


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("at_step", [5, 25])
def test_a_signal_stops_cleanly_and_resume_equals_the_undisturbed_run(tmp_path, reference, signum, code, at_step):
    workdir = tmp_path / "run"
    process = _start(workdir)
    _wait_for_step(workdir, at_step, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode == code, err
    lines = [line for line in err.splitlines() if line.startswith("nanlab.train: ") and "resume with" in line]
    assert len(lines) == 1 and f"--workdir {workdir} --resume" in lines[0]
    assert "Traceback" not in err
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_by"] == signal.Signals(signum).name
    stopped_at = summary["steps"]
    assert at_step <= stopped_at < STEPS
    assert str(stopped_at) in _checkpoint_dirs(workdir)
    assert all(name.isdigit() for name in _checkpoint_dirs(workdir))  # no torn save left
    assert train.main(_argv(workdir, **FLAGS, resume=True)) == 0
    assert json.loads((workdir / "summary.json").read_text())["resumed_from"] == stopped_at
    assert _rows_without_timing(workdir / "metrics.jsonl") == reference


def test_a_second_ctrl_c_aborts_at_once_leaving_complete_checkpoints(tmp_path):
    workdir = tmp_path / "run"
    process = _start(workdir, steps=4000, checkpoint_every=1, log_every=1)
    _wait_for_step(workdir, 3, process)
    process.send_signal(signal.SIGINT)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in err
    names = _checkpoint_dirs(workdir)
    assert names and all(name.isdigit() for name in names)  # an aborted save's folder is removed


@pytest.mark.parametrize("at_step", [3, 12, 27])
def test_sigkill_inside_checkpoint_writes_then_resume_equals_the_undisturbed_run(tmp_path, reference_every_step,
                                                                                 at_step):
    workdir = tmp_path / "run"
    process = _start(workdir, **EVERY_STEP)
    _wait_for_step(workdir, at_step, process)
    process.kill()
    process.communicate(timeout=60)
    assert train.main(_argv(workdir, **EVERY_STEP, resume=True)) == 0
    assert _rows_without_timing(workdir / "metrics.jsonl") == reference_every_step
    assert all(name.isdigit() for name in _checkpoint_dirs(workdir))  # a torn save's folder was removed


def test_full_disk_during_a_checkpoint_stops_with_one_line_and_keeps_the_previous(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    real_save = ocp.CheckpointManager.save
    calls = []

    def save_until_the_disk_is_full(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_the_disk_is_full)
    assert train.main(_argv(workdir, **FLAGS)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"nanlab.train: error: could not write checkpoint 20 in {workdir / 'checkpoints'}: "
                       "No space left on device; checkpoint 10 is intact")
    assert not any("Traceback" in line for line in err)
    assert _checkpoint_dirs(workdir) == ["10"]


def test_a_corrupt_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys, reference):
    workdir = tmp_path / "run"
    assert train.main(_argv(workdir, **{**FLAGS, "steps": 20})) == 0
    for path in (workdir / "checkpoints" / "20").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the arrays' data: truncate them
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    capsys.readouterr()
    assert train.main(_argv(workdir, **FLAGS, resume=True)) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "skipped corrupt checkpoint" in line]
    assert len(warnings) == 1 and warnings[0].startswith("nanlab.train: warning: skipped corrupt checkpoint 20: ")
    assert warnings[0].endswith("resuming from checkpoint 10")
    assert _rows_without_timing(workdir / "metrics.jsonl") == reference
    assert _checkpoint_dirs(workdir) == ["30", "40"]  # the corrupt 20 was written again, then pruned
