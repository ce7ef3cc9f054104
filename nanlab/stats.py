"""Small statistics shared by the clipping lab and the benchmarks: percentile-bootstrap intervals.

numpy only. The generator's seed is fixed, so the same values always give the same interval.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "bootstrap_ci", "bootstrap_mean_ci"]

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def bootstrap_ci(
    values: Sequence[float],
    *,
    statistic: Callable[..., np.ndarray] = np.mean,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """A statistic of `values` and its percentile-bootstrap confidence interval.

    Args:
      values: the samples (finite), e.g. per-seed outcomes or per-round timing ratios.
      statistic: reduces along ``axis=1`` (np.mean, np.median, ...).
      resamples: bootstrap resamples.
      level: coverage of the interval, in (0, 1).
      seed: seed of numpy's generator (fixed: the same values always give the same interval).

    Returns:
      (statistic, low, high); all NaN for no values; (v, v, v) for a single value.
    """
    data = np.asarray(values, np.float64).ravel()
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if data.size == 0:
        return math.nan, math.nan, math.nan
    if not np.all(np.isfinite(data)):
        raise ValueError(f"values must be finite, got {data.tolist()}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(resamples, data.size))
    stats = statistic(data[picks], axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(statistic(data[None], axis=1)[0]), float(low), float(high)


def bootstrap_mean_ci(values: Sequence[float], **kwargs: Any) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean; see `bootstrap_ci`."""
    return bootstrap_ci(values, statistic=np.mean, **kwargs)
