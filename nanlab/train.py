"""`python -m nanlab.train`: train the Flax InceptionV3 with a sigmoid cross-entropy head, and report.

The CLI is thin: flags -> `TrainConfig` (`nanlab.config.make_config`) -> `run(config)` -> exit code.
Exit codes: 0 success, 2 bad input (one line on stderr, nothing written: every input, the data
included, is checked before the run folder is created), 3 the run went non-finite (report.json
written into the workdir), or its validation metrics did (summary.json status
`nonfinite-validation`; such a run is never `ok`).

The loop: each step is one call of `nanlab.guard.guard(train_step)`, one jitted executable with
donated state whose finite flag is the step's own sentinel (it sees the gradients) and whose gate is
the step's own ``apply_update``. The flags stay on the device; the host reads the guard's carry only
at log intervals. A non-finite step freezes the state on the device (the step returns its input
state, and every later step of the interval is a no-op), so at the next sync the guard holds exactly
the state before the failing step: it replays that step through `nanlab.trace.localize` and
`nanlab.diagnose.diagnose`, the loop prints both, writes report.json and exits 3.
On the steps it logs, the loop also runs `nanlab.step.update_telemetry` on a copy of the weights
from before the step (parameter norm, update/param ratio); when that finds the new weights
non-finite (an overflow inside the optimizer, which the step itself does not check), the failure
is the next step, the first to meet them.
Data: the built-in sets are generated in memory (`nanlab.data.load_for_config`); an image folder,
.npz or .array_record is streamed through `nanlab.streaming` (uint8 until the devices, normalized
there). Either way the loop takes its batches from a `nanlab.prefetch.Prefetcher` that prepares
and places the next --prefetch batches while the current step runs (`_Feed`).
Ctrl-C (SIGINT) or SIGTERM stops the run at the next step boundary: the pending steps are checked,
a checkpoint of the last finite state is saved, summary.json says `interrupted`, one line says how
to resume, and the exit code is 130 (SIGINT) or 143 (SIGTERM); a second Ctrl-C aborts at once
(checkpoints are atomic, so only complete ones remain; the line names the newest), as does one
before the loop (`_aborted`: nothing to resume yet). A corrupt newest checkpoint is skipped on
--resume for the newest intact one, with one line saying which and why.
With --skip-nonfinite the step's optax guard drops the update and the run goes on (the guard's
"skip" mode); the loop then reads the guard's carry every step until the first event is reported,
so that event's replay starts from the state the event saw (parameters, BatchNorm and optimizer
moments are untouched by a skipped step; only the step counter is rewound).
"""

from __future__ import annotations

if __name__ == "__main__":  # before JAX loads: the CLI runs on mimalloc where installed (nanlab.allocator)
    from nanlab import allocator

    allocator.rerun_with_mimalloc()

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from nanlab import _cli, allocator
from nanlab import config as config_lib
from nanlab._cli import EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_OK
from nanlab.config import BadInput
from nanlab.interrupts import StopOnSignal

__all__ = ["EXIT_BAD_INPUT", "EXIT_NONFINITE", "EXIT_OK", "build_parser", "config_from_args", "main", "run"]

PROG = "nanlab.train"
RUN_MARKERS = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "report.json", "data_state.json")
DATA_STATE_FILE = "data_state.json"  # a streamed run's pipeline state: --resume refuses other data


# ------------------------------------------------------------------------------------------ the CLI


