"""The scenarios in the accelerator preset's dtypes (bfloat16, float16), at tiny size on the CPU.

The accelerator preset computes in bfloat16 with float32 parameters and loss; these runs check that
the failure recipes still fail, and are diagnosed, as the scenario table documents, in both
low-precision dtypes. The 3-conv model keeps each run to seconds.
"""

import json

import pytest

from nanlab import train
from tests.test_train import _argv, compilation_cache  # noqa: F401


def _run(tmp_path, capsys, **flags):
    workdir = tmp_path / "run"
    code = train.main(_argv(workdir, steps=30, **flags))
    capsys.readouterr()
    return code, workdir


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_naive_loss_fails_and_is_diagnosed_as_the_unstable_loss(tmp_path, capsys, dtype):
    code, workdir = _run(tmp_path, capsys, scenario="naive-loss", dtype=dtype)
    assert code == 3
    report = json.loads((workdir / "report.json").read_text())
    assert report["verdict"]["cause"] == "unstable-loss"
    assert report["report"]["origin"]["primitive"] == "log"
    assert report["report"]["cause"] == "log-of-zero"


def test_high_lr_in_float16_overflows_the_dtype_and_says_so(tmp_path, capsys):
    code, workdir = _run(tmp_path, capsys, scenario="high-lr", dtype="float16")
    assert code == 3
    report = json.loads((workdir / "report.json").read_text())
    assert report["verdict"]["cause"] == "low-precision-overflow"
    origin = report["report"]["origin"]
    assert origin["cause"] == "overflow" and {o["dtype"] for o in origin["outputs"]} == {"float16"}


def test_unscaled_inputs_in_bfloat16_stay_finite_as_documented(tmp_path, capsys):
    # bfloat16 has float32's range: the x1000 pixels (255,000) fit, and BatchNorm absorbs the
    # scale, as in float32; only float16 (max 65,504) overflows on entry.
    code, workdir = _run(tmp_path, capsys, scenario="unscaled-inputs", dtype="bfloat16")
    assert code == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["input_stats"]["raw"]["max"] == 255_000.0


def test_high_lr_in_bfloat16_is_caught_where_the_batchnorm_statistics_overflow(tmp_path, capsys):
    # In bfloat16 the running variance of a BatchNorm overflows in a step whose loss and gradients
    # are still finite; the sentinel checks the statistics too, so that step is the one replayed.
    code, workdir = _run(tmp_path, capsys, scenario="high-lr", dtype="bfloat16")
    assert code == 3
    report = json.loads((workdir / "report.json").read_text())
    assert report["nonfinite"] == ["BatchNorm statistics"]
    origin = report["report"]["origin"]
    assert origin["cause"] == "overflow" and origin["phase"] == "forward"
    assert origin["module"].endswith("BatchNorm_0")
