"""One command that checks nanlab on an accelerator end to end and records what it measured.

Run from the repository root on a GPU/TPU host (about 8 minutes on one GPU):

    python benchmarks/accelerator_check.py                 # writes benchmarks/results/accelerator.md
    python benchmarks/accelerator_check.py --cpu-dry-run   # every part at tiny sizes on the CPU

Parts, each in its own process (a crash or a hang in one is recorded and the next still runs):

1. `peak`: the device's bf16 matmul rate, measured here (the denominator of every FLOP share).
2. `throughput`: the accelerator preset's training (`python -m nanlab.train --preset accelerator`):
   images/s from metrics.jsonl, and achieved FLOP/s as a share of the measured peak (XLA's cost
   analysis of one forward pass, times 3 for forward + backward).
3. `bench_model`: `benchmarks/bench_model.py --full` (nanlab against Keras 3 on JAX).
4. `sentinel`: `benchmarks/bench_sentinel.py` at full size, the sentinel's cost against a plain step.
5. `debug_nans`: the `naive-loss` scenario with `--debug-nans`: exit 3, the verdict, the localization time.
6. `unscaled_bf16`: the `unscaled-inputs` scenario in bfloat16 (its documented outcome: BatchNorm
   absorbs the scale in a wide-range dtype, so the run stays finite).
7. `compare`: a short `python -m nanlab.compare --preset accelerator` grid.
8. `multiseed`: `benchmarks/bench_multiseed.py` at 8 seeds (goal on a GPU: vmapped >= 3x sequential).

`--cpu-dry-run` runs the same parts with tiny sizes and writes nothing under benchmarks/results
unless `--out` says where; it exits 0 when every part ran and 1 otherwise. The test suite runs it,
so the script cannot rot while no accelerator is at hand.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "accelerator.md"
TAIL_LINES = 25  # lines of each part's output kept in the record


@dataclasses.dataclass
class Part:
    """One check: a command per mode and a reader that turns its run folder into headline figures."""

    name: str
    what: str
    full: list[str]
    dry: list[str]
    timeout_s: int
    read: Callable[[Path, str], dict] | None = None


@dataclasses.dataclass
class Outcome:
    name: str
    ok: bool
    seconds: float
    figures: dict
    tail: str


# ------------------------------------------------------------------------------------------ readers


def read_metrics_throughput(workdir: Path, _: str) -> dict:
    """Median images/s over the logged rows after the first (which holds compilation)."""
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = sorted(r["images_per_s"] for r in rows[1:] if r.get("images_per_s"))
    if not rates:
        raise ValueError("no timed rows in metrics.jsonl")
    config = json.loads((workdir / "config.json").read_text())
    return {"images_per_s": rates[len(rates) // 2], "config": config}


def read_report(workdir: Path, _: str) -> dict:
    report = json.loads((workdir / "report.json").read_text())
    return {"failed_step": report["step"], "verdict": report["verdict"]["cause"],
            "cause": report["report"]["cause"], "localize_s": round(report["report"]["seconds"], 1)}


def read_summary(workdir: Path, _: str) -> dict:
    summary = json.loads((workdir / "summary.json").read_text())
    keys = ("status", "steps", "final_loss", "val_accuracy", "wall_s")
    return {k: summary[k] for k in keys if k in summary}


def read_peak(_: Path, output: str) -> dict:
    line = next(l for l in output.splitlines() if l.startswith("peak "))
    return {"bf16_matmul_tflops": float(line.split()[1])}


# ------------------------------------------------------------------------------------------- parts

_PEAK_PROGRAM = r"""
import sys, time
import jax, jax.numpy as jnp
n = int(sys.argv[1])
a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
mm = jax.jit(lambda a, b: a @ b)
mm(a, b).block_until_ready()
times = []
for _ in range(10):
    start = time.perf_counter(); mm(a, b).block_until_ready(); times.append(time.perf_counter() - start)
best = min(times)
print(f"peak {2 * n ** 3 / best / 1e12:.4g} TFLOP/s bf16 ({n}x{n} matmul, best of 10: {best * 1e3:.2f} ms, "
      f"{jax.devices()[0].device_kind})")
