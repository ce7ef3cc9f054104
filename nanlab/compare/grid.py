"""The grid: scenarios x chains x seeds, validated (`make_grid`) and trained (`run_grid`).

`run_grid` groups each scenario's chains by clip structure and trains every group with
`runner.train_group` (one vmapped computation per group), then summarizes each cell against the
scenario's baseline `none`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from nanlab import config as config_lib
from nanlab import data as data_lib
from nanlab import losses, models, optim
from nanlab.compare.chains import Chain, chain_structure, parse_chains
from nanlab.compare.replicas import Problem
from nanlab.compare.runner import CellData, CellRun, diagnose_first_failure, train_group
from nanlab.compare.summary import per_seed_table, summarize_cell

__all__ = [
    "DEFAULT_CHAINS", "DEFAULT_SCENARIOS", "DEFAULT_SEEDS", "DEFAULT_STEPS", "Grid", "LAB_PRESET_OVERRIDES",
    "PASSED_FLAGS", "make_grid", "run_grid",
]

# high-lr trains with plain SGD, which is what makes it a clipping question: Adam divides each step
# by the gradient's running RMS, so clipping the gradient barely changes Adam's step (measured on
# this grid with Adam: no chain changed the outcome, and the baseline itself stayed finite for 20
# steps); with SGD a clip bounds the step to lr x threshold.
DEFAULT_SCENARIOS: tuple[str, ...] = ("high-lr",)
DEFAULT_CHAINS: tuple[str, ...] = (
    "none", "global_norm:1", "global_norm:10", "value:0.01", "agc:0.01", "skip", "global_norm:1+skip",
)
DEFAULT_SEEDS = 8
DEFAULT_STEPS = 20
# The lab's own defaults for train-CLI flags, per preset (on top of the train CLI's preset; the
# lab trains chains x seeds replicas at once, so each gets a smaller batch); explicit flags win.
LAB_PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    "cpu": {"batch_size": 8, "num_train": 512, "num_val": 128},
    "accelerator": {"batch_size": 32, "num_train": 4096, "num_val": 512},
}
# Train-CLI flags the lab passes through (flag dest -> TrainConfig field); unset ones keep the
# preset's and the scenario's values.
PASSED_FLAGS: tuple[str, ...] = (
    "preset", "width_multiplier", "image_size", "batch_size", "num_train", "num_val", "lr", "optimizer",
    "schedule", "warmup_steps", "weight_decay", "data", "normalize", "dtype",
)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A validated grid.

    Attributes:
      scenarios: scenario names, in order.
      chains: the chains, in order.
      seeds: the seeds (0 .. count-1).
      steps: training steps per seed.
      configs: scenario -> its TrainConfig (flags applied over the scenario's overrides).
    """

    scenarios: tuple[str, ...]
    chains: tuple[Chain, ...]
    seeds: tuple[int, ...]
    steps: int
    configs: dict[str, Any]


