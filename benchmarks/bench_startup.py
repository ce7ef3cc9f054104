"""Start-up of the main job: compile seconds by program, time to the first step, wall against training.

Run from the repository root:

    python benchmarks/bench_startup.py                  # the README's main job, cold then warm cache
    python benchmarks/bench_startup.py --quick          # the 3-conv model, a short run (a smoke check)
    python benchmarks/bench_startup.py -- --steps 50    # flags after -- go to python -m nanlab.train

Each run is a fresh process of `python -m nanlab.train` (its own workdir under a temporary folder)
whose JAX compilation events are recorded (`jax.monitoring`). Two pairs of runs, all in this
invocation:

- `--steps 1 --log-every 1`: launch to exit of a one-step run, and launch to its first metrics row
  (the first finished step: the time a user waits to see training start);
- the full run: its wall time, and its pure training time (steps x the median steady-state step
  time from metrics.jsonl, the first logged interval left out as it holds compilation).

Each pair runs first with an empty persistent compilation cache (cold) and then again with the
cache the cold run filled (warm). The figures printed are the seconds, the wall / training ratio,
and the compile seconds per program (XLA's backend compile time, by jitted function name).
Goals (issue 17, on this CPU): first step <= 25 s cold and <= 8 s warm; warm wall <= 2x training.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nanlab.machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent

# The process under test: the train CLI, with JAX's compile events and the wall-clock time of its
# first metrics row (written after the host has read the first logged step's results, so with
# --log-every 1 it marks the first finished step) saved to a file at exit.
_WRAPPER = r"""
import atexit, json, sys, time
import jax
events = {"compiles": [], "first_row": None}
jax.monitoring.register_event_duration_secs_listener(
    lambda name, seconds, **kw: events["compiles"].append((name, seconds, kw.get("fun_name", ""))))
atexit.register(lambda: json.dump(events, open(sys.argv[1], "w")))
import nanlab.train as train
row = train._metrics_row
def first_row(*args, **kwargs):
    if events["first_row"] is None:
        events["first_row"] = time.time()
    return row(*args, **kwargs)
train._metrics_row = first_row
sys.exit(train.main(sys.argv[2:]))
"""
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
QUICK_FLAGS = ["--model", "small_cnn", "--width-multiplier", "1.0", "--num-train", "256", "--num-val", "64",
               "--batch-size", "16", "--steps", "40", "--log-every", "10"]


def run_train(flags: list[str], cache: Path | None, workdir: Path) -> dict:
    """One `python -m nanlab.train` process; its wall time, exit code and compile events."""
    events_file = workdir.with_suffix(".events.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    if cache is not None:
        env["NANLAB_COMPILE_CACHE"] = str(cache)  # the train CLI's own switch
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)  # and JAX's, for a CLI that predates it
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    else:
        env["NANLAB_COMPILE_CACHE"] = "off"
    command = [sys.executable, "-c", _WRAPPER, str(events_file), *flags, "--workdir", str(workdir),
               "--no-progress"]
    launched = time.time()  # wall clock: the child's first-row time is on the same clock
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bench_startup: the run failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    events = json.loads(events_file.read_text()) if events_file.exists() else {"compiles": [], "first_row": None}
    compiles = collections.Counter()
    for name, seconds, fun in events["compiles"]:
        if name == COMPILE_EVENT:
            compiles[fun] += seconds
    first = events["first_row"] - launched if events["first_row"] is not None else float("nan")
    return {"wall": wall, "compiles": compiles, "workdir": workdir, "first_step": first}


def training_seconds(workdir: Path) -> float:
    """Steps x the median steady-state step time (from images/s of the logged rows after the first)."""
    config = json.loads((workdir / "config.json").read_text())
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rates = [r["images_per_s"] for r in rows[1:] if r.get("images_per_s")]
    if not rates:
        return float("nan")
    return config["steps"] * config["batch_size"] / statistics.median(rates)


def compile_table(runs: dict[str, dict], top: int) -> list[str]:
    names = collections.Counter()
    for run in runs.values():
        names.update(run["compiles"])
    lines = ["| program | " + " | ".join(runs) + " |", "| --- |" + " --- |" * len(runs)]
    for name, _ in names.most_common(top):
        lines.append(f"| `{name}` | " + " | ".join(f"{run['compiles'].get(name, 0.0):.2f}" for run in runs.values()) + " |")
    lines.append("| **all programs** | " + " | ".join(f"{sum(run['compiles'].values()):.2f}" for run in runs.values())
                 + " |")
    lines.append("| programs compiled | " + " | ".join(str(len(run['compiles'])) for run in runs.values()) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 3-conv model, 40 steps")
    parser.add_argument("--top", type=int, default=12, help="programs shown in the compile table")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(own)
    flags = (QUICK_FLAGS if args.quick else []) + extra
    one_step = [f for f in flags]
    if "--steps" in one_step:
        i = one_step.index("--steps")
        del one_step[i:i + 2]
    one_step += ["--steps", "1", "--log-every", "1"]

    import jax

    header = (f"{cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__}, Python {platform.python_version()}; "
              f"train flags: {' '.join(flags) or '(the defaults: the README main job)'}")
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="nanlab-startup-") as tmp:
        tmp = Path(tmp)
        runs: dict[str, dict] = {}
        for label, cache_dir, run_flags in (
            ("1 step, cold", tmp / "cache", one_step),
            ("1 step, warm", tmp / "cache", one_step),
            ("full, cold", tmp / "cache-full", flags),
            ("full, warm", tmp / "cache-full", flags),
            ("full, no cache", None, flags),
        ):
            run = run_train(run_flags, cache_dir, tmp / label.replace(" ", "").replace(",", "-"))
            runs[label] = run
            print(f"{label:16s} {run['wall']:6.1f} s wall, first row {run['first_step']:6.1f} s after launch, "
                  f"{sum(run['compiles'].values()):6.1f} s compiling ({len(run['compiles'])} programs)", flush=True)
        training = {label: training_seconds(run["workdir"]) for label, run in runs.items() if label.startswith("full")}
        lines = [f"# Start-up of `python -m nanlab.train`", "", f"`python benchmarks/bench_startup.py "
                 f"{' '.join(argv)}`".replace("  ", " "), "", header, "",
                 "| run | wall s | first step done, s after launch | training s | wall / training |",
                 "| --- | --- | --- | --- | --- |"]
        for label, run in runs.items():
            train_s = training.get(label, float("nan"))
            ratio = run["wall"] / train_s if train_s == train_s else float("nan")
            # In the full runs the first row comes after the first --log-every steps, not after one.
            first = f"{run['first_step']:.1f}" if label.startswith("1 step") else "—"
            lines.append(f"| {label} | {run['wall']:.1f} | {first} | {train_s:.1f} | {ratio:.2f} |")
        lines += ["", "Compile seconds by program (XLA backend compile; a cache hit compiles nothing):", ""]
        lines += compile_table(runs, args.top)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
