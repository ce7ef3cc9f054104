"""Tests of nanlab.data: built-in data, loaders and their errors, normalization, batching, sharding."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from PIL import Image

from nanlab import data

SIZE = 75


@pytest.fixture(scope="module")
def binary():
    return data.builtin_dataset("binary", image_size=SIZE, num_train=200, num_val=200, seed=0)


@pytest.fixture(scope="module")
def multilabel():
    return data.builtin_dataset("multilabel", image_size=SIZE, num_train=64, num_val=300, seed=0)


def _raises_one_line(exc_type, match, fn, *args, **kwargs):
    with pytest.raises(exc_type, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# builtin_dataset
# ---------------------------------------------------------------------------------------------


def test_builtin_shapes_dtypes_range(binary, multilabel):
    assert binary.x_train.shape == (200, SIZE, SIZE, 3) and binary.x_val.shape == (200, SIZE, SIZE, 3)
    assert binary.y_train.shape == (200, 1) and binary.num_classes == 1
    assert multilabel.y_val.shape == (300, data.DEFAULT_NUM_LABELS)
    assert multilabel.num_classes == data.DEFAULT_NUM_LABELS
    for ds in (binary, multilabel):
        for array in (ds.x_train, ds.y_train, ds.x_val, ds.y_val):
            assert array.dtype == np.float32
        assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 255.0
        assert ds.x_train.max() > 200.0  # raw pixel scale, not [0, 1]
        assert set(np.unique(ds.y_train)) == {0.0, 1.0}
    assert binary.y_train.mean() == 0.5  # balanced classes
    assert 0.35 < multilabel.y_val.mean() < 0.65


def test_builtin_is_deterministic_and_seeded():
    a = data.builtin_dataset("binary", image_size=SIZE, num_train=8, num_val=4, seed=3)
    b = data.builtin_dataset("binary", image_size=SIZE, num_train=8, num_val=4, seed=3)
    c = data.builtin_dataset("binary", image_size=SIZE, num_train=8, num_val=4, seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_val, b.y_val)
    assert not np.array_equal(a.x_train, c.x_train)
    # The validation set does not depend on the training set's size.
    d = data.builtin_dataset("binary", image_size=SIZE, num_train=16, num_val=4, seed=3)
    np.testing.assert_array_equal(a.x_val, d.x_val)


def test_builtin_any_size_from_75():
    ds = data.builtin_dataset("multilabel", image_size=101, num_train=2, num_val=2, seed=0)
    assert ds.x_train.shape == (2, 101, 101, 3)
    _raises_one_line(ValueError, "image_size must be >= 75.*got 74", data.builtin_dataset, "binary", 74)
    _raises_one_line(ValueError, "unknown builtin dataset kind 'colour'", data.builtin_dataset, "colour")
    _raises_one_line(ValueError, "num_train must be >= 1, got 0", data.builtin_dataset, "binary", 75, 0)


def _orientation_score(x):
    """Mean |horizontal difference| minus mean |vertical difference|: > 0 for vertical stripes."""
    gray = x.mean(axis=-1)
    return np.abs(np.diff(gray, axis=2)).mean(axis=(1, 2)) - np.abs(np.diff(gray, axis=1)).mean(axis=(1, 2))


def test_builtin_binary_is_learnable_from_orientation_not_pixels(binary):
    # The signal: stripe orientation separates the classes almost perfectly...
    predicted = (_orientation_score(binary.x_val) < 0).astype(np.float32)
    assert (predicted == binary.y_val[:, 0]).mean() > 0.95
    # ...while the class-mean images hardly differ (random phases): it is a pattern task.
    y = binary.y_train[:, 0]
    mean_gap = np.abs(binary.x_train[y == 1].mean(0) - binary.x_train[y == 0].mean(0)).mean()
    assert mean_gap < 0.25 * binary.x_train.std()


def _wedge_energy(x, angle, half_width):
    """Spectral energy of gray images within +-half_width of `angle` (the stripes' normal)."""
    gray = x.mean(axis=-1)
    gray = gray - gray.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(gray)) ** 2
    freqs = np.fft.fftfreq(x.shape[1])
    fy, fx = np.meshgrid(freqs, freqs, indexing="ij")
    theta = np.arctan2(fy, fx) % np.pi
    distance = np.abs((theta - angle + np.pi / 2) % np.pi - np.pi / 2)
    mask = (distance < half_width) & (np.hypot(fx, fy) > 0.03)
    return (power * mask).sum(axis=(1, 2))


