"""Bad input to `python -m nanlab.train`: exit 2, one line on stderr, no traceback, nothing created.

Each case of the README's exit-code list runs from a fresh current directory with the default
workdir (`runs/<timestamp>-<scenario>`), so that "nothing created" means the folder stays empty;
the cases that need a workdir of their own check that it is left exactly as it was. Non-finite
data is bad input unless the run asks for it (`--allow-nonfinite-data`); a validation metric
that comes out non-finite is never `ok`.
"""

import json

import numpy as np
import pytest
from PIL import Image

from nanlab import data as data_lib
from nanlab import train
from tests.test_train import TINY, _argv, compilation_cache  # noqa: F401

SMALL = {**TINY, "batch_size": 8, "steps": 5, "eval_every": 0, "stats_every": 0, "bn_recalibration_batches": 0}


def _flags(**overrides):
    """_argv without --workdir: the default runs/<timestamp>-<scenario> in the current folder."""
    return _argv("unused", **{**SMALL, **overrides})[2:]


def write_npz(path, n=40, size=75, seed=0, **edits):
    """A small binary .npz (x float32 (n, size, size, 3) in 0..255, y (n,)); `edits` set x/y entries."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, (n, size, size, 3)).astype(np.float32)
    y = (np.arange(n) % 2).astype(np.float32)
    arrays = {"x": x, "y": y}
    for name, (index, value) in edits.items():
        arrays[name][index] = value
    np.savez(path, **arrays)
    return path


def val_and_train_example(n=40, seed=0):
    """(an index that `load_dataset`'s split sends to validation, one it sends to training)."""
    marks = np.arange(n, dtype=np.float32)
    x = np.broadcast_to(marks[:, None, None, None], (n, 2, 2, 1))
    split = data_lib._split(x, marks[:, None], seed, 0.2, "probe", ())
    return int(split.y_val[0, 0]), int(split.y_train[0, 0])


def _run_in_empty_folder(tmp_path, monkeypatch, capsys, argv):
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    code = train.main(argv)
    err = capsys.readouterr().err
    return code, err, sorted(p.relative_to(here).as_posix() for p in here.rglob("*"))


def _assert_one_line(code, err, message):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def _image_folder(root, classes=("a", "b"), per_class=3):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("case", [
    "missing path", "empty folder", "one class", "class without images", "unreadable image", "bad npz",
    "npz without y", "labels outside [0, 1]", "nan pixel", "inf pixel", "nan label", "batch larger than data",
])
def test_every_data_error_exits_2_before_any_run_folder(tmp_path, monkeypatch, capsys, case):
    data = tmp_path / "data"
    if case == "missing path":
        spec, message = data / "nowhere.npz", "data path does not exist"
    elif case == "empty folder":
        data.mkdir()
        spec, message = data, "empty data folder"
    elif case == "one class":
        spec, message = _image_folder(data, classes=("a",)), "has 1 class subfolder(s); need at least 2"
    elif case == "class without images":
        _image_folder(data)
        (data / "c").mkdir()
        spec, message = data, f"class folder {data / 'c'} has no image files"
    elif case == "unreadable image":
        _image_folder(data, per_class=6)  # a training split larger than the batch: the image is met decoding
        (data / "b" / "9.png").write_bytes(b"not a png")
        spec, message = data, f"unreadable image {data / 'b' / '9.png'}"
    elif case == "bad npz":
        data.mkdir()
        (data / "x.npz").write_bytes(b"garbage")
        spec, message = data / "x.npz", "unreadable .npz file"
    elif case == "npz without y":
        data.mkdir()
        np.savez(data / "x.npz", x=np.zeros((4, 75, 75, 3), np.float32))
        spec, message = data / "x.npz", "missing array(s) y"
    elif case == "labels outside [0, 1]":
        data.mkdir()
        spec, message = write_npz(data / "x.npz", y=(3, 2.0)), "labels must lie in [0, 1], got y[3, 0] = 2.0"
    elif case == "nan pixel":
        data.mkdir()
        spec = write_npz(data / "x.npz", x=((7, 10, 20, 1), np.nan))
        message = "x[7, 10, 20, 1] = nan is not finite (pass --allow-nonfinite-data"
    elif case == "inf pixel":
        data.mkdir()
        spec, message = write_npz(data / "x.npz", x=((0, 0, 0, 2), -np.inf)), "x[0, 0, 0, 2] = -inf is not finite"
    elif case == "nan label":
        data.mkdir()
        spec, message = write_npz(data / "x.npz", y=(11, np.nan)), "labels must lie in [0, 1], got y[11, 0] = nan (pass --allow-nonfinite-data"
    else:
        data.mkdir()
        spec, message = write_npz(data / "x.npz", n=6), "batch size 8 is larger than the training set (5"
    code, err, created = _run_in_empty_folder(tmp_path, monkeypatch, capsys, _flags(data=spec))
    _assert_one_line(code, err, message)
    if case != "batch larger than data":
        assert err.startswith(f"nanlab.train: error: --data {spec}")
    assert created == []


@pytest.mark.parametrize("flags, message", [
    (dict(scenario="exploding"), "unknown scenario 'exploding'"),
    (dict(optimizer="lamb"), "--optimizer 'lamb'"),
    (dict(clip="global_norm:x"), "--clip 'global_norm:x'"),
    (dict(batch_size=0), "--batch-size must be a positive number, got 0"),
    (dict(steps=0), "--steps must be a positive number, got 0"),
    (dict(lr=-1), "--lr must be a positive number, got -1.0"),
    (dict(image_size=64), "--image-size 64 is below the minimum 75"),
    (dict(num_train=4), "--batch-size 8 is larger than the training set (4 examples)"),
    (dict(resume=True, overwrite=True), "--resume and --overwrite exclude each other"),
])
def test_every_bad_flag_exits_2_before_any_run_folder(tmp_path, monkeypatch, capsys, flags, message):
    code, err, created = _run_in_empty_folder(tmp_path, monkeypatch, capsys, _flags(**flags))
    _assert_one_line(code, err, message)
    assert created == []


def _tree(root):
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def test_bad_data_for_an_existing_run_leaves_it_untouched(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train.main(_argv(workdir, **SMALL)) == 0
    before = _tree(workdir)
    bad = write_npz(tmp_path / "bad.npz", x=((1, 2, 3, 0), np.nan))
    capsys.readouterr()
    for extra in (dict(overwrite=True), dict(resume=True, steps=10)):
        code = train.main(_argv(workdir, **{**SMALL, "data": bad, **extra}))
        _assert_one_line(code, capsys.readouterr().err, "x[1, 2, 3, 0] = nan is not finite")
        assert _tree(workdir) == before


def test_mismatched_checkpoint_on_resume_exits_2_and_leaves_the_run(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train.main(_argv(workdir, **SMALL)) == 0
    before = _tree(workdir)
    capsys.readouterr()
    code = train.main(_argv(workdir, **{**SMALL, "width_multiplier": 0.5, "steps": 10, "resume": True}))
    _assert_one_line(code, capsys.readouterr().err, "--resume: checkpoint 5 does not match this run")
    assert _tree(workdir) == before


def test_a_workdir_holding_a_run_is_refused_before_the_data_is_read(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "summary.json").write_text("{}")
    # Missing data too: the workdir's refusal (cheap, no folder needed) comes first.
    code = train.main(_argv(workdir, **{**SMALL, "data": tmp_path / "nowhere"}))
    _assert_one_line(code, capsys.readouterr().err, "already holds a run")
    assert _tree(workdir) == {"summary.json": b"{}"}


# ------------------------------------------------------------------------- asked-for non-finite data


def test_nan_in_validation_data_with_the_flag_is_never_ok(tmp_path, capsys):
    # A NaN label: the loss of that example is NaN whatever the model does. (A NaN pixel can vanish
    # inside the jitted ReLU network on CPU: the eval logits come out finite.)
    val_index, _ = val_and_train_example()
    spec = write_npz(tmp_path / "x.npz", y=(val_index, np.nan))
    workdir = tmp_path / "run"
    code = train.main(_argv(workdir, **{**SMALL, "data": spec, "allow_nonfinite_data": True}))
    err = capsys.readouterr().err
    assert code == 3
    lines = [line for line in err.splitlines() if "validation went non-finite" in line]
    assert len(lines) == 1 and lines[0].startswith("nanlab.train: validation went non-finite at step 5: val_loss")
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "nonfinite-validation"
    assert summary["nonfinite_validation"]["step"] == 5 and "val_loss" in summary["nonfinite_validation"]["metrics"]
    assert summary["input_stats"]["raw"]["nonfinite"] == 0  # the training inputs were finite
    assert summary["steps"] == 5


def test_nonfinite_check_names_the_first_index_in_c_order():
    a = np.zeros((2, 3, 4), np.float32)
    a[1, 2, 0] = np.inf
    a[1, 0, 3] = np.nan
    assert data_lib.first_nonfinite(a) == (1, 0, 3)
    assert data_lib.first_nonfinite(np.zeros((2, 2))) is None
    assert data_lib.first_nonfinite(np.arange(4)) is None  # integers are always finite
