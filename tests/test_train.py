"""Tests of nanlab.train: the main job end to end on a CPU.

The loop's mechanics (sentinel, exit codes, report.json, skip, checkpoints, resume, SIGKILL,
devices, bad input) are tested with `--model small_cnn`, which compiles in seconds and has the same
knobs and statistics as InceptionV3. The scenarios on the tiny InceptionV3 itself (one compile
of its train step costs minutes of CPU) are marked slow. Runs are in-process (`run(config)` /
`main(argv)`) except where a separate process is the point (SIGKILL, simulated devices). The module
turns on JAX's persistent compilation cache in a temporary directory, shared with its
subprocesses, so that runs with the same shapes and flags compile once.
"""

import ast
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from nanlab import allocator, config as config_lib
from nanlab import runlog, train
from tests.cli_flags import train_argv

TINY = {
    "model": "small_cnn",
    "width_multiplier": 1.0,
    "image_size": 75,
    "batch_size": 16,
    "num_train": 256,
    "num_val": 64,
    "log_every": 5,
    "eval_every": 0,
    "stats_every": 10,  # > 0 everywhere: every run compiles the same step (stats collected in-jit)
    "checkpoint_every": 0,
    "bn_recalibration_batches": 4,
    "progress": False,
    "plots": False,
}


def _argv(workdir, **overrides):
    return train_argv(workdir, {**TINY, **overrides})


def _config(workdir, **overrides):
    return config_lib.make_config({**TINY, "workdir": str(workdir), **overrides}, backend="cpu")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for this module's runs (restored afterwards)."""
    directory = str(tmp_path_factory.mktemp("jax-cache"))
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    os.environ["NANLAB_TEST_JAX_CACHE"] = directory
    yield directory
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


def _subprocess_env(**extra):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ["NANLAB_TEST_JAX_CACHE"],
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", **extra}
    return env


def _rows_without_timing(path):
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in runlog.read_metrics(path)]


# ------------------------------------------------------------------------------------ healthy runs


def test_clean_run_converges_and_resume_equals_uninterrupted(tmp_path):
    workdir = tmp_path / "clean"
    config = _config(workdir, steps=60, checkpoint_every=30, stats_every=30, plots=True)
    assert train.run(config) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["preset"] == "cpu" and summary["scenario"] == "clean"
    assert summary["val_accuracy"] > 0.75  # chance is 0.5 on the balanced built-in task
    rows = runlog.read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, 65, 5))
    for key in ("step", "loss", "accuracy", "grad_norm", "param_norm", "update_ratio", "lr", "skipped",
                "images_per_s"):
        assert key in rows[-1]
    stats_rows = [r for r in rows if "module_grad_norms" in r]
    assert [r["step"] for r in stats_rows] == [30, 60]
    assert set(stats_rows[0]["module_grad_norms"]) == {"Conv1", "Conv2", "Conv3", "Logits"}
    assert set(stats_rows[0]["activation_max_abs"]) == {"Conv1", "Conv2", "Conv3"}
    assert all(math.isfinite(r["loss"]) for r in rows)
    for name in ("config.json",) + runlog.PLOT_FILES:
        assert (workdir / name).exists()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["30", "60"]

    # Resume: drop the final checkpoint and continue from step 30; the metrics must be identical.
    uninterrupted = _rows_without_timing(workdir / "metrics.jsonl")
    import shutil

    shutil.rmtree(workdir / "checkpoints" / "60")
    assert train.run(_config(workdir, steps=60, checkpoint_every=30, stats_every=30, resume=True)) == 0
    assert _rows_without_timing(workdir / "metrics.jsonl") == uninterrupted
    assert json.loads((workdir / "summary.json").read_text())["resumed_from"] == 30


# ------------------------------------------------------------------------------------ failing runs


@pytest.mark.parametrize("scenario, cause", [("unscaled-inputs", "unscaled-inputs"), ("naive-loss", "unstable-loss")])
def test_failure_scenarios_exit_3_with_report(tmp_path, capsys, scenario, cause):
    workdir = tmp_path / scenario
    code = train.main(_argv(workdir, scenario=scenario, steps=30))
    out = capsys.readouterr()
    assert code == 3
    report = json.loads((workdir / "report.json").read_text())
    step = report["step"]
    assert f"non-finite at step {step}" in out.out
    assert f"step {step} went non-finite" in out.err
    assert report["verdict"]["cause"] == cause
    assert report["report"]["found"] is True
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "non-finite" and summary["failed_step"] == step
    # The frozen state was never checkpointed: every checkpoint left is finite (none at all here).
    assert not any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())