def test_builtin_multilabel_attributes_are_independently_detectable(multilabel):
    k = multilabel.num_classes
    for attribute in range(k):
        energy = _wedge_energy(multilabel.x_val, attribute * np.pi / k, np.pi / (2 * k))
        labels = multilabel.y_val[:, attribute]
        threshold = np.median(energy[labels == 1]) / 2 + np.median(energy[labels == 0]) / 2
        assert ((energy > threshold) == (labels == 1)).mean() > 0.9, attribute
    # Independent attributes: correlations near zero.
    corr = np.corrcoef(multilabel.y_val.T)
    assert np.abs(corr[np.triu_indices(k, 1)]).max() < 0.2


# ---------------------------------------------------------------------------------------------
# load_dataset: builtin, image folder, npz
# ---------------------------------------------------------------------------------------------


def test_load_builtin_specs():
    ds = data.load_dataset("builtin", SIZE, seed=0)
    assert ds.name == "builtin" and ds.num_classes == 1
    assert len(ds.x_train) == data.DEFAULT_NUM_TRAIN and len(ds.x_val) == data.DEFAULT_NUM_VAL
    ml = data.load_dataset("builtin-multilabel", SIZE, seed=0)
    assert ml.num_classes == data.DEFAULT_NUM_LABELS


def _write_png(path, value, size=(20, 30), mode="RGB"):
    channels = {"RGB": (3,), "L": ()}[mode]
    Image.fromarray(np.full(size + channels, value, np.uint8), mode=mode).save(path)


def _image_folder(root, classes, per_class=3):
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            _write_png(root / name / f"{i}.png", 10 * c + i, mode="L" if i == 0 else "RGB")
    return root


def test_image_folder_two_classes_is_binary_second_class_positive(tmp_path):
    root = _image_folder(tmp_path / "pets", ["dog", "cat"])  # sorted: cat=0, dog=1
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    ds = data.load_dataset(str(root), SIZE, seed=0, val_fraction=0.34)
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 1
    assert len(ds.x_train) == 4 and len(ds.x_val) == 2
    x = np.concatenate([ds.x_train, ds.x_val])
    y = np.concatenate([ds.y_train, ds.y_val])[:, 0]
    assert x.shape == (6, SIZE, SIZE, 3) and x.dtype == np.float32  # grayscale PNG became RGB
    # Pixel values identify the class (written in the order given): dog images are 0..2, cat 10..12.
    np.testing.assert_array_equal(y, (x[:, 0, 0, 0] < 10).astype(np.float32))


