"""Tests of the train CLI on streamed data (nanlab.streaming through `_Feed`) and of the prefetcher.

Small throughout: `--model small_cnn`, 75x75, batch 8, a folder of 40 tiny images, a few steps.
Most runs decode in the training process (`--data-workers 0`); the worker-count test starts 1
and 2 spawned processes. JAX's persistent compilation cache (a temporary directory) is shared by
the module's runs so that equal shapes compile once.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from nanlab import config as config_lib
from nanlab import runlog, streaming, train
from nanlab.prefetch import Prefetcher
from tests.cli_flags import train_argv
from tests.test_train import _rows_without_timing as _metric_rows, compilation_cache  # noqa: F401

TINY = {
    "model": "small_cnn",
    "width_multiplier": 1.0,
    "image_size": 75,
    "batch_size": 8,
    "log_every": 1,
    "eval_every": 0,
    "stats_every": 0,
    "checkpoint_every": 0,
    "bn_recalibration_batches": 0,
    "data_workers": 0,
    "progress": False,
    "plots": False,
    "compile_cache": "off",  # the module's own cache (below) stays in charge
}


def _config(workdir, **overrides):
    return config_lib.make_config({**TINY, "workdir": str(workdir), **overrides}, backend="cpu")


def _argv(workdir, **overrides):
    return train_argv(workdir, {**TINY, **overrides})


def _losses(workdir):
    return [row["loss"] for row in runlog.read_metrics(Path(workdir) / "metrics.jsonl")]


def _rows_without_timing(workdir):
    return _metric_rows(Path(workdir) / "metrics.jsonl")


def _make_folder(root: Path, classes=("cat", "dog"), per_class=20, seed=0) -> Path:
    """Random JPEG and PNG images of mixed sizes; each class darkens one channel (learnable)."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(40, 100, size=2))
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            pixels[..., c] //= 2
            Image.fromarray(pixels).save(root / name / f"{c}_{i:03d}.{'jpg' if i % 3 == 0 else 'png'}")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp("train-stream") / "pets")


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("train-packed") / "pets.array_record"
    streaming.convert_folder(folder, out)
    return out


# ------------------------------------------------------------------------------- the same batches


def test_worker_counts_and_array_record_give_the_same_losses(folder, packed, tmp_path):
    runs = {"w1": (folder, 1), "w2": (folder, 2), "packed": (packed, 0)}
    for name, (data, workers) in runs.items():
        assert train.run(_config(tmp_path / name, data=str(data), data_workers=workers, steps=5)) == 0, name
    reference = _losses(tmp_path / "w1")
    assert len(reference) == 5 and len(set(reference)) > 1  # five distinct steps, not one repeated batch
    assert _losses(tmp_path / "w2") == reference
    assert _losses(tmp_path / "packed") == reference
    summary = json.loads((tmp_path / "packed" / "summary.json").read_text())
    assert summary["data"]["class_mapping"] == {"task": "binary", "class_names": ["cat", "dog"],
                                                "label_1": "dog", "label_0": "cat"}
    assert summary["data"]["source"] == "array_record:pets.array_record"
    assert summary["data"]["num_train"] + summary["data"]["num_val"] == 40
    assert "bad_images" not in summary["data"]  # reported under --on-bad-image skip only


def test_resume_on_a_streamed_folder_equals_the_uninterrupted_run(folder, tmp_path):
    flags = dict(data=str(folder), eval_every=6, bn_recalibration_batches=2)
    assert train.run(_config(tmp_path / "whole", steps=12, **flags)) == 0
    split = tmp_path / "split"
    assert train.run(_config(split, steps=6, **flags)) == 0
    assert train.run(_config(split, steps=12, resume=True, **flags)) == 0
    whole = _rows_without_timing(tmp_path / "whole")
    assert [row["step"] for row in whole] == list(range(1, 13))
    assert "val_loss" in whole[5] and "val_loss" in whole[11]  # evaluation read the validation stream
    assert _rows_without_timing(split) == whole
    assert json.loads((split / "summary.json").read_text())["resumed_from"] == 6


def test_sigint_on_a_streamed_run_then_resume_equals_the_uninterrupted_run(folder, tmp_path, compilation_cache):
    flags = dict(data=str(folder), steps=30)
    assert train.run(_config(tmp_path / "whole", **flags)) == 0
    workdir = tmp_path / "stopped"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": compilation_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    process = subprocess.Popen([sys.executable, "-m", "nanlab.train", *_argv(workdir, **flags)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline and process.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    stopped_at = json.loads((workdir / "summary.json").read_text())["steps"]
    assert 1 <= stopped_at < 30
    assert train.run(_config(workdir, resume=True, **flags)) == 0
    assert json.loads((workdir / "summary.json").read_text())["resumed_from"] == stopped_at
    assert _rows_without_timing(workdir) == _rows_without_timing(tmp_path / "whole")


