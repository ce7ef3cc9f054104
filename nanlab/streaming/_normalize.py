"""Normalization of streamed images: statistics over a stream, the arithmetic on the device.

`fit_stream_normalizer` returns the same dict as `nanlab.data.fit_normalizer` (so the two paths
share one format in checkpoints and summaries) without holding the images: float64 running sums
per channel. `normalize_on_device` is `nanlab.data.normalize`'s arithmetic in jax.numpy, for use
inside the jitted step on uint8 batches.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nanlab.config import NORMALIZE_MODES


def _check_mode(mode: str) -> None:
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"unknown normalize mode {mode!r} (choose from {', '.join(NORMALIZE_MODES)})")


def fit_stream_normalizer(pipeline, mode: str, *, input_scale: float = 1.0, max_images: int | None = None,
                          workers: int | None = None) -> dict[str, Any]:
    """Fits normalization statistics on a `StreamPipeline`'s training images, streaming.

    Args:
      pipeline: from `open_stream`.
      mode: ``none``, ``unit`` (finite min/max) or ``standardize`` (per-channel mean/std), as in
        `nanlab.data.fit_normalizer`.
      input_scale: the factor the pixels are multiplied by before normalization (``--input-scale``).
      max_images: None: every training image (one decoding pass; the in-memory path's statistics
        to float64 rounding); n: the first n images of epoch 0's seeded order, a random sample.
      workers: decode processes for the pass (default: the pipeline's).

    Returns:
      The `nanlab.data.fit_normalizer` dict: {"mode"} plus "min"/"max" or "mean"/"std".
    """
    _check_mode(mode)
    if mode == "none":
        return {"mode": "none"}
    scale = np.float32(input_scale)
    channels = pipeline.image_shape[-1]
    low, high = math.inf, -math.inf
    count = 0
    total = np.zeros(channels, np.float64)
    total_sq = np.zeros(channels, np.float64)
    magnitude = np.zeros(channels, np.float64)
    for x, _, weights in pipeline.sample_batches(max_images, workers=workers):
        x = x[weights > 0].astype(np.float32) * scale  # the in-memory path's float32 product
        if x.size == 0:
            continue
        low, high = min(low, float(x.min())), max(high, float(x.max()))
        values = x.reshape(-1, channels).astype(np.float64)
        count += values.shape[0]
        total += values.sum(axis=0)
        total_sq += np.square(values).sum(axis=0)
        magnitude = np.maximum(magnitude, np.abs(values).max(axis=0))
    if count == 0:  # every image skipped: the identity-like defaults of fit_normalizer
        return {"mode": "unit", "min": 0.0, "max": 1.0} if mode == "unit" else \
            {"mode": "standardize", "mean": [0.0] * channels, "std": [1.0] * channels}
    if mode == "unit":
        return {"mode": "unit", "min": low, "max": high}
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - np.square(mean), 0.0))
    # fit_normalizer's floor: 1e-3 of the channel's magnitude (at least 1e-3), so a constant
    # channel divides by a small number instead of zero.
    std = np.maximum(std, 1e-3 * np.maximum(magnitude, 1.0))
    return {"mode": "standardize", "mean": mean.tolist(), "std": std.tolist()}


def normalize_on_device(x, mode: str, stats: dict[str, Any], input_scale: float = 1.0):
    """`nanlab.data.normalize` (after ``* input_scale``) in jax.numpy, for inside a jitted step.

    Args:
      x: a batch in any dtype (uint8 from a stream), channels last.
      mode, stats: as from `fit_stream_normalizer` or `nanlab.data.fit_normalizer` (static:
        Python floats folded into the program).
      input_scale: ``--input-scale``.

    Returns:
      float32 array of x's shape.
    """
    import jax.numpy as jnp

    _check_mode(mode)
    if stats.get("mode") != mode:
        raise ValueError(f"normalizer stats were fitted for mode {stats.get('mode')!r}, not {mode!r}")
    x = jnp.asarray(x).astype(jnp.float32) * jnp.float32(input_scale)
    if mode == "none":
        return x
    if mode == "unit":
        span = stats["max"] - stats["min"] or 1.0  # a constant training set maps to 0
        return (x - jnp.float32(stats["min"])) / jnp.float32(span)
    mean = jnp.asarray(stats["mean"], jnp.float32)
    std = jnp.asarray(stats["std"], jnp.float32)
    if mean.shape[0] != x.shape[-1]:
        raise ValueError(f"normalizer has {mean.shape[0]} channels, images have {x.shape[-1]}")
    return (x - mean) / std
