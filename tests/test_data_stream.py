"""Tests of nanlab.streaming: the Grain pipeline over image folders, .npz and ArrayRecord files.

Small data throughout (20-80 pixel images, dozens of files; the memory test makes ~1,500 tiny
PNGs); the worker-process tests start 1-2 spawned processes (about a second each).
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from nanlab import data
from nanlab import streaming

SIZE = 75
REPO = Path(__file__).resolve().parents[1]


def _make_folder(root: Path, classes=("cat", "dog"), per_class=10, seed=0, modes=True) -> Path:
    """Random images of mixed sizes, JPEG and PNG; with `modes`, also a grayscale and an RGBA file."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(20, 80, size=2))
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            image = Image.fromarray(pixels)
            if modes and i == 1:
                image = image.convert("L")
            if modes and i == 2:
                image = image.convert("RGBA")
            suffix = "jpg" if i % 3 == 0 and image.mode != "RGBA" else "png"
            image.save(root / name / f"{c}_{i:03d}.{suffix}")
        (root / name / "notes.txt").write_text("not an image")  # ignored, as by data.load_dataset
    return root


def _corrupt(path: Path) -> None:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp("stream") / "pets", per_class=13)


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    return _make_folder(tmp_path_factory.mktemp("stream3") / "abc", classes=("a", "b", "c"), per_class=8, seed=1)


@pytest.fixture(scope="module")
def packed(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "pets.array_record"
    streaming.convert_folder(folder, out)
    return out


# ---------------------------------------------------------------------------------------------
# The same batches as the in-memory path; split
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["folder", "three_classes"])
def test_folder_batches_equal_the_in_memory_batches(fixture, request):
    root = request.getfixturevalue(fixture)
    memory = data.load_dataset(str(root), SIZE, seed=5)
    pipeline = streaming.open_stream(str(root), SIZE, seed=5, batch_size=4, workers=0)
    assert pipeline.num_train == len(memory.x_train) and pipeline.num_val == len(memory.x_val)
    assert pipeline.class_names == memory.class_names and pipeline.num_classes == memory.num_classes
    # Steps inside the first epoch and in later epochs (other permutations).
    for step in (0, 1, pipeline.steps_per_epoch - 1, pipeline.steps_per_epoch, 3 * pipeline.steps_per_epoch + 2):
        x, y = pipeline.batch_at(step)
        x_ref, y_ref = data.batch_at(memory.x_train, memory.y_train, step, 4, 5)
        assert x.dtype == np.uint8 and x.shape == (4, SIZE, SIZE, 3)
        np.testing.assert_array_equal(x.astype(np.float32), x_ref)
        np.testing.assert_array_equal(y, y_ref)


def test_split_is_load_datasets_disjoint_and_covering(folder):
    memory = data.load_dataset(str(folder), SIZE, seed=2, val_fraction=0.3)
    pipeline = streaming.open_stream(str(folder), SIZE, seed=2, batch_size=3, val_fraction=0.3, workers=0)
    assert not set(pipeline.train_index) & set(pipeline.val_index)
    assert sorted(set(pipeline.train_index) | set(pipeline.val_index)) == list(range(26))
    x_val, y_val, weights = (np.concatenate(parts) for parts in zip(*pipeline.eval_batches()))
    assert weights.sum() == len(memory.x_val) and (weights[: len(memory.x_val)] == 1).all()
    assert (x_val[len(memory.x_val):] == 0).all()  # zero padding to a full batch
    np.testing.assert_array_equal(x_val[: len(memory.x_val)].astype(np.float32), memory.x_val)
    np.testing.assert_array_equal(y_val[: len(memory.y_val)], memory.y_val)
    other = streaming.open_stream(str(folder), SIZE, seed=3, batch_size=3, val_fraction=0.3, workers=0)
    assert not np.array_equal(other.val_index, pipeline.val_index)  # the seed moves the split


def test_class_mapping_for_summary(folder, three_classes):
    binary = streaming.open_stream(str(folder), SIZE, seed=0, batch_size=2, workers=0).class_mapping()
    assert binary == {"task": "binary", "class_names": ["cat", "dog"], "label_1": "dog", "label_0": "cat"}
    many = streaming.open_stream(str(three_classes), SIZE, seed=0, batch_size=2, workers=0).class_mapping()
    assert many["label_columns"] == ["a", "b", "c"] and many["task"] == "multi-label (one-vs-rest)"
    assert json.loads(json.dumps(many)) == many  # summary.json takes it as it is