def test_image_folder_many_classes_is_one_hot(tmp_path):
    root = _image_folder(tmp_path / "three", ["a", "b", "c"], per_class=2)
    ds = data.load_dataset(str(root), SIZE, seed=1)
    y = np.concatenate([ds.y_train, ds.y_val])
    x = np.concatenate([ds.x_train, ds.x_val])
    assert ds.num_classes == 3 and y.shape == (6, 3)
    np.testing.assert_array_equal(y.sum(axis=1), 1.0)
    np.testing.assert_array_equal(y.argmax(axis=1), x[:, 0, 0, 0] // 10)


def test_image_folder_unreadable_image_is_named(tmp_path):
    root = _image_folder(tmp_path / "bad", ["a", "b"])
    (root / "b" / "broken.png").write_bytes(b"this is not a png")
    message = _raises_one_line(data.DataError, "unreadable image", data.load_dataset, str(root), SIZE, 0)
    assert "broken.png" in message


@pytest.mark.parametrize(
    "layout, match",
    [
        ("empty", "empty data folder"),
        ("one-class", "1 class subfolder.*need at least 2"),
        ("class-without-images", "class folder .*b has no image files"),
    ],
)
def test_image_folder_errors(tmp_path, layout, match):
    root = tmp_path / "data"
    root.mkdir()
    if layout == "one-class":
        _image_folder(tmp_path / "tmp", ["a"])
        (tmp_path / "tmp" / "a").rename(root / "a")
    if layout == "class-without-images":
        _image_folder(tmp_path / "tmp", ["a"])
        (tmp_path / "tmp" / "a").rename(root / "a")
        (root / "b").mkdir()
    _raises_one_line(data.DataError, match, data.load_dataset, str(root), SIZE, 0)


def test_missing_path_and_unknown_file(tmp_path):
    _raises_one_line(data.DataError, "data path does not exist: .*nowhere", data.load_dataset, str(tmp_path / "nowhere"), SIZE, 0)
    other = tmp_path / "data.csv"
    other.write_text("1,2")
    _raises_one_line(data.DataError, "neither a folder nor an .npz", data.load_dataset, str(other), SIZE, 0)
    _raises_one_line(ValueError, "image_size must be >= 75", data.load_dataset, "builtin", 64, 0)
    _raises_one_line(ValueError, "val_fraction must be in", data.load_dataset, "builtin", SIZE, 0, 1.0)
    _raises_one_line(ValueError, "seed must be >= 0, got -1", data.load_dataset, "builtin", SIZE, -1)
    assert issubclass(data.DataError, ValueError)


def test_npz_grayscale_resized_and_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, size=(10, 80, 90)).astype(np.float32)
    y = (np.arange(10) % 2).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = data.load_dataset(str(tmp_path / "d.npz"), SIZE, seed=0)
    assert ds.x_train.shape == (8, SIZE, SIZE, 1) and ds.x_val.shape == (2, SIZE, SIZE, 1)
    assert ds.y_train.dtype == np.float32 and ds.num_classes == 1
    assert sorted(np.concatenate([ds.y_train, ds.y_val])[:, 0].tolist()) == [0.0] * 5 + [1.0] * 5
    # Same seed, same split; a different seed changes it.
    again = data.load_dataset(str(tmp_path / "d.npz"), SIZE, seed=0)
    np.testing.assert_array_equal(ds.x_val, again.x_val)
    other = data.load_dataset(str(tmp_path / "d.npz"), SIZE, seed=5)
    assert not np.array_equal(ds.x_val, other.x_val)


def test_npz_multilabel_same_size_kept_exactly(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=(6, SIZE, SIZE, 3)).astype(np.float32)
    y = rng.uniform(0, 1, size=(6, 4)).astype(np.float32)  # soft labels in [0, 1] are fine
    np.savez(tmp_path / "m.npz", x=x, y=y)
    ds = data.load_dataset(str(tmp_path / "m.npz"), SIZE, seed=0, val_fraction=0.5)
    got = np.concatenate([ds.x_train, ds.x_val])
    order = np.argsort(got[:, 0, 0, 0])
    np.testing.assert_array_equal(got[order], x[np.argsort(x[:, 0, 0, 0])])
    assert ds.num_classes == 4


def test_npz_nonfinite_pixels_allowed_and_reported(tmp_path):
    x = np.full((4, SIZE, SIZE, 3), 7.0, np.float32)
    x[1, 2, 3, 0] = np.nan
    x[2, 0, 0, 1] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=np.array([0, 1, 0, 1]))
    with pytest.raises(data.DataError, match=r"nan.npz: x\[1, 2, 3, 0\] = nan is not finite"):
        data.load_dataset(str(tmp_path / "nan.npz"), SIZE, seed=0, val_fraction=0.25)  # refused unless asked
    ds = data.load_dataset(str(tmp_path / "nan.npz"), SIZE, seed=0, val_fraction=0.25, allow_nonfinite=True)
    stats = data.input_stats(np.concatenate([ds.x_train, ds.x_val]))
    assert stats["nonfinite"] == 2 and stats["min"] == 7.0 and stats["max"] == 7.0