def _preset_default(field: str) -> str:
    cpu = config_lib.TrainConfig().to_dict()[field]
    accelerator = config_lib.PRESET_OVERRIDES["accelerator"].get(field, cpu)
    if cpu == accelerator:
        return f"default: {cpu}"
    return f"default: {cpu} on CPU, {accelerator} on an accelerator"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag's help states its default.

    Flags left out stay None (booleans too), so that `make_config` can tell an explicit flag
    (which wins over the scenario) from a default.
    """
    p = _cli.Parser(
        PROG,
        description="Train the Flax InceptionV3 (sigmoid cross-entropy head) and report on its numerical "
        "health. Exit codes: 0 ok, 2 bad input, 3 non-finite (report.json written).",
    )
    d = _preset_default
    add = p.add_argument
    add("--scenario", help=f"failure recipe to reproduce: {', '.join(config_lib.SCENARIOS)} ({d('scenario')})")
    add("--list-scenarios", action="store_true", default=None, help="print the scenarios and their overrides, then exit")
    add("--preset", help=f"size preset: {', '.join(config_lib.PRESETS)} (default: cpu on a CPU, accelerator otherwise)")
    add("--steps", type=int, help=f"total training steps ({d('steps')})")
    add("--batch-size", type=int, help=f"global batch size, split over devices ({d('batch_size')})")
    add("--seed", type=int, help=f"seed of init, dropout and data order ({d('seed')})")
    add("--data", help="'builtin' (binary stripes), 'builtin-multilabel' (both in memory), or streamed: an image "
        f"folder (one subfolder per class), an .npz with x and y, or an .array_record file ({d('data')})")
    add("--data-workers", type=int, help="decode processes of streamed data (a folder, .npz or .array_record); "
        "0 decodes in the training process (default: one per core but one, at most 16)")
    add("--on-bad-image", help=f"an unreadable image met while streaming: {', '.join(config_lib.ON_BAD_IMAGE)} "
        f"(error: exit 2 naming the file; skip: replace it by the next readable one and count it) ({d('on_bad_image')})")
    add("--prefetch", type=int, help="batches prepared and placed on the devices ahead of the running step; "
        f"0: none ({d('prefetch')})")
    add("--allow-nonfinite-data", action="store_true", default=None,
        help="train on --data holding NaN/inf pixels or labels (to reproduce such a failure); without it they "
        "are bad input, exit 2 (default: off)")
    add("--image-size", type=int, help=f"square input side, >= 75 ({d('image_size')})")
    add("--num-train", type=int, help=f"training examples of the built-in data ({d('num_train')})")
    add("--num-val", type=int, help=f"validation examples of the built-in data ({d('num_val')})")
    add("--normalize", help=f"input normalization: {', '.join(config_lib.NORMALIZE_MODES)} ({d('normalize')})")
    add("--input-scale", type=float, help=f"factor on the raw pixels before normalization ({d('input_scale')})")
    add("--model", help=f"{', '.join(config_lib.MODELS)}; small_cnn compiles in seconds, for quick checks ({d('model')})")
    add("--width-multiplier", type=float, help=f"InceptionV3 channel multiplier ({d('width_multiplier')})")
    add("--hidden-activation", help=f"{', '.join(config_lib.HIDDEN_ACTIVATIONS)} ({d('hidden_activation')})")
    add("--batchnorm", dest="use_batchnorm", action=argparse.BooleanOptionalAction, default=None,
        help=f"BatchNorm after each convolution ({d('use_batchnorm')})")
    add("--dtype", help=f"compute dtype: {', '.join(config_lib.DTYPES)} ({d('dtype')})")
    add("--conv-impl", help=f"InceptionV3's convolution formulations: {', '.join(config_lib.CONV_IMPLS)}; tuned "
        "times each convolution shape's formulations on this machine at first use (tens of seconds) and "
        f"caches the picks under the user's cache directory (NANLAB_CONV_TUNING moves it) ({d('conv_impl')})")
    add("--conv-library", help=f"who runs the convolutions on CPU: {', '.join(config_lib.CONV_LIBRARIES)}; default is "
        "XLA's choice (YNNPACK), eigen XLA's runtime (Eigen) for every program, eigen-eval/eigen-train Eigen for one "
        "program only, tuned times the train and evaluation steps on both at first use on this machine (two extra "
        "compiles of each; with --conv-impl tuned, each library with the formulations timed for it) and caches "
        f"the picks next to --conv-impl tuned's ({d('conv_library')})")
    add("--dropout-rate", type=float, help=f"dropout before the head ({d('dropout_rate')})")
    add("--bn-recalibration-batches", type=int, help="evaluate with BatchNorm moments recomputed on this many "
        f"training batches under the current weights (precise BN); 0: the running averages ({d('bn_recalibration_batches')})")
    add("--loss", help=f"{', '.join(config_lib.LOSSES)} ({d('loss')})")
    add("--optimizer", help=f"{', '.join(config_lib.OPTIMIZERS)} ({d('optimizer')})")
    add("--lr", type=float, help=f"peak learning rate ({d('lr')})")
    add("--schedule", help=f"{', '.join(config_lib.SCHEDULES)} ({d('schedule')})")
    add("--warmup-steps", type=int, help=f"warmup of warmup-cosine ({d('warmup_steps')})")
    add("--weight-decay", type=float, help=f"decoupled weight decay for adamw, L2 otherwise ({d('weight_decay')})")
    add("--clip", help="gradient processing chain: none, global_norm:X, value:X, agc:X, or several joined "
        f"by commas, e.g. agc:0.01,global_norm:5 ({d('clip')})")
    add("--skip-nonfinite", action="store_true", default=None,
        help="drop non-finite updates (params and optimizer state untouched), count them and go on (default: off)")
    add("--debug-nans", action="store_true", default=None,
        help="run with JAX's jax_debug_nans for this run only; its FloatingPointError gives the same report "
        "and exit code 3 (default: off)")
    add("--debug-infs", action="store_true", default=None, help="same with jax_debug_infs (default: off)")
    add("--workdir", help="output directory (default: runs/<timestamp>-<scenario>)")
    add("--resume", action="store_true", default=None, help="continue the run in --workdir from its last checkpoint")
    add("--overwrite", action="store_true", default=None, help="replace a run already in --workdir")
    add("--log-every", type=int, help=f"steps between metrics rows and host syncs ({d('log_every')})")
    add("--eval-every", type=int, help=f"steps between validation passes; 0: only at the end ({d('eval_every')})")
    add("--stats-every", type=int, help="steps between per-module grad norms and activation max|a| rows; "
        f"0: never ({d('stats_every')})")
    add("--checkpoint-every", type=int, help=f"steps between checkpoints; 0: only at the end ({d('checkpoint_every')})")
    add("--keep-checkpoints", type=int, help=f"checkpoints kept ({d('keep_checkpoints')})")
    add("--tensorboard", action="store_true", default=None, help="also write TensorBoard events to <workdir>/tb")
    add("--plots", action=argparse.BooleanOptionalAction, default=None, help=f"write PNG plots ({d('plots')})")
    add("--progress", action=argparse.BooleanOptionalAction, default=None, help=f"live progress bar ({d('progress')})")
    add("--data-parallel", action=argparse.BooleanOptionalAction, default=None,
        help="shard the batch over all local devices when there are several (default: on)")
    add("--compile-cache", help="JAX's persistent compilation cache: a directory, or 'off' (default: "
        "$NANLAB_COMPILE_CACHE, else ~/.cache/nanlab/jax-cache or $XDG_CACHE_HOME/nanlab/jax-cache)")
    return p


def config_from_args(args: argparse.Namespace, *, backend: str | None = None) -> config_lib.TrainConfig:
    """The TrainConfig of parsed flags: only flags given explicitly override preset and scenario."""
    explicit = {k: v for k, v in vars(args).items() if v is not None and k != "list_scenarios"}
    return config_lib.make_config(explicit, backend=backend)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv`, build the config and run it.

    Returns:
      The exit code (0 ok, 2 bad input, 3 non-finite).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.list_scenarios:
        print(config_lib.describe_scenarios())
        return EXIT_OK
    try:
        config = config_from_args(args)
    except ValueError as error:
        return _cli.report_bad_input(PROG, error)
    return run(config)


# ------------------------------------------------------------------------------------------ the run


def default_workdir(config: config_lib.TrainConfig) -> Path:
    """runs/<UTC timestamp>-<scenario>."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{config.scenario}"


def check_workdir(workdir: Path, config: config_lib.TrainConfig, *, create: bool = True) -> None:
    """Refuse a workdir that cannot be written, or that holds a run without --resume/--overwrite.

    With `create` False nothing is created (and writability is not yet probed).

    Raises:
      BadInput: with one line naming the workdir and the problem.
    """
    holds_run = workdir.is_dir() and any((workdir / marker).exists() for marker in RUN_MARKERS)
    refusal = None
    if config.resume and not (workdir / "checkpoints").is_dir():
        refusal = f"--resume: no checkpoint in workdir {workdir}"
    elif holds_run and not (config.resume or config.overwrite):
        refusal = f"workdir {workdir} already holds a run; pass --resume to continue it or --overwrite to replace it"
    _cli.check_workdir(workdir, shown=f"workdir {workdir}", refusal=refusal, create=create)


class _Placer:
    """Puts host batches on the devices: sharded over a 1-D mesh when data-parallel, else as is."""

    def __init__(self, config: config_lib.TrainConfig):
        import jax

        from nanlab import data as data_lib

        self.mesh = None
        if config.data_parallel and jax.device_count() > 1:
            if config.batch_size % jax.device_count():
                raise BadInput(
                    f"--batch-size {config.batch_size} is not divisible by the {jax.device_count()} devices; "
                    "use a multiple or --no-data-parallel"
                )
            self.mesh = data_lib.make_mesh()
        self._data = data_lib

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    def batch(self, tree):
        """Place a global host batch; with several processes each passes only its own slice."""
        import jax

        if self.mesh is None:
            return jax.device_put(tree)
        if jax.process_count() > 1:
            # Every process computes the same global batch (batch_at is pure); it feeds its share.
            tree = self._data.process_slice(tree)
        return self._data.shard_batch(tree, self.mesh)

    def state(self, tree):
        return tree if self.mesh is None else self._data.replicate(tree, self.mesh)