"""

_TRAIN = [sys.executable, "-m", "nanlab.train", "--no-progress", "--no-plots", "--checkpoint-every", "0"]
# The dry run trains the 3-conv model: InceptionV3 would spend the minutes on CPU compilation.
_TINY_TRAIN = ["--model", "small_cnn", "--width-multiplier", "1.0", "--image-size", "75", "--batch-size", "8",
               "--num-train", "64", "--num-val", "16", "--eval-every", "0"]


def parts(workdir: Path) -> list[Part]:
    w = lambda name: str(workdir / name)  # noqa: E731
    return [
        Part("peak", "bf16 matmul rate of the device", [sys.executable, "-c", _PEAK_PROGRAM, "8192"],
             [sys.executable, "-c", _PEAK_PROGRAM, "256"], 120, read_peak),
        Part("throughput", "accelerator preset training (images/s, FLOP share)",
             _TRAIN + ["--preset", "accelerator", "--steps", "300", "--log-every", "50", "--eval-every", "0",
                       "--workdir", w("throughput")],
             _TRAIN + ["--preset", "accelerator", *_TINY_TRAIN, "--steps", "6", "--log-every", "2",
                       "--workdir", w("throughput")], 300, read_metrics_throughput),
        Part("bench_model", "bench_model.py --full (nanlab vs Keras 3 on JAX)",
             [sys.executable, "benchmarks/bench_model.py", "--full", "--steps", "5"],
             [sys.executable, "benchmarks/bench_model.py", "--quick", "--steps", "1", "--warmup", "0", "--no-keras",
              "--impls", "xla", "--image-size", "75", "--batch", "2"], 300),
        Part("sentinel", "the sentinel's cost against a plain step",
             [sys.executable, "benchmarks/bench_sentinel.py", "--width", "1.0", "--image-size", "299", "--batch",
              "64", "--rounds", "40", "--variants", "sentinel,jax_debug_nans", "--no-localize"],
             [sys.executable, "benchmarks/bench_sentinel.py", "--quick", "--rounds", "2", "--batch", "2",
              "--variants", "sentinel", "--no-localize"], 300),
        Part("debug_nans", "naive-loss with --debug-nans: report, verdict, localization time",
             _TRAIN + ["--preset", "accelerator", "--scenario", "naive-loss", "--debug-nans", "--steps", "100",
                       "--log-every", "10", "--workdir", w("debug_nans")],
             _TRAIN + ["--scenario", "naive-loss", "--debug-nans", *_TINY_TRAIN, "--steps", "20", "--log-every",
                       "5", "--workdir", w("debug_nans")], 300, read_report),
        Part("unscaled_bf16", "unscaled-inputs in bfloat16",
             _TRAIN + ["--preset", "accelerator", "--scenario", "unscaled-inputs", "--dtype", "bfloat16",
                       "--steps", "100", "--log-every", "10", "--workdir", w("unscaled_bf16")],
             _TRAIN + ["--scenario", "unscaled-inputs", "--dtype", "bfloat16", *_TINY_TRAIN, "--steps", "6",
                       "--log-every", "2", "--workdir", w("unscaled_bf16")], 300, read_summary),
        Part("compare", "a short clipping-lab grid at the accelerator preset",
             [sys.executable, "-m", "nanlab.compare", "--preset", "accelerator", "--scenarios", "high-lr",
              "--chains", "none", "global_norm:1", "skip", "--seeds", "4", "--steps", "20", "--no-progress",
              "--workdir", w("compare")],
             [sys.executable, "-m", "nanlab.compare", "--scenarios", "high-lr", "--chains", "none", "global_norm:1",
              "--seeds", "2", "--steps", "2", "--chunk-steps", "2", "--width-multiplier", "0.125", "--image-size",
              "75", "--batch-size", "2", "--num-train", "16", "--num-val", "8", "--no-progress",
              "--workdir", w("compare")], 300),
        Part("multiseed", "vmapped seeds against sequential (goal on a GPU: >= 3x at 8 seeds)",
             [sys.executable, "benchmarks/bench_multiseed.py", "--seeds", "8", "--steps", "10",
              "--width-multiplier", "1.0", "--image-size", "299", "--batch-size", "32"],
             [sys.executable, "benchmarks/bench_multiseed.py", "--seeds", "2", "--steps", "2",
              "--width-multiplier", "0.125", "--batch-size", "2", "--repeats", "1"], 300),
    ]


# ------------------------------------------------------------------------------------------ running


def run_part(part: Part, dry: bool, workdir: Path) -> Outcome:
    command = part.dry if dry else part.full
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=part.timeout_s)
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        output += f"\n(timed out after {part.timeout_s} s)"
        code = None
    seconds = time.perf_counter() - start
    # A scenario that is meant to fail exits 3 with its report: that is the part working.
    ok = code == 0 or (code == 3 and part.read is read_report)
    figures: dict = {}
    if ok and part.read is not None:
        try:
            figures = part.read(workdir / part.name, output)
        except (OSError, ValueError, KeyError, StopIteration) as error:
            ok, figures = False, {"error": f"{type(error).__name__}: {error}"}
    if code is not None and not ok and "error" not in figures:
        figures["exit"] = code
    tail = "\n".join(output.strip().splitlines()[-TAIL_LINES:])
    return Outcome(part.name, ok, seconds, figures, tail)


def forward_flops_per_image(config: dict) -> float | None:
    """XLA's FLOP count of one forward pass of the configured model, per image (None if unknown)."""
    import jax
    import jax.numpy as jnp

    from nanlab.models.inception_v3 import InceptionV3, abstract_variables

    if config.get("model", "inception_v3") != "inception_v3":
        return None
    size = config["image_size"]
    model = InceptionV3(num_classes=1, width_multiplier=config["width_multiplier"],
                        dtype=jnp.dtype(config["dtype"]))
    variables = abstract_variables(model, (size, size, 3))
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    compiled = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, x).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and "flops" in cost else None


