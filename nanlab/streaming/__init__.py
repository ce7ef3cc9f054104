"""Streamed input: image folders, ``.npz`` and ArrayRecord files read through Grain.

Batches are a pure function of (seed, step), decoded in worker processes and kept in the
source's dtype (uint8 for images) until the device, where `normalize_on_device` runs inside the
jitted step. The built-in data sets stay in memory (`nanlab.data`).

Modules: ``_sources`` (random-access sources, decoding, the ArrayRecord record format),
``_pipeline`` (the Grain pipeline, split, order, bad-image policy, checkpoint state),
``_normalize`` (statistics over a stream, normalization on the device), ``_convert`` (folder ->
ArrayRecord) and ``cli`` (``python -m nanlab.data convert``).
"""

from nanlab.streaming._convert import convert_folder
from nanlab.streaming._normalize import fit_stream_normalizer, normalize_on_device
from nanlab.streaming._pipeline import (
    DEFAULT_PREFETCH,
    ON_BAD_IMAGE,
    BatchIterator,
    StreamPipeline,
    default_workers,
    epoch_order,
    is_stream_spec,
    open_stream,
    split_indices,
)
from nanlab.streaming._sources import (
    ARRAY_RECORD_SUFFIX,
    ArrayRecordSource,
    BadImage,
    FolderSource,
    NpzSource,
    open_source,
)

__all__ = [
    "ARRAY_RECORD_SUFFIX",
    "ArrayRecordSource",
    "BadImage",
    "BatchIterator",
    "DEFAULT_PREFETCH",
    "FolderSource",
    "NpzSource",
    "ON_BAD_IMAGE",
    "StreamPipeline",
    "convert_folder",
    "default_workers",
    "epoch_order",
    "fit_stream_normalizer",
    "is_stream_spec",
    "normalize_on_device",
    "open_source",
    "open_stream",
    "split_indices",
]
