"""Tests of nanlab.runlog: metrics rows, truncation on resume, summary, plots, TensorBoard."""

import json
import math

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