def add_flop_share(outcomes: dict[str, Outcome]) -> None:
    """Achieved train FLOP/s of the throughput part, and its share of the measured bf16 peak."""
    throughput, peak = outcomes.get("throughput"), outcomes.get("peak")
    if not (throughput and throughput.ok):
        return
    config = throughput.figures.pop("config")
    flops = forward_flops_per_image(config)
    if flops is None:
        throughput.figures["flop_share"] = "n/a (model without a FLOP count)"
        return
    achieved = 3 * flops * throughput.figures["images_per_s"]  # forward + backward ~ 3 forwards
    throughput.figures["train_tflops"] = round(achieved / 1e12, 3)
    if peak and peak.ok:
        throughput.figures["share_of_bf16_peak"] = round(achieved / 1e12 / peak.figures["bf16_matmul_tflops"], 3)


def environment() -> str:
    import jax

    device = jax.devices()[0]
    return (f"{getattr(device, 'device_kind', device.platform)} x{jax.device_count()} "
            f"({jax.default_backend()}), jax {jax.__version__}, Python {platform.python_version()}, "
            f"host {platform.processor() or platform.machine()}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")


def markdown(outcomes: list[Outcome], dry: bool, command: str) -> str:
    lines = [f"# Accelerator check{' (CPU dry run)' if dry else ''}", "", f"`{command}`", "", environment(), "",
             "| part | ran | seconds | figures |", "| --- | --- | --- | --- |"]
    for o in outcomes:
        lines.append(f"| {o.name} | {'yes' if o.ok else 'FAILED'} | {o.seconds:.0f} | "
                     f"{json.dumps(o.figures, sort_keys=True)} |")
    for o in outcomes:
        lines += ["", f"## {o.name}", "", "```", o.tail, "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="every part at tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the markdown record (default: {RESULTS.relative_to(ROOT)}; none for a dry run)")
    parser.add_argument("--only", default="", help="comma-separated subset of the parts")
    args = parser.parse_args(argv)
    dry = args.cpu_dry_run
    if dry:
        os.environ["JAX_PLATFORMS"] = "cpu"  # the subprocesses too
    out = args.out if args.out is not None else (None if dry else RESULTS)
    if out is not None and out.exists() and out.is_dir():
        print(f"accelerator_check: --out {out} is a directory", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="nanlab-accel-") as tmp:
        selected = parts(Path(tmp))
        names = [p.name for p in selected]
        wanted = [n for n in args.only.split(",") if n] or names
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            print(f"accelerator_check: unknown part {unknown[0]!r}; choose from {', '.join(names)}", file=sys.stderr)
            return 2
        outcomes: dict[str, Outcome] = {}
        for part in selected:
            if part.name not in wanted:
                continue
            print(f"[{part.name}] {part.what} ...", flush=True)
            outcomes[part.name] = run_part(part, dry, Path(tmp))
            o = outcomes[part.name]
            print(f"[{part.name}] {'ok' if o.ok else 'FAILED'} in {o.seconds:.0f} s {json.dumps(o.figures, default=str)[:300]}",
                  flush=True)
        add_flop_share(outcomes)
    text = markdown(list(outcomes.values()), dry, " ".join(["python", "benchmarks/accelerator_check.py", *(argv or sys.argv[1:])]))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    failed = [o.name for o in outcomes.values() if not o.ok]
    print(f"accelerator_check: {len(outcomes) - len(failed)} of {len(outcomes)} parts ran"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
