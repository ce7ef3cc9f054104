"""Tests of `python -m nanlab.check`: table, exit codes, one-line errors."""

import subprocess
import sys

import pytest

from nanlab import check, losses


def test_resolve_finds_a_function():
    assert check.resolve("nanlab.losses:sigmoid_binary_cross_entropy") is losses.sigmoid_binary_cross_entropy


@pytest.mark.parametrize(
    "spec, words",
    [
        ("nanlab.losses", ["MODULE:FUNCTION", "'nanlab.losses'"]),
        ("no_such_module_xyz:f", ["cannot import", "no_such_module_xyz"]),
        ("nanlab.losses:no_such_function", ["no attribute", "no_such_function"]),
        ("nanlab.losses:_REDUCTIONS", ["not callable", "tuple"]),
        (":f", ["MODULE:FUNCTION"]),
    ],
)
def test_resolve_rejects_bad_specs_naming_the_value(spec, words):
    with pytest.raises(check.BadArgument) as raised:
        check.resolve(spec)
    for word in words:
        assert word in str(raised.value)


def test_main_passes_nanlab_loss_and_prints_the_table(capsys):
    code = check.main(["nanlab.losses:sigmoid_binary_cross_entropy", "--max-examples", "40", "--labels", "hard"])
    out = capsys.readouterr().out
    assert code == 0
    assert "9/9 properties hold" in out and "FAIL" not in out
    assert out.count("PASS") == 9


def test_main_fails_the_naive_loss_with_counterexamples(capsys):
    code = check.main(
        ["nanlab.losses:naive_sigmoid_binary_cross_entropy", "--max-examples", "40", "--skip", "gradient,reference,symmetry"]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "limits" in out and "FAIL" in out and "counterexample: logit=" in out
    rows = [line.split()[0] for line in out.splitlines()[2:-1] if "counterexample" not in line]
    assert rows == ["finite", "non_negative", "finite_gradient", "limits", "transforms", "nan_propagation"]
    assert out.strip().endswith("2/6 properties hold")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["nanlab.losses:nope"], ["no attribute", "nope"]),
        (["nanlab.losses:sigmoid_binary_cross_entropy", "--skip", "finiteness"], ["unknown property", "finiteness"]),
        (["nanlab.losses:sigmoid_binary_cross_entropy", "--max-examples", "0"], ["--max-examples", "0"]),
    ],
)
def test_main_bad_argument_exits_2_with_one_line(argv, words, capsys):
    assert check.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    for word in words:
        assert word in captured.err


def test_module_entry_point_reports_bad_argument_without_traceback():
    process = subprocess.run(
        [sys.executable, "-m", "nanlab.check", "no_such_module_xyz:loss"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip() == "nanlab.check: error: cannot import module 'no_such_module_xyz': No module named 'no_such_module_xyz'"


def test_a_function_that_is_not_a_binary_loss_is_bad_input_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "nanlab.check", "math:sqrt"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr == ("nanlab.check: error: math:sqrt does not accept (logits, labels): "
                           "math.sqrt() takes exactly one argument (2 given)\n")
    assert done.stdout == ""


def test_the_battery_leaves_no_hypothesis_folder_in_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert check.main(["nanlab.losses:sigmoid_binary_cross_entropy", "--max-examples", "10"]) == 0
    assert list(tmp_path.iterdir()) == []
