"""The lab's outputs: results.csv, results.json, the three PNG plots, and the terminal table."""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from nanlab.compare.chains import Chain
from nanlab.compare.runner import CellRun
from nanlab.compare.summary import COLUMNS
from nanlab.runlog import write_json

__all__ = ["OUTPUT_FILES", "results_table", "write_csv", "write_plots", "write_results_json"]

OUTPUT_FILES = ("results.csv", "results.json", "loss_curves.png", "nonfinite_rate.png", "grad_norms.png")


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Writes the results rows as CSV with the `COLUMNS` header; NaN is written as an empty field."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({
                key: ("" if isinstance(value, float) and not math.isfinite(value) else value)
                for key, value in row.items()
            })


def write_results_json(payload: dict[str, Any], path: str) -> None:
    """Writes results.json: strict JSON (NaN/inf anywhere become null), indent 1, keys in order."""
    write_json(path, payload, strict=True, indent=1, sort_keys=False)


def _loss_bands(run: CellRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step median and IQR of the loss over the seeds alive with a finite loss at that step."""
    loss = np.where(run.ran & np.isfinite(run.loss), run.loss, np.nan)
    median, q25, q75 = (np.full(loss.shape[0], np.nan) for _ in range(3))
    has = np.isfinite(loss).any(axis=1)
    if has.any():
        q25[has], median[has], q75[has] = np.nanpercentile(loss[has], [25, 50, 75], axis=1)
    return median, q25, q75


def _save_figure(fig, workdir: str, filename: str) -> str:
    """Lay out, write and close one figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(
    scenarios: Sequence[str],
    chains: Sequence[Chain],
    runs: dict[tuple[str, Chain], CellRun],
    rows: Sequence[dict[str, Any]],
    workdir: str,
) -> list[str]:
    """Writes the three PNG plots (one panel per scenario in each).

    loss_curves.png: training loss per step, median over live seeds with the IQR as a band, one
    line per chain (log scale). nonfinite_rate.png: per chain, the fraction of seeds with a
    non-finite step and the fraction that failed. grad_norms.png: per chain, the distribution
    (box plot, log scale) of the finite steps' global gradient norms over all seeds.

    Returns:
      The written paths.
    """

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(5.0, 5.0 * len(scenarios))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = []

    fig, axes = plt.subplots(1, len(scenarios), figsize=(width, 4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        for i, chain in enumerate(chains):
            run = runs[(scenario, chain)]
            median, q25, q75 = _loss_bands(run)
            steps = np.arange(median.size)
            color = colors[i % len(colors)]
            ax.plot(steps, median, color=color, label=chain.label, lw=1.2)
            ax.fill_between(steps, q25, q75, color=color, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"{scenario}: train loss (median, IQR over seeds)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    paths.append(_save_figure(fig, workdir, "loss_curves.png"))

    fig, axes = plt.subplots(1, len(scenarios), figsize=(width, 4), squeeze=False)
    by_cell = {(row["scenario"], row["chain"]): row for row in rows}
    for ax, scenario in zip(axes[0], scenarios):
        positions = np.arange(len(chains))
        nonfinite = [by_cell[(scenario, c.label)]["nonfinite_frac"] for c in chains]
        failed = [by_cell[(scenario, c.label)]["failed_frac"] for c in chains]
        ax.bar(positions - 0.2, nonfinite, width=0.4, label="had a non-finite step")
        ax.bar(positions + 0.2, failed, width=0.4, label="failed")
        ax.set_xticks(positions, [c.label for c in chains], rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{scenario}: fraction of seeds")
        ax.legend(fontsize=7)
    paths.append(_save_figure(fig, workdir, "nonfinite_rate.png"))

    fig, axes = plt.subplots(1, len(scenarios), figsize=(width, 4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        samples = []
        for chain in chains:
            run = runs[(scenario, chain)]
            norms = run.grad_norm[run.ran & run.finite & (run.grad_norm > 0)]
            samples.append(np.log10(norms) if norms.size else np.array([np.nan]))
        ax.boxplot(samples, showfliers=False)
        ax.set_xticks(np.arange(1, len(chains) + 1), [c.label for c in chains], rotation=30, ha="right",
                      fontsize=7)
        ax.set_ylabel("log10 global grad norm")
        ax.set_title(f"{scenario}: gradient norms (finite steps)")
    paths.append(_save_figure(fig, workdir, "grad_norms.png"))
    return paths


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _fmt_ci(mean: float, low: float, high: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:+.3g} [{low:+.3g}, {high:+.3g}]"


TABLE_HEADINGS = ("scenario", "chain", "non-finite", "failed", "first NaN step (IQR)", "val loss", "val acc",
                  "clip active", "Δ failed [95% CI]", "Δ val loss [95% CI]")
TABLE_MIN_WIDTH = 150  # below this many columns the table folds into unreadable slivers: a list instead


def _table_cells(row: dict[str, Any], with_verdicts: bool) -> list[tuple[str, str]]:
    """(column heading, text) of one results row, in the table's order."""
    first = "-"
    if math.isfinite(row["first_nonfinite_median"]):
        first = f"{row['first_nonfinite_median']:g} ({row['first_nonfinite_q25']:g}-{row['first_nonfinite_q75']:g})"
    values = [
        row["scenario"], row["chain"], _fmt(row["nonfinite_frac"], 2), _fmt(row["failed_frac"], 2), first,
        _fmt(row["final_val_loss"]), _fmt(row["final_val_accuracy"]), _fmt(row["clip_active_frac"], 2),
        _fmt_ci(row["delta_failed_frac"], row["delta_failed_ci_low"], row["delta_failed_ci_high"]),
        _fmt_ci(row["delta_val_loss"], row["delta_val_loss_ci_low"], row["delta_val_loss_ci_high"]),
    ]
    cells = list(zip(TABLE_HEADINGS, values))
    return cells + ([("verdict", row["verdict"] or "-")] if with_verdicts else [])


def results_table(rows: Sequence[dict[str, Any]], width: int | None = None):
    """The terminal summary of the results rows: a rich Table, or, when `width` (the output's
    columns; None: wide) is under `TABLE_MIN_WIDTH` (a narrow terminal, or a pipe, which rich
    takes as 80 columns), a list with one block of ``heading: value`` lines per cell."""
    from rich.table import Table
    from rich.text import Text

    with_verdicts = any(row["verdict"] for row in rows)
    if width is not None and width < TABLE_MIN_WIDTH:
        lines = ["nanlab.compare: clipping lab"]
        for row in rows:
            cells = _table_cells(row, with_verdicts)
            lines.append(f"\n{row['scenario']} / {row['chain']}")
            lines.extend(f"  {name}: {value}" for name, value in cells[2:])
        return Text("\n".join(lines))
    table = Table(title="nanlab.compare: clipping lab")
    for name in TABLE_HEADINGS + (("verdict",) if with_verdicts else ()):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*(value for _, value in _table_cells(row, with_verdicts)))
    return table