class _Feed:
    """The loop's batches, placed on the devices and normalized: built-in data in memory, or a stream.

    Built-in data (`nanlab.data.load_for_config`) is normalized on the host, as before. A stream
    (`nanlab.streaming.open_stream`: a folder, .npz or .array_record) carries uint8 images to the
    devices and normalizes them there with one small jitted program per batch, dispatched right
    after the transfer. That program runs before the step rather than inside it so that the step,
    its compiled executable and the failing-step replay (trace.localize, diagnose) see the same
    float32 normalized batch on both paths; the prefetcher dispatches it ahead, so it overlaps the
    previous step.
    """

    def __init__(self, config: config_lib.TrainConfig, placer: _Placer, *, dataset=None, pipeline=None,
                 normalizer: dict[str, Any] | None = None):
        import jax

        self.config, self.placer, self.dataset, self.pipeline = config, placer, dataset, pipeline
        self._normalize = None
        if pipeline is not None:
            from nanlab.streaming import normalize_on_device

            # The statistics are Python floats folded into the program (one compile per run).
            self._normalize = jax.jit(lambda x: normalize_on_device(x, config.normalize, normalizer,
                                                                    config.input_scale))

    @property
    def num_train(self) -> int:
        return self.pipeline.num_train if self.pipeline is not None else len(self.dataset.x_train)

    def _x(self, x):
        """Place an image batch; normalize it on the devices when it is streamed."""
        x = self.placer.batch(x)
        return x if self._normalize is None else self._normalize(x)

    def place(self, batch):
        """A host (x, y) batch -> the device batch the step takes."""
        x, y = batch
        return self._x(x), self.placer.batch(y)

    def host_batch(self, step: int):
        """The training batch of `step` on the host (random access: the failing-step replay)."""
        from nanlab import data as data_lib

        if self.pipeline is not None:
            return self.pipeline.batch_at(step)
        dataset = self.dataset
        return data_lib.batch_at(dataset.x_train, dataset.y_train, step, self.config.batch_size, self.config.seed)

    def batch_of(self, step: int):
        return self.place(self.host_batch(step))

    @contextlib.contextmanager
    def batches(self, start_step: int):
        """The device batches of steps start_step..--steps, prepared --prefetch batches ahead."""
        from nanlab.prefetch import Prefetcher

        with contextlib.ExitStack() as stack:
            if self.pipeline is not None:
                # Worker processes decode in order; the iterator is the stream from start_step on.
                stream = stack.enter_context(self.pipeline.batches(start_step))
                items = (next(stream) for _ in range(start_step, self.config.steps))
            else:
                items = (self.host_batch(step) for step in range(start_step, self.config.steps))
            # Closed before the stream: the thread stops using it first.
            yield stack.enter_context(Prefetcher(items, self.place, self.config.prefetch))

    def calibration(self, num_batches: int):
        """Device image batches for BatchNorm recalibration: the first training batches in stored order."""
        size = self.config.batch_size
        num_batches = min(num_batches, self.num_train // size)
        if num_batches == 0:  # (a stream would start its worker processes for nothing)
            return iter(())
        if self.pipeline is not None:
            return (self._x(x) for x in self.pipeline.calibration_batches(num_batches))
        x_train = self.dataset.x_train
        return (self._x(x_train[i * size:(i + 1) * size]) for i in range(num_batches))

    def evaluation(self):
        """The validation split as ((x, y), weights) device batches, the last one padded."""
        from nanlab import data as data_lib

        if self.pipeline is not None:
            host = self.pipeline.eval_batches()
        else:
            host = data_lib.eval_batches(self.dataset.x_val, self.dataset.y_val, self.config.batch_size)
        return ((self.place((xb, yb)), self.placer.batch(weights)) for xb, yb, weights in host)

    def summary(self) -> dict[str, Any] | None:
        """For summary.json: what was streamed, its class -> label mapping and skipped images."""
        pipeline = self.pipeline
        if pipeline is None:
            return None
        out = {"source": pipeline.name, "num_train": pipeline.num_train, "num_val": pipeline.num_val,
               "workers": pipeline.workers, "class_mapping": pipeline.class_mapping()}
        if pipeline.on_bad_image == "skip":
            out["bad_images"] = pipeline.bad_image_report()
        return out


def _nonfinite_quantities(stats) -> list[str]:
    """What a failed step found non-finite; None stats: the weights a previous update wrote."""
    if stats is None:
        return ["weights (written by the previous step's update)"]
    return [name for name, flag in (("loss", stats.loss_finite), ("gradients", stats.grads_finite),
                                    ("BatchNorm statistics", stats.batch_stats_finite))
            if not bool(flag)]


def _metrics_row(step: int, stats, telemetry: dict | None, *, images_per_s: float | None,
                 with_module_stats: bool) -> dict[str, Any]:
    """A metrics.jsonl row from a step's stats and, on logged steps, its update telemetry."""
    nan = float("nan")
    row = {
        "step": step,
        "loss": float(stats.loss),
        "accuracy": float(stats.accuracy),
        "grad_norm": float(stats.grad_norm),
        "param_norm": float(telemetry["param_norm"]) if telemetry else nan,
        "update_ratio": float(telemetry["update_ratio"]) if telemetry else nan,
        "lr": float(stats.lr),
        "skipped": int(stats.total_skipped),
        "images_per_s": images_per_s,
    }
    if with_module_stats:
        row["module_grad_norms"] = {k: float(v) for k, v in stats.module_grad_norms.items()}
        row["activation_max_abs"] = {k: float(v) for k, v in stats.activation_max_abs.items()}
    return row


def _evaluate(eval_fn, moments_fn, state, feed: "_Feed", config) -> dict[str, float]:
    from nanlab import step as step_lib

    state = step_lib.recalibrated(state, moments_fn, feed.calibration(config.bn_recalibration_batches))
    totals = {"loss_sum": 0.0, "correct_sum": 0.0, "count": 0.0}
    for batch, weights in feed.evaluation():
        out = eval_fn(state, batch, weights)
        for key in totals:
            totals[key] += float(out[key])
    count = max(totals["count"], 1.0)
    return {"val_loss": totals["loss_sum"] / count, "val_accuracy": totals["correct_sum"] / count}


def _report_nonfinite(*, workdir: Path, step: int, quantities: list[str], train_step, state, batch,
                      history: list[dict], jax_error: str | None = None):
    """Replay the failing step with the guard's replay (`nanlab.guard.replay_failure`: trace.reproduce,
    then diagnose), print the report and the verdict, and write report.json in the CLI's keys.

    Returns:
      The `nanlab.guard.NonFiniteError` (not raised), its payload the report.json contents.
    """
    import jax

    from nanlab.guard import replay_failure
    from nanlab.runlog import write_json

    what = ", ".join(quantities) if quantities else "a value (jax_debug_nans/infs)"
    print(f"{PROG}: step {step} went non-finite: {what}; replaying it to localize the origin...", file=sys.stderr)
    # Host copies of the state and the batch (a sharded state is gathered once, here).
    error = replay_failure(train_step, jax.device_get((state, batch)), step=step, history=history,
                           verbose=False, what="step")
    print(f"\nnon-finite at step {step}: {what}")
    if jax_error:
        print(f"JAX: {jax_error.splitlines()[0]}")
    print(error.report)
    print(f"\n{error.verdict}")
    error.payload = {
        "step": step,
        "nonfinite": quantities,
        "jax_error": jax_error,
        "report": error.report.to_dict(),
        "verdict": error.verdict.to_dict(),
    }
    write_json(workdir / "report.json", error.payload)
    return error


def _history_verdict(history: list[dict]) -> dict[str, Any] | None:
    """diagnose's verdict on a run that stayed finite (e.g. vanishing gradients); None if healthy."""
    from nanlab import diagnose

    verdict = diagnose.diagnose_history(history)
    return None if verdict.cause == "none" else verdict.to_dict()


def run(config: config_lib.TrainConfig) -> int:
    """Train as `config` says; write the run's record into its workdir.

    Args:
      config: a validated TrainConfig.

    Returns:
      The exit code: 0 ok, 2 bad input (one line on stderr), 3 non-finite (report.json written).
    """
    from nanlab.data import DataError

    try:
        return _run(config)
    except BadInput as error:
        return _cli.report_bad_input(PROG, error)
    except DataError as error:  # met while streaming: an unreadable image (named), with --on-bad-image error
        return _cli.report_bad_input(PROG, f"--data {config.data}: {error}")
    except KeyboardInterrupt:  # before the run folder exists (after, `_run` says what is left)
        print(f"{PROG}: aborted before the run folder was created; nothing was written", file=sys.stderr)
        return 130


def _clear_previous_run(workdir: Path) -> None:
    """--overwrite: remove what an earlier run left (its record, checkpoints, TensorBoard, plots)."""
    for marker in RUN_MARKERS + ("tb",) + tuple(f.name for f in workdir.glob("*.png")):
        path = workdir / marker
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class _Parts:
    """What a run is built from: its data feed, device placement, model, loss and optimizer."""

    feed: _Feed
    input_stats: dict[str, Any]
    placer: "_Placer"
    model: Any
    loss_fn: Any
    schedule: Any
    tx: Any
    sample_x: Any  # a zero batch of the training shape (what init traces)
    init: Any  # jitted sample_x -> TrainState at step 0
    # --conv-impl tuned: conv library -> the formulation picks timed for it (the libraries the
    # run's programs may run on); empty otherwise.
    conv_tables: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)