# ---------------------------------------------------------------------------------------------
# Worker counts, resume, checkpoint state
# ---------------------------------------------------------------------------------------------


def test_batches_do_not_depend_on_the_worker_count(folder):
    reference = streaming.open_stream(str(folder), SIZE, seed=1, batch_size=4, workers=0)
    expected = [reference.batch_at(step) for step in range(3, 3 + 2 * reference.steps_per_epoch)]
    for workers in (0, 1, 2):
        pipeline = streaming.open_stream(str(folder), SIZE, seed=1, batch_size=4, workers=workers)
        with pipeline.batches(3) as batches:
            got = [next(batches) for _ in expected]
            assert batches.step == 3 + len(expected)
        for (x, y), (x_ref, y_ref) in zip(got, expected):
            np.testing.assert_array_equal(x, x_ref)
            np.testing.assert_array_equal(y, y_ref)


def test_resume_from_step_k_equals_the_uninterrupted_run(folder):
    run = streaming.open_stream(str(folder), SIZE, seed=4, batch_size=4, workers=1)
    with run.batches(0) as batches:
        uninterrupted = [next(batches) for _ in range(9)]
    k = 6
    state = run.state(k)
    json.dumps(state)  # it goes into a checkpoint's metadata as it is
    fresh = streaming.open_stream(str(folder), SIZE, seed=4, batch_size=4, workers=2)
    start = fresh.restore(state)
    assert start == k
    with fresh.batches(start) as batches:
        resumed = [next(batches) for _ in range(9 - k)]
    for (x, y), (x_ref, y_ref) in zip(resumed, uninterrupted[k:]):
        np.testing.assert_array_equal(x, x_ref)
        np.testing.assert_array_equal(y, y_ref)
    # The epoch boundary lies inside the compared range (26 * 0.8 = 21 train -> 5 steps per epoch).
    assert fresh.steps_per_epoch < 9


def test_restore_refuses_other_data_seed_or_batch_size(folder, three_classes, tmp_path):
    state = streaming.open_stream(str(folder), SIZE, seed=0, batch_size=4, workers=0).state(3)
    for other in (
        streaming.open_stream(str(folder), SIZE, seed=1, batch_size=4, workers=0),
        streaming.open_stream(str(folder), SIZE, seed=0, batch_size=2, workers=0),
        streaming.open_stream(str(three_classes), SIZE, seed=0, batch_size=4, workers=0),
    ):
        with pytest.raises(data.DataError, match="differs"):
            other.restore(state)
    # A changed folder (one more file) is other data too.
    changed = _make_folder(tmp_path / "pets", per_class=13)
    assert streaming.open_stream(str(changed), SIZE, seed=0, batch_size=4, workers=0).restore(state) == 3
    (changed / "cat" / "extra.png").write_bytes((changed / "cat" / "0_001.png").read_bytes())
    with pytest.raises(data.DataError, match="differs"):
        streaming.open_stream(str(changed), SIZE, seed=0, batch_size=4, workers=0).restore(state)
    with pytest.raises(data.DataError, match="not a data pipeline state"):
        streaming.open_stream(str(folder), SIZE, seed=0, batch_size=4, workers=0).restore({"step": 3})


# ---------------------------------------------------------------------------------------------
# ArrayRecord: conversion and the same batches
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [SIZE, 99])
def test_array_record_gives_the_folders_batches(folder, packed, image_size):
    from_folder = streaming.open_stream(str(folder), image_size, seed=7, batch_size=5, workers=0)
    from_record = streaming.open_stream(str(packed), image_size, seed=7, batch_size=5, workers=0)
    assert from_record.class_names == from_folder.class_names
    assert from_record.num_train == from_folder.num_train
    for step in (0, 2, 9):
        for a, b in zip(from_record.batch_at(step), from_folder.batch_at(step)):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(from_record.eval_batches(), from_folder.eval_batches()):
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def test_array_record_with_workers_equals_in_process(packed):
    reference = streaming.open_stream(str(packed), SIZE, seed=2, batch_size=4, workers=0)
    with streaming.open_stream(str(packed), SIZE, seed=2, batch_size=4, workers=2).batches(1) as batches:
        for step in range(1, 8):
            np.testing.assert_array_equal(next(batches)[0], reference.batch_at(step)[0])