def test_resume_refuses_changed_data(tmp_path, capsys):
    root = _make_folder(tmp_path / "data", per_class=8, seed=4)
    workdir = tmp_path / "run"
    assert train.main(_argv(workdir, data=str(root), steps=2)) == 0
    assert json.loads((workdir / "data_state.json").read_text())["num_train"] == 13
    Image.new("RGB", (50, 50)).save(root / "cat" / "added.png")
    capsys.readouterr()
    assert train.main(_argv(workdir, data=str(root), steps=4, resume=True)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume: --data" in err and "differs from this one" in err
    assert [row["step"] for row in runlog.read_metrics(workdir / "metrics.jsonl")] == [1, 2]  # untouched


def test_streamed_run_trains_and_evaluates(folder, tmp_path):
    workdir = tmp_path / "learn"
    assert train.run(_config(workdir, data=str(folder), steps=20, log_every=10, lr=3e-3,
                             bn_recalibration_batches=2)) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["val_accuracy"] >= 0.75  # chance: 0.5
    assert summary["input_stats"]["raw"]["max"] <= 255 and "first training batch" in summary["input_stats"]["over"]


# ------------------------------------------------------------------------------- bad data


def test_corrupt_image_mid_stream_exits_2_naming_it_or_is_skipped_and_counted(tmp_path, capsys):
    root = _make_folder(tmp_path / "broken", per_class=10, seed=3)
    pipeline = streaming.open_stream(str(root), 75, 0, 8, workers=0)
    victim = Path(pipeline.source.name_of(int(pipeline.train_index[0])))
    victim = victim if victim.is_absolute() else root / victim
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)

    assert train.main(_argv(tmp_path / "error", data=str(root), steps=3)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert victim.name in err and f"--data {root}" in err

    workdir = tmp_path / "skip"
    assert train.main(_argv(workdir, data=str(root), steps=3, on_bad_image="skip")) == 0
    report = json.loads((workdir / "summary.json").read_text())["data"]["bad_images"]
    assert report["policy"] == "skip" and report["skipped"] == 1
    assert report["files"][0].endswith(victim.name)


@pytest.mark.parametrize("layout, message", [("one-class", "class"), ("empty", "no image files"),
                                             ("missing", "does not exist")])
def test_bad_data_exits_2_before_the_workdir_exists(tmp_path, capsys, layout, message):
    root = tmp_path / "data"
    if layout == "one-class":
        _make_folder(root, classes=("only",), per_class=4)
    elif layout == "empty":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
    workdir = tmp_path / "run"
    assert train.main(_argv(workdir, data=str(root), steps=2)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--data {root}" in err and message in err
    assert not workdir.exists()


@pytest.mark.parametrize("flags, message", [
    (["--on-bad-image", "ignore"], "--on-bad-image 'ignore' is not one of error, skip"),
    (["--data-workers", "-1"], "--data-workers must be >= 0, got -1"),
    (["--prefetch", "-2"], "--prefetch must be >= 0, got -2"),
])
def test_bad_stream_flags_exit_2(tmp_path, capsys, flags, message):
    assert train.main(["--workdir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------- prefetch


def test_prefetch_keeps_the_batches_built_in_and_streamed(folder, tmp_path):
    for data, extra in (("builtin", dict(num_train=64, num_val=16)), (str(folder), {})):
        name = Path(data).name
        for depth in (0, 2):
            assert train.run(_config(tmp_path / f"{name}-{depth}", data=data, steps=5, prefetch=depth, **extra)) == 0
        assert _losses(tmp_path / f"{name}-2") == _losses(tmp_path / f"{name}-0"), data


def test_prefetch_with_two_simulated_devices(folder, tmp_path, compilation_cache):
    flags = dict(data=str(folder), steps=4, prefetch=2)
    assert train.run(_config(tmp_path / "one", **flags)) == 0
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
           "JAX_COMPILATION_CACHE_DIR": compilation_cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    two = tmp_path / "two"
    result = subprocess.run([sys.executable, "-m", "nanlab.train", *_argv(two, **flags)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((two / "summary.json").read_text())["devices"] == 2
    np.testing.assert_allclose(_losses(two), _losses(tmp_path / "one"), rtol=1e-5)


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_prefetcher_is_map_in_order(depth):
    with Prefetcher(range(7), lambda i: i * i, depth) as prefetcher:
        assert list(prefetcher) == [i * i for i in range(7)]
        assert next(prefetcher, "end") == "end"


def test_prefetcher_runs_ahead_but_no_further_than_its_depth():
    prepared = []

    def prepare(item):
        prepared.append(item)
        return item

    with Prefetcher(range(100), prepare, depth=2) as prefetcher:
        assert next(prefetcher) == 0
        time.sleep(0.5)
        # 1 and 2 buffered, 3 prepared and waiting for room: ahead of the consumer, bounded.
        assert 2 <= len(prepared) <= 4
    assert not any(t.name == "nanlab-prefetch" for t in threading.enumerate())


def test_prefetcher_raises_the_producers_error_in_order():
    def items():
        yield 1
        raise ValueError("bad image x.png")

    prefetcher = Prefetcher(items(), lambda i: i, depth=2)
    assert next(prefetcher) == 1
    with pytest.raises(ValueError, match="bad image x.png"):
        next(prefetcher)
    prefetcher.close()
    with pytest.raises(ValueError, match="depth"):
        Prefetcher([], lambda i: i, depth=-1)