def _open_stream(config: config_lib.TrainConfig):
    """The `StreamPipeline` of a streamed --data (None for built-in data): checks the files and
    their layout, decodes nothing, so bad data exits before the workdir is created.

    Raises:
      BadInput: a missing path, one class, an empty folder, a malformed file, a batch larger
        than the training split.
    """
    from nanlab import streaming

    if not streaming.is_stream_spec(config.data):
        return None
    try:
        return streaming.open_stream(config.data, config.image_size, config.seed, config.batch_size,
                                     workers=config.data_workers, on_bad_image=config.on_bad_image,
                                     allow_nonfinite=config.allow_nonfinite_data)
    except ValueError as error:  # DataError is a ValueError
        raise BadInput(f"--data {config.data}: {error}") from None


def _stream_input_stats(pipeline, config: config_lib.TrainConfig, normalizer: dict[str, Any]) -> dict[str, Any]:
    """Raw and normalized input statistics of a stream, over its first training batch (the
    in-memory path's are over the whole training set, which a stream never holds)."""
    from nanlab import data as data_lib

    x, _ = pipeline.batch_at(0)
    raw = x.astype(np.float32) * np.float32(config.input_scale)
    return {"raw": data_lib.input_stats(raw),
            "normalized": data_lib.input_stats(data_lib.normalize(raw, config.normalize, normalizer)),
            "over": f"the first training batch ({len(x)} images)"}


def _build_parts(config: config_lib.TrainConfig, pipeline=None, store=None) -> _Parts:
    import jax
    import jax.numpy as jnp

    from nanlab import data as data_lib
    from nanlab import compile_cache, losses, models, optim, streaming
    from nanlab import step as step_lib

    placer = _Placer(config)
    if pipeline is None:
        dataset, input_stats = data_lib.load_for_config(config)
        feed = _Feed(config, placer, dataset=dataset)
        num_classes, image_shape = dataset.num_classes, dataset.x_train.shape[1:]
    else:
        # One decoding pass over the training split: the in-memory path's statistics (to float64
        # rounding) without holding the images.
        normalizer = streaming.fit_stream_normalizer(pipeline, config.normalize, input_scale=config.input_scale)
        input_stats = _stream_input_stats(pipeline, config, normalizer)
        feed = _Feed(config, placer, pipeline=pipeline, normalizer=normalizer)
        num_classes, image_shape = pipeline.num_classes, pipeline.image_shape
    model = models.build(config, num_classes)
    sample_x = jnp.zeros((config.batch_size,) + tuple(image_shape), jnp.float32)
    conv_tables = {}
    if config.conv_impl == "tuned" and config.model == "inception_v3":
        # The shapes are timed on each library a program may run on: with --conv-library tuned on
        # both, so that the program-level pick times each library with its own picks.
        conv_tables = _tune_convolutions(model, sample_x, _conv_libraries_to_tune(config))
    schedule = optim.make_schedule(config.schedule, config.lr, config.steps, config.warmup_steps)
    tx = optim.make_tx(config.clip, config.optimizer, schedule, config.weight_decay, config.skip_nonfinite)
    # Runs once per run: compiled without XLA's optimization passes (see compile_cache).
    jit = store.jit("init", **_program_parts(config, "init", conv_tables)) if store is not None else jax.jit
    init = jit(lambda x: step_lib.create_train_state(model, tx, x, config.seed),
               compiler_options=compile_cache.RUN_ONCE_OPTIONS)
    return _Parts(feed, input_stats, placer, model, losses.by_name(config.loss), schedule, tx, sample_x, init,
                  conv_tables)


def _conv_libraries_to_tune(config: config_lib.TrainConfig) -> tuple[str, ...]:
    """The convolution libraries the run's programs may run on, the train step's first."""
    from nanlab.models import conv as conv_lib

    if config.conv_library == "tuned":
        return tuple(conv_lib.LIBRARIES)
    return tuple(dict.fromkeys(config_lib.conv_library_of(config, program) for program in ("train", "eval")))


def _tune_convolutions(model, sample_x, libraries: Sequence[str]) -> dict[str, dict[str, str]]:
    """--conv-impl tuned: time the formulations of each convolution shape of the training step that
    this machine's cache lacks, compiled for each convolution library in `libraries`, and activate
    the first library's picks (one line on stderr per library).

    Returns:
      library -> its picks (each program is traced with the picks of the library it runs on).
    """
    from nanlab.models import conv_tuning

    path, tables = conv_tuning.default_path(), {}
    for library in libraries:
        start = time.perf_counter()
        on = "" if library == "default" else f" on {library}"
        try:
            tables[library], timed = conv_tuning.ensure_tuned_model(model, sample_x, path=path, library=library)
        except OSError as error:  # the picks are active; only the cache for later runs is missing
            tables[library] = conv_tuning.active()
            print(f"{PROG}: warning: --conv-impl tuned{on}: could not write {path} ({error.strerror or error}); "
                  "the picks are used for this run only", file=sys.stderr)
            continue
        print(f"{PROG}: --conv-impl tuned{on}: {len(tables[library])} convolution shapes, {timed} timed now "
              f"({time.perf_counter() - start:.0f} s), the rest from {path or 'nowhere (tuning cache off)'}",
              file=sys.stderr)
    conv_tuning.activate(tables[libraries[0]])
    return tables


def _check_data_state(workdir: Path, config: config_lib.TrainConfig, pipeline, start_step: int) -> None:
    """A streamed run records its pipeline's state (files, split, seed, batch size); --resume
    refuses a pipeline that would give other batches. Built-in data: nothing to record.

    Raises:
      BadInput: --resume on other files, seed, batch size or split than the run's.
    """
    from nanlab.data import DataError
    from nanlab.runlog import write_json

    if pipeline is None:
        return
    path = workdir / DATA_STATE_FILE
    if config.resume and path.exists():
        try:
            pipeline.restore(json.loads(path.read_text()))
        except (DataError, ValueError) as error:  # a changed folder, or an unreadable file
            raise BadInput(f"--resume: --data {config.data}: {error}; resume with the run's data, or start over "
                           "with --overwrite") from None
    write_json(path, pipeline.state(start_step))


