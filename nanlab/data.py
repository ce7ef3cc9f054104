"""Datasets, input normalization, deterministic batching and device placement.

Data sources (`load_dataset`):

* ``"builtin"`` / ``"builtin-multilabel"``: generated in memory by `builtin_dataset`, no download.
* an image folder: one subfolder per class, images decoded with Pillow, converted to RGB and
  resized to ``image_size`` x ``image_size`` (bilinear). Class names are the subfolder names in
  sorted order. Two classes give a binary task with K=1 and label 1 for the SECOND class in
  sorted order (e.g. ``cat/`` and ``dog/``: dog = 1). More than two give a multi-label
  (one-vs-rest) task with K = number of classes and one-hot labels. Files whose suffix is not an
  image suffix (`IMAGE_SUFFIXES`) and hidden files are ignored.
* an ``.npz`` file with ``x`` of shape (N, H, W, C) or (N, H, W) and ``y`` of shape (N,) or
  (N, K), labels in [0, 1]. Images are resized to ``image_size`` when their size differs.

Every `Dataset` holds float32 NHWC images at raw pixel scale (0..255 for images) and float32
(N, K) labels. A non-finite pixel or label in an .npz is bad input (`DataError` naming the array
and its first index) unless the caller asks for them (``allow_nonfinite=True``, the train flag
``--allow-nonfinite-data``: a failure to reproduce); decoded images are uint8, always finite.
`input_stats` counts the non-finite pixels either way.

Data parallelism: `make_mesh` builds a 1-D mesh (axis ``"batch"``), `shard_batch` splits a
batch's leading axis over it, `replicate` copies params and optimizer state to every device.
Multi-host (several processes, e.g. one per GPU host)::

    jax.distributed.initialize()                     # before any other JAX call
    mesh = make_mesh()                               # all devices of all processes
    xb, yb = batch_at(x, y, step, global_batch, seed)  # every process loads the same data
    batch = shard_batch(process_slice((xb, yb)), mesh) # each contributes its rows of the batch

`shard_batch` then assembles the global array from the process-local rows with
``jax.make_array_from_process_local_data``; with one process it is a plain ``jax.device_put``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from nanlab.config import BUILTIN_DATA, MIN_IMAGE_SIZE, NORMALIZE_MODES, BadInput

__all__ = [
    "DataError", "Dataset", "batch_at", "builtin_dataset", "check_finite_array", "check_npz_arrays", "eval_batches",
    "first_nonfinite", "fit_normalizer", "input_stats",
    "labels_from_class_index", "list_image_folder", "load_dataset", "load_for_config", "make_mesh", "normalize",
    "process_slice", "replicate", "shard_batch",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
BATCH_AXIS = "batch"

DEFAULT_NUM_TRAIN = 1024
DEFAULT_NUM_VAL = 256
DEFAULT_NUM_LABELS = 3
GENERATION_CHUNK = 256  # images per random stream; part of the data's definition (changing it changes the data)
NOISE_STD = 20.0  # pixel noise of the built-in images, in 0..255 units


class DataError(ValueError):
    """Bad data input: the message is one line that names the offending file or value."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/validation split held in host memory.

    Attributes:
      x_train, x_val: float32 (N, H, W, C) images, raw pixel scale.
      y_train, y_val: float32 (N, K) labels in [0, 1]; one independent sigmoid per column.
      num_classes: K, the number of label columns (1 for a binary task).
      name: a short description of the source.
      class_names: names of the label columns (or of the two classes of a binary task).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------
# The built-in dataset
# --------------------------------------------------------------------------------------------


