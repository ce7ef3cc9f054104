"""Tests of benchmarks/accelerator_check.py: its CPU dry run, so the GPU check cannot rot unseen.

The default suite runs the parts that train the 3-conv model (seconds each); the full dry run, whose
InceptionV3 parts (bench_model, sentinel, compare, multiseed) compile for minutes on a 2-core CPU,
is marked slow.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "accelerator_check.py"
FAST_PARTS = "peak,throughput,debug_nans,unscaled_bf16"


def _load():
    spec = importlib.util.spec_from_file_location("accelerator_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _dry_run(tmp_path, *extra):
    out = tmp_path / "accelerator.md"
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=1800)
    return done, out


def _rows(markdown: str) -> dict[str, str]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1] in ("yes", "FAILED"):
            rows[cells[0]] = line
    return rows


def test_dry_run_of_the_fast_parts_runs_each_and_records_its_figures(tmp_path):
    done, out = _dry_run(tmp_path, "--only", FAST_PARTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 of 4 parts ran" in done.stdout
    text = out.read_text()
    rows = _rows(text)
    assert sorted(rows) == sorted(FAST_PARTS.split(","))
    assert all("| yes |" in row for row in rows.values())
    assert '"bf16_matmul_tflops"' in rows["peak"]
    assert '"images_per_s"' in rows["throughput"]
    # The naive loss fails, is localized and diagnosed as documented, in the recorded figures.
    assert '"verdict": "unstable-loss"' in rows["debug_nans"] and '"cause": "log-of-zero"' in rows["debug_nans"]
    # unscaled-inputs in bfloat16: bf16 holds 255,000, BatchNorm absorbs the scale, the run stays finite.
    assert '"status": "ok"' in rows["unscaled_bf16"]
    assert "jax " in text and "Python " in text  # the environment line names the versions


def test_a_failing_part_is_recorded_and_the_exit_code_says_so(tmp_path, monkeypatch):
    check = _load()
    broken = check.Part("broken", "a part that exits 1", [sys.executable, "-c", "raise SystemExit(1)"],
                        [sys.executable, "-c", "raise SystemExit(1)"], 30)
    outcome = check.run_part(broken, True, tmp_path)
    assert not outcome.ok and outcome.figures == {"exit": 1}
    hanging = check.Part("hang", "a part that hangs", [], [sys.executable, "-c", "import time; time.sleep(30)"], 1)
    outcome = check.run_part(hanging, True, tmp_path)
    assert not outcome.ok and "timed out after 1 s" in outcome.tail


def test_unknown_part_is_bad_input(tmp_path):
    done, out = _dry_run(tmp_path, "--only", "peak,warp-drive")
    assert done.returncode == 2
    assert "unknown part 'warp-drive'" in done.stderr
    assert not out.exists()


def test_forward_flops_of_inception_are_counted():
    check = _load()
    config = {"model": "inception_v3", "image_size": 75, "width_multiplier": 0.125, "dtype": "float32"}
    flops = check.forward_flops_per_image(config)
    assert flops is not None and 1e6 < flops < 1e9
    wider = check.forward_flops_per_image({**config, "width_multiplier": 0.25})
    assert 2.5 < wider / flops < 4.5  # channels double on both sides of most convolutions


@pytest.mark.slow
def test_full_dry_run_runs_every_part(tmp_path):
    done, out = _dry_run(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = _rows(out.read_text())
    assert len(rows) == 8 and all("| yes |" in row for row in rows.values())