def _initial_state(config: config_lib.TrainConfig, parts: _Parts, checkpointer) -> tuple[int, Any]:
    """(start step, placed state): restored from the last checkpoint with --resume, else freshly initialized.

    Raises:
      BadInput: a corrupt or mismatched checkpoint, or one already at --steps.
    """
    import jax

    from nanlab.checkpoint import CheckpointError, CheckpointMismatch

    if not config.resume:
        return 0, parts.placer.state(parts.init(parts.sample_x))
    try:
        # The state's shapes suffice as the restore target: tracing init, not compiling it.
        start_step, state, skipped = checkpointer.restore_newest_intact(jax.eval_shape(parts.init, parts.sample_x))
    except CheckpointMismatch as error:
        raise BadInput(f"--resume: {error}; resume with that run's flags, or start over with --overwrite") from None
    except CheckpointError as error:
        raise BadInput(f"--resume: {error}; start over with --overwrite or another --workdir") from None
    for line in skipped:
        print(f"{PROG}: warning: skipped corrupt {line}; resuming from checkpoint {start_step}", file=sys.stderr)
    if skipped:
        checkpointer.discard_after(start_step)  # the resumed run writes those steps again
    if start_step >= config.steps:
        raise BadInput(f"--resume: the checkpoint is at step {start_step}, already at --steps {config.steps}")
    return start_step, parts.placer.state(state)


class _StepFns(NamedTuple):
    """The jitted functions the loop calls."""

    train_step: Any  # the pure step, unjitted: what the loop guards and a failure replays
    telemetry: Any  # update_telemetry(params_before, params_after)
    snapshot: Any  # a copy of the params (the step donates them)
    evaluate: Any  # eval step: (state, batch, mask) -> sums
    moments: Any  # BatchNorm moments of a batch, for precise-BN evaluation
    train_jit: Any  # what jits the guarded train step: a program store's `jit`, or jax.jit


def _step_fns(config: config_lib.TrainConfig, parts: _Parts, store=None) -> _StepFns:
    import jax
    import jax.numpy as jnp

    from nanlab import step as step_lib
    from nanlab.models.common import BN_MOMENTUM

    forward_only = conv_compiler_options(config, "eval")
    eval_library = config_lib.conv_library_of(config, "eval")

    def stored(name):  # the programs loaded from the store when it holds them
        if store is None:
            return jax.jit
        return store.jit(name, **_program_parts(config, name, parts.conv_tables))

    return _StepFns(
        train_step=_with_picks(parts, config_lib.conv_library_of(config, "train"), _train_step_fn(config, parts)),
        telemetry=jax.jit(step_lib.update_telemetry),
        snapshot=jax.jit(lambda params: jax.tree.map(jnp.copy, params)),  # one dispatch, not one per array
        evaluate=stored("eval")(_with_picks(parts, eval_library, step_lib.make_eval_step(parts.model, parts.loss_fn)),
                                compiler_options=forward_only),
        moments=stored("moments")(_with_picks(parts, eval_library,
                                              step_lib.make_batch_moments_fn(parts.model, BN_MOMENTUM)),
                                  compiler_options=forward_only),
        train_jit=stored("train"),
    )


def _train_step_fn(config: config_lib.TrainConfig, parts: _Parts):
    """The pure train step of the run (nanlab.step.make_train_step), before any jit or tuned picks.

    One executable, activation statistics included whenever they are asked for at all: on a CPU,
    compiling a second InceptionV3 step variant costs as much as the first (minutes on 2 cores),
    while the ~20 max|a| reductions over activations the step already holds are a small share of a
    step's work. They are read back only every --stats-every steps.
    """
    from nanlab import step as step_lib

    return step_lib.make_train_step(parts.model, parts.loss_fn, parts.tx, schedule=parts.schedule,
                                    skip_nonfinite=config.skip_nonfinite, collect_stats=config.stats_every > 0)


def _with_picks(parts: _Parts, library: str, fn):
    """`fn` traced with the --conv-impl tuned picks timed for the convolution `library` it runs on."""
    if not parts.conv_tables:
        return fn
    from nanlab.models import conv_tuning

    return conv_tuning.traced_with(parts.conv_tables[library], fn)