def _check_image_size(image_size: Any) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise TypeError(f"image_size must be an int, got {type(image_size).__name__}: {image_size!r}")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE} (InceptionV3's minimum), got {image_size}")
    return int(image_size)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _gratings(rng: np.random.Generator, angles: np.ndarray, image_size: int) -> np.ndarray:
    """Sinusoidal stripes, one per angle: float32 (N, S, S) in [-1, 1].

    The stripes run perpendicular to `angles` (radians); the period is 10-20% of the image side so
    the pattern looks the same at every image size and survives the stem's stride-2 layers.
    """
    n = angles.shape[0]
    coords = np.arange(image_size, dtype=np.float32)
    period = rng.uniform(0.10, 0.20, size=(n, 1, 1)).astype(np.float32) * image_size
    phase = rng.uniform(0.0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
    cos = np.cos(angles).astype(np.float32)[:, None, None]
    sin = np.sin(angles).astype(np.float32)[:, None, None]
    projection = cos * coords[None, None, :] + sin * coords[None, :, None]  # (N, S, S)
    return np.sin((2 * np.pi / period) * projection + phase)


def _render(rng: np.random.Generator, pattern: np.ndarray) -> np.ndarray:
    """Colours a (N, S, S) pattern, adds background and noise: float32 (N, S, S, 3) in [0, 255]."""
    n = pattern.shape[0]
    colour = rng.uniform(0.4, 1.0, size=(n, 1, 1, 3)).astype(np.float32)
    background = rng.uniform(90.0, 160.0, size=(n, 1, 1, 3)).astype(np.float32)
    # Uniform noise from random bytes: 5-10x faster than Gaussian draws (generation must stay
    # well under a second for thousands of images); std = NOISE_STD like the Gaussian it replaces.
    image = rng.integers(0, 256, size=pattern.shape + (3,), dtype=np.uint8).astype(np.float32)
    image -= np.float32(127.5)
    image *= np.float32(NOISE_STD * math.sqrt(12.0) / 256.0)  # uniform on a width-w interval: std w/sqrt(12)
    image += background
    image += pattern[..., None] * colour
    return np.clip(image, 0.0, 255.0, out=image)


def _binary_split(rng: np.random.Generator, n: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    # Balanced labels (per chunk), shuffled: label 1 = horizontal stripes, 0 = vertical, +-20 degrees jitter.
    labels = rng.permutation(np.arange(n) % 2).astype(np.float32)
    jitter = rng.uniform(-np.pi / 9, np.pi / 9, size=n)
    angles = labels * (np.pi / 2) + jitter
    contrast = rng.uniform(40.0, 90.0, size=(n, 1, 1)).astype(np.float32)
    x = _render(rng, contrast * _gratings(rng, angles, image_size))
    return x, labels[:, None]


def _multilabel_split(
    rng: np.random.Generator, n: int, image_size: int, *, num_labels: int
) -> tuple[np.ndarray, np.ndarray]:
    # Attribute k = stripes at angle k*180/K degrees (+-jitter), present independently with p=0.5.
    labels = (rng.random(size=(n, num_labels)) < 0.5).astype(np.float32)
    spacing = np.pi / num_labels
    pattern = np.zeros((n, image_size, image_size), np.float32)
    for k in range(num_labels):
        angles = k * spacing + rng.uniform(-spacing / 6, spacing / 6, size=n)
        contrast = rng.uniform(35.0, 60.0, size=(n, 1, 1)).astype(np.float32)
        pattern += labels[:, k, None, None] * contrast * _gratings(rng, angles, image_size)
    return _render(rng, pattern), labels


def _generate(make_chunk, key: tuple[int, ...], n: int, image_size: int, num_classes: int):
    """Fills (n, S, S, 3) images and (n, K) labels chunk by chunk.

    Chunk c draws from its own stream (key + (c,)), so temporaries stay small even for 16k images
    at 299x299.
    """
    x = np.empty((n, image_size, image_size, 3), np.float32)
    y = np.empty((n, num_classes), np.float32)
    for chunk, start in enumerate(range(0, n, GENERATION_CHUNK)):
        stop = min(start + GENERATION_CHUNK, n)
        rng = np.random.default_rng(key + (chunk,))
        x[start:stop], y[start:stop] = make_chunk(rng, stop - start, image_size)
    return x, y


def builtin_dataset(
    kind: str = "binary",
    image_size: int = MIN_IMAGE_SIZE,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    seed: int = 0,
    *,
    num_labels: int = DEFAULT_NUM_LABELS,
) -> Dataset:
    """The built-in image task, generated deterministically in memory (no download).

    ``binary``: coloured stripes plus uniform pixel noise (std 20); label 1 when the stripes are
    horizontal, 0 when vertical (each +-20 degrees). Classes are balanced. A small convnet learns
    it well above chance in a couple of hundred steps; no single pixel's mean tells the classes
    apart (stripe phases are random), the orientation does.

    ``multilabel``: K = num_labels independent attributes; attribute k is the presence of stripes
    at angle k*180/K degrees (each present with probability 1/2, superposed).

    Images are generated in chunks of `GENERATION_CHUNK` from streams of (seed, kind, split,
    chunk): the validation set does not depend on num_train.

    Pixels are float32 in [0, 255], like decoded images, so normalization matters.

    Args:
      kind: ``binary`` or ``multilabel``.
      image_size: side of the square images, >= 75.
      num_train, num_val: split sizes, >= 1.
      seed: the generator seed.
      num_labels: K for ``multilabel`` (>= 2).

    Returns:
      A `Dataset`.
    """
    image_size = _check_image_size(image_size)
    num_train = _check_count("num_train", num_train, 1)
    num_val = _check_count("num_val", num_val, 1)
    seed = _check_count("seed", seed, 0)
    if kind == "binary":
        make_chunk, num_classes, names = _binary_split, 1, ("vertical", "horizontal")
    elif kind == "multilabel":
        num_labels = _check_count("num_labels", num_labels, 2)
        make_chunk = functools.partial(_multilabel_split, num_labels=num_labels)
        num_classes = num_labels
        names = tuple(f"stripes_{round(k * 180 / num_labels)}deg" for k in range(num_labels))
    else:
        raise ValueError(f"unknown builtin dataset kind {kind!r} (choose from binary, multilabel)")
    key = (seed, 0 if kind == "binary" else 1, num_classes)
    x_train, y_train = _generate(make_chunk, key + (0,), num_train, image_size, num_classes)
    x_val, y_val = _generate(make_chunk, key + (1,), num_val, image_size, num_classes)
    return Dataset(x_train, y_train, x_val, y_val, num_classes, "builtin" if kind == "binary" else "builtin-multilabel", names)


# --------------------------------------------------------------------------------------------
# Loading: builtin | image folder | .npz
# --------------------------------------------------------------------------------------------


def _split(
    x: np.ndarray, y: np.ndarray, seed: int, val_fraction: float, name: str, class_names: tuple[str, ...]
) -> Dataset:
    """Seeded shuffle, then the first round(N * val_fraction) examples (at least 1) go to val."""
    n = x.shape[0]
    if n < 2:
        raise DataError(f"{name}: need at least 2 examples for a train/validation split, got {n}")
    num_val = min(max(1, round(n * val_fraction)), n - 1)
    order = np.random.default_rng([seed, 2]).permutation(n)
    val_idx, train_idx = np.sort(order[:num_val]), np.sort(order[num_val:])
    return Dataset(
        np.ascontiguousarray(x[train_idx]),
        np.ascontiguousarray(y[train_idx]),
        np.ascontiguousarray(x[val_idx]),
        np.ascontiguousarray(y[val_idx]),
        int(y.shape[1]),
        name,
        class_names,
    )


def _describe(error: BaseException) -> str:
    """An exception as one line (error messages of this module are single lines)."""
    return " ".join(f"{type(error).__name__}: {error}".split())


def _load_image(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.float32)
    # Pillow's decoders raise many types (UnidentifiedImageError, OSError for truncation,
    # SyntaxError, ValueError, DecompressionBombError): any of them means "unreadable".
    except Exception as error:
        raise DataError(f"unreadable image {path}: {_describe(error)}") from None


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES


def list_image_folder(root: Path) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray]:
    """Lists an image folder without decoding anything.

    Returns:
      (class_names, relative file paths "class/file", int32 class index per file).

    Raises:
      DataError: an empty folder, fewer than 2 class subfolders, a class without image files.
    """
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(f"empty data folder {root}: expected one subfolder per class")
    class_dirs = sorted((p for p in entries if p.is_dir()), key=lambda p: p.name)
    if len(class_dirs) < 2:
        raise DataError(
            f"data folder {root} has {len(class_dirs)} class subfolder(s); need at least 2 (one per class)"
        )
    files: list[str] = []
    class_index: list[int] = []
    for index, class_dir in enumerate(class_dirs):
        names = sorted(p.name for p in class_dir.iterdir() if _is_image_file(p))
        if not names:
            raise DataError(f"class folder {class_dir} has no image files ({', '.join(IMAGE_SUFFIXES)})")
        files.extend(f"{class_dir.name}/{name}" for name in names)
        class_index.extend([index] * len(names))
    return tuple(p.name for p in class_dirs), tuple(files), np.asarray(class_index, np.int32)


def labels_from_class_index(class_index: np.ndarray, num_classes: int) -> np.ndarray:
    """The folder convention of `nanlab.data`: 2 classes -> K=1 with label 1 for the SECOND
    class in sorted order; more -> one-hot over K = num_classes (one-vs-rest)."""
    if num_classes == 2:
        return (class_index == 1).astype(np.float32)[:, None]
    return np.eye(num_classes, dtype=np.float32)[class_index]


def _load_image_folder(root: Path, image_size: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    names, files, class_index = list_image_folder(root)
    x = np.stack([_load_image(root / f, image_size) for f in files])
    return x, labels_from_class_index(class_index, len(names)), names


def _resize_images(x: np.ndarray, image_size: int) -> np.ndarray:
    """Bilinear resize of (N, H, W, C) float32 to image_size, per channel with Pillow's 'F' mode."""
    if x.shape[1:3] == (image_size, image_size):
        return x
    out = np.empty((x.shape[0], image_size, image_size, x.shape[3]), np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[3]):
            plane = Image.fromarray(np.ascontiguousarray(x[i, :, :, c]), mode="F")
            out[i, :, :, c] = np.asarray(plane.resize((image_size, image_size), Image.Resampling.BILINEAR))
    return out


def first_nonfinite(a: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first non-finite element of `a` in C order; None when all are finite."""
    if not np.issubdtype(a.dtype, np.inexact):
        return None  # integers and booleans are always finite
    finite = np.isfinite(a)
    if finite.all():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmin(finite)), a.shape))


def check_finite_array(path: Path, name: str, a: np.ndarray, first: int = 0) -> None:
    """Refuse an array holding NaN or inf, naming the file, the array and the first bad index.

    `first`: the index of a[0] in the whole array, when `a` is one chunk of it.

    Raises:
      DataError: one line, with the way to train on such data on purpose.
    """
    index = first_nonfinite(a)
    if index is not None:
        where = [first + index[0], *index[1:]]
        raise DataError(f"{path}: {name}{where} = {float(a[index])} is not finite (pass "
                        "--allow-nonfinite-data to train on non-finite data on purpose)")


def check_npz_arrays(path: Path, x_shape: tuple[int, ...], x_dtype: np.dtype, y: np.ndarray,
                     allow_nonfinite: bool = False) -> np.ndarray:
    """Check an .npz's images (by shape and dtype: they may stay on disk) and labels.

    Args:
      allow_nonfinite: let NaN and inf labels through (finite ones must still lie in [0, 1]).

    Returns:
      y as float32 of shape (N, K).

    Raises:
      DataError: one line naming the file and what is wrong (object arrays, non-numeric dtypes,
        shapes, lengths, empty arrays, labels outside [0, 1], or non-finite unless allowed).
    """
    if np.dtype(x_dtype).hasobject or y.dtype.hasobject:
        raise DataError(f"{path}: x or y holds arrays of mixed shapes (an object array)")
    if not (np.issubdtype(x_dtype, np.number) or x_dtype == bool):
        raise DataError(f"{path}: x must be numeric, got dtype {x_dtype}")
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise DataError(f"{path}: y must be numeric, got dtype {y.dtype}")
    if len(x_shape) not in (3, 4):
        raise DataError(f"{path}: x must have shape (N, H, W, C) or (N, H, W), got {tuple(x_shape)}")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise DataError(f"{path}: y must have shape (N,) or (N, K), got {y.shape}")
    if x_shape[0] != y.shape[0]:
        raise DataError(f"{path}: x and y lengths differ: x has {x_shape[0]} examples, y has {y.shape[0]}")
    if x_shape[0] == 0 or y.shape[1] == 0 or min(x_shape[1:]) == 0:
        raise DataError(f"{path}: empty arrays: x {tuple(x_shape)}, y {y.shape}")
    y = y.astype(np.float32)
    in_range = (y >= 0) & (y <= 1)  # False for NaN
    bad = ~in_range & np.isfinite(y) if allow_nonfinite else ~in_range
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        hint = "" if np.isfinite(y[first]) else " (pass --allow-nonfinite-data to train on non-finite data on purpose)"
        raise DataError(f"{path}: labels must lie in [0, 1], got y{list(first)} = {float(y[first])}{hint}")
    return y


def _load_npz(path: Path, image_size: int, allow_nonfinite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as error:  # zipfile/OSError/ValueError: all mean "not a readable .npz"
        raise DataError(f"unreadable .npz file {path}: {_describe(error)}") from None
    if not hasattr(archive, "files"):  # a plain .npy saved under an .npz name
        raise DataError(f"{path} holds a single array, not an .npz archive with x and y (use np.savez)")
    with archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise DataError(f"{path}: missing array(s) {', '.join(missing)}; found {archive.files}")
        try:
            x, y = archive["x"], archive["y"]
        except ValueError:
            # Object arrays need pickle: that is how numpy stores a list of differently shaped images.
            raise DataError(
                f"{path}: x or y holds arrays of mixed shapes (an object array); save one array x of "
                "shape (N, H, W, C) or (N, H, W)"
            ) from None
    y = check_npz_arrays(path, x.shape, x.dtype, y, allow_nonfinite)
    if not allow_nonfinite:
        check_finite_array(path, "x", x)  # before the resize, which would spread a NaN over its neighbours
    if x.ndim == 3:
        x = x[..., None]
    x = _resize_images(x.astype(np.float32), image_size)
    return x, y


def load_dataset(spec: str, image_size: int, seed: int, val_fraction: float = 0.2,
                 allow_nonfinite: bool = False) -> Dataset:
    """Loads the data named by `spec` (the ``--data`` flag).

    Args:
      spec: ``"builtin"``, ``"builtin-multilabel"``, an image folder or an ``.npz`` path (see
        the module docstring for the layouts).
      image_size: side of the square images, >= 75.
      seed: seed of the built-in generator and of the train/validation split of loaded data.
      val_fraction: share of loaded data held out for validation, in (0, 1); at least one
        example goes to each split. Ignored by the built-in sets (they have fixed split sizes).
      allow_nonfinite: accept NaN/inf pixels and labels in an .npz (to reproduce such a failure).

    Returns:
      A `Dataset`.

    Raises:
      DataError: a missing path, an empty folder, fewer than 2 class folders, an unreadable image
        (named), mixed shapes, labels outside [0, 1] (the value), an x/y length mismatch, a
        non-finite pixel or label unless allowed (the array and its first index).
    """
    image_size = _check_image_size(image_size)
    seed = _check_count("seed", seed, 0)
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if spec == "builtin":
        return builtin_dataset("binary", image_size=image_size, seed=seed)
    if spec == "builtin-multilabel":
        return builtin_dataset("multilabel", image_size=image_size, seed=seed)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"data spec must be a string or a path, got {type(spec).__name__}: {spec!r}")
    path = Path(spec)
    if not path.exists():
        raise DataError(f"data path does not exist: {spec} (use builtin, builtin-multilabel, a folder or an .npz)")
    if path.is_dir():
        x, y, names = _load_image_folder(path, image_size)
        return _split(x, y, seed, val_fraction, f"folder:{path.name}", names)
    if path.suffix.lower() == ".npz":
        x, y = _load_npz(path, image_size, allow_nonfinite)
        names = tuple(f"label_{k}" for k in range(y.shape[1]))
        return _split(x, y, seed, val_fraction, f"npz:{path.name}", names)
    raise DataError(f"data path {spec} is neither a folder nor an .npz file")


# --------------------------------------------------------------------------------------------
# Statistics and normalization
# --------------------------------------------------------------------------------------------


def load_for_config(config: Any) -> tuple[Dataset, dict[str, dict[str, float]]]:
    """A TrainConfig's dataset, scaled by ``input_scale`` and normalized; plus raw and normalized input stats.

    Returns:
      (Dataset with normalized x, {"raw": stats, "normalized": stats}).

    Raises:
      BadInput: unreadable data, or a batch larger than the training set.
    """
    try:
        if config.data in BUILTIN_DATA:
            kind = "binary" if config.data == "builtin" else "multilabel"
            dataset = builtin_dataset(kind, config.image_size, config.num_train, config.num_val, config.seed)
        else:
            dataset = load_dataset(config.data, config.image_size, config.seed,
                                   allow_nonfinite=config.allow_nonfinite_data)
    except ValueError as error:  # DataError is a ValueError
        raise BadInput(f"--data {config.data}: {error}") from None
    if config.batch_size > len(dataset.x_train):
        raise BadInput(f"--batch-size {config.batch_size} is larger than the training set ({len(dataset.x_train)} examples)")
    scale = np.float32(config.input_scale)
    # x * 1 is x, bit for bit: the default scale copies nothing (the training images are ~0.3 GB).
    raw_train = dataset.x_train * scale if scale != 1 else dataset.x_train
    x_val = dataset.x_val * scale if scale != 1 else dataset.x_val
    normalizer = fit_normalizer(raw_train, config.normalize)
    raw_stats = input_stats(raw_train)
    # In place: the arrays are this function's own (generated or read here), replaced in the result.
    x_train = normalize(raw_train, config.normalize, normalizer, out=raw_train)
    x_val = normalize(x_val, config.normalize, normalizer, out=x_val)
    stats = {"raw": raw_stats, "normalized": input_stats(x_train)}
    return dataclasses.replace(dataset, x_train=x_train, x_val=x_val), stats


def input_stats(x: np.ndarray) -> dict[str, float]:
    """Summary statistics of the inputs, over their finite values.

    Args:
      x: an array of any shape.

    Returns:
      {"min", "max", "mean", "std", "nonfinite"}: floats over the finite elements (NaN when there
      are none) and the count of NaN/inf elements (the bad-data scenario shows up here).
    """
    x = np.asarray(x)
    finite_mask = np.isfinite(x)
    nonfinite = int(x.size - np.count_nonzero(finite_mask))
    values = x if nonfinite == 0 else x[finite_mask]  # no copy in the common all-finite case
    if values.size == 0:
        return {"min": math.nan, "max": math.nan, "mean": math.nan, "std": math.nan, "nonfinite": nonfinite}
    moments = column_moments(values.reshape(-1, 1))
    return {
        "min": float(moments.min[0]),
        "max": float(moments.max[0]),
        "mean": float(moments.mean[0]),
        "std": float(moments.std[0]),
        "nonfinite": nonfinite,
    }


@dataclasses.dataclass(frozen=True)
class ColumnMoments:
    """Per-column count, mean, standard deviation, min and max (float64) of a 2-D array."""

    count: int
    mean: np.ndarray
    std: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @property
    def magnitude(self) -> np.ndarray:
        """The largest |value| of each column."""
        return np.maximum(np.abs(self.min), np.abs(self.max))


_MOMENT_ROWS = 1 << 16  # rows per float64 chunk: ~0.5 MB per column, no full-size float64 copy


def column_moments(values: np.ndarray) -> ColumnMoments:
    """Moments of each column of `values` (rows, columns), all finite, accumulated in float64.

    One pass in chunks of rows: each chunk, made float64, is shifted by the first chunk's column
    means (so that the sum of squares does not cancel catastrophically when the mean is large
    against the spread) and summed by a matrix-vector product, which runs at memory speed where
    numpy's column reductions of a few-column array do not (1.5 s against 0.06 s for the built-in
    data's 11.5M pixels x 3 channels).
    """
    values = np.asarray(values)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"column_moments needs a non-empty 2-D array, got shape {values.shape}")
    ones = np.ones(min(len(values), _MOMENT_ROWS))
    shift = values[:_MOMENT_ROWS].astype(np.float64).mean(axis=0)
    total = np.zeros(values.shape[1])
    total_sq = np.zeros(values.shape[1])
    for start in range(0, len(values), _MOMENT_ROWS):
        chunk = values[start:start + _MOMENT_ROWS].astype(np.float64) - shift
        weights = ones[:len(chunk)]
        total += weights @ chunk
        total_sq += weights @ (chunk * chunk)
    count = len(values)
    offset = total / count
    std = np.sqrt(np.maximum(total_sq / count - offset * offset, 0.0))
    low, high = (_column_extreme(values, reduce) for reduce in (np.min, np.max))
    return ColumnMoments(count, shift + offset, std, low.astype(np.float64), high.astype(np.float64))


def _column_extreme(values: np.ndarray, reduce) -> np.ndarray:
    """`reduce` (np.min or np.max) of each column. Folding many rows into one long row first keeps
    numpy's reduction vectorized (a reduction over a 3-wide axis 0 runs 3 lanes at a time)."""
    columns = values.shape[1]
    fold = max(1, 4096 // columns)
    whole = len(values) - len(values) % fold
    parts = [reduce(values[whole:], axis=0)] if whole < len(values) else []
    if whole:
        wide = reduce(values[:whole].reshape(-1, fold * columns), axis=0)
        parts.append(reduce(wide.reshape(fold, columns), axis=0))
    return reduce(parts, axis=0)


def fit_normalizer(x_train: np.ndarray, mode: str) -> dict[str, Any]:
    """Fits the normalization statistics on the training images (JSON-serializable).

    Modes:
      ``none``: identity.
      ``unit``: min-max scaling to [0, 1] with the training split's finite min and max (for 0..255
        images this is about x / 255; unlike a fixed /255 it also fits .npz data of any scale).
      ``standardize``: per-channel (last axis) mean and std of the training split's finite values.

    Args:
      x_train: float (N, H, W, C) training images.
      mode: one of `NORMALIZE_MODES`.

    Returns:
      {"mode": mode, ...}: "min"/"max" floats for unit, "mean"/"std" lists per channel for
      standardize.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalize mode {mode!r} (choose from {', '.join(NORMALIZE_MODES)})")
    x_train = np.asarray(x_train)
    if mode == "none":
        return {"mode": "none"}
    if mode == "unit":
        stats = input_stats(x_train)
        low = 0.0 if math.isnan(stats["min"]) else stats["min"]
        high = low + 1.0 if math.isnan(stats["max"]) else stats["max"]
        return {"mode": "unit", "min": low, "max": high}
    channels = x_train.reshape(-1, x_train.shape[-1])
    if np.isfinite(channels).all():
        moments = column_moments(channels)
        mean, std, scale = moments.mean, moments.std, moments.magnitude
    else:  # each channel's finite values on their own (bad-data runs); none at all: zeros
        mean, std, scale = np.zeros((3, channels.shape[1]))
        for c, column in enumerate(channels.T):
            finite = column[np.isfinite(column)]
            if finite.size:
                moments = column_moments(finite.reshape(-1, 1))
                mean[c], std[c], scale[c] = moments.mean[0], moments.std[0], moments.magnitude[0]
    # Floor the std: a constant channel (std 0) would divide by zero and turn the inputs into
    # inf/NaN -- the very failure this lab reproduces on purpose elsewhere. 1e-3 of the channel's
    # magnitude (at least 1e-3) keeps the division finite and leaves real channels untouched.
    std = np.maximum(std, 1e-3 * np.maximum(scale, 1.0))
    return {"mode": "standardize", "mean": mean.tolist(), "std": std.tolist()}


def normalize(x: np.ndarray, mode: str, stats: dict[str, Any], *, out: np.ndarray | None = None) -> np.ndarray:
    """Applies the normalization fitted by `fit_normalizer`.

    Args:
      x: float images (..., C).
      mode: one of `NORMALIZE_MODES`; must match ``stats["mode"]``.
      stats: the dict returned by `fit_normalizer`.
      out: a float32 array of x's shape to write the result into (x itself, to normalize in
        place: no new 0.3 GB array and its page faults for the built-in training set); a new one
        by default.

    Returns:
      float32 array of x's shape (`out` when given).
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalize mode {mode!r} (choose from {', '.join(NORMALIZE_MODES)})")
    if stats.get("mode") != mode:
        raise ValueError(f"normalizer stats were fitted for mode {stats.get('mode')!r}, not {mode!r}")
    x = np.asarray(x, dtype=np.float32)
    if mode == "none":
        if out is None or out is x:
            return x
        np.copyto(out, x)
        return out
    if mode == "unit":
        # A constant training set (max == min) maps to 0 instead of dividing by zero.
        shift, divisor = np.float32(stats["min"]), np.float32(stats["max"] - stats["min"] or 1.0)
    else:
        shift, divisor = np.asarray(stats["mean"], np.float32), np.asarray(stats["std"], np.float32)
        if shift.shape[0] != x.shape[-1]:
            raise ValueError(f"normalizer has {shift.shape[0]} channels, images have {x.shape[-1]}")
    out = np.subtract(x, shift, out=out)  # (x - shift) / divisor, in float32 as written
    return np.divide(out, divisor, out=out)


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _check_batch_args(x: np.ndarray, y: np.ndarray, batch_size: Any) -> int:
    batch_size = _check_count("batch_size", batch_size, 1)
    if len(x) != len(y):
        raise ValueError(f"x and y lengths differ: {len(x)} vs {len(y)}")
    if batch_size > len(x):
        raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(x)} examples)")
    return batch_size


def batch_at(x: np.ndarray, y: np.ndarray, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of global step `step`: a pure function of (step, seed).

    Each epoch visits the examples in a permutation drawn from (seed, epoch); the last partial
    batch of an epoch is dropped so every batch has batch_size examples. Because nothing depends
    on earlier calls, a resumed run gets exactly the batches of an uninterrupted one.

    Args:
      x, y: arrays with the same leading length N.
      step: global step, >= 0.
      batch_size: 1 <= batch_size <= N.
      seed: the data-order seed.

    Returns:
      (x[idx], y[idx]) with idx the step's batch_size indices.
    """
    batch_size = _check_batch_args(x, y, batch_size)
    step = _check_count("step", step, 0)
    steps_per_epoch = len(x) // batch_size
    epoch, position = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, 3, epoch]).permutation(len(x))
    idx = np.sort(order[position * batch_size : (position + 1) * batch_size])  # sorted: faster gather
    return x[idx], y[idx]


def eval_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Fixed-size batches covering every example once, in order (for evaluation).

    The last batch is padded with zeros to batch_size (so it shards like the others and needs no
    recompilation); `weights` is 1.0 for real examples and 0.0 for padding.

    Yields:
      (xb, yb, weights) with leading size batch_size.
    """
    batch_size = _check_count("batch_size", batch_size, 1)
    if len(x) != len(y):
        raise ValueError(f"x and y lengths differ: {len(x)} vs {len(y)}")
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        real = len(xb)
        weights = np.zeros(batch_size, np.float32)
        weights[:real] = 1.0
        if real < batch_size:
            xb = np.concatenate([xb, np.zeros((batch_size - real,) + xb.shape[1:], xb.dtype)])
            yb = np.concatenate([yb, np.zeros((batch_size - real,) + yb.shape[1:], yb.dtype)])
        yield xb, yb, weights


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------


def make_mesh(devices=None):
    """A 1-D device mesh with axis ``"batch"`` for data parallelism.

    Args:
      devices: the devices to span; default ``jax.devices()`` -- all local devices in a single
        process, all devices of all processes after ``jax.distributed.initialize()``.

    Returns:
      A ``jax.sharding.Mesh``.
    """
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def _local_device_count(mesh) -> int:
    return sum(1 for d in mesh.devices.flat if d.process_index == jax.process_index())


def shard_batch(tree: Any, mesh) -> Any:
    """Places a batch on the mesh, leading axis split over ``"batch"``.

    Single process: ``jax.device_put`` with ``NamedSharding(mesh, P("batch"))``. Several processes:
    each passes its process-local part of the batch, and the global array (leading size summed over
    processes) is built with ``jax.make_array_from_process_local_data``.

    Args:
      tree: a pytree of host arrays with a common leading (batch) axis.
      mesh: from `make_mesh`.

    Returns:
      The same pytree of sharded ``jax.Array``s.

    Raises:
      ValueError: a leaf without a batch axis or a batch size not divisible by the device count.
    """
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    local_devices = _local_device_count(mesh)
    for leaf in jax.tree.leaves(tree):
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError("shard_batch: a leaf is a scalar; every leaf needs a leading batch axis")
        if shape[0] % local_devices:
            raise ValueError(
                f"batch size {shape[0]} is not divisible by the number of devices ({local_devices}); "
                f"use a multiple of {local_devices}"
            )
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf)), tree)


