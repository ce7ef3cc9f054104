"""What a run leaves behind: config.json, metrics.jsonl, summary.json, PNG plots, progress, TensorBoard.

metrics.jsonl holds one JSON object per logged step. Keys of every row:

- ``step``: steps taken when the row was written (the row describes step ``step - 1`` -> ``step``
  for the per-step values);
- ``loss``, ``accuracy``: the training batch's mean loss and label accuracy of that step;
- ``grad_norm``, ``param_norm``, ``update_ratio``: global gradient norm, parameter norm before the
  step, |applied update| / |params| (the last two from `nanlab.step.update_telemetry`);
- ``lr``: the learning rate of the step; ``skipped``: steps skipped so far (skip-nonfinite);
- ``images_per_s``: training throughput since the previous row (null on the first row).

Rows every ``--stats-every`` steps add ``module_grad_norms`` (top-level module -> gradient norm) and
``activation_max_abs`` (block -> max |activation|). Rows of an evaluation add ``val_loss`` and
``val_accuracy``. Non-finite numbers are written as JSON ``NaN``/``Infinity`` (Python's json reads
them back).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
PLOT_FILES = ("loss.png", "grad_norm.png", "module_grad_norms.png")

__all__ = [
    "CONFIG_FILE", "METRICS_FILE", "PLOT_FILES", "SUMMARY_FILE", "RunLog", "json_float", "metric_figures",
    "module_grad_grid", "plot_metrics",
    "print_summary", "read_metrics", "summary_rows", "truncate_metrics", "write_json",
]


def write_json(path: str | os.PathLike, payload: Mapping[str, Any], *, strict: bool = False, indent: int = 2,
               sort_keys: bool = True) -> None:
    """Write `payload` as indented JSON, atomically (temporary file, then rename).

    Args:
      path: the file.
      payload: a JSON-ready mapping; numpy scalars and arrays are converted with ``.tolist()``.
      strict: write NaN and infinities as null (strict JSON, for tools that do not read Python's
        ``NaN``/``Infinity`` extension); otherwise they stay ``NaN``/``Infinity`` (metrics files).
      indent, sort_keys: as `json.dumps`.
    """
    if strict:
        payload = _nonfinite_as_null(payload)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, default=_json_default, allow_nan=not strict)
    tmp.write_text(text + "\n")
    tmp.replace(path)


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays (and anything with .tolist())."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def json_float(value: Any) -> float | None:
    """A float for strict JSON: NaN and infinities become None."""
    value = float(value)
    return value if math.isfinite(value) else None


def _nonfinite_as_null(value: Any) -> Any:
    """`value` with every float NaN/inf, at any depth of dicts, lists and tuples, turned into None."""
    if isinstance(value, float):
        return json_float(value)
    if isinstance(value, Mapping):
        return {key: _nonfinite_as_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nonfinite_as_null(item) for item in value]
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file (a missing file has none; a torn last line is dropped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line torn by a kill mid-write: everything before it is whole
    return rows


def truncate_metrics(path: str | os.PathLike, last_step: int) -> list[dict[str, Any]]:
    """Keep only the rows with ``step <= last_step`` (a resumed run rewrites what came after).

    Returns:
      The kept rows.
    """
    rows = [row for row in read_metrics(path) if row["step"] <= last_step]
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row, default=_json_default) + "\n" for row in rows))
    tmp.replace(path)
    return rows


def plot_metrics(rows: list[dict[str, Any]], workdir: str | os.PathLike) -> list[Path]:
    """Write loss.png, grad_norm.png and module_grad_norms.png into `workdir` (matplotlib Agg).

    Args:
      rows: metrics.jsonl rows.
      workdir: the output directory.

    Returns:
      The written files' paths.
    """
    import matplotlib.pyplot as plt

    workdir = Path(workdir)
    written = []
    for name, fig in metric_figures(rows).items():
        fig.tight_layout()
        fig.savefig(workdir / name, dpi=90)
        plt.close(fig)
        written.append(workdir / name)
    return written


def module_grad_grid(rows: list[dict[str, Any]]) -> tuple[list[str], list[int], np.ndarray]:
    """(module names in the rows' order, logged steps, log10 grad norm as modules x steps; NaN where
    a norm is missing, zero or non-finite)."""
    module_rows = [row for row in rows if "module_grad_norms" in row]
    names = list(module_rows[0]["module_grad_norms"]) if module_rows else []
    norms = np.array([[row["module_grad_norms"].get(name, np.nan) for row in module_rows] for name in names],
                     np.float64).reshape(len(names), len(module_rows))
    with np.errstate(divide="ignore", invalid="ignore"):
        log_norms = np.where(np.isfinite(norms) & (norms > 0), np.log10(norms), np.nan)
    return names, [row["step"] for row in module_rows], log_norms


def metric_figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's plots as matplotlib figures, by file name; each has a title.

    module_grad_norms.png is a modules x steps heatmap of log10 gradient norms, one labelled row per
    module (17 lines on a 10-colour cycle could not be told apart).
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    figures = {}
    steps = [row["step"] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [row["loss"] for row in rows], label="train loss")
    val = [(row["step"], row["val_loss"]) for row in rows if "val_loss" in row]
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend()
    ax.set_title("Loss (train; validation at its passes)")
    figures["loss.png"] = fig

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [row["grad_norm"] for row in rows])
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_ylabel("global grad norm")
    ax.set_title("Global gradient norm")
    figures["grad_norm.png"] = fig

    names, module_steps, log_norms = module_grad_grid(rows)
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.25 * max(len(names), 1)))
    if names:
        image = ax.imshow(log_norms, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        shown = np.unique(np.linspace(0, len(module_steps) - 1, min(len(module_steps), 10)).astype(int))
        ax.set_xticks(shown, [str(module_steps[i]) for i in shown])
        fig.colorbar(image, ax=ax, label="log10 grad norm")
    ax.set_xlabel("step")
    ax.set_title("Gradient norm per module (input at the top; blank: not finite)")
    figures["module_grad_norms.png"] = fig
    return figures


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


class RunLog:
    """Writes a run's record into its workdir and shows its progress.

    Args:
      workdir: the run directory (must exist).
      config: the run's config as a dict (written to config.json).
      total_steps: the step the run ends at (for the progress bar).
      start_step: the step the run starts from (> 0 when resumed; later rows are dropped).
      progress: show a live rich progress bar on stderr.
      tensorboard: also write TensorBoard event files (tensorboardX) under ``workdir/tb``.
    """

    def __init__(self, workdir, config: Mapping[str, Any], *, total_steps: int, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = False):
        self.workdir = Path(workdir)
        self.metrics_path = self.workdir / METRICS_FILE
        write_json(self.workdir / CONFIG_FILE, config)
        self.rows = truncate_metrics(self.metrics_path, start_step)
        self._file = open(self.metrics_path, "a")
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.workdir / "tb"))
        self._progress = None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), transient=False,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, info="compiling...")
            self._progress.start()

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one metrics row (flushed at once), update the progress bar and TensorBoard."""
        row = dict(row)
        self.rows.append(row)
        self._file.write(json.dumps(row, default=_json_default) + "\n")
        self._file.flush()
        if self._progress is not None:
            ips = row.get("images_per_s")
            info = f"loss {_fmt(row['loss'])}  grad {_fmt(row['grad_norm'])}" + (
                f"  {ips:.1f} img/s" if ips else "")
            self._progress.update(self._task, completed=row["step"], info=info)
        if self._writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(key, value, row["step"])
                elif isinstance(value, dict):
                    for name, sub in value.items():
                        self._writer.add_scalar(f"{key}/{name}", sub, row["step"])

    def finish(self, summary: Mapping[str, Any], *, plots: bool = True) -> None:
        """Close the live display, write summary.json and the plots, print the summary table."""
        self.close()
        write_json(self.workdir / SUMMARY_FILE, summary)
        if plots and self.rows:
            plot_metrics(self.rows, self.workdir)
        print_summary(summary)

    def close(self, *, clear: bool = False) -> None:
        """Stop the progress bar and close the files (idempotent).

        `clear`: erase the bar instead of leaving its last state on the terminal (a failure report
        follows, and a stale 'train 1/200' line above it would say training was still going).
        """
        if self._progress is not None:
            if clear:
                self._progress.live.transient = True  # rich erases a transient display when it stops
            self._progress.stop()
            self._progress = None
        if not self._file.closed:
            self._file.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def summary_rows(summary: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    """(key, formatted value) pairs of a summary, nested dicts flattened with dots."""
    for key, value in summary.items():
        if isinstance(value, dict):
            for sub_key, sub_value in summary_rows(value):
                yield f"{key}.{sub_key}", sub_value
        elif isinstance(value, list):
            yield key, "; ".join(_fmt(v) for v in value)
        else:
            yield key, _fmt(value)


def print_summary(summary: Mapping[str, Any]) -> None:
    """Print the summary as a two-column rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="nanlab.train summary", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in summary_rows(summary):
        table.add_row(key, value)
    Console(width=120).print(table)
