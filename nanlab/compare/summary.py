"""Statistics of a cell: per-seed outcomes, one results row per cell (the `COLUMNS`), the per-seed table.

Every chain is compared with the same scenario's baseline `none`, seed by seed: the delta columns
are paired differences with a percentile-bootstrap interval over the seeds (`nanlab.stats`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from nanlab.compare.chains import Chain
from nanlab.compare.runner import CellRun
from nanlab.runlog import json_float
from nanlab.stats import bootstrap_mean_ci

__all__ = ["COLUMNS", "per_seed_table", "seed_outcomes", "summarize_cell"]

# results.csv / results.json columns, in order, with their meaning (the README lists these).
COLUMNS: dict[str, str] = {
    "scenario": "the train CLI's scenario",
    "chain": "the chain spec (normalized; '+skip' = skip-nonfinite guard)",
    "clip": "the clip part of the chain ('none' for no clipping)",
    "skip_nonfinite": "whether the skip-nonfinite guard wraps the chain",
    "seeds": "number of seeds",
    "steps": "training steps per seed",
    "nonfinite_frac": "fraction of seeds with at least one non-finite step (loss, grads or updates)",
    "failed_frac": "fraction of seeds whose run failed: stopped by a non-finite step (no guard), or "
    "still non-finite at the last step (guard)",
    "first_nonfinite_median": "median step index (0-based) of the first non-finite step, over seeds with one",
    "first_nonfinite_q25": "25th percentile of that step",
    "first_nonfinite_q75": "75th percentile of that step",
    "skipped_steps_mean": "mean number of steps the guard skipped per seed (0 without the guard)",
    "final_train_loss": "mean over seeds that did not fail of the inference-mode loss on the first "
    "training examples (as many as the validation set has, at most)",
    "final_train_accuracy": "the same for accuracy",
    "final_val_loss": "mean over seeds that did not fail of the validation loss",
    "final_val_accuracy": "the same for validation accuracy",
    "grad_norm_mean": "mean global gradient norm over the finite steps of all seeds",
    "clip_active_frac": "fraction of finite steps in which the clip changed the gradients",
    "delta_failed_frac": "failed_frac minus the baseline's ('none' chain, same scenario), paired by seed",
    "delta_failed_ci_low": "95% bootstrap CI of delta_failed_frac over seeds, lower end",
    "delta_failed_ci_high": "upper end",
    "delta_val_loss": "mean over seeds that failed in neither of final_val_loss minus the baseline's",
    "delta_val_loss_ci_low": "95% bootstrap CI of delta_val_loss, lower end",
    "delta_val_loss_ci_high": "upper end",
    "delta_pairs": "number of seeds behind delta_val_loss",
    "verdict": "with --diagnose: nanlab.diagnose's verdict on the first non-finite step of the cell's "
    "first seed that died (empty otherwise, and for '+skip' chains, whose seeds train on)",
    "seconds": "wall time of the cell (compilation included)",
}

def seed_outcomes(run: CellRun, skip_nonfinite: bool) -> dict[str, np.ndarray]:
    """Per-seed outcomes of a cell.

    Args:
      run: the cell's CellRun.
      skip_nonfinite: whether the chain had the guard.

    Returns:
      {"nonfinite", "failed" (bool), "first_nonfinite_step" (float, NaN if none),
      "skipped_steps" (int)} arrays of shape (S,).
    """
    events = run.nonfinite_event
    nonfinite = events.any(axis=0)
    if skip_nonfinite:
        # The guard kept the run going; it failed only if it was still broken at the end.
        failed = events[-1] | ~np.isfinite(run.final_val_loss)
        skipped = events.sum(axis=0)
    else:
        failed = nonfinite
        skipped = np.zeros_like(nonfinite, dtype=np.int64)
    return {
        "nonfinite": nonfinite,
        "failed": failed,
        "first_nonfinite_step": run.first_nonfinite_step(),
        "skipped_steps": skipped.astype(np.int64),
    }


def _mean_or_nan(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else math.nan


def summarize_cell(
    scenario: str, chain: Chain, run: CellRun, baseline: CellRun | None
) -> dict[str, Any]:
    """One results row (the `COLUMNS`) for a cell.

    Args:
      scenario: the scenario name.
      chain: the cell's chain.
      run: the cell's CellRun.
      baseline: the CellRun of the same scenario's 'none' chain with the same seeds, or None
        (then the delta columns are NaN).

    Returns:
      A dict with every key of `COLUMNS` (floats may be NaN).
    """
    outcome = seed_outcomes(run, chain.skip_nonfinite)
    ok = ~outcome["failed"]
    first = outcome["first_nonfinite_step"]
    first = first[np.isfinite(first)]
    q25, median, q75 = (np.percentile(first, [25, 50, 75]) if first.size else (math.nan,) * 3)
    good_steps = run.ran & run.finite
    row: dict[str, Any] = {
        "scenario": scenario,
        "chain": chain.label,
        "clip": chain.clip,
        "skip_nonfinite": chain.skip_nonfinite,
        "seeds": int(run.seeds.size),
        "steps": int(run.loss.shape[0]),
        "nonfinite_frac": float(outcome["nonfinite"].mean()),
        "failed_frac": float(outcome["failed"].mean()),
        "first_nonfinite_median": float(median),
        "first_nonfinite_q25": float(q25),
        "first_nonfinite_q75": float(q75),
        "skipped_steps_mean": float(outcome["skipped_steps"].mean()),
        "final_train_loss": _mean_or_nan(run.final_train_loss[ok]),
        "final_train_accuracy": _mean_or_nan(run.final_train_accuracy[ok]),
        "final_val_loss": _mean_or_nan(run.final_val_loss[ok]),
        "final_val_accuracy": _mean_or_nan(run.final_val_accuracy[ok]),
        "grad_norm_mean": _mean_or_nan(run.grad_norm[good_steps]),
        "clip_active_frac": _mean_or_nan(run.clip_active[good_steps].astype(np.float64)),
        "seconds": float(run.seconds),
        "verdict": "",  # filled by run_grid(diagnose=True)
    }
    delta = dict.fromkeys(
        ["delta_failed_frac", "delta_failed_ci_low", "delta_failed_ci_high", "delta_val_loss",
         "delta_val_loss_ci_low", "delta_val_loss_ci_high"], math.nan
    )
    delta["delta_pairs"] = 0
    if baseline is not None:
        if not np.array_equal(baseline.seeds, run.seeds):
            raise ValueError(f"baseline seeds {baseline.seeds.tolist()} differ from {run.seeds.tolist()}")
        base_failed = seed_outcomes(baseline, skip_nonfinite=False)["failed"]
        failed_diff = outcome["failed"].astype(np.float64) - base_failed.astype(np.float64)
        (delta["delta_failed_frac"], delta["delta_failed_ci_low"],
         delta["delta_failed_ci_high"]) = bootstrap_mean_ci(failed_diff)
        pairs = ok & ~base_failed & np.isfinite(run.final_val_loss) & np.isfinite(baseline.final_val_loss)
        loss_diff = run.final_val_loss[pairs] - baseline.final_val_loss[pairs]
        (delta["delta_val_loss"], delta["delta_val_loss_ci_low"],
         delta["delta_val_loss_ci_high"]) = bootstrap_mean_ci(loss_diff)
        delta["delta_pairs"] = int(pairs.sum())
    row.update(delta)
    return {key: row[key] for key in COLUMNS}


def per_seed_table(chain: Chain, run: CellRun) -> list[dict[str, Any]]:
    """Per-seed outcomes of a cell as JSON-ready rows (for results.json)."""
    outcome = seed_outcomes(run, chain.skip_nonfinite)
    rows = []
    for i, seed in enumerate(run.seeds.tolist()):
        rows.append({
            "seed": int(seed),
            "nonfinite": bool(outcome["nonfinite"][i]),
            "failed": bool(outcome["failed"][i]),
            "first_nonfinite_step": json_float(outcome["first_nonfinite_step"][i]),
            "skipped_steps": int(outcome["skipped_steps"][i]),
            "final_train_loss": json_float(run.final_train_loss[i]),
            "final_val_loss": json_float(run.final_val_loss[i]),
            "final_val_accuracy": json_float(run.final_val_accuracy[i]),
        })
    return rows