@pytest.mark.parametrize(
    "arrays, match",
    [
        ({"x": np.zeros((4, 75, 75, 3)), "y": np.array([0.0, 1.0, 1.5, 0.0])}, r"labels must lie in \[0, 1\], got y\[2, 0\] = .*1\.5"),
        ({"x": np.zeros((3, 75, 75, 3)), "y": np.array([0.0, np.nan, 1.0])}, r"labels must lie in \[0, 1\].*nan"),
        ({"x": np.zeros((3, 75, 75, 3)), "y": np.array([0.0, -1.0, 1.0])}, r"labels must lie in \[0, 1\].*-1\.0"),
        ({"x": np.zeros((4, 75, 75, 3)), "y": np.zeros(3)}, "x has 4 examples, y has 3"),
        ({"x": np.zeros((4, 75, 75, 3))}, "missing array.*y"),
        ({"x": np.zeros((4, 75)), "y": np.zeros(4)}, r"x must have shape \(N, H, W, C\) or \(N, H, W\), got \(4, 75\)"),
        ({"x": np.zeros((4, 75, 75)), "y": np.zeros((4, 1, 1))}, r"y must have shape \(N,\) or \(N, K\)"),
        ({"x": np.zeros((0, 75, 75)), "y": np.zeros(0)}, "empty arrays"),
        ({"x": np.array(["a", "b"]), "y": np.zeros(2)}, "x must be numeric"),
    ],
)
def test_npz_errors(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    _raises_one_line(data.DataError, match, data.load_dataset, str(tmp_path / "bad.npz"), SIZE, 0)


def test_npz_mixed_shapes(tmp_path):
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((75, 75, 3)), np.zeros((80, 80, 3))
    np.savez(tmp_path / "ragged.npz", x=ragged, y=np.zeros(2))
    _raises_one_line(data.DataError, "mixed shapes", data.load_dataset, str(tmp_path / "ragged.npz"), SIZE, 0)


def test_npy_under_npz_name(tmp_path):
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, np.zeros((2, 75, 75)))
    _raises_one_line(data.DataError, "single array, not an .npz archive", data.load_dataset, str(tmp_path / "single.npz"), SIZE, 0)


def test_npz_corrupt_file(tmp_path):
    (tmp_path / "c.npz").write_bytes(b"garbage")
    message = _raises_one_line(data.DataError, "unreadable .npz file", data.load_dataset, str(tmp_path / "c.npz"), SIZE, 0)
    assert "c.npz" in message


# ---------------------------------------------------------------------------------------------
# input_stats, fit_normalizer, normalize
# ---------------------------------------------------------------------------------------------


def test_input_stats_values():
    x = np.array([[0.0, 1.0], [2.0, 5.0]], np.float32)
    stats = data.input_stats(x)
    assert stats == {"min": 0.0, "max": 5.0, "mean": 2.0, "std": pytest.approx(np.std([0, 1, 2, 5])), "nonfinite": 0}
    bad = data.input_stats(np.array([np.nan, np.inf, -np.inf], np.float32))
    assert bad["nonfinite"] == 3 and np.isnan(bad["mean"])


def test_normalize_unit_maps_train_to_0_1(binary):
    stats = data.fit_normalizer(binary.x_train, "unit")
    out = data.normalize(binary.x_train, "unit", stats)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == pytest.approx(1.0)
    assert stats == {"mode": "unit", "min": 0.0, "max": 255.0}


def test_normalize_standardize_per_channel(binary):
    x = binary.x_train * np.array([1.0, 0.5, 2.0], np.float32) + np.array([0, 10, -50], np.float32)
    stats = data.fit_normalizer(x, "standardize")
    out = data.normalize(x, "standardize", stats)
    # float64 accumulation in the check itself: numpy's float32 std over 1e6 strided values drifts 3e-4.
    np.testing.assert_allclose(out.reshape(-1, 3).mean(axis=0, dtype=np.float64), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.reshape(-1, 3).std(axis=0, dtype=np.float64), 1.0, rtol=1e-5)
    # Validation data uses the training statistics, not its own.
    val = data.normalize(binary.x_val, "standardize", data.fit_normalizer(binary.x_train, "standardize"))
    assert abs(float(val.mean())) < 0.1


@pytest.mark.parametrize("mode", data.NORMALIZE_MODES)
def test_normalize_in_place_gives_the_same_bits_as_the_textbook_formula(binary, mode):
    x = binary.x_val[:8] * np.float32(1.5)
    stats = data.fit_normalizer(x, mode)
    if mode == "standardize":
        expected = (x - np.float32(stats["mean"])) / np.float32(stats["std"])
    elif mode == "unit":
        expected = (x - np.float32(stats["min"])) / np.float32(stats["max"] - stats["min"])
    else:
        expected = x.copy()
    fresh = data.normalize(x, mode, stats)
    assert fresh is not x or mode == "none"
    np.testing.assert_array_equal(fresh, expected)
    own = x.copy()
    assert data.normalize(own, mode, stats, out=own) is own
    np.testing.assert_array_equal(own, expected)
    if mode != "none":
        np.testing.assert_array_equal(x, binary.x_val[:8] * np.float32(1.5))  # the input untouched without out=


