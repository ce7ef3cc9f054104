"""Tests of nanlab.runlog: metrics rows, truncation on resume, summary, plots, TensorBoard."""

import json
import math

import numpy as np

from nanlab import runlog


def _row(step, **extra):
    return {"step": step, "loss": 1.0 / step, "accuracy": 0.5, "grad_norm": 2.0, "param_norm": 3.0,
            "update_ratio": 1e-3, "lr": 1e-3, "skipped": 0, "images_per_s": None, **extra}


def test_metrics_rows_summary_and_plots(tmp_path):
    log = runlog.RunLog(tmp_path, {"steps": 3}, total_steps=3, progress=True, tensorboard=True)
    log.log(_row(1))
    log.log(_row(2, module_grad_norms={"Conv": 1.0, "Logits": 0.5}, activation_max_abs={"Conv": 4.0}))
    log.log(_row(3, loss=float("nan"), val_loss=0.7, val_accuracy=0.75))
    log.finish({"status": "ok", "nested": {"a": 1}}, plots=True)
    assert json.loads((tmp_path / "config.json").read_text()) == {"steps": 3}
    rows = runlog.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[1]["module_grad_norms"] == {"Conv": 1.0, "Logits": 0.5}
    assert math.isnan(rows[2]["loss"]) and rows[2]["val_accuracy"] == 0.75
    assert json.loads((tmp_path / "summary.json").read_text())["nested"] == {"a": 1}
    for name in runlog.PLOT_FILES:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((tmp_path / "tb").iterdir())


def test_resume_truncates_rows_after_the_checkpoint(tmp_path):
    log = runlog.RunLog(tmp_path, {}, total_steps=30, progress=False)
    for step in (10, 20, 30):
        log.log(_row(step))
    log.close()
    resumed = runlog.RunLog(tmp_path, {}, total_steps=30, start_step=20, progress=False)
    assert [r["step"] for r in resumed.rows] == [10, 20]
    resumed.log(_row(30))
    resumed.close()
    assert [r["step"] for r in runlog.read_metrics(tmp_path / "metrics.jsonl")] == [10, 20, 30]


def test_a_torn_last_line_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(_row(1)) + "\n" + '{"step": 2, "lo')
    assert [r["step"] for r in runlog.read_metrics(path)] == [1]


def test_summary_rows_flatten_nested_values():
    rows = dict(runlog.summary_rows({"a": {"b": 1.23456, "c": {"d": "x"}}, "e": [1.0, 2.0], "f": float("inf")}))
    assert rows == {"a.b": "1.235", "a.c.d": "x", "e": "1; 2", "f": "inf"}


def test_every_plot_has_a_title_and_module_norms_are_one_labelled_row_each():
    import matplotlib.pyplot as plt

    names = [f"Mixed_{i}" for i in range(17)]  # more modules than a 10-colour cycle
    rows = [{"step": step, "loss": 1.0 / step, "grad_norm": 2.0, "val_loss": 0.5,
             "module_grad_norms": {name: 10.0 ** (i - 8) for i, name in enumerate(names)}} for step in (10, 20, 30)]
    rows[1]["module_grad_norms"]["Mixed_3"] = float("nan")
    grid_names, steps, log_norms = runlog.module_grad_grid(rows)
    assert grid_names == names and steps == [10, 20, 30] and log_norms.shape == (17, 3)
    assert log_norms[0, 0] == -8.0 and log_norms[16, 2] == 8.0 and np.isnan(log_norms[3, 1])
    figures = runlog.metric_figures(rows)
    try:
        assert sorted(figures) == sorted(["loss.png", "grad_norm.png", "module_grad_norms.png"])
        assert all(fig.axes[0].get_title() for fig in figures.values())
        heatmap = figures["module_grad_norms.png"].axes[0]
        assert [label.get_text() for label in heatmap.get_yticklabels()] == names
        assert len(heatmap.get_lines()) == 0 and len(heatmap.get_images()) == 1  # a heatmap, not 17 lines
    finally:
        for fig in figures.values():
            plt.close(fig)


def _terminal_bar(tmp_path, monkeypatch, clear):
    import io

    import rich.console
    import rich.progress

    screen = io.StringIO()
    console = rich.console.Console(file=screen, force_terminal=True, width=100)
    monkeypatch.setattr(rich.progress, "get_console", lambda: console)
    (tmp_path / str(clear)).mkdir()
    log = runlog.RunLog(tmp_path / str(clear), {}, total_steps=5, progress=True)
    log.log({"step": 1, "loss": 0.5, "grad_norm": 1.0})
    log.close(clear=clear)
    return screen.getvalue()


def test_a_failure_erases_the_progress_bar(tmp_path, monkeypatch):
    erase_line = "\x1b[2K"
    kept, cleared = _terminal_bar(tmp_path, monkeypatch, False), _terminal_bar(tmp_path, monkeypatch, True)
    assert "1/5" in kept and "1/5" in cleared  # both drew the bar
    # Closed for a failure, the bar's line is erased last (cursor up, erase), not left on screen.
    assert erase_line in cleared.rsplit("1/5", 1)[1]
    assert erase_line not in kept.rsplit("1/5", 1)[1]