_TRACED: list[str] = []  # names of the functions JAX traces (one listener for the module)
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kw: _TRACED.append(kw.get("fun_name", "")) if event.endswith("jaxpr_trace_duration") else None)


def test_a_second_run_takes_its_programs_from_the_store_and_trains_the_same(tmp_path, capsys):
    cache = tmp_path / "cache"
    rows, sources, traced = [], [], []
    for run in ("first", "second"):
        _TRACED.clear()
        assert train.main(_argv(tmp_path / run, steps=10, eval_every=5, compile_cache=str(cache))) == 0
        traced.append(set(_TRACED))
        rows.append(_rows_without_timing(tmp_path / run / "metrics.jsonl"))
        sources.append(json.loads((tmp_path / run / "summary.json").read_text())["programs"])
    # The first run traced (to export) each program; the second traced none of them.
    exports = {"export_init", "export_train", "export_eval", "export_moments"}
    assert exports <= traced[0] and not exports & traced[1]
    assert train.main(_argv(tmp_path / "off", steps=10, eval_every=5, compile_cache="off")) == 0
    capsys.readouterr()
    programs = {"init", "train", "eval", "moments"}
    assert sources[0] == {name: "traced" for name in programs}
    assert sources[1] == {name: "stored" for name in programs}
    assert json.loads((tmp_path / "off" / "summary.json").read_text())["programs"] is None
    assert rows[0] == rows[1] == _rows_without_timing(tmp_path / "off" / "metrics.jsonl")
    assert len(list((cache / "programs").iterdir())) == len(programs)


@pytest.mark.slow  # two failing runs and their replays (~30 s); tests/test_guard.py replays a stored step quickly
def test_a_failure_of_a_stored_train_step_is_replayed_and_reported_the_same(tmp_path, capsys):
    reports = []
    for run in ("first", "second"):
        workdir = tmp_path / run
        code = train.main(_argv(workdir, scenario="naive-loss", steps=30, compile_cache=str(tmp_path / "cache")))
        assert code == 3
        summary = json.loads((workdir / "summary.json").read_text())
        assert summary["programs"]["train"] == ("traced" if run == "first" else "stored")
        reports.append(json.loads((workdir / "report.json").read_text()))
    capsys.readouterr()
    first, second = reports
    assert second["step"] == first["step"] and second["verdict"] == first["verdict"]
    assert second["report"]["origin"] == first["report"]["origin"]


@pytest.mark.parametrize("log_every", [1, 5])
def test_update_overflow_from_finite_gradients_is_reported_as_learning_rate_too_high(tmp_path, capsys, log_every):
    # lr 1e39 is inf in float32: step 0's gradients are finite, its update is not. Logged (every
    # step), update_telemetry flags it at once; unlogged, step 1's sentinel meets the weights.
    # Either way the replay is of step 1, whose weights were non-finite on entry.
    workdir = tmp_path / f"overflow{log_every}"
    code = train.main(_argv(workdir, steps=10, lr=1e39, optimizer="sgd", log_every=log_every))
    capsys.readouterr()
    assert code == 3
    report = json.loads((workdir / "report.json").read_text())
    assert report["step"] == 1
    assert report["verdict"]["cause"] == "learning-rate-too-high"
    assert any("params" in path for path in report["report"]["bad_inputs"])


def test_skip_nonfinite_finishes_with_finite_params_and_a_skip_count(tmp_path, capsys):
    workdir = tmp_path / "skip"
    code = train.main(_argv(workdir, scenario="naive-loss", steps=30, skip_nonfinite=True))
    capsys.readouterr()
    # The run trains to the end, skipping; its logits saturated, so the naive loss is NaN on the
    # validation set too: a non-finite validation metric is never `ok` (exit 3).
    assert code == 3
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "nonfinite-validation" and summary["steps"] == 30
    assert summary["skipped_steps"] > 0
    assert summary["first_nonfinite"]["step"] < 30 and summary["first_nonfinite"]["cause"] == "unstable-loss"
    assert json.loads((workdir / "report.json").read_text())["verdict"]["cause"] == "unstable-loss"
    from nanlab.checkpoint import Checkpointer

    restored = Checkpointer(workdir / "checkpoints")
    assert restored.latest_step() == 30  # a non-finite state is never written, so the params are finite