def test_standardize_constant_channel_stays_finite():
    x = np.zeros((4, 8, 8, 2), np.float32)
    x[..., 1] = np.arange(4, dtype=np.float32)[:, None, None]  # channel 0 is constant
    stats = data.fit_normalizer(x, "standardize")
    assert stats["std"][0] > 0
    out = data.normalize(x + 1.0, "standardize", stats)
    assert np.isfinite(out).all()


def test_normalize_none_and_errors(binary):
    stats = data.fit_normalizer(binary.x_val, "none")
    np.testing.assert_array_equal(data.normalize(binary.x_val, "none", stats), binary.x_val)
    _raises_one_line(ValueError, "unknown normalize mode 'zscore'", data.fit_normalizer, binary.x_val, "zscore")
    _raises_one_line(ValueError, "fitted for mode 'none', not 'unit'", data.normalize, binary.x_val, "unit", stats)
    one_channel = data.fit_normalizer(binary.x_val[..., :1], "standardize")
    _raises_one_line(ValueError, "1 channels, images have 3", data.normalize, binary.x_val, "standardize", one_channel)


def test_fit_normalizer_ignores_nonfinite():
    x = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    x[0, 0, 0, 0] = np.nan
    stats = data.fit_normalizer(x, "standardize")
    assert np.isfinite(stats["mean"]).all() and np.isfinite(stats["std"]).all()
    unit = data.fit_normalizer(x, "unit")
    assert unit["min"] == 1.0 and unit["max"] == 15.0


# ---------------------------------------------------------------------------------------------
# batch_at, eval_batches
# ---------------------------------------------------------------------------------------------


def _indexed(n):
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    return x, x.copy()


def test_batch_at_is_a_pure_function_of_step_and_seed():
    x, y = _indexed(10)
    first = [data.batch_at(x, y, step, 3, seed=1)[0][:, 0].tolist() for step in range(7)]
    # Resume: step 5 asked cold gives the same batch as in the sequence.
    assert data.batch_at(x, y, 5, 3, seed=1)[0][:, 0].tolist() == first[5]
    again = [data.batch_at(x, y, step, 3, seed=1)[0][:, 0].tolist() for step in range(7)]
    assert first == again
    other = [data.batch_at(x, y, step, 3, seed=2)[0][:, 0].tolist() for step in range(7)]
    assert other != first


def test_batch_at_epochs_drop_last_without_repeats():
    x, y = _indexed(10)
    steps_per_epoch = 10 // 3
    epochs = []
    for epoch in range(3):
        seen = []
        for step in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
            xb, yb = data.batch_at(x, y, step, 3, seed=0)
            assert xb.shape == (3, 1)
            np.testing.assert_array_equal(xb, yb)  # x and y stay paired
            seen.extend(xb[:, 0].tolist())
        assert len(set(seen)) == 9  # 9 distinct examples per epoch, the 10th dropped
        epochs.append(sorted(seen))
    assert len({tuple(e) for e in epochs}) > 1  # a fresh permutation each epoch


@given(
    n=st.integers(1, 40),
    batch_size=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    epoch=st.integers(0, 10**6),
)
def test_batch_at_each_epoch_is_a_partition_without_repeats(n, batch_size, seed, epoch):
    assume(batch_size <= n)
    x, y = _indexed(n)
    steps_per_epoch = n // batch_size
    seen = np.concatenate(
        [data.batch_at(x, y, epoch * steps_per_epoch + i, batch_size, seed)[1][:, 0] for i in range(steps_per_epoch)]
    )
    assert len(seen) == steps_per_epoch * batch_size == len(np.unique(seen))  # no example twice
    assert n - len(seen) < batch_size  # only the last partial batch is dropped


def test_batch_at_errors():
    x, y = _indexed(4)
    _raises_one_line(ValueError, "batch_size 5 is larger than the dataset \\(4 examples\\)", data.batch_at, x, y, 0, 5, 0)
    _raises_one_line(ValueError, "batch_size must be >= 1, got 0", data.batch_at, x, y, 0, 0, 0)
    _raises_one_line(ValueError, "step must be >= 0, got -1", data.batch_at, x, y, -1, 2, 0)
    _raises_one_line(ValueError, "x and y lengths differ: 4 vs 3", data.batch_at, x, y[:3], 0, 2, 0)