def _tune_conv_library(config: config_lib.TrainConfig, parts: _Parts, state) -> config_lib.TrainConfig:
    """--conv-library tuned: time the train step and the evaluation step compiled for each convolution
    library (`nanlab.models.conv.LIBRARIES`) on this machine, each with the --conv-impl tuned picks
    timed for that library, or read the picks cached for this model, shape and formulation; one line
    on stderr.

    Returns:
      `config` with the concrete `conv_library` mode that runs each program on its pick.
    """
    import jax
    import jax.numpy as jnp

    from nanlab import step as step_lib
    from nanlab.models import conv as conv_lib
    from nanlab.models import conv_tuning

    batch = parts.feed.batch_of(0)
    mask = jnp.ones(config.batch_size, jnp.float32)
    train_step = _train_step_fn(config, parts)
    eval_step = step_lib.make_eval_step(parts.model, parts.loss_fn)

    def blocking(fn, library, *args):
        # Compiled for `library`, with the --conv-impl tuned picks timed for it.
        program = jax.jit(_with_picks(parts, library, fn), compiler_options=conv_lib.compiler_options(library))
        return lambda: jax.block_until_ready(program(*args))

    # program -> (library -> one timed call of the program compiled for it)
    programs = {
        "train": lambda library: blocking(train_step, library, state, batch),
        "eval": lambda library: blocking(eval_step, library, state, batch, mask),
    }
    picks = " picks per library" if parts.conv_tables else ""  # (the picks timed on each library)
    shape = (f"{config.model} w{config.width_multiplier} {config.image_size}px b{config.batch_size} {config.dtype} "
             f"conv {config.conv_impl}{picks} bn {config.use_batchnorm} stats {config.stats_every > 0} "
             f"devices {parts.placer.num_devices}")
    start, path = time.perf_counter(), conv_tuning.default_path()
    picks, notes = {}, []
    for program, build in programs.items():
        try:
            picks[program], medians = conv_tuning.ensure_program_library(
                f"{program} | {shape}", build, path=path)
        except conv_tuning.CachedPickError as error:  # the pick stands; only later runs lose it
            picks[program], medians = error.library, error.medians
            print(f"{PROG}: warning: --conv-library tuned: could not write {path} ({error.strerror}); "
                  "the picks are used for this run only", file=sys.stderr)
        other = min(medians[name] for name in medians if name != picks[program]) if medians else None
        notes.append(f"{program} on {picks[program]}"
                     + (f" ({other / medians[picks[program]]:.2f}x the other)" if medians else " (cached)"))
    print(f"{PROG}: --conv-library tuned: {', '.join(notes)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return dataclasses.replace(config, conv_library=config_lib.conv_library_mode(picks["train"], picks["eval"]))


def _program_store(cache_dir: Path | None, config: config_lib.TrainConfig, pipeline):
    """The run's `nanlab.program_store.ProgramStore`, beside JAX's compilation cache, with the init and
    train programs already loading in the background; None when the cache is off, under
    --debug-nans/--debug-infs (JAX's checks run in jax.jit's dispatch, which a stored program's call
    skips), and on several devices (the store serves single-device processes)."""
    import jax

    if cache_dir is None or config.debug_nans or config.debug_infs or jax.device_count() != 1:
        return None
    from nanlab.program_store import ProgramStore

    description = {name: value for name, value in config.to_dict().items() if name != "workdir"}
    if pipeline is not None:  # a folder's classes and image size are not in the config
        description["data_shape"] = [pipeline.num_classes, list(pipeline.image_shape)]
    store = ProgramStore(cache_dir / "programs", description,
                         warn=lambda line: print(f"{PROG}: warning: {line}", file=sys.stderr))
    if config.conv_impl != "tuned" and config.conv_library != "tuned":
        # Their keys are known before the data is built: they load in the background meanwhile, the
        # train step and the init first (the first step waits for them).
        for name in ("train", "init", "eval", "moments"):
            store.prefetch(name, **_program_parts(config, name))
    return store


def _program_parts(config: config_lib.TrainConfig, program: str,
                   conv_tables: dict[str, dict[str, str]] | None = None) -> dict[str, Any]:
    """What shapes a stored program (init, train, eval, moments) beyond the run description: the
    --conv-impl tuned picks it is traced with (`conv_tables`: library -> picks), and the conv
    library its --conv-library mode gives it."""
    parts: dict[str, Any] = {}
    if program == "init":
        if conv_tables:  # (its values do not depend on the formulations; its trace does)
            parts["conv_picks"] = next(iter(conv_tables.values()))
        return parts
    library = config_lib.conv_library_of(config, "train" if program == "train" else "eval")
    if conv_tables:
        parts["conv_picks"] = conv_tables[library]
    parts["conv_library"] = library
    return parts


def conv_compiler_options(config: config_lib.TrainConfig, program: str) -> dict[str, str] | None:
    """XLA's options for the convolutions of the train step (program "train") or of the forward-only
    programs, evaluation and BatchNorm recalibration ("eval"), as --conv-library asks."""
    from nanlab.models import conv as conv_lib

    return conv_lib.compiler_options(config_lib.conv_library_of(config, program))


def _guard_step(config: config_lib.TrainConfig, fns: _StepFns):
    """The train step under `nanlab.guard`: the step's own flag and gate, the state donated.

    `_Loop` sets its ``replay`` hook, which reports a failure as this run's step.
    """
    from nanlab import step as step_lib
    from nanlab.guard import guard

    debug = config.debug_nans or config.debug_infs
    # Not donated under jax_debug_nans/infs: JAX re-runs a failing call on its arguments.
    return guard(fns.train_step, donate_argnums=() if debug else 0, check_every=config.log_every,
                 on_failure="skip" if config.skip_nonfinite else "raise",
                 finite=step_lib.guard_flag, gate_kwarg="apply_update",
                 compiler_options=conv_compiler_options(config, "train"), jit=fns.train_jit)


def _run(config: config_lib.TrainConfig) -> int:
    import jax

    from nanlab.checkpoint import Checkpointer
    from nanlab.runlog import RunLog

    from nanlab import compile_cache

    wall_start = time.perf_counter()
    try:
        cache_dir = compile_cache.resolve(config.compile_cache)
    except ValueError as error:
        raise BadInput(str(error)) from None
    # Every input is checked before the run folder exists, so that bad input leaves nothing behind:
    # the workdir's refusals first (cheap), then the data, the devices and the optimizer chain.
    workdir = Path(config.workdir) if config.workdir else default_workdir(config)
    check_workdir(workdir, config, create=False)
    pipeline = _open_stream(config)  # streamed data: bad data exits here
    # JAX's cache first: the stored programs start compiling (loading, when it holds them) in the
    # background at once, while the data is built.
    compile_cache.enable(cache_dir)
    store = _program_store(cache_dir, config, pipeline)
    parts = _build_parts(config, pipeline, store)  # with --conv-impl tuned, tens of seconds (Ctrl-C: `run`)
    check_workdir(workdir, config)
    try:  # the run folder exists from here on
        if config.overwrite:  # (--resume and --overwrite exclude each other)
            _clear_previous_run(workdir)
        with contextlib.ExitStack() as resources:  # closes the run log, then the checkpointer
            checkpointer = Checkpointer(workdir / "checkpoints", config.keep_checkpoints)
            resources.callback(checkpointer.close)
            # A second Ctrl-C aborts at once, maybe inside a save: leave only complete checkpoints.
            resources.push(lambda kind, *_: checkpointer.remove_temporary() if kind is KeyboardInterrupt else None)
            if config.conv_library == "tuned":  # the programs' libraries, measured here (or cached)
                start_step, state = _initial_state(config, parts, checkpointer)
                libraries = _tune_conv_library(config, parts, state)
                fns = _step_fns(libraries, parts, store)
                guarded = _guard_step(libraries, fns)
            else:
                libraries = config
                fns = _step_fns(config, parts, store)
                guarded = _guard_step(config, fns)
                if store is not None and not config.resume:
                    # The init and the train step are taken from the store or traced here, and XLA
                    # compiles (or loads) both in the store's background threads: on a cold start
                    # the step's tracing overlaps the init's compile, the telemetry's compile below
                    # overlaps the step's.
                    guarded.prepare(parts.init.prepare(parts.sample_x), parts.feed.batch_of(0))
                start_step, state = _initial_state(config, parts, checkpointer)
            # The programs of a logged step (a copy of the weights, its telemetry), compiled by running
            # them once on the initial weights: on a warm start, while the train step still loads.
            fns.telemetry(fns.snapshot(state.params), state.params)
            _check_data_state(workdir, config, pipeline, start_step)
            summary: dict[str, Any] = {
                "preset": config.preset,
                "scenario": config.scenario,
                "workdir": str(workdir),
                "devices": parts.placer.num_devices,
                "backend": jax.default_backend(),
                "input_stats": parts.input_stats,
                "resumed_from": start_step if config.resume else None,
                "compile_cache": str(cache_dir) if cache_dir is not None else None,
                "conv_library": libraries.conv_library,  # --conv-library tuned: the measured mode
                # program -> "stored" (loaded from the program store) or "compiled"; filled as they run
                "programs": store.sources if store is not None else None,
            }
            runlog = RunLog(workdir, {**config.to_dict(), "workdir": str(workdir)}, total_steps=config.steps,
                            start_step=start_step, progress=config.progress, tensorboard=config.tensorboard)
            resources.callback(runlog.close)
            print(f"{PROG}: preset {config.preset}, scenario {config.scenario}, {parts.placer.num_devices} device(s), "
                  f"inputs raw {_fmt_stats(parts.input_stats['raw'])} -> normalized "
                  f"{_fmt_stats(parts.input_stats['normalized'])}", file=sys.stderr)
            loop = _Loop(config, workdir, parts, fns, guarded, runlog, checkpointer, summary, start_step)
            with StopOnSignal() as loop.stop:
                exit_code = loop.run(state)
            if parts.feed.summary() is not None:
                summary["data"] = parts.feed.summary()
            if exit_code == EXIT_OK:
                exit_code = _check_validation(summary, runlog.rows)
        _complete_summary(summary, runlog.rows, exit_code, loop, wall_start)
        runlog.finish(summary, plots=config.plots)
        return exit_code
    except KeyboardInterrupt:  # Ctrl-C before the loop watches for it, or a second one inside it
        return _aborted(workdir)


def _aborted(workdir: Path) -> int:
    """Ctrl-C outside the loop's watch (compiling, measuring, loading) or a second one inside it:
    one line saying what there is to resume, exit 130. Only complete checkpoints remain."""
    from nanlab.checkpoint import complete_steps

    steps = complete_steps(workdir / "checkpoints")
    if steps:
        print(f"{PROG}: aborted; resume from checkpoint {steps[-1]} with python -m nanlab.train "
              f"--workdir {workdir} --resume", file=sys.stderr)
    else:
        print(f"{PROG}: aborted before the first checkpoint: nothing to resume; run again with --overwrite "
              f"(or another --workdir) to start over", file=sys.stderr)
    return 130


class _Loop:
    """The training loop: one guarded step per batch, host syncs at log intervals, and the ways a run fails.

    The step runs as `nanlab.guard.guard(train_step)`: one jitted executable with donated state, the
    step's own sentinel flag (``finite=``) and its own gate (``gate_kwarg="apply_update"``). The
    loop reads the guard's carry (`GuardedStep.check`) only where it writes a metrics row, before a
    checkpoint and on a signal; with --skip-nonfinite also after every step until the first event.
    A run fails (exit 3, report.json written) when JAX's debug checks raise (`_fail_on_jax_error`),
    when the guard finds a non-finite step without --skip-nonfinite (the guard raises
    `NonFiniteError` after `_replay`; `_fail_on_nonfinite`), or when a logged step's update made the
    weights non-finite (`_fail_on_update_overflow`); with --skip-nonfinite the guard replays and
    reports the first skipped step (`_replay`), and the run goes on.
    """

    def __init__(self, config, workdir, parts, fns, guarded, runlog, checkpointer, summary, start_step):
        self.config, self.workdir, self.parts, self.fns = config, workdir, parts, fns
        self.runlog, self.checkpointer, self.summary = runlog, checkpointer, summary
        self.start_step = self.step = start_step
        self.first_event: dict[str, Any] | None = None
        self.interval = (time.perf_counter(), start_step)  # (wall time, step) of the last metrics row
        self.stop = StopOnSignal()  # the run's signal flag (installed around `run` by the caller)
        self.guarded = guarded
        guarded.replay = self._replay  # failures are reported as this run's steps

    def run(self, state) -> int:
        """Train from `self.step` to --steps; returns the exit code (0, or 3 after a failure)."""
        with self.parts.feed.batches(self.step) as batches:
            try:
                return self._run(state, batches)
            except _NonFiniteState as error:
                return self._fail_on_nonfinite_state(error)

    def _run(self, state, batches) -> int:
        import jax

        from nanlab.guard import NonFiniteError

        config, fns, placer, guarded = self.config, self.fns, self.parts.placer, self.guarded
        once = _JaxNoticeOnce() if config.debug_nans or config.debug_infs else contextlib.nullcontext()
        with jax.debug_nans(config.debug_nans), jax.debug_infs(config.debug_infs), once:
            try:
                while self.step < config.steps:
                    if self.stop.requested:
                        return self._interrupt(state)
                    step = self.step
                    batch = next(batches)  # the batch of `step`, placed (prefetched while the last step ran)
                    with_stats = config.stats_every > 0 and (step + 1) % config.stats_every == 0
                    logged = _logs_after(step + 1, config) or with_stats  # a metrics row follows this step
                    # The weights before a logged step, for update_telemetry (the step donates them).
                    before = fns.snapshot(state.params) if logged else None
                    try:
                        state, stats = guarded(state, batch)
                    except NonFiniteError:
                        raise
                    except FloatingPointError as error:  # jax_debug_nans/infs
                        return self._fail_on_jax_error(step, state, batch, error)
                    self.step = step = step + 1
                    watch_skips = config.skip_nonfinite and self.first_event is None
                    if not (logged or watch_skips):
                        continue
                    # The host sync: the guard reads its carry, and replays a failure among the calls
                    # since the last read (raising, or with --skip-nonfinite reporting and going on).
                    state, stats = guarded.check()
                    if not logged:
                        continue
                    host = jax.device_get((stats, fns.telemetry(before, state.params)))
                    if not config.skip_nonfinite and not bool(host[1]["updates_finite"]):
                        return self._fail_on_update_overflow(state)
                    self._log(host, state, with_stats)
            except NonFiniteError as error:
                return self._fail_on_nonfinite(error)
        return EXIT_OK

    def _interrupt(self, state) -> int:
        """SIGINT/SIGTERM at a step boundary: check the pending steps, checkpoint, say how to resume.

        No metrics row is written here: the rows stay those of an uninterrupted run, which the
        resumed run continues exactly from the checkpoint. A non-finite pending step raises the
        guard's `NonFiniteError` (handled by `run`).
        """
        config, step = self.config, self.step
        outputs = self.guarded.check()
        if outputs is not None:
            state = outputs[0]
        if step > self.start_step and step not in self.checkpointer.all_steps():
            self._save(step, state)
        self.summary.update(status="interrupted", interrupted_by=self.stop.name)
        self.runlog.close()
        print(f"{PROG}: {self.stop.name} at step {step}: checkpoint saved; resume with "
              f"python -m nanlab.train --workdir {self.workdir} --resume", file=sys.stderr)
        return self.stop.exit_code

    def _save(self, step: int, state) -> None:
        from nanlab.checkpoint import CheckpointError, nonfinite_leaves

        bad = nonfinite_leaves(state)
        if bad:  # a bad value no update touched (planted before step 0, say): training failed, not the disk
            raise _NonFiniteState(step, bad)
        try:
            self.checkpointer.save(step, state)
        except CheckpointError as error:  # a full disk, say: stop with one line, earlier checkpoints intact
            raise BadInput(str(error)) from None

    def _report(self, step: int, quantities: list[str], state, batch, jax_error: str | None = None):
        return _report_nonfinite(workdir=self.workdir, step=step, quantities=quantities,
                                 train_step=self.fns.train_step, state=state, batch=batch,
                                 history=self.runlog.rows, jax_error=jax_error)

    def _replay(self, index: int, inputs: tuple, stats):
        """The guard's `replay` hook: guarded call `index` went non-finite; report it as this run's step.

        `inputs` holds the state the guard kept: without skipping, the failing step's input state
        (the step froze); with --skip-nonfinite, its output, which differs from the input only by the
        step counter (optax's skip guard dropped the update, the step kept BatchNorm's statistics).
        """
        import jax.numpy as jnp

        step = self.start_step + index
        state, batch = inputs
        quantities = _nonfinite_quantities(stats)
        if self.config.skip_nonfinite:
            state = state.replace(step=jnp.asarray(step, jnp.int32))
        else:
            self.runlog.close(clear=True)  # the run ends here: no progress bar under the report
        error = self._report(step, quantities, state, batch)
        if self.config.skip_nonfinite:
            self.first_event = {"step": step, "nonfinite": quantities, "cause": error.verdict.cause}
        return error

    def _fail_on_jax_error(self, step: int, state, batch, error: FloatingPointError) -> int:
        """--debug-nans/--debug-infs raised inside `step` (its state was not donated): replay it, report, exit 3."""
        self.runlog.close(clear=True)
        self._report(step, [], state, batch, jax_error=str(error))
        self.summary.update(status="non-finite", failed_step=step, jax_error=str(error).splitlines()[0])
        return EXIT_NONFINITE

    def _fail_on_nonfinite(self, error) -> int:
        """The guard found a non-finite step (no skipping) and replayed it (`_replay`): exit 3."""
        self._fail_summary(error.payload["step"], error.payload["nonfinite"])
        return EXIT_NONFINITE

    def _fail_on_update_overflow(self, state) -> int:
        """A logged step's update made the weights non-finite (an overflow inside the optimizer, which the
        step's sentinel does not check): the failure is the next step, the first to meet them."""
        self.runlog.close(clear=True)
        quantities = _nonfinite_quantities(None)
        self._report(self.step, quantities, state, self.parts.feed.batch_of(self.step))
        self._fail_summary(self.step, quantities)
        return EXIT_NONFINITE

    def _fail_on_nonfinite_state(self, error: "_NonFiniteState") -> int:
        """The state due for a checkpoint holds NaN/Inf although every step was finite or skipped
        (with --skip-nonfinite the skipped updates never touched it; the value was there before):
        nothing is saved, exit 3. The first skipped step's report.json, if any, says where it shows."""
        self.runlog.close(clear=True)
        shown = ", ".join(error.leaves[:3]) + (f" and {len(error.leaves) - 3} more" if len(error.leaves) > 3 else "")
        print(f"{PROG}: the state at step {error.step} holds non-finite values ({shown}) that no update "
              "wrote: not checkpointed; the run stops here", file=sys.stderr)
        self._fail_summary(error.step, ["state"])
        return EXIT_NONFINITE

    def _fail_summary(self, failed_step: int, quantities: list[str]) -> None:
        rows = self.runlog.rows
        self.summary.update(status="non-finite", failed_step=failed_step, nonfinite=quantities,
                            last_finite_loss=rows[-1]["loss"] if rows else None)

    def _log(self, last: tuple[Any, Any], state, with_stats: bool) -> None:
        """Write the metrics row of `self.step` (evaluating first when due); checkpoint when due."""
        config, step = self.config, self.step
        stats, telemetry = last
        interval_start, interval_step = self.interval
        images_per_s = (step - interval_step) * config.batch_size / (time.perf_counter() - interval_start)
        row = _metrics_row(step, stats, telemetry,
                           images_per_s=images_per_s if interval_step > self.start_step else None,
                           with_module_stats=with_stats)
        if _eval_due(step, config):
            row.update(_evaluate(self.fns.evaluate, self.fns.moments, state, self.parts.feed, config))
        self.runlog.log(row)
        if _checkpoint_due(step, config):
            self._save(step, state)
        self.interval = (time.perf_counter(), step)


class _NonFiniteState(Exception):
    """Raised by `_Loop._save`: the state to checkpoint holds NaN/Inf (`leaves` names them)."""

    def __init__(self, step: int, leaves: list[str]):
        super().__init__(step, leaves)
        self.step, self.leaves = step, leaves


class _JaxNoticeOnce:
    """Context manager: JAX's ``Invalid nan value ... de-optimized version.`` notice printed once.

    Under jax_debug_nans/infs JAX prints that line to stdout each time a jitted call's output is
    non-finite; the de-optimized re-run of the step calls the jitted functions nested in it, which
    print it again. Lines other than a repeat of that notice pass through unchanged.
    """

    NOTICE = "Invalid nan value encountered in the output of a jax.jit function."

    def __init__(self):
        self._stdout, self._seen, self._drop_newline = None, False, False

    def __enter__(self) -> "_JaxNoticeOnce":
        self._stdout, sys.stdout = sys.stdout, self
        return self

    def __exit__(self, *exc_info: Any) -> None:
        sys.stdout = self._stdout

    def write(self, text: str) -> int:
        if text.startswith(self.NOTICE):
            if self._seen:
                self._drop_newline = True  # print() writes the line's newline separately
                return len(text)
            self._seen = True
        elif text == "\n" and self._drop_newline:
            self._drop_newline = False
            return len(text)
        self._drop_newline = False
        return self._stdout.write(text)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, encoding, ...: the real stdout's
        return getattr(self._stdout, name)


VALIDATION_METRICS = ("val_loss", "val_accuracy")


def _check_validation(summary: dict[str, Any], rows: list[dict]) -> int:
    """A run whose training stayed finite but whose validation metrics did not is never `ok`.

    Returns:
      EXIT_OK, or EXIT_NONFINITE with summary's status set to ``nonfinite-validation`` and one line
      on stderr naming the first such step and metrics.
    """
    for row in rows:
        bad = [key for key in VALIDATION_METRICS if key in row and not math.isfinite(row[key])]
        if bad:
            summary.update(status="nonfinite-validation", nonfinite_validation={"step": row["step"], "metrics": bad})
            print(f"{PROG}: validation went non-finite at step {row['step']}: {', '.join(bad)} "
                  f"= {', '.join(str(row[key]) for key in bad)} while training stayed finite; the validation "
                  "data or the evaluation path holds a non-finite value (input_stats in summary.json)",
                  file=sys.stderr)
            return EXIT_NONFINITE
    return EXIT_OK


def _complete_summary(summary: dict[str, Any], rows: list[dict], exit_code: int, loop: _Loop,
                      wall_start: float) -> None:
    """Add the run's outcome to summary.json's payload: steps, wall time, and for a run that trained
    to the end (ok, or non-finite in validation only) its final metrics, its first skipped step and
    the history's verdict."""
    trained_on = summary.get("status") in ("interrupted", "nonfinite-validation")
    summary.update(
        steps=loop.step if exit_code == EXIT_OK or trained_on else summary.get("failed_step"),
        wall_s=round(time.perf_counter() - wall_start, 2),
        allocator=allocator.current(),  # "mimalloc" when the CLI reran itself on it (nanlab.allocator)
    )
    if exit_code != EXIT_OK and summary.get("status") != "nonfinite-validation":
        return
    summary.setdefault("status", "ok")
    final = rows[-1] if rows else {}
    summary.update(
        final_loss=final.get("loss"),
        val_loss=final.get("val_loss"),
        val_accuracy=final.get("val_accuracy"),
        skipped_steps=final.get("skipped", 0),
        images_per_s=_median([r["images_per_s"] for r in rows if r.get("images_per_s")]),
    )
    if loop.first_event is not None:
        summary["first_nonfinite"] = loop.first_event
    verdict = _history_verdict(rows)
    if verdict is not None:
        summary["verdict"] = verdict


def _eval_due(step: int, config: config_lib.TrainConfig) -> bool:
    return step == config.steps or bool(config.eval_every and step % config.eval_every == 0)


def _checkpoint_due(step: int, config: config_lib.TrainConfig) -> bool:
    return step == config.steps or bool(config.checkpoint_every and step % config.checkpoint_every == 0)


def _logs_after(step: int, config: config_lib.TrainConfig) -> bool:
    """Whether the loop writes a metrics row once `step` steps are done (stats rows aside)."""
    return step % config.log_every == 0 or _eval_due(step, config) or _checkpoint_due(step, config)


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _fmt_stats(stats: dict[str, float]) -> str:
    return "[" + ", ".join(f"{k} {v:.3g}" for k, v in stats.items() if isinstance(v, (int, float)) and math.isfinite(v)) + "]"


if __name__ == "__main__":
    sys.exit(main())