def make_grid(
    scenarios: Sequence[str],
    chains: Sequence[str],
    num_seeds: int,
    steps: int,
    overrides: dict[str, Any] | None = None,
) -> Grid:
    """Validates the grid and builds each scenario's TrainConfig.

    Args:
      scenarios: scenario names (nanlab.config.SCENARIOS); duplicates are an error.
      chains: chain specs (see `parse_chain`); duplicates are an error.
      num_seeds: how many seeds (>= 1); seeds are 0 .. num_seeds-1.
      steps: training steps per seed (>= 1).
      overrides: TrainConfig fields given as flags; they win over every scenario's overrides.

    Returns:
      The Grid.

    Raises:
      ValueError: one line naming the offending value.
    """
    if isinstance(num_seeds, bool) or not isinstance(num_seeds, int) or num_seeds < 1:
        raise ValueError(f"--seeds must be a whole number >= 1, got {num_seeds!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"--steps must be a whole number >= 1, got {steps!r}")
    if not scenarios:
        raise ValueError("--scenarios: need at least one scenario")
    for name in scenarios:
        if name not in config_lib.SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; choose from {', '.join(config_lib.SCENARIOS)}")
    if len(set(scenarios)) != len(scenarios):
        raise ValueError(f"duplicate scenario in {list(scenarios)}")
    parsed = parse_chains(chains)
    configs = {}
    for name in scenarios:
        try:
            configs[name] = config_lib.make_config({**(overrides or {}), "scenario": name, "steps": steps})
        except ValueError as error:
            raise ValueError(f"scenario {name!r}: {error}") from None
        if configs[name].batch_size > configs[name].num_train and configs[name].data.startswith("builtin"):
            raise ValueError(
                f"--batch-size {configs[name].batch_size} is larger than the training set ({configs[name].num_train})"
            )
    return Grid(tuple(scenarios), parsed, tuple(range(num_seeds)), steps, configs)


def _data_key(config) -> tuple:
    return (config.data, config.image_size, config.num_train, config.num_val, config.seed, config.input_scale,
            config.normalize)


def _plan(grid: Grid) -> list[tuple[str, Any, CellData, tuple[str, ...], list[Chain]]]:
    """The groups to train, in order: (scenario, its config, its data, clip structure, the chains).

    Scenarios with the same data settings share one loaded dataset.
    """
    datasets: dict[tuple, CellData] = {}
    plan = []
    for scenario in grid.scenarios:
        config = grid.configs[scenario]
        key = _data_key(config)
        if key not in datasets:
            dataset, _ = data_lib.load_for_config(config)
            datasets[key] = CellData(
                x_train=dataset.x_train, y_train=dataset.y_train, x_val=dataset.x_val, y_val=dataset.y_val,
                num_eval_train=min(len(dataset.x_train), len(dataset.x_val)),
            )
        structures: dict[tuple[str, ...], list[Chain]] = {}
        for chain in grid.chains:
            structures.setdefault(chain_structure(chain), []).append(chain)
        for structure, chains in structures.items():
            plan.append((scenario, config, datasets[key], structure, chains))
    return plan


def run_grid(
    grid: Grid,
    *,
    chunk_steps: int = 10,
    progress: bool = True,
    console=None,
    diagnose: bool = False,
    stop: Callable[[], bool] | None = None,
) -> tuple[list[dict[str, Any]], dict[tuple[str, Chain], CellRun], list[dict[str, Any]]]:
    """Trains the whole grid: per scenario, one vmapped computation per clip structure.

    Args:
      grid: a Grid from `make_grid`.
      chunk_steps: steps per scan chunk (progress granularity).
      diagnose: localize and diagnose each cell's first dead seed (`diagnose_first_failure`);
        the verdict goes to the row's "verdict" and the details to its per-seed entry.
      progress: show a rich progress bar.
      console: a rich Console to draw on (None: a new one on stderr).
      stop: asked after each group of cells (one scenario's clip structure, trained together);
        True ends the grid there, and only the finished cells get rows.

    Returns:
      (rows: one results row per cell, in grid order; runs: (scenario, chain) -> CellRun;
       per_seed: the per-seed table of every cell, with its "diagnosis" (None if none)).

    Raises:
      nanlab.config.BadInput: unreadable data or a batch larger than the data.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    plan = _plan(grid)
    total = sum(len(chains) * len(grid.seeds) * grid.steps for *_, chains in plan)
    runs: dict[tuple[str, Chain], CellRun] = {}
    diagnoses: dict[tuple[str, Chain], dict[str, Any] | None] = {}
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, disable=not progress, transient=False) as bar:
        task = bar.add_task("replica-steps", total=total)
        for scenario, config, data, structure, chains in plan:
            bar.update(task, description=f"{scenario}: {len(chains)} chains x {len(grid.seeds)} seeds")
            problem = Problem(
                model=models.build(config, data.y_train.shape[1]),
                loss_fn=losses.by_name(config.loss),
                structure=structure,
                optimizer=config.optimizer,
                schedule=optim.make_schedule(config.schedule, config.lr, config.steps, config.warmup_steps),
                weight_decay=config.weight_decay,
                batch_size=config.batch_size,
            )
            group = train_group(
                problem, data, chains, grid.seeds, grid.steps, chunk_steps=chunk_steps,
                on_steps=lambda n: bar.advance(task, n), keep_states=diagnose,
            )
            for chain, run in group.items():
                if diagnose:
                    bar.update(task, description=f"{scenario}: diagnosing {chain.label}")
                    diagnoses[(scenario, chain)] = diagnose_first_failure(problem, data, chain, run)
                    run = dataclasses.replace(run, final_states=None)  # the states served their purpose
                runs[(scenario, chain)] = run
            if stop is not None and stop():
                break

    rows, per_seed = [], []
    for scenario in grid.scenarios:
        baseline_chain = next((c for c in grid.chains if c.is_baseline), None)
        baseline = runs.get((scenario, baseline_chain))
        for chain in grid.chains:
            if (scenario, chain) not in runs:  # stopped before this cell trained
                continue
            run = runs[(scenario, chain)]
            row = summarize_cell(scenario, chain, run, None if chain.is_baseline else baseline)
            diagnosis = diagnoses.get((scenario, chain))
            row["verdict"] = diagnosis["verdict"] if diagnosis else ""
            rows.append(row)
            per_seed.append({"scenario": scenario, "chain": chain.label, "seeds": per_seed_table(chain, run),
                             "diagnosis": diagnosis})
    return rows, runs, per_seed