def test_eval_batches_cover_everything_once():
    x, y = _indexed(7)
    batches = list(data.eval_batches(x, y, 3))
    assert len(batches) == 3 and all(xb.shape == (3, 1) for xb, _, _ in batches)
    weights = np.concatenate([w for _, _, w in batches])
    np.testing.assert_array_equal(weights, [1, 1, 1, 1, 1, 1, 1, 0, 0])
    real = np.concatenate([xb[w > 0, 0] for xb, _, w in batches])
    np.testing.assert_array_equal(real, np.arange(7))


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def test_shard_and_replicate_on_one_device():
    mesh = data.make_mesh()
    assert mesh.axis_names == ("batch",) and mesh.size == jax.device_count()
    x, y = _indexed(4)
    batch = data.shard_batch({"x": x, "y": y}, mesh)
    assert batch["x"].sharding.spec == jax.sharding.PartitionSpec("batch")
    np.testing.assert_array_equal(np.asarray(batch["x"]), x)
    params = data.replicate({"w": np.ones(3, np.float32)}, mesh)
    assert params["w"].sharding.spec == jax.sharding.PartitionSpec()
    _raises_one_line(ValueError, "leaf is a scalar", data.shard_batch, {"s": np.float32(1.0)}, mesh)


def test_process_slice_gives_each_process_its_rows():
    x, y = _indexed(8)
    np.testing.assert_array_equal(data.process_slice(x), x)  # one process: everything
    parts = [data.process_slice((x, y), process_index=i, process_count=4) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate([px for px, _ in parts]), x)
    np.testing.assert_array_equal(parts[2][0][:, 0], [4, 5])
    _raises_one_line(ValueError, "global batch size 6 is not divisible by the number of processes \\(4\\)",
                     data.process_slice, x[:6], 0, 4)
    _raises_one_line(ValueError, "process_index must be in \\[0, 4\\), got 4", data.process_slice, x, 4, 4)


_FOUR_DEVICES = textwrap.dedent(
    """
    import jax, numpy as np
    from nanlab import data
    assert jax.device_count() == 4, jax.devices()
    mesh = data.make_mesh()
    x = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    batch = data.shard_batch({"x": x}, mesh)["x"]
    shards = sorted(batch.addressable_shards, key=lambda s: s.index[0].start)
    assert len({s.device for s in shards}) == 4
    for i, shard in enumerate(shards):
        assert shard.data.shape == (2, 2), shard.data.shape
        np.testing.assert_array_equal(np.asarray(shard.data), x[2 * i : 2 * i + 2])
    w = data.replicate(np.ones(3, np.float32), mesh)
    assert all(s.data.shape == (3,) for s in w.addressable_shards) and len(w.addressable_shards) == 4
    try:
        data.shard_batch(np.zeros((6, 2)), mesh)
    except ValueError as error:
        assert "batch size 6 is not divisible by the number of devices (4)" in str(error), error
    else:
        raise AssertionError("batch 6 on 4 devices was accepted")
    print("OK")
    """
)


def test_shard_batch_splits_over_four_simulated_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", _FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "OK"