def test_convert_cli_writes_a_file_that_streams(folder, tmp_path):
    out = tmp_path / "cli.array_record"
    result = subprocess.run([sys.executable, "-m", "nanlab.data", "convert", str(folder), str(out)],
                            capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "26 images, 2 classes (cat, dog)" in result.stdout
    assert streaming.open_stream(str(out), SIZE, seed=0, batch_size=2, workers=0).num_train == 21


def test_convert_bad_image_exit_2_one_line_no_output(tmp_path):
    root = _make_folder(tmp_path / "pets", per_class=4, modes=False)
    _corrupt(root / "dog" / "1_002.png")
    out = tmp_path / "out.array_record"
    result = subprocess.run([sys.executable, "-m", "nanlab.data", "convert", str(root), str(out)],
                            capture_output=True, text=True, cwd=REPO, env=_env(), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "1_002.png" in lines[0] and lines[0].startswith("python -m nanlab.data convert: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pets"]  # no output, no temporary left
    # --on-bad-image skip leaves the file out and says so.
    skipped = streaming.convert_folder(root, out, on_bad_image="skip")
    assert skipped["images"] == 7 and skipped["skipped"] == [str(root / "dog" / "1_002.png")]
    assert streaming.open_stream(str(out), SIZE, seed=0, batch_size=2, workers=0).source.labels.sum() == 3


def test_convert_refuses_bad_layouts_and_existing_output(folder, packed, tmp_path):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "cls").mkdir()
    for source, out, match in [
        (folder, packed, "exists"),
        (folder, tmp_path / "x.rec", "must end in .array_record"),
        (tmp_path / "only", tmp_path / "y.array_record", "1 class subfolder"),
        (tmp_path / "missing", tmp_path / "z.array_record", "not a folder"),
    ]:
        with pytest.raises(data.DataError, match=match) as info:
            streaming.convert_folder(source, out)
        _one_line(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["only"]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_while_streaming_names_the_file(tmp_path, workers):
    root = _make_folder(tmp_path / "pets", per_class=6, modes=False)
    _corrupt(root / "cat" / "0_004.png")
    pipeline = streaming.open_stream(str(root), SIZE, seed=0, batch_size=3, workers=workers)  # opens fine
    with pytest.raises(data.DataError, match="unreadable image .*0_004.png") as info:
        with pipeline.batches(0) as batches:
            for _ in range(2 * pipeline.steps_per_epoch):  # two epochs meet every training image
                next(batches)
        list(pipeline.eval_batches())
    _one_line(info.value)


def test_skip_policy_replaces_counts_and_keeps_batches_pure(tmp_path):
    root = _make_folder(tmp_path / "pets", per_class=6, modes=False)
    bad = root / "cat" / "0_004.png"
    _corrupt(bad)
    skip = streaming.open_stream(str(root), SIZE, seed=0, batch_size=3, workers=0, on_bad_image="skip")
    bad_index = skip.source.files.index("cat/0_004.png")
    steps = range(2 * skip.steps_per_epoch)
    first = [skip.batch_at(step) for step in steps]
    x_val = [x for x, _, _ in skip.eval_batches()]
    assert all(x.shape == (3, SIZE, SIZE, 3) for x, _ in first)
    assert skip.skipped == {bad_index: str(bad)}  # counted once, however often it is met
    report = skip.bad_image_report()
    assert report == {"policy": "skip", "skipped": 1, "files": [str(bad)]}
    # Pure: a second pipeline (and worker processes) give the same batches, substitutes included.
    again = streaming.open_stream(str(root), SIZE, seed=0, batch_size=3, workers=1, on_bad_image="skip")
    with again.batches(0) as batches:
        for x, y in first:
            x2, y2 = next(batches)
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)
    # A skipped validation image is a zero image with weight 0; the training batches never hold it
    # (the bad file is not decodable, and the substitute is the next readable training image).
    if bad_index in skip.val_index:
        weights = np.concatenate([w for _, _, w in skip.eval_batches()])
        assert weights.sum() == skip.num_val - 1
    else:
        assert bad_index in skip.train_index
    assert len(x_val) == -(-skip.num_val // 3)


@pytest.mark.parametrize(
    "layout, match",
    [
        ({}, "empty data folder"),
        ({"only": 2}, "1 class subfolder"),
        ({"a": 2, "b": 0}, "has no image files"),
    ],
)
def test_bad_folders_fail_at_open(tmp_path, layout, match):
    root = tmp_path / "data"
    root.mkdir()
    for name, count in layout.items():
        (root / name).mkdir()
        for i in range(count):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / name / f"{i}.png")
    with pytest.raises(data.DataError, match=match) as info:
        streaming.open_stream(str(root), SIZE, seed=0, batch_size=1, workers=0)
    _one_line(info.value)


def test_open_errors_name_the_problem(folder, tmp_path):
    (tmp_path / "plain.array_record").write_bytes(b"")
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "foreign.array_record"), "group_size:1")
    writer.write(b"someone else's record")
    writer.close()
    for spec, match in [
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "plain.array_record", "unreadable ArrayRecord|not a nanlab image ArrayRecord"),
        (tmp_path / "foreign.array_record", "not a nanlab image ArrayRecord"),
    ]:
        with pytest.raises(data.DataError, match=match) as info:
            streaming.open_stream(str(spec), SIZE, seed=0, batch_size=1, workers=0)
        _one_line(info.value)
    with pytest.raises(data.DataError, match="larger than the training set"):
        streaming.open_stream(str(folder), SIZE, seed=0, batch_size=22, workers=0)
    with pytest.raises(ValueError, match="in memory"):
        streaming.open_stream("builtin", SIZE, seed=0, batch_size=1)
    with pytest.raises(ValueError, match="on_bad_image"):
        streaming.open_stream(str(folder), SIZE, seed=0, batch_size=1, on_bad_image="ignore")