def test_debug_nans_error_becomes_the_same_report_and_exit_3(tmp_path, capsys):
    workdir = tmp_path / "debug"
    code = train.main(_argv(workdir, scenario="naive-loss", steps=10, debug_nans=True))
    out = capsys.readouterr().out
    assert code == 3
    assert out.count("Calling the de-optimized version.") == 1  # JAX's notice once, not per nested jit
    report = json.loads((workdir / "report.json").read_text())
    assert "nan" in report["jax_error"].lower()
    assert report["verdict"]["cause"] == "unstable-loss"
    assert not jax.config.jax_debug_nans  # scoped to the run, not left on


# ------------------------------------------------------------------------------------ processes


def test_sigkill_during_training_then_resume(tmp_path):
    workdir = tmp_path / "killed"
    argv = _argv(workdir, steps=400, checkpoint_every=5)
    process = subprocess.Popen([sys.executable, "-m", "nanlab.train", *argv], env=_subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not (workdir / "checkpoints" / "10").exists():
            time.sleep(0.2)
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    assert (workdir / "checkpoints" / "10").exists()
    assert train.main(_argv(workdir, steps=20, checkpoint_every=5, resume=True)) == 0
    rows = runlog.read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10, 15, 20]
    assert json.loads((workdir / "summary.json").read_text())["resumed_from"] >= 10