def process_slice(tree: Any, process_index: int | None = None, process_count: int | None = None) -> Any:
    """This process's rows of a global batch (the identity with a single process).

    Args:
      tree: a pytree of host arrays with a common leading (global batch) axis.
      process_index, process_count: default ``jax.process_index()`` / ``jax.process_count()``.

    Returns:
      Each leaf's rows [i * n / p, (i + 1) * n / p) for process i of p.

    Raises:
      ValueError: a leading size not divisible by the number of processes.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index must be in [0, {count}), got {index}")

    def rows(leaf):
        size = np.shape(leaf)[0]
        if size % count:
            raise ValueError(f"global batch size {size} is not divisible by the number of processes ({count})")
        per_process = size // count
        return leaf[index * per_process : (index + 1) * per_process]

    return jax.tree.map(rows, tree)


def replicate(tree: Any, mesh) -> Any:
    """Places a pytree (params, optimizer state) on every device of the mesh, unsharded.

    Args:
      tree: a pytree of arrays (identical on every process when several run).
      mesh: from `make_mesh`.

    Returns:
      The same pytree of replicated ``jax.Array``s.
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)
    # Replicated: each process's local data is the whole array.
    return jax.tree.map(
        lambda leaf: jax.make_array_from_process_local_data(sharding, np.asarray(leaf), np.shape(leaf)), tree
    )


if __name__ == "__main__":
    # `python -m nanlab.data convert FOLDER OUT.array_record`: the CLI lives in nanlab.streaming.cli
    # (a library module never imports a CLI module; this block runs only as a program).
    import sys

    from nanlab.streaming.cli import main

    sys.exit(main())
