"""The NaN-planting matrix of `python -m nanlab.train`: one bad value planted per place, with and
without `--skip-nonfinite`, and what the user gets.

Places: training images, training labels, validation data (a label), parameters, optimizer state,
a gradient. Data is planted in an .npz (refused with exit 2 unless `--allow-nonfinite-data`, see
tests/test_bad_input.py); parameters and optimizer state by wrapping `nanlab.step.create_train_state`;
a gradient by a loss whose forward value is the stable loss and whose derivative is NaN.
Without skipping, a planted training value ends in exit 3 with report.json naming what went
non-finite; with skipping, the bad steps are dropped and whatever checkpoint is written holds
only finite parameters, optimizer moments and BatchNorm statistics (the checkpointer refuses
anything else). Print the matrix with
`pytest tests/test_nan_matrix.py -s -p no:xdist -m "slow or not slow" | grep MATRIX`.

A value planted in the parameters or optimizer state before step 0 with --skip-nonfinite makes
every step skip (correctly untouched); the state due for a checkpoint still holds it, so the run
stops there with exit 3 (status non-finite, nothing saved) after reporting the first skipped step.
Either way the verdict is `nonfinite-state` (report.json is step 0's, or step 1's where step 0's update
carried planted moments into the weights: no learning rate enters the moments); the NaN
derivative's is `unstable-gradient`.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanlab import losses, train
from nanlab import step as step_lib
from tests.test_bad_input import SMALL, val_and_train_example, write_npz
from tests.test_train import _argv, compilation_cache  # noqa: F401

FLAGS = {**SMALL, "steps": 6, "log_every": 2, "checkpoint_every": 6}


def _plant_in_state(monkeypatch, where):
    real = step_lib.create_train_state

    def planted(*args, **kwargs):
        state = real(*args, **kwargs)
        if where == "params":
            params = jax.tree.map(lambda a: a, state.params)
            params["Conv2"]["Conv_0"]["kernel"] = params["Conv2"]["Conv_0"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
            return state.replace(params=params)
        adam = state.opt_state
        leaves, treedef = jax.tree.flatten(adam)
        first = next(i for i, leaf in enumerate(leaves) if getattr(leaf, "ndim", 0) == 4)  # a conv kernel's mu
        leaves[first] = leaves[first].at[(0,) * leaves[first].ndim].set(jnp.inf)
        return state.replace(opt_state=jax.tree.unflatten(treedef, leaves))

    monkeypatch.setattr(step_lib, "create_train_state", planted)


def _plant_in_gradient(monkeypatch):
    real_by_name = losses.by_name

    @jax.custom_jvp
    def nan_gradient(x):
        return x

    nan_gradient.defjvp(lambda primals, tangents: (primals[0], tangents[0] * jnp.nan))

    monkeypatch.setattr(losses, "by_name", lambda name: (lambda logits, labels: real_by_name(name)(
        nan_gradient(logits), labels)))


def _run(tmp_path, monkeypatch, capsys, place, skip):
    flags = {**FLAGS, **({"skip_nonfinite": True} if skip else {})}  # a store_true flag: no --no- form
    val_index, train_index = val_and_train_example()
    if place == "training images":
        flags.update(data=write_npz(tmp_path / "d.npz", x=((train_index, 40, 40, 0), np.nan)),
                     allow_nonfinite_data=True)
    elif place == "training labels":
        flags.update(data=write_npz(tmp_path / "d.npz", y=(train_index, np.nan)), allow_nonfinite_data=True)
    elif place == "validation data":
        flags.update(data=write_npz(tmp_path / "d.npz", y=(val_index, np.nan)), allow_nonfinite_data=True)
    elif place == "training images, not allowed":
        flags.update(data=write_npz(tmp_path / "d.npz", x=((train_index, 40, 40, 0), np.nan)))
    elif place in ("params", "optimizer state"):
        _plant_in_state(monkeypatch, place)
    elif place == "gradient":
        _plant_in_gradient(monkeypatch)
    workdir = tmp_path / "run"
    code = train.main(_argv(workdir, **flags))
    err = capsys.readouterr().err
    summary = json.loads((workdir / "summary.json").read_text()) if (workdir / "summary.json").exists() else {}
    report = json.loads((workdir / "report.json").read_text()) if (workdir / "report.json").exists() else None
    return code, err, workdir, summary, report


def _checkpoint_is_finite(workdir):
    from nanlab.checkpoint import Checkpointer

    checkpointer = Checkpointer(workdir / "checkpoints")
    try:
        step = checkpointer.latest_step()
        if step is None:
            return None
        state = checkpointer._manager.restore(step)  # the raw tree, no target needed
    finally:
        checkpointer.close()
    return all(bool(np.all(np.isfinite(np.asarray(leaf)))) for leaf in jax.tree.leaves(state)
               if np.issubdtype(np.asarray(leaf).dtype, np.inexact))


# place -> {skip: (exit code, summary status, report's non-finite quantities or None)}
EXPECTED = {
    "training images, not allowed": {False: (2, None, None), True: (2, None, None)},
    "training labels": {False: (3, "non-finite", ["loss", "gradients"]), True: (0, "ok", ["loss", "gradients"])},
    "params": {False: (3, "non-finite", ["gradients", "BatchNorm statistics"]),
               True: (3, "non-finite", ["gradients", "BatchNorm statistics"])},
    "gradient": {False: (3, "non-finite", ["gradients"]), True: (0, "ok", ["gradients"])},
    "training images": {False: (3, "non-finite", ["gradients", "BatchNorm statistics"]),
                        True: (0, "ok", ["gradients", "BatchNorm statistics"])},
    "validation data": {False: (3, "nonfinite-validation", None), True: (3, "nonfinite-validation", None)},
    # With skipping, the first skipped step's gradients and statistics are finite: only its update
    # (Adam's moments hold the NaN) is not, which optax's skip guard catches and the step's
    # statistics do not name.
    "optimizer state": {False: (3, "non-finite", ["gradients", "BatchNorm statistics"]),
                        True: (3, "non-finite", [])},
}
# place -> report.json's verdict (both skip modes; with --skip-nonfinite, the first skipped step's).
# A value planted before step 0 was there before any update (not a learning rate's doing); a NaN
# derivative is born in the backward pass from finite values.
VERDICT = {
    "training labels": "bad-data",
    "training images": "bad-data",
    "params": "nonfinite-state",
    "optimizer state": "nonfinite-state",
    "gradient": "unstable-gradient",
}
FAST = ["training images, not allowed", "training labels", "params", "gradient"]
SLOW = ["training images", "validation data", "optimizer state"]


@pytest.mark.parametrize("skip", [False, True], ids=["no-skip", "skip"])
@pytest.mark.parametrize("place", FAST + [pytest.param(p, marks=pytest.mark.slow) for p in SLOW])
def test_matrix(tmp_path, monkeypatch, capsys, place, skip):
    code, err, workdir, summary, report = _run(tmp_path, monkeypatch, capsys, place, skip)
    finite_checkpoint = _checkpoint_is_finite(workdir) if (workdir / "checkpoints").exists() else None
    print(f"\nMATRIX {place} | {'--skip-nonfinite' if skip else 'no skip'} | exit {code}, status "
          f"{summary.get('status')}, report {report and report['nonfinite']}, verdict "
          f"{report and report['verdict']['cause']}, skipped {summary.get('skipped_steps')}")
    assert "Traceback" not in err
    want_code, want_status, want_nonfinite = EXPECTED[place][skip]
    assert code == want_code, err
    assert summary.get("status") == want_status
    assert finite_checkpoint in (True, None)  # a checkpoint never holds a bad value
    if want_nonfinite is not None:
        assert report["nonfinite"] == want_nonfinite
    if place in VERDICT:
        assert report["verdict"]["cause"] == VERDICT[place], report["verdict"]
    if place in ("params", "optimizer state"):
        # Reported where it first showed: step 0, except Adam's planted moments without skipping,
        # which step 0's update carries into the weights and step 1's loss meets.
        assert report["step"] == (1 if place == "optimizer state" and not skip else 0)
        assert ("['Conv2']" if place == "params" else ".mu['Conv1']") in report["verdict"]["evidence"][0]
    if skip and want_code == 0:
        assert summary["skipped_steps"] > 0 and finite_checkpoint is True  # the final state is finite
    if skip and place in ("params", "optimizer state"):
        # The planted value is never touched by a skipped update, so it is still there when the
        # first checkpoint is due: nothing is saved, and the run stops naming it (exit 3).
        assert "the state at step 6 holds non-finite values" in err
        assert summary["nonfinite"] == ["state"] and summary["failed_step"] == 6
        assert ("params['Conv2']" if place == "params" else ".mu['Conv1']") in err
        assert finite_checkpoint is None