def _tiny_convnet_accuracy(ds, steps=150, batch_size=32, seed=0):
    """Trains conv(5x5, 8) -> relu -> global mean -> dense by Adam on `ds`; returns val accuracy."""
    import jax.numpy as jnp
    import optax

    stats = data.fit_normalizer(ds.x_train, "standardize")
    x_train = data.normalize(ds.x_train, "standardize", stats)
    x_val = data.normalize(ds.x_val, "standardize", stats)
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "kernel": 0.1 * jax.random.normal(k1, (5, 5, 3, 8)),
        "dense": 0.1 * jax.random.normal(k2, (8, ds.num_classes)),
        "bias": jnp.zeros(ds.num_classes),
    }

    def logits_fn(params, x):
        h = jax.lax.conv_general_dilated(x, params["kernel"], (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(h).mean(axis=(1, 2)) @ params["dense"] + params["bias"]

    def loss_fn(params, x, y):
        return optax.sigmoid_binary_cross_entropy(logits_fn(params, x), y).mean()

    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    for i in range(steps):
        xb, yb = data.batch_at(x_train, ds.y_train, i, batch_size, seed)
        params, opt_state = step(params, opt_state, xb, yb)
    predicted = np.asarray(jax.jit(logits_fn)(params, x_val)) > 0
    return (predicted == (ds.y_val > 0.5)).mean(axis=0)


def test_builtin_tasks_are_learned_by_a_tiny_convnet_from_pixels():
    # Learnability by gradient descent from normalized pixels, not only by a hand-made feature.
    # Chance is 0.5 (balanced binary labels; attributes present with p = 1/2).
    binary = data.builtin_dataset("binary", image_size=SIZE, num_train=256, num_val=128, seed=1)
    assert _tiny_convnet_accuracy(binary, steps=60, batch_size=16)[0] > 0.9
    # The multi-label task is harder (0/60/120 degree stripes superposed): well above chance in 120
    # steps (about 0.97/0.77/0.74 at seed 1), ~0.96 each after 300 steps.
    multilabel = data.builtin_dataset("multilabel", image_size=SIZE, num_train=256, num_val=128, seed=1)
    accuracy = _tiny_convnet_accuracy(multilabel, steps=120, batch_size=16)
    assert (accuracy > 0.65).all() and accuracy.mean() > 0.75, accuracy


_TWO_PROCESSES_WORKER = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{sys.argv[1]}", num_processes=2,
                               process_id=int(sys.argv[2]))
    from nanlab import data
    assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
    mesh = data.make_mesh()
    x = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)  # the same global batch on both processes
    batch = data.shard_batch(data.process_slice(x), mesh)
    assert batch.shape == (8, 2), batch.shape
    for shard in batch.addressable_shards:
        assert shard.data.shape == (2, 2)
        np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
    w = data.replicate(np.ones(3, np.float32), mesh)
    assert w.shape == (3,) and all(s.data.shape == (3,) for s in w.addressable_shards)
    print("OK", float(jax.jit(lambda b: b.sum())(batch)))
    """
)


@pytest.mark.slow  # three JAX start-ups and a gloo rendezvous: ~10 s on 2 cores
def test_shard_batch_multi_process_builds_the_global_batch():
    import socket

    with socket.socket() as probe:  # a free port for the coordinator
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    workers = [
        subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES_WORKER, str(port), str(i)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outputs = [worker.communicate(timeout=120) for worker in workers]
    for worker, (stdout, stderr) in zip(workers, outputs):
        assert worker.returncode == 0, stderr[-2000:]
        # Each process sees the whole global batch's sum (0 + 1 + ... + 15) through the collective.
        assert stdout.strip().splitlines()[-1] == "OK 120.0"  # gloo prints its own lines first


@pytest.mark.parametrize("rows, columns, offset", [(1, 1, 0.0), (70_001, 3, 0.0), (70_001, 3, 1e6),
                                                   (4097, 5, -300.0), (131_072, 1, 12.5)])
def test_column_moments_match_numpy_two_pass_float64(rows, columns, offset):
    """Chunked, shifted float64 sums (a chunk edge and an uneven fold inside) give numpy's two-pass
    float64 mean and std to ~1e-12, even with a mean 1e6 times the spread; magnitude exactly."""
    rng = np.random.default_rng(rows + columns)
    values = (rng.normal(size=(rows, columns)) * rng.uniform(0.5, 3, size=columns) + offset).astype(np.float32)
    moments = data.column_moments(values)
    reference = values.astype(np.float64)
    assert moments.count == rows
    np.testing.assert_allclose(moments.mean, reference.mean(axis=0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(moments.std, reference.std(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(moments.magnitude, np.abs(reference).max(axis=0))


def test_column_moments_comparison_can_fail():
    """The check above has teeth: a float32 one-pass variance at a 1e4 offset misses by far more."""
    values = (np.random.default_rng(0).normal(size=(70_001, 1)) + 1e4).astype(np.float32)
    naive = np.sqrt(np.mean(values * values) - np.mean(values) ** 2)
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(naive, values.astype(np.float64).std(), rtol=1e-9)
    _raises_one_line(ValueError, r"non-empty 2-D array, got shape \(3,\)", data.column_moments, np.ones(3))
