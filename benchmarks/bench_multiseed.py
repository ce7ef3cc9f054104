"""Vmapped seeds against the same seeds one after another, in the same process.

    python benchmarks/bench_multiseed.py [--seeds 8] [--steps 10] [--width-multiplier 0.25]
        [--batch-size 32] [--image-size 75] [--repeats 2]

Both sides train the same replicas (chain 'none', seeds 0..N-1) of the train CLI's small (cpu)
preset InceptionV3 on the built-in data with nanlab.compare.train_group: once vmapped over the
seed axis (one jitted computation), once with the unvmapped step, seed after seed (compiled once,
reused). Each side runs cold first (compilation included) and then `--repeats` times warm
(compiled code cached); the warm runs are interleaved (vmapped, sequential, vmapped, ...) so that
load on a shared machine hits both alike. Prints both times and the ratio sequential / vmapped;
the goal is >= 3x for 8 seeds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from nanlab import compare
from nanlab import config as config_lib
from nanlab import optim
from nanlab import train as train_lib


def build(args: argparse.Namespace) -> tuple[compare.Problem, compare.CellData]:
    """The small-preset problem and its data."""
    config = config_lib.make_config({
        "preset": "cpu", "steps": args.steps, "batch_size": args.batch_size, "image_size": args.image_size,
        "width_multiplier": args.width_multiplier, "num_train": 512, "num_val": 128,
    })
    dataset, _ = train_lib.load_data(config)
    data = compare.CellData(dataset.x_train, dataset.y_train, dataset.x_val, dataset.y_val, num_eval_train=128)
    problem = compare.Problem(
        model=train_lib.build_model(config, dataset.y_train.shape[1]),
        loss_fn=train_lib.build_loss(config),
        structure=compare.CANONICAL_STRUCTURE,
        optimizer=config.optimizer,
        schedule=optim.make_schedule(config.schedule, config.lr, config.steps, config.warmup_steps),
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
    )
    return problem, data


def timed(problem, data, seeds, steps, vmapped) -> tuple[float, compare.CellRun]:
    """Wall seconds of one train_group call, and its run."""
    chain = compare.parse_chain("none")
    started = time.perf_counter()
    run = compare.train_group(problem, data, [chain], seeds, steps, vmapped=vmapped, chunk_steps=steps)[chain]
    return time.perf_counter() - started, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--width-multiplier", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=75)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    problem, data = build(args)
    seeds = list(range(args.seeds))
    print(f"backend {jax.default_backend()}, {jax.device_count()} device(s); InceptionV3 width "
          f"{args.width_multiplier}, {args.image_size}x{args.image_size}, batch {args.batch_size}/seed, "
          f"{args.seeds} seeds x {args.steps} steps")
    cold_v, run_v = timed(problem, data, seeds, args.steps, vmapped=True)
    cold_s, run_s = timed(problem, data, seeds, args.steps, vmapped=False)
    # Step 0 runs the same parameters on the same batch: only rounding differs (batched against
    # plain kernels). Later steps compound it: Adam turns tiny gradient differences into full-size
    # updates where gradients are near 0, so trajectories drift apart after a few steps.
    first_step = abs(run_v.loss[0] - run_s.loss[0]).max() / abs(run_s.loss[0]).max()
    every_step = abs(run_v.loss - run_s.loss).max()
    print(f"cold (compilation included): vmapped {cold_v:.1f} s, sequential {cold_s:.1f} s, "
          f"ratio {cold_s / cold_v:.2f}x")
    warm_v, warm_s = [], []
    for _ in range(args.repeats):
        warm_v.append(timed(problem, data, seeds, args.steps, vmapped=True)[0])
        warm_s.append(timed(problem, data, seeds, args.steps, vmapped=False)[0])
    med_v, med_s = statistics.median(warm_v), statistics.median(warm_s)
    print(f"warm (median of {args.repeats}): vmapped {med_v:.1f} s, sequential {med_s:.1f} s, "
          f"ratio {med_s / med_v:.2f}x")
    print(f"vmapped vs sequential loss: step 0 max relative difference {first_step:.2e}; "
          f"max |difference| over all steps and seeds {every_step:.2e}")


if __name__ == "__main__":
    main()