# ---------------------------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_streams_the_in_memory_values(tmp_path, save):
    rng = np.random.default_rng(0)
    resized = tmp_path / "gray.npz"  # float, 40x40 grayscale: resized, float32 like load_dataset
    save(resized, x=rng.uniform(0, 1, size=(30, 40, 40)).astype(np.float32), y=rng.integers(0, 2, size=30))
    exact = tmp_path / "rgb.npz"  # uint8 at the image size: kept uint8
    save(exact, x=rng.integers(0, 256, size=(30, SIZE, SIZE, 3), dtype=np.uint8),
         y=rng.integers(0, 2, size=(30, 3)).astype(np.float32))
    for path, dtype in ((resized, np.float32), (exact, np.uint8)):
        memory = data.load_dataset(str(path), SIZE, seed=1)
        pipeline = streaming.open_stream(str(path), SIZE, seed=1, batch_size=4, workers=0)
        assert pipeline.image_dtype == dtype
        for step in (0, 7):
            x, y = pipeline.batch_at(step)
            x_ref, y_ref = data.batch_at(memory.x_train, memory.y_train, step, 4, 1)
            assert x.dtype == dtype
            np.testing.assert_array_equal(x.astype(np.float32), x_ref)
            np.testing.assert_array_equal(y, y_ref)
    assert not list(tmp_path.glob("nanlab-npz-*"))  # temporary copies live elsewhere


