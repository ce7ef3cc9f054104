"""The Grain pipeline: batches as a pure function of (seed, step), decoded in worker processes.

The training batch of step s holds the same examples as `nanlab.data.batch_at` picks from an
in-memory load of the same data: the validation split is drawn from (seed, 2) like
`nanlab.data.load_dataset`'s, and each epoch visits the training examples in a permutation drawn
from (seed, 3, epoch), last partial batch dropped. For an image folder the pixels are the same
too (uint8 here, the same values as float32 there), so a streamed run and an in-memory run of a
small folder see identical batches.

Grain's part: a ``MapDataset`` over global example positions (step * batch_size + j), mapped to
decoded examples and batched, so ``dataset[step]`` is random access (replay of a failing step,
resume) and ``dataset[start:]`` streams from any step. ``mp_prefetch`` hands whole batches to
worker processes round-robin and returns them in order, so the batches do not depend on the
number of workers. Nothing about the position lives in an iterator: the step is the state.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from nanlab.config import BUILTIN_DATA, ON_BAD_IMAGE
from nanlab.data import DataError, _check_count, _check_image_size
from nanlab.streaming._sources import BadImage, open_source

DEFAULT_PREFETCH = 2  # batches buffered per worker (in-process: batches decoded ahead)
MAX_SUBSTITUTES = 64  # a skipped image is replaced by the next readable one among this many
STATE_FORMAT = "nanlab-stream/1"
_MAX_STEPS = 1 << 40  # the training dataset's length in batches: "endless", yet random access


def default_workers() -> int:
    """Decode workers for this host: one per core, less one for the main process, at most 16."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, 16))


def is_stream_spec(spec: Any) -> bool:
    """Whether a ``--data`` value is streamed (a folder, .npz, .array_record) rather than built in."""
    return spec not in BUILTIN_DATA


def split_indices(n: int, seed: int, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), each sorted; `nanlab.data.load_dataset`'s split.

    A seeded shuffle from (seed, 2), then the first round(n * val_fraction) examples (at least 1,
    at most n - 1) go to validation: deterministic, disjoint, covering every example.
    """
    num_val = min(max(1, round(n * val_fraction)), n - 1)
    order = np.random.default_rng([seed, 2]).permutation(n)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def epoch_order(num_train: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of training positions that epoch `epoch` visits (`nanlab.data.batch_at`'s)."""
    return np.random.default_rng([seed, 3, epoch]).permutation(num_train)


def _close(iterator) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _detached(array: np.ndarray) -> np.ndarray:
    """A plain array of the batch's values.

    From worker processes Grain hands over arrays in shared memory, freed when the array is
    collected; a copy (a few ms per batch, far below decoding) frees the block at once, so none
    is left for the interpreter's shutdown, where freeing it fails noisily.
    """
    return np.array(array, copy=True) if type(array) is not np.ndarray else array


def _zeros(source) -> np.ndarray:
    return np.zeros(source.image_shape, source.image_dtype)


def _absl_flags_defaults() -> None:
    """Lets Grain's worker start read its absl flags (at their defaults) outside an absl app.

    ``mp_prefetch`` reads ``--grain_enable_multiprocess_worker_profiling``, which raises
    UnparsedFlagAccessError unless the program parsed absl flags; nanlab's CLIs use argparse.
    A program that did parse them is left alone.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class _TrainExample:
    """Global position p = step * batch_size + j -> the j-th example of step's batch.

    Runs in Grain's threads and worker processes: caches are replaced whole, never mutated.
    """

    def __init__(self, source, train_index: np.ndarray, batch_size: int, seed: int):
        self.source, self.train_index, self.batch_size, self.seed = source, train_index, batch_size, seed
        self.steps_per_epoch = len(train_index) // batch_size
        self._epoch: tuple[int, np.ndarray] | None = None
        self._step: tuple[int, np.ndarray] | None = None

    def positions(self, step: int) -> np.ndarray:
        """Sorted positions into the training indices for `step` (sorted as in data.batch_at)."""
        cached = self._step
        if cached is None or cached[0] != step:
            epoch, position = divmod(step, self.steps_per_epoch)
            order = self._epoch
            if order is None or order[0] != epoch:
                order = self._epoch = (epoch, epoch_order(len(self.train_index), self.seed, epoch))
            chosen = np.sort(order[1][position * self.batch_size:(position + 1) * self.batch_size])
            cached = self._step = (step, chosen)
        return cached[1]

    def __call__(self, global_position: int) -> dict[str, np.ndarray]:
        step, j = divmod(int(global_position), self.batch_size)
        position = int(self.positions(step)[j])
        index = int(self.train_index[position])
        bad = -1
        for attempt in range(MAX_SUBSTITUTES + 1):
            candidate = int(self.train_index[(position + attempt) % len(self.train_index)])
            try:
                image = self.source.image(candidate)
            except BadImage:
                if attempt == 0:
                    bad = index
                continue
            # A bad image is replaced by the next readable one in the stored order: a pure function
            # of (seed, step) still, and the batch keeps its size (no recompilation).
            return {"image": image, "label": self.source.labels[candidate], "bad": np.int64(bad),
                    "filled": np.bool_(True)}
        return {"image": _zeros(self.source), "label": np.zeros_like(self.source.labels[0]),
                "bad": np.int64(bad), "filled": np.bool_(False)}


class _OrderedExample:
    """Position q -> example indices[q], or zero padding with weight 0 past the end."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, indices

    def __call__(self, position: int) -> dict[str, np.ndarray]:
        position = int(position)
        if position < len(self.indices):
            index = int(self.indices[position])
            try:
                return {"image": self.source.image(index), "label": self.source.labels[index],
                        "weight": np.float32(1.0), "bad": np.int64(-1)}
            except BadImage:
                bad = index
        else:
            bad = -1
        return {"image": _zeros(self.source), "label": np.zeros_like(self.source.labels[0]),
                "weight": np.float32(0.0), "bad": np.int64(bad)}