@pytest.mark.skipif(allocator.mimalloc_library() is None, reason="mimalloc is a Linux x86_64 dependency")
def test_the_cli_process_trains_on_mimalloc_and_the_same_as_on_the_system_allocator(tmp_path):
    summaries, rows = {}, {}
    for name in ("mimalloc", "system"):
        env = allocator.without_preload(_subprocess_env(NANLAB_ALLOCATOR=name))
        done = subprocess.run([sys.executable, "-m", "nanlab.train", *_argv(tmp_path / name, steps=10)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        summaries[name] = json.loads((tmp_path / name / "summary.json").read_text())
        rows[name] = _rows_without_timing(tmp_path / name / "metrics.jsonl")
    assert summaries["mimalloc"]["allocator"] == "mimalloc" and summaries["system"]["allocator"] == "system"
    assert rows["mimalloc"] == rows["system"]  # the allocator changes where buffers live, not a value


# The train CLI in a process that prints, at exit, the threads that compiled (or loaded from the
# persistent cache) the guarded train step, whose jit is named after the guard's `body`.
_STEP_COMPILES = """
import atexit, sys, threading
import jax
threads = []
def listen(name, seconds, **kw):
    if name.endswith("backend_compile_duration") and "body" in kw.get("fun_name", ""):
        threads.append(threading.current_thread().name)
jax.monitoring.register_event_duration_secs_listener(listen)
atexit.register(lambda: print("STEP COMPILES", threads, file=sys.stderr))
from nanlab import train
sys.exit(train.main(sys.argv[1:]))
"""


def _step_compiles(stderr: str) -> list[str]:
    line = next(l for l in stderr.splitlines() if l.startswith("STEP COMPILES"))
    return ast.literal_eval(line.removeprefix("STEP COMPILES"))  # the thread names, printed by repr


def test_four_simulated_devices_give_the_same_loss_as_one(tmp_path):
    flags = dict(steps=3, log_every=1, bn_recalibration_batches=0)
    one = tmp_path / "one"
    assert train.main(_argv(one, **flags)) == 0
    four = tmp_path / "four"
    env = _subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "-c", _STEP_COMPILES, *_argv(four, **flags)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((four / "summary.json").read_text())["devices"] == 4
    # One compile of the step: the guard places its fresh carry on the state's mesh, as the call
    # returns it (an uncommitted first carry made the second call trace and compile the step again).
    assert _step_compiles(result.stderr) == ["MainThread"]
    loss_one = [r["loss"] for r in runlog.read_metrics(one / "metrics.jsonl")]
    loss_four = [r["loss"] for r in runlog.read_metrics(four / "metrics.jsonl")]
    np.testing.assert_allclose(loss_four, loss_one, rtol=1e-4)


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scenario", "exploding"], "unknown scenario 'exploding'"),
        (["--optimizer", "lamb"], "--optimizer 'lamb'"),
        (["--clip", "global_norm:x"], "--clip 'global_norm:x'"),
        (["--batch-size", "0"], "--batch-size must be a positive number, got 0"),
        (["--steps", "-1"], "--steps must be a positive number, got -1"),
        (["--lr", "0"], "--lr must be a positive number, got 0.0"),
        (["--image-size", "64"], "--image-size 64 is below the minimum 75"),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (["--batch-size", "512", "--num-train", "256"], "--batch-size 512 is larger than the training set (256"),
        (["--data", "/nonexistent/data.npz"], "--data /nonexistent/data.npz"),
        (["--conv-impl", "cudnn"], "--conv-impl 'cudnn'"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, flags, message):
    workdir = tmp_path / "run"
    code = train.main(["--workdir", str(workdir), "--no-progress", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (workdir / "config.json").exists()


def test_unwritable_workdir_exits_2(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert train.main(["--workdir", str(blocker / "run")]) == 2
    assert "is not writable" in capsys.readouterr().err


def test_existing_run_is_refused_and_left_untouched(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text('{"mine": true}')
    assert train.main(["--workdir", str(workdir)]) == 2
    assert "already holds a run; pass --resume to continue it or --overwrite" in capsys.readouterr().err
    assert (workdir / "config.json").read_text() == '{"mine": true}'


def test_resume_without_checkpoint_exits_2(tmp_path, capsys):
    assert train.main(["--workdir", str(tmp_path / "none"), "--resume"]) == 2
    assert "--resume: no checkpoint in workdir" in capsys.readouterr().err


def test_corrupt_checkpoint_on_resume_exits_2_and_keeps_the_run(tmp_path, capsys):
    workdir = tmp_path / "run"
    step_dir = workdir / "checkpoints" / "5"
    step_dir.mkdir(parents=True)
    (step_dir / "_CHECKPOINT_METADATA").write_text("garbage")
    (workdir / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n')
    assert train.main(_argv(workdir, steps=10, resume=True)) == 2
    err = capsys.readouterr().err
    assert "no intact checkpoint in" in err and "(checkpoint 5: " in err and err.count("\n") == 1
    assert "start over with --overwrite" in err
    assert (workdir / "metrics.jsonl").read_text() == '{"step": 5, "loss": 1.0}\n'


# ------------------------------------------------------------------------------------ the CLI surface


def test_list_scenarios(capsys):
    assert train.main(["--list-scenarios"]) == 0
    out = capsys.readouterr().out
    for name in config_lib.SCENARIOS:
        assert name in out


def test_help_documents_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        train.build_parser().parse_args(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for flag in ("--steps", "--batch-size", "--image-size", "--width-multiplier", "--seed", "--workdir", "--data",
                 "--normalize", "--scenario", "--optimizer", "--lr", "--schedule", "--clip", "--skip-nonfinite",
                 "--debug-nans", "--debug-infs", "--resume", "--eval-every", "--stats-every",
                 "--checkpoint-every", "--tensorboard"):
        assert flag in text
    assert "default: 0.25 on CPU, 1.0 on an accelerator" in text


def test_explicit_flag_wins_over_scenario():
    args = train.build_parser().parse_args(["--scenario", "unscaled-inputs", "--normalize", "standardize"])
    config = train.config_from_args(args, backend="cpu")
    assert config.normalize == "standardize" and config.input_scale == 1000.0


# ------------------------------------------------------------------------------------ InceptionV3 (slow)

INCEPTION = {"model": "inception_v3", "width_multiplier": 0.125}


@pytest.mark.slow
def test_inception_clean_run_converges(tmp_path):
    # The main job's own sizes (the cpu preset: width 0.25, 2048 train images, batch 32, 200 steps):
    # at width 0.125 on 256 images for 100 steps held-out accuracy measured only 0.72.
    workdir = tmp_path / "clean"
    preset = {"model": "inception_v3", "width_multiplier": 0.25, "num_train": 2048, "num_val": 512,
              "batch_size": 32, "bn_recalibration_batches": 8}
    assert train.run(_config(workdir, **preset, steps=200, stats_every=25)) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["val_accuracy"] > 0.75
    rows = runlog.read_metrics(workdir / "metrics.jsonl")
    assert "Mixed_7c" in rows[-1]["module_grad_norms"] and "Mixed_5b" in rows[-1]["activation_max_abs"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario, causes, sizes", [
    ("naive-loss", {"unstable-loss"}, {}),
    # The cpu preset's own sizes: at width 0.125 on 256 images high-lr's SGD stays finite for 100 steps.
    ("high-lr", {"learning-rate-too-high", "exploding-gradients"},
     {"width_multiplier": 0.25, "batch_size": 32, "num_train": 2048, "num_val": 512}),
])
def test_inception_failure_scenarios_give_their_verdicts(tmp_path, capsys, scenario, causes, sizes):
    workdir = tmp_path / scenario
    code = train.main(_argv(workdir, **{**INCEPTION, **sizes}, scenario=scenario, steps=100))
    capsys.readouterr()
    assert code == 3
    assert json.loads((workdir / "report.json").read_text())["verdict"]["cause"] in causes


@pytest.mark.slow
def test_inception_sigmoid_hidden_stalls_with_vanishing_gradients_verdict(tmp_path):
    workdir = tmp_path / "sigmoid"
    assert train.run(_config(workdir, **INCEPTION, scenario="sigmoid-hidden", steps=40)) == 0
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["verdict"]["cause"] == "vanishing-gradients"


def test_conv_impl_tuned_tunes_what_the_cache_lacks_then_reads_the_cache(tmp_path, monkeypatch, capsys):
    """--conv-impl tuned: the training step's convolution shapes are timed once (here by a stand-in
    for the timing, which takes tens of seconds), saved in the tuning cache and activated; a second
    run of the same shapes times nothing and activates the cached picks."""
    import jax.numpy as jnp

    from nanlab import models
    from nanlab.models import conv_tuning

    cache = tmp_path / "conv-tuning.json"
    monkeypatch.setenv(conv_tuning.ENV_VAR, str(cache))
    timed = []

    def stand_in(keys, **kwargs):
        timed.extend(keys)
        return {key: "fast:taps" for key in keys}

    monkeypatch.setattr(conv_tuning, "tune", stand_in)
    config = config_lib.make_config({"width_multiplier": 0.125, "conv_impl": "tuned"}, backend="cpu")
    model = models.build(config, 2)
    assert model.conv_impl == "tuned"
    sample_x = jnp.zeros((2, 75, 75, 3))
    try:
        train._tune_convolutions(model, sample_x, ("default",))
        first = conv_tuning.active()
        assert len(timed) == len(first) > 20 and set(first.values()) == {"fast:taps"}
        assert cache.exists() and "timed now" in capsys.readouterr().err
        timed.clear()
        train._tune_convolutions(model, sample_x, ("default",))
        assert timed == [] and conv_tuning.active() == first
        assert "0 timed now" in capsys.readouterr().err
    finally:
        conv_tuning.activate({})  # later models trace with the fixed choices again


def test_each_program_is_traced_with_the_picks_timed_for_its_conv_library(tmp_path, monkeypatch, capsys):
    """--conv-impl tuned with programs on two libraries (here --conv-library eigen-train): the shapes
    are timed for each library (a stand-in picks each library's own formulation), and the train
    step is traced with eigen's picks, evaluation with the default library's, whatever is active."""
    import jax.numpy as jnp

    from nanlab.models import conv as conv_lib
    from nanlab.models import conv_tuning

    monkeypatch.setenv(conv_tuning.ENV_VAR, str(tmp_path / "conv-tuning.json"))
    tuned_for = []

    def stand_in(keys, *, library="default", **kwargs):
        tuned_for.append(library)
        return {key: conv_tuning.candidates(key)[0 if library == "default" else -1] for key in keys}

    monkeypatch.setattr(conv_tuning, "tune", stand_in)
    seen = []
    real_choice = conv_lib._tuned_choice
    monkeypatch.setattr(conv_lib, "_tuned_choice", lambda key: seen.append(real_choice(key)) or seen[-1])
    config = _config(tmp_path / "run", **INCEPTION, conv_impl="tuned", conv_library="eigen-train")
    try:
        parts = train._build_parts(config)
        assert tuned_for == ["eigen", "default"]
        err = capsys.readouterr().err
        assert "--conv-impl tuned on eigen:" in err and "--conv-impl tuned:" in err
        fns = train._step_fns(config, parts)
        state = jax.eval_shape(parts.init, parts.sample_x)
        batch = parts.feed.batch_of(0)
        conv_tuning.activate({})  # what is active around a trace does not matter
        for program, call, library in [("train", lambda: jax.eval_shape(fns.train_step, state, batch), "eigen"),
                                       ("eval", lambda: jax.eval_shape(fns.evaluate, state, batch,
                                                                       jnp.ones(config.batch_size)), "default")]:
            seen.clear()
            call()
            assert set(seen) == set(parts.conv_tables[library].values()), program
        assert train._program_parts(config, "train", parts.conv_tables)["conv_picks"] == parts.conv_tables["eigen"]
        assert train._program_parts(config, "eval", parts.conv_tables)["conv_picks"] == parts.conv_tables["default"]
        # The stand-in's picks differ everywhere: "xla" for the default library, a "fast" one for eigen.
        assert not set(parts.conv_tables["eigen"].values()) & set(parts.conv_tables["default"].values())

        # --conv-library tuned: each program is timed on each library with that library's picks
        # (the clock's verdict is a stand-in that compiles nothing), and cached under a key that
        # says so (picks timed on one library for both were cached under another).
        both = dataclasses.replace(config, conv_library="tuned")
        parts = train._build_parts(both)
        assert tuned_for == ["eigen", "default"]  # both tables from the cache now
        wrapped, real_with_picks = [], train._with_picks
        monkeypatch.setattr(train, "_with_picks", lambda parts, library, fn: wrapped.append(library)
                            or real_with_picks(parts, library, fn))
        monkeypatch.setattr(conv_tuning, "fastest", lambda runs, rounds: ("eigen", {"default": 2.0, "eigen": 1.0}))
        assert train._tune_conv_library(both, parts, state).conv_library == "eigen"
        assert wrapped == ["default", "eigen"] * 2
        cached = json.loads((tmp_path / "conv-tuning.json").read_text())
        assert sum("picks per library" in key for table in cached.values() for key in table) == 2
    finally:
        conv_tuning.activate({})


def test_conv_impl_tuned_on_a_full_disk_warns_and_keeps_the_picks(tmp_path, monkeypatch, capsys):
    """The tuning cache cannot be written (ENOSPC): one warning line, and the run uses the picks."""
    import jax.numpy as jnp

    from nanlab import models
    from nanlab.models import conv_tuning

    monkeypatch.setenv(conv_tuning.ENV_VAR, str(tmp_path / "conv-tuning.json"))
    monkeypatch.setattr(conv_tuning, "tune", lambda keys, **kwargs: {key: "fast:taps" for key in keys})

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(conv_tuning, "save", full_disk)
    model = models.build(config_lib.make_config({"width_multiplier": 0.125, "conv_impl": "tuned"}, backend="cpu"), 2)
    try:
        train._tune_convolutions(model, jnp.zeros((2, 75, 75, 3)), ("default",))
        assert len(conv_tuning.active()) > 20
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "No space left on device" in err[0] and "this run only" in err[0]
    finally:
        conv_tuning.activate({})


def test_ctrl_c_while_tuning_exits_130_with_nothing_created(tmp_path, monkeypatch, capsys):
    """Ctrl-C before the run folder exists (tuning takes tens of seconds): exit 130, one line that
    says nothing was written (not a --resume hint), and no folder."""
    from nanlab.models import conv_tuning

    monkeypatch.setenv(conv_tuning.ENV_VAR, "off")

    def interrupted(keys, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(conv_tuning, "tune", interrupted)
    workdir = tmp_path / "run"
    code = train.main(_argv(workdir, model="inception_v3", width_multiplier=0.125, conv_impl="tuned"))
    err = capsys.readouterr().err
    assert code == 130 and "nothing was written" in err and "--resume" not in err
    assert "Traceback" not in err and not workdir.exists()


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path, monkeypatch, capsys):
    """Ctrl-C once the run folder exists but before the loop watches for it (the init compiling):
    exit 130 and one line that says there is nothing to resume, not a --resume hint."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_initial_state", interrupted)
    workdir = tmp_path / "run"
    code = train.main(_argv(workdir, steps=10))
    err = capsys.readouterr().err
    assert code == 130 and "aborted before the first checkpoint: nothing to resume" in err
    assert "--resume" not in err and "Traceback" not in err
    assert workdir.exists() and not any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())


def test_a_second_ctrl_c_after_a_checkpoint_names_it_for_resume(tmp_path, monkeypatch, capsys):
    row = train._metrics_row

    def interrupted_at_10(step, *args, **kwargs):
        if step == 10:
            raise KeyboardInterrupt  # as a second Ctrl-C does, inside the loop
        return row(step, *args, **kwargs)

    monkeypatch.setattr(train, "_metrics_row", interrupted_at_10)
    workdir = tmp_path / "run"
    code = train.main(_argv(workdir, steps=20, checkpoint_every=5))
    err = capsys.readouterr().err
    assert code == 130 and f"resume from checkpoint 5 with python -m nanlab.train --workdir {workdir} --resume" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("library, in_train, in_eval", [("default", True, True), ("eigen", False, False),
                                                        ("eigen-eval", True, False)])
def test_conv_library_sets_who_runs_the_convolutions_of_each_program(tmp_path, library, in_train, in_eval):
    """--conv-library: the guarded train step and the forward-only programs (evaluation, BatchNorm
    recalibration) are compiled with the library's options: YNNPACK's fusions present or not."""
    import jax.numpy as jnp

    config = _config(tmp_path / "run", conv_library=library)
    parts = train._build_parts(config)
    fns = train._step_fns(config, parts)
    state = parts.init(parts.sample_x)
    batch = (parts.sample_x, jnp.zeros((config.batch_size, 1)))
    texts = {
        "train": train._guard_step(config, fns).lower(state, batch).compile().as_text(),
        "eval": fns.evaluate.lower(state, batch, jnp.ones(config.batch_size)).compile().as_text(),
        "moments": fns.moments.lower(state, parts.sample_x).compile().as_text(),
    }
    expected = {"train": in_train, "eval": in_eval, "moments": in_eval}
    assert {name: "%ynn_fusion" in text for name, text in texts.items()} == expected


def test_bad_conv_library_exits_2_with_one_line(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert train.main(["--workdir", str(workdir), "--no-progress", "--conv-library", "mkl"]) == 2
    err = capsys.readouterr().err
    assert "--conv-library 'mkl'" in err and err.count("\n") == 1 and not workdir.exists()


def test_conv_library_modes_name_each_programs_library():
    for mode, train_library, eval_library in [("default", "default", "default"), ("eigen", "eigen", "eigen"),
                                              ("eigen-eval", "default", "eigen"), ("eigen-train", "eigen", "default")]:
        config = config_lib.make_config({"conv_library": mode}, backend="cpu")
        assert (config_lib.conv_library_of(config, "train"), config_lib.conv_library_of(config, "eval")) == \
            (train_library, eval_library)
        assert config_lib.conv_library_mode(train_library, eval_library) == mode
    with pytest.raises(ValueError, match="resolved by measuring"):
        config_lib.conv_library_of(config_lib.make_config({"conv_library": "tuned"}, backend="cpu"), "train")


def test_conv_library_tuned_measures_each_program_once_then_reads_the_cache(tmp_path, monkeypatch, capsys):
    """--conv-library tuned: the train and evaluation steps are timed on each library (here the
    real compiled programs, with a stand-in for the clock's verdict), the picks cached and used:
    the guarded step is compiled for the train pick; a second run reads the picks."""
    from nanlab.models import conv_tuning

    monkeypatch.setenv(conv_tuning.ENV_VAR, str(tmp_path / "conv-tuning.json"))
    timed = []

    def verdict(runs, rounds):
        for run in runs.values():
            run()  # the programs really compile and run
        timed.append(tuple(runs))
        return ("eigen", {"default": 2.0, "eigen": 1.0}) if len(timed) == 1 else ("default", {"default": 1.0, "eigen": 3.0})

    monkeypatch.setattr(conv_tuning, "fastest", verdict)
    guarded_with = []
    real_guard_step = train._guard_step
    monkeypatch.setattr(train, "_guard_step", lambda config, fns: guarded_with.append(config.conv_library)
                        or real_guard_step(config, fns))
    assert train.main(_argv(tmp_path / "first", conv_library="tuned")) == 0
    err = capsys.readouterr().err
    assert "train on eigen (2.00x the other), eval on default (3.00x the other)" in err
    assert timed == [("default", "eigen")] * 2 and guarded_with == ["eigen-train"]
    assert json.loads((tmp_path / "first" / "summary.json").read_text())["conv_library"] == "eigen-train"
    assert train.main(_argv(tmp_path / "second", conv_library="tuned")) == 0
    assert "train on eigen (cached), eval on default (cached)" in capsys.readouterr().err
    assert len(timed) == 2 and guarded_with == ["eigen-train"] * 2