def test_npz_nonfinite_pixel_is_bad_input_when_opened(tmp_path):
    x = np.full((12, 8, 8), 100.0, np.float32)
    x[5, 2, 3] = np.nan
    path = tmp_path / "nan.npz"
    np.savez(path, x=x, y=np.arange(12) % 2)
    # Refused when opened (before a run creates anything), whatever the bad-image policy.
    for policy in ("error", "skip"):
        with pytest.raises(data.DataError, match=r"x\[5, 2, 3\] = nan is not finite") as info:
            streaming.open_stream(str(path), SIZE, seed=0, batch_size=2, workers=0, on_bad_image=policy)
        _one_line(info.value)
    # --allow-nonfinite-data: the NaN reaches the batches on purpose.
    allowed = streaming.open_stream(str(path), SIZE, seed=0, batch_size=2, workers=0, allow_nonfinite=True)
    images = [allowed.batch_at(step)[0] for step in range(allowed.steps_per_epoch)]
    images += [x for x, _, _ in allowed.eval_batches()]
    assert sum(int((~np.isfinite(i)).any()) for i in images) == 1


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((4, 8, 8))}, "missing array"),
        ({"x": np.zeros((4, 8, 8)), "y": np.array([0, 1, 2, 1])}, "labels must lie in"),
        ({"x": np.zeros((4, 8)), "y": np.zeros(4)}, "must have shape"),
        ({"x": np.zeros((4, 8, 8)), "y": np.zeros(3)}, "lengths differ"),
    ],
)
def test_npz_errors_at_open(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(data.DataError, match=match):
        streaming.open_stream(str(path), SIZE, seed=0, batch_size=1, workers=0)


def test_npz_mixed_shapes_fail_at_open(tmp_path):
    path = tmp_path / "mixed.npz"
    x = np.empty(2, dtype=object)
    x[0], x[1] = np.zeros((8, 8)), np.zeros((9, 9))
    np.savez(path, x=x, y=np.zeros(2))
    with pytest.raises(data.DataError, match="mixed shapes"):
        streaming.open_stream(str(path), SIZE, seed=0, batch_size=1, workers=0)


# ---------------------------------------------------------------------------------------------
# Normalization: streamed statistics, the arithmetic on the device
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "unit", "standardize"])
def test_stream_normalizer_and_device_normalize_match_the_in_memory_path(folder, mode):
    memory = data.load_dataset(str(folder), SIZE, seed=0)
    pipeline = streaming.open_stream(str(folder), SIZE, seed=0, batch_size=4, workers=0)
    scale = 0.5
    stats = streaming.fit_stream_normalizer(pipeline, mode, input_scale=scale)
    reference = data.fit_normalizer(memory.x_train * np.float32(scale), mode)
    assert stats.keys() == reference.keys()
    for key in stats:
        np.testing.assert_allclose(stats[key], reference[key], rtol=1e-9) if key != "mode" else None
    x, _ = pipeline.batch_at(3)
    on_device = jax.jit(lambda b: streaming.normalize_on_device(b, mode, stats, scale))(x)
    expected = data.normalize(x.astype(np.float32) * np.float32(scale), mode, stats)
    assert on_device.dtype == np.float32
    np.testing.assert_allclose(np.asarray(on_device), expected, rtol=1e-6, atol=1e-6)


def test_stream_normalizer_sample_is_seeded_and_smaller(folder):
    pipeline = streaming.open_stream(str(folder), SIZE, seed=0, batch_size=4, workers=0)
    full = streaming.fit_stream_normalizer(pipeline, "standardize")
    sample = streaming.fit_stream_normalizer(pipeline, "standardize", max_images=5)
    assert sample == streaming.fit_stream_normalizer(pipeline, "standardize", max_images=5)
    assert sample != full
    chosen = streaming.epoch_order(pipeline.num_train, 0, 0)[:5]
    x = np.concatenate([x[w > 0] for x, _, w in pipeline.sample_batches(5)])
    np.testing.assert_array_equal(x, np.stack([pipeline.source.image(i) for i in pipeline.train_index[np.sort(chosen)]]))


# ---------------------------------------------------------------------------------------------
# Memory: bounded by the prefetch depth, not by the dataset
# ---------------------------------------------------------------------------------------------

