"""Vmapped seeds against the same seeds one after another, in the same process.

    python benchmarks/bench_multiseed.py [--seeds 8] [--steps 10] [--width-multiplier 0.25]
        [--batch-size 8] [--image-size 75] [--repeats 2]

Both sides train the same replicas (chain 'none', seeds 0..N-1) of the train CLI's small (cpu)
preset InceptionV3 on the built-in data with nanlab.compare.train_group: once vmapped over the
seed axis (one jitted computation), once with the unvmapped step, seed after seed (compiled once,
reused). Three measurements, all warm runs interleaved (vmapped, sequential, ...) so that load
on a shared machine hits both alike:

1. whole grid: `--steps` steps, initialisation and final evaluation included; cold (compilation
   included) and warm. The goal is >= 3x for 8 seeds.
2. training alone: seconds per replica-step, from the difference of a 2-step and a
   (2 + `--steps`)-step run (the difference cancels initialisation and evaluation).
3. the ceiling: what any seed axis could gain on this machine. One replica trains at batch
   N x batch-size with ONE set of weights, against N steps at batch-size: the same FLOPs as
   the vmapped step in the largest kernels the batch allows. Vmapped replicas (a weight set each)
   run the same FLOPs in kernels no larger, so N x t(batch) / t(N x batch) bounds their speed-up.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax

from nanlab import compare
from nanlab import config as config_lib
from nanlab import models, optim
from nanlab import data as data_lib
from nanlab import losses


def build(args: argparse.Namespace) -> tuple[compare.Problem, compare.CellData]:
    """The small-preset problem and its data."""
    config = config_lib.make_config({
        "preset": "cpu", "steps": args.steps, "batch_size": args.batch_size, "image_size": args.image_size,
        "width_multiplier": args.width_multiplier, "num_train": 512, "num_val": 128,
    })
    dataset, _ = data_lib.load_for_config(config)
    data = compare.CellData(dataset.x_train, dataset.y_train, dataset.x_val, dataset.y_val, num_eval_train=128)
    problem = compare.Problem(
        model=models.build(config, dataset.y_train.shape[1]),
        loss_fn=losses.by_name(config.loss),
        structure=compare.CANONICAL_STRUCTURE,
        optimizer=config.optimizer,
        schedule=optim.make_schedule(config.schedule, config.lr, config.steps, config.warmup_steps),
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
    )
    return problem, data


CHUNK = 2  # steps per scan: every run below reuses one compiled chunk per side


def timed(problem, data, seeds, steps, vmapped) -> tuple[float, compare.CellRun]:
    """Wall seconds of one train_group call, and its run."""
    chain = compare.parse_chain("none")
    started = time.perf_counter()
    run = compare.train_group(problem, data, [chain], seeds, steps, vmapped=vmapped, chunk_steps=CHUNK)[chain]
    return time.perf_counter() - started, run


def per_replica_step(problem, data, seeds, steps, vmapped) -> float:
    """Seconds per replica-step of training alone (warm): (t(CHUNK + steps) - t(CHUNK)) / (steps x replicas)."""
    short = timed(problem, data, seeds, CHUNK, vmapped)[0]
    long = timed(problem, data, seeds, CHUNK + steps, vmapped)[0]
    return (long - short) / (steps * len(seeds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width-multiplier", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.steps % CHUNK:
        parser.error(f"--steps must be a multiple of {CHUNK}, got {args.steps}")
    problem, data = build(args)
    seeds = list(range(args.seeds))
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); InceptionV3 width "
          f"{args.width_multiplier}, {args.image_size}x{args.image_size}, batch {args.batch_size}/seed, "
          f"{args.seeds} seeds x {args.steps} steps", flush=True)
    cold_v, run_v = timed(problem, data, seeds, args.steps, vmapped=True)
    cold_s, run_s = timed(problem, data, seeds, args.steps, vmapped=False)
    # Step 0 runs the same parameters on the same batch: only rounding differs (batched against
    # plain kernels). Later steps compound it: Adam turns tiny gradient differences into full-size
    # updates where gradients are near 0, so trajectories drift apart after a few steps.
    first_step = abs(run_v.loss[0] - run_s.loss[0]).max() / abs(run_s.loss[0]).max()
    every_step = abs(run_v.loss - run_s.loss).max()
    print(f"1. whole grid, cold (compilation included): vmapped {cold_v:.1f} s, sequential {cold_s:.1f} s, "
          f"ratio {cold_s / cold_v:.2f}x", flush=True)
    warm_v, warm_s, step_v, step_s = [], [], [], []
    for _ in range(args.repeats):
        warm_v.append(timed(problem, data, seeds, args.steps, vmapped=True)[0])
        warm_s.append(timed(problem, data, seeds, args.steps, vmapped=False)[0])
        step_v.append(per_replica_step(problem, data, seeds, args.steps, vmapped=True))
        step_s.append(per_replica_step(problem, data, seeds, args.steps, vmapped=False))
    med_v, med_s = statistics.median(warm_v), statistics.median(warm_s)
    print(f"1. whole grid, warm (median of {args.repeats}): vmapped {med_v:.1f} s, sequential {med_s:.1f} s, "
          f"ratio {med_s / med_v:.2f}x")
    med_v, med_s = statistics.median(step_v), statistics.median(step_s)
    print(f"2. training alone, per replica-step: vmapped {1e3 * med_v:.1f} ms, sequential {1e3 * med_s:.1f} ms, "
          f"ratio {med_s / med_v:.2f}x", flush=True)
    wide = dataclasses.replace(problem, batch_size=args.batch_size * args.seeds)
    timed(wide, data, [0], CHUNK, vmapped=False)  # compile the wide step outside the timing
    narrow_t, wide_t = [], []
    for _ in range(args.repeats):
        narrow_t.append(per_replica_step(problem, data, [0], args.steps, vmapped=False))
        wide_t.append(per_replica_step(wide, data, [0], args.steps, vmapped=False))
    narrow, wide_step = statistics.median(narrow_t), statistics.median(wide_t)
    print(f"3. ceiling: one step at batch {args.batch_size} {1e3 * narrow:.1f} ms, at batch "
          f"{args.batch_size * args.seeds} (one weight set) {1e3 * wide_step:.1f} ms; a seed axis can gain "
          f"at most {args.seeds * narrow / wide_step:.2f}x here")
    print(f"vmapped vs sequential loss: step 0 max relative difference {first_step:.2e}; "
          f"max |difference| over all steps and seeds {every_step:.2e}")


if __name__ == "__main__":
    main()