class BatchIterator:
    """Training batches (x, y) from a step on; ``.step`` is the step of the next batch.

    Close it (or use ``with``) to stop the worker processes.
    """

    def __init__(self, pipeline: "StreamPipeline", start_step: int):
        self._pipeline = pipeline
        self.step = start_step
        self._iterator = pipeline._iterate(pipeline._train[start_step:])

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        if self._iterator is None:
            raise StopIteration
        batch = next(self._iterator)
        out = self._pipeline._accept(batch)
        self.step += 1
        return out

    def state(self) -> dict[str, Any]:
        """The checkpointable position: `StreamPipeline.state` of the next step."""
        return self._pipeline.state(self.step)

    def close(self) -> None:
        """Stops the workers and drops Grain's iterator (collected now, not at interpreter exit,
        where its own cleanup fails noisily)."""
        iterator, self._iterator = self._iterator, None
        _close(iterator)

    def __enter__(self) -> "BatchIterator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class StreamPipeline:
    """A streamed dataset: random-access training batches, evaluation batches, the class mapping.

    Build it with `open_stream`. Batches hold images in the source's dtype (uint8 for image
    folders and ArrayRecord files) and float32 (B, K) labels; normalize on the device
    (`nanlab.streaming.normalize_on_device`).

    Attributes:
      source: the random-access source (`FolderSource`, `NpzSource`, `ArrayRecordSource`).
      name: a short description ("folder:cats", "array_record:cats.array_record", "npz:x.npz").
      class_names: names of the classes (a folder's subfolders in sorted order; label_k for .npz).
      num_classes: K, the label columns (1 for a binary task).
      num_train, num_val: sizes of the split.
      steps_per_epoch: num_train // batch_size.
      image_shape, image_dtype: of one example as the batches carry it.
      train_index, val_index: sorted source indices of each split.
    """

    def __init__(self, source, *, seed: int, batch_size: int, val_fraction: float, workers: int,
                 on_bad_image: str, prefetch: int):
        import grain

        self.source = source
        self.seed, self.batch_size, self.val_fraction = seed, batch_size, val_fraction
        self.workers, self.on_bad_image, self.prefetch = workers, on_bad_image, prefetch
        self.name = f"{source.kind}:{Path(source.path if hasattr(source, 'path') else source.root).name}"
        self.class_names = tuple(source.class_names)
        self.num_classes = int(source.labels.shape[1])
        self.image_shape, self.image_dtype = source.image_shape, source.image_dtype
        if len(source) < 2:
            raise DataError(f"{self.name}: need at least 2 examples for a train/validation split, got {len(source)}")
        self.train_index, self.val_index = split_indices(len(source), seed, val_fraction)
        self.num_train, self.num_val = len(self.train_index), len(self.val_index)
        if batch_size > self.num_train:
            raise DataError(f"batch size {batch_size} is larger than the training set ({self.num_train} examples)")
        self.steps_per_epoch = self.num_train // batch_size
        self._skipped: dict[int, str] = {}
        self._fingerprint: str | None = None
        examples = _TrainExample(source, self.train_index, batch_size, seed)
        self._train = grain.MapDataset.range(_MAX_STEPS * batch_size).map(examples).batch(
            batch_size, drop_remainder=True)

    # -- training ----------------------------------------------------------------------------

    def batch_at(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of `step`, decoded in this process (random access: replay, tests)."""
        step = _check_count("step", step, 0)
        return self._accept(self._train[step])

    def batches(self, start_step: int = 0) -> BatchIterator:
        """An endless iterator of training batches from `start_step` (resume: the checkpoint's step)."""
        return BatchIterator(self, _check_count("start_step", start_step, 0))

    # -- evaluation and statistics ----------------------------------------------------------

    def eval_batches(self, workers: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The validation split in fixed-size batches, in order, like `nanlab.data.eval_batches`.

        Yields:
          (x, y, weights): the last batch is zero-padded with weight 0; an image skipped under
          ``on_bad_image="skip"`` is a zero image with weight 0.
        """
        yield from self._ordered(self.val_index, workers)

    def calibration_batches(self, num_batches: int, workers: int | None = None) -> Iterator[np.ndarray]:
        """The first `num_batches` full batches of training images in stored order (BatchNorm
        recalibration; the in-memory path uses ``x_train[i * B:(i + 1) * B]``)."""
        num_batches = min(_check_count("num_batches", num_batches, 0), self.steps_per_epoch)
        for x, _, _ in self._ordered(self.train_index[:num_batches * self.batch_size], workers):
            yield x

    def sample_batches(self, max_images: int | None = None,
                       workers: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Training images for statistics: all of them in stored order, or the first `max_images`
        of epoch 0's order (a seeded random sample). Yields padded (x, y, weights)."""
        if max_images is None or max_images >= self.num_train:
            indices = self.train_index
        else:
            chosen = epoch_order(self.num_train, self.seed, 0)[:_check_count("max_images", max_images, 1)]
            indices = self.train_index[np.sort(chosen)]
        yield from self._ordered(indices, workers)

    # -- bad input, checkpoint, summary -------------------------------------------------------

    @property
    def skipped(self) -> dict[int, str]:
        """Source index -> name of each distinct image skipped so far (``on_bad_image="skip"``)."""
        return dict(self._skipped)

    def bad_image_report(self, max_files: int = 20) -> dict[str, Any]:
        """For summary.json: the policy, how many distinct images were skipped, the first names."""
        names = [self._skipped[i] for i in sorted(self._skipped)]
        return {"policy": self.on_bad_image, "skipped": len(names), "files": names[:max_files]}

    def class_mapping(self) -> dict[str, Any]:
        """For summary.json: which class is which label column."""
        if self.source.kind == "npz":
            return {"task": "npz labels", "label_columns": list(self.class_names)}
        if len(self.class_names) == 2:
            return {"task": "binary", "class_names": list(self.class_names),
                    "label_1": self.class_names[1], "label_0": self.class_names[0]}
        return {"task": "multi-label (one-vs-rest)", "class_names": list(self.class_names),
                "label_columns": list(self.class_names)}

    def fingerprint(self) -> str:
        """A digest of what defines the batches: the source's listing and the split parameters."""
        if self._fingerprint is None:
            definition = {"source": self.source.fingerprint(), "image_size": self.image_shape[0],
                          "seed": self.seed, "batch_size": self.batch_size, "val_fraction": self.val_fraction}
            text = json.dumps(definition, sort_keys=True).encode()
            self._fingerprint = hashlib.sha256(text).hexdigest()[:16]
        return self._fingerprint

    def state(self, step: int) -> dict[str, Any]:
        """The pipeline's checkpointable state before `step`: JSON-serializable ints and strings.

        The position is the step itself (batches are a pure function of it), so resuming with a
        different worker count is exact; the fingerprint catches resuming on changed data.
        """
        return {"format": STATE_FORMAT, "step": _check_count("step", step, 0), "fingerprint": self.fingerprint(),
                "num_train": self.num_train, "num_val": self.num_val}

    def restore(self, state: dict[str, Any]) -> int:
        """Checks a `state` against this pipeline and returns its step (resume from it).

        Raises:
          DataError: a state of another format, or of other data, seed, batch size or split.
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DataError(f"not a data pipeline state ({STATE_FORMAT}): {state!r}"[:200])
        if state.get("fingerprint") != self.fingerprint():
            raise DataError(f"the checkpoint's data pipeline ({state.get('num_train')} train / {state.get('num_val')} "
                            f"val, fingerprint {state.get('fingerprint')}) differs from this one ({self.num_train} / "
                            f"{self.num_val}, {self.fingerprint()}): other files, seed, batch size or split")
        return _check_count("step", state.get("step"), 0)

    # -- internals -----------------------------------------------------------------------------

    def _iterate(self, dataset, workers: int | None = None):
        import grain

        workers = self.workers if workers is None else workers
        if workers == 0:
            # In this process: one thread decodes up to `prefetch` batches ahead.
            return iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self.prefetch)))
        _absl_flags_defaults()
        # Each worker process decodes whole batches (one thread), `prefetch` of them buffered.
        per_worker = dataset.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
        options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=self.prefetch)
        return iter(per_worker.mp_prefetch(options))

    def _ordered(self, indices: np.ndarray, workers: int | None):
        import grain

        padded = math.ceil(len(indices) / self.batch_size) * self.batch_size
        dataset = grain.MapDataset.range(padded).map(_OrderedExample(self.source, indices)).batch(self.batch_size)
        iterator = self._iterate(dataset, workers)
        try:
            for batch in iterator:
                self._check_bad(batch["bad"])
                yield _detached(batch["image"]), _detached(batch["label"]), _detached(batch["weight"])
        finally:
            _close(iterator)
            del iterator

    def _check_bad(self, bad: np.ndarray) -> None:
        for index in np.unique(bad[bad >= 0]).tolist():
            if self.on_bad_image == "error":
                raise DataError(self._message(index))
            self._skipped.setdefault(index, self.source.name_of(index))

    def _accept(self, batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self._check_bad(batch["bad"])
        if not batch["filled"].all():
            raise DataError(f"{self.name}: {MAX_SUBSTITUTES + 1} consecutive unreadable images from "
                            f"{self._skipped.get(int(batch['bad'][~batch['filled']][0]), '?')}")
        return _detached(batch["image"]), _detached(batch["label"])

    def _message(self, index: int) -> str:
        """The one-line message of a bad example, re-read in this process (workers send indices)."""
        try:
            self.source.image(index)
        except BadImage as error:
            return str(error)
        return f"image {self.source.name_of(index)} could not be read while streaming (it reads now)"


def open_stream(spec: str | os.PathLike, image_size: int, seed: int, batch_size: int, *,
                val_fraction: float = 0.2, workers: int | None = None, on_bad_image: str = "error",
                prefetch: int = DEFAULT_PREFETCH, allow_nonfinite: bool = False) -> StreamPipeline:
    """Opens a folder, ``.npz`` or ``.array_record`` file for streaming; checks it, decodes nothing.

    Args:
      spec: the ``--data`` value (not a built-in set: those stay in memory, `nanlab.data`).
      image_size: side of the square images the batches carry (>= 75).
      seed: the split and data-order seed (the same as `nanlab.data.load_dataset`'s).
      batch_size: the global batch size, <= the training split.
      val_fraction: share held out for validation, in (0, 1).
      workers: decode processes; 0 decodes in this process; None: `default_workers()`.
      on_bad_image: ``"error"`` (a `DataError` naming the file when the batch is taken) or
        ``"skip"`` (replaced by the next readable image, counted in `StreamPipeline.skipped`).
      prefetch: batches buffered per worker.
      allow_nonfinite: let an .npz's NaN/inf pixels and labels through (else a `DataError` here).

    Returns:
      A `StreamPipeline`.

    Raises:
      DataError: a missing path, fewer than 2 classes, an empty class or folder, a malformed
        .npz/.array_record, a batch larger than the training split -- before any decoding.
      ValueError, TypeError: bad arguments.
    """
    if not is_stream_spec(spec):
        raise ValueError(f"{spec!r} is generated in memory (nanlab.data.load_dataset), not streamed")
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"data spec must be a string or a path, got {type(spec).__name__}: {spec!r}")
    image_size = _check_image_size(image_size)
    seed = _check_count("seed", seed, 0)
    batch_size = _check_count("batch_size", batch_size, 1)
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    workers = default_workers() if workers is None else _check_count("workers", workers, 0)
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
    prefetch = _check_count("prefetch", prefetch, 1)
    source = open_source(spec, image_size, allow_nonfinite)
    return StreamPipeline(source, seed=seed, batch_size=batch_size, val_fraction=float(val_fraction),
                          workers=workers, on_bad_image=on_bad_image, prefetch=prefetch)