_RSS_GROWTH = textwrap.dedent(
    """
    import sys
    import numpy as np
    from nanlab import data, streaming

    def rss_mib():  # resident memory now (Linux), not the peak: the imports' peak would hide growth
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096 / 2**20

    if __name__ == "__main__":
        mode, root, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
        before = rss_mib()
        if mode == "stream":
            pipeline = streaming.open_stream(root, size, seed=0, batch_size=16, workers=0)
            highest = rss_mib()
            with pipeline.batches(0) as batches:
                for _ in range(pipeline.steps_per_epoch):  # one epoch: every training image
                    x, y = next(batches)
                    highest = max(highest, rss_mib())
            seen = pipeline.steps_per_epoch * 16
        else:
            dataset = data.load_dataset(root, size, seed=0)
            highest, seen = rss_mib(), len(dataset.x_train)
        print(highest - before, seen)
    """
)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _rss_growth(tmp_path, mode, root, size):
    """Highest resident memory while loading `root` in a fresh process, less that before (MiB)."""
    script = tmp_path / "rss.py"
    script.write_text(_RSS_GROWTH)
    result = subprocess.run([sys.executable, str(script), mode, str(root), str(size)], capture_output=True,
                            text=True, env=_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    growth, seen = result.stdout.split()
    return float(growth), int(seen)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc/self/statm (Linux)")
def test_loader_memory_stays_flat_as_the_folder_grows(tmp_path):
    size = 128  # 1,500 images at 128x128: ~290 MiB as float32 in memory, 48 KiB each
    small = _make_folder(tmp_path / "small", per_class=75, modes=False)
    large = _make_folder(tmp_path / "large", per_class=750, modes=False)
    stream_small, seen_small = _rss_growth(tmp_path, "stream", small, size)
    stream_large, seen_large = _rss_growth(tmp_path, "stream", large, size)
    assert seen_large > 9 * seen_small  # the large run did stream ~10x the images
    memory_small, _ = _rss_growth(tmp_path, "memory", small, size)
    memory_large, _ = _rss_growth(tmp_path, "memory", large, size)
    # The harness sees memory that grows with the data (the in-memory loader: >= 1 float32 copy)...
    print(f"RSS growth MiB: stream {stream_small:.1f} -> {stream_large:.1f}, "
          f"in memory {memory_small:.1f} -> {memory_large:.1f}")
    assert memory_large - memory_small > 200, (memory_small, memory_large)
    # ...and the streamed loader's stays flat: well under one tenth of that growth.
    assert stream_large - stream_small < 20, (stream_small, stream_large)


_UNDER_LIMIT = textwrap.dedent(
    """
    import resource, sys
    import numpy as np
    import jax, jax.numpy as jnp
    from nanlab import data, streaming

    UNIT = {"mode": "unit", "min": 0.0, "max": 255.0}

    def vm_data():  # private data + anonymous mappings: what RLIMIT_DATA counts (Linux >= 4.7)
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    @jax.jit
    def sgd(w, x, y):  # logistic regression on mean colours, normalized from uint8 in the step
        def loss(w):
            logits = jnp.mean(streaming.normalize_on_device(x, "unit", UNIT), axis=(1, 2)) @ w
            return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits)
        value, grad = jax.value_and_grad(loss)(w)
        return w - 0.5 * grad, value

    if __name__ == "__main__":
        mode, root, size, headroom_mib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        w = jnp.zeros((3, 1))
        sgd(w, np.zeros((8, size, size, 3), np.uint8), np.zeros((8, 1), np.float32))  # compiled before
        limit = vm_data() + headroom_mib * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        try:
            if mode == "memory":
                data.load_dataset(root, size, seed=0)
                print("loaded")
            else:
                pipeline = streaming.open_stream(root, size, seed=0, batch_size=8, workers=1)
                losses = []
                with pipeline.batches(0) as batches:
                    for _ in range(pipeline.steps_per_epoch):
                        w, value = sgd(w, *next(batches))
                        losses.append(float(value))
                print("trained", len(losses), int(np.isfinite(losses).all()))
        except (MemoryError, data.DataError) as error:
            print("out of memory" if "MemoryError" in f"{type(error).__name__} {error}" else f"failed {error}")
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or sys.platform != "linux",
                    reason="RLIMIT_DATA on anonymous mappings and /proc/self/status (Linux)")
def test_a_dataset_bigger_than_an_in_memory_load_would_hold_still_trains(tmp_path):
    root = _make_folder(tmp_path / "big", per_class=300, modes=False)  # 600 images
    script = tmp_path / "limit.py"
    script.write_text(_UNDER_LIMIT)
    # 300 MiB above the process's data after start-up; the in-memory load needs 600 x 299 x 299 x 3
    # float32 = 643 MiB for its array alone.
    outputs = {}
    for mode in ("memory", "stream"):
        result = subprocess.run([sys.executable, str(script), mode, str(root), "299", "300"], capture_output=True,
                                text=True, env=_env(), timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        outputs[mode] = result.stdout.strip()
    assert outputs["memory"] == "out of memory"
    assert outputs["stream"] == "trained 60 1"  # a whole epoch, 480 training images, finite losses
