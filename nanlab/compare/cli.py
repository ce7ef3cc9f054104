"""`python -m nanlab.compare`: the clipping lab's command line (flags -> grid -> run -> outputs)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax

from nanlab import _cli
from nanlab import config as config_lib
from nanlab.compare import grid as lab_grid
from nanlab.compare.grid import Grid, make_grid, run_grid
from nanlab.compare.report import OUTPUT_FILES, results_table, write_csv, write_plots, write_results_json
from nanlab.compare.summary import COLUMNS
from nanlab.config import BadInput
from nanlab.interrupts import StopOnSignal

__all__ = ["PROG", "build_parser", "check_workdir", "grid_from_args", "main"]

PROG = "nanlab.compare"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every flag's help states its default."""
    p = _cli.Parser(
        PROG,
        description="The clipping lab: train scenarios x gradient-processing chains x seeds (seeds and chains "
        "vmapped together) and compare every chain with the unclipped baseline 'none'.",
    )
    add = p.add_argument
    add("--scenarios", nargs="+", default=None,
        help="scenarios of the train CLI, space- or comma-separated (default: "
        f"{' '.join(lab_grid.DEFAULT_SCENARIOS)})")
    add("--chains", nargs="+", default=list(lab_grid.DEFAULT_CHAINS),
        help="chains, one per argument: a --clip spec of the train CLI (none, global_norm:X, value:X, agc:X, "
        "comma-joined parts), optionally suffixed '+skip' for the skip-nonfinite guard; 'skip' alone = no clip "
        f"+ guard (default: {' '.join(lab_grid.DEFAULT_CHAINS)})")
    add("--seeds", type=int, default=lab_grid.DEFAULT_SEEDS,
        help=f"number of seeds, 0..N-1 (default: {lab_grid.DEFAULT_SEEDS})")
    add("--steps", type=int, default=lab_grid.DEFAULT_STEPS,
        help=f"training steps per seed (default: {lab_grid.DEFAULT_STEPS})")
    add("--workdir", default="runs/compare", help="output folder (default: runs/compare)")
    add("--overwrite", action="store_true", help="replace results already in --workdir (default: off)")
    add("--chunk-steps", type=int, default=10,
        help="steps per chunk: one jitted scan, or on a CPU as many step calls (default: 10)")
    add("--diagnose", action="store_true",
        help="replay the first non-finite step of each cell's first dead seed through nanlab.trace and "
        "nanlab.diagnose: a 'verdict' per cell (default: off; each replay costs about one compilation "
        "of the step)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (default: on)")
    _add_train_flags(p.add_argument_group("train-CLI flags (default: the preset's and the scenario's values)"))
    return p


def _add_train_flags(group) -> None:
    """The train-CLI flags the lab passes through (`grid.PASSED_FLAGS`); choice lists from nanlab.config."""
    add = group.add_argument
    add("--preset", help=f"{' or '.join(config_lib.PRESETS)} (default: cpu on a CPU, accelerator otherwise)")
    add("--width-multiplier", type=float, help="InceptionV3 channel multiplier")
    add("--image-size", type=int, help=f"square input side, >= {config_lib.MIN_IMAGE_SIZE}")
    add("--batch-size", type=int, help="batch size per seed (default: 8 on the cpu preset, 32 on accelerator)")
    add("--num-train", type=int, help="training examples of the built-in data (default: 512 cpu, 4096 accelerator)")
    add("--num-val", type=int, help="validation examples of the built-in data (default: 128 cpu, 512 accelerator)")
    add("--lr", type=float, help="peak learning rate")
    add("--optimizer", help=", ".join(config_lib.OPTIMIZERS))
    add("--schedule", help=", ".join(config_lib.SCHEDULES))
    add("--warmup-steps", type=int, help="warmup of warmup-cosine")
    add("--weight-decay", type=float, help="weight decay")
    add("--data", help=f"{', '.join(config_lib.BUILTIN_DATA)}, an image folder or an .npz")
    add("--normalize", help=", ".join(config_lib.NORMALIZE_MODES))
    add("--dtype", help=", ".join(config_lib.DTYPES))


def _split_scenarios(values: Sequence[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def check_workdir(workdir: str, overwrite: bool) -> None:
    """Refuses an unwritable folder, or one holding results without `overwrite`.

    Raises:
      BadInput (a ValueError): one line naming the folder.
    """
    existing = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(workdir, name))]
    refusal = None
    if existing and not overwrite:
        refusal = f"--workdir {workdir} already holds results ({existing[0]}); pass --overwrite to replace them"
    _cli.check_workdir(Path(workdir), shown=f"--workdir {workdir}", noun="folder", refusal=refusal)


def grid_from_args(args: argparse.Namespace) -> tuple[Grid, dict[str, Any]]:
    """The grid the parsed flags ask for, and the train-CLI overrides behind it.

    Overrides stack as: the lab's preset defaults (`grid.LAB_PRESET_OVERRIDES`), then explicit flags.

    Raises:
      ValueError: see `make_grid`.
    """
    explicit = {name: getattr(args, name) for name in lab_grid.PASSED_FLAGS if getattr(args, name) is not None}
    preset = explicit.get("preset") or config_lib.default_preset()
    overrides = {**lab_grid.LAB_PRESET_OVERRIDES.get(preset, {}), **explicit}
    scenarios = list(lab_grid.DEFAULT_SCENARIOS) if args.scenarios is None else _split_scenarios(args.scenarios)
    return make_grid(scenarios, args.chains, args.seeds, args.steps, overrides), overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the lab from command-line arguments.

    Returns:
      0 on success, 2 on bad input (one line on stderr, nothing written), 130/143 when SIGINT/SIGTERM
      stopped the grid (the finished cells written).
    """
    from rich.console import Console

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        grid, overrides = grid_from_args(args)
        if args.chunk_steps < 1:
            raise ValueError(f"--chunk-steps must be >= 1, got {args.chunk_steps}")
        check_workdir(args.workdir, args.overwrite)
    except ValueError as error:
        return _cli.report_bad_input(PROG, error)

    started = time.perf_counter()
    # Ctrl-C/SIGTERM: finish the group of cells in flight, write what finished, exit 130/143.
    stop = StopOnSignal("stopping after the cells in training (press Ctrl-C again to abort)")
    try:
        with stop:
            rows, runs, per_seed = run_grid(grid, chunk_steps=args.chunk_steps, progress=args.progress,
                                            console=Console(stderr=True), diagnose=args.diagnose,
                                            stop=lambda: stop.requested)
    except BadInput as error:
        return _cli.report_bad_input(PROG, error)
    except KeyboardInterrupt:  # the second Ctrl-C
        print(f"{PROG}: aborted; nothing written", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - started
    _write_outputs(args.workdir, _command_line(argv), grid, overrides, seconds, rows, runs, per_seed)
    console = Console()
    console.print(results_table(rows, width=console.width))
    if stop.requested:
        print(f"{PROG}: {stop.name}: stopped after {len(rows)} of {len(grid.scenarios) * len(grid.chains)} "
              f"cells; the finished cells' results are in {args.workdir}/", file=sys.stderr)
        return stop.exit_code
    print(f"{len(rows)} cells, {len(grid.seeds)} seeds, {grid.steps} steps in {seconds:.0f} s; "
          f"results in {args.workdir}/ ({', '.join(OUTPUT_FILES)})")
    return _cli.EXIT_OK


def _command_line(argv: Sequence[str] | None) -> str:
    """The command as results.json records it."""
    command = "python -m nanlab.compare" + ("" if argv is None and len(sys.argv) < 2 else " ") + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    return command.rstrip()


def _write_outputs(workdir: str, command: str, grid: Grid, overrides: dict[str, Any], seconds: float,
                   rows, runs, per_seed) -> None:
    """results.csv, results.json and the plots into `workdir`."""
    write_csv(rows, os.path.join(workdir, "results.csv"))
    write_results_json(
        {
            "command": command,
            "grid": {
                "scenarios": list(grid.scenarios), "chains": [c.label for c in grid.chains],
                "seeds": list(grid.seeds), "steps": grid.steps, "flags": overrides,
                "configs": {name: config.to_dict() for name, config in grid.configs.items()},
            },
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "seconds": seconds,
            "columns": COLUMNS,
            "cells": rows,
            "per_seed": per_seed,
        },
        os.path.join(workdir, "results.json"),
    )
    # The plots draw every chain of a scenario: only scenarios whose cells all finished.
    finished = [s for s in grid.scenarios if all((s, c) in runs for c in grid.chains)]
    if finished:
        write_plots(finished, grid.chains, runs, [r for r in rows if r["scenario"] in finished], workdir)


if __name__ == "__main__":
    raise SystemExit(main())
