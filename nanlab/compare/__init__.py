"""The clipping lab: does clipping save a diverging run, which clipping, and what does it cost?

The lab trains a grid of scenarios x gradient-processing chains x seeds and compares every chain
with the unclipped baseline `none` of the same scenario, seed by seed (seed s of every chain has
the init, dropout keys and batches of `python -m nanlab.train --seed s`).

How it runs: per scenario, the chains are grouped by clip structure (`chains.chain_structure`);
each group's replicas, one per (chain, seed) pair, train together in ONE jitted computation, the
replica step vmapped over a leading replica axis (`replicas`, `runner`). Clip thresholds and the
skip flag are data of each replica, so `none`, `global_norm:1`, `agc:0.01,global_norm:5`, `skip`...
share one program. With several devices the replica axis is sharded over them; a replica that
goes non-finite without '+skip' keeps its last finite state and its first non-finite step is
recorded.

Modules, one concern each:

| module | its job |
| --- | --- |
| `chains` | chain specs (`parse_chain`) and chains as data of one program (`make_lab_tx`, the clip probe) |
| `replicas` | a replica's data and state, the masked per-replica step and eval |
| `runner` | `train_group`: one vmapped (or sharded) computation per group; `diagnose_first_failure` |
| `summary` | per-seed outcomes and one results row per cell (`COLUMNS`), deltas against the baseline |
| `report` | results.csv, results.json, the plots, the terminal table |
| `grid` | the grid: validation (`make_grid`), defaults, `run_grid` |
| `cli` | `python -m nanlab.compare` (`__main__` runs it); nothing else imports it |

This package re-exports the library names of those modules (not the CLI's).
"""

from nanlab.compare.chains import (
    CANONICAL_STRUCTURE,
    SKIP_MARKER,
    Chain,
    ClipProbeState,
    chain_structure,
    chain_thresholds,
    find_probe_state,
    make_lab_tx,
    parse_chain,
    parse_chains,
    probe_clip,
)
from nanlab.compare.grid import (
    DEFAULT_CHAINS,
    DEFAULT_SCENARIOS,
    DEFAULT_SEEDS,
    DEFAULT_STEPS,
    LAB_PRESET_OVERRIDES,
    PASSED_FLAGS,
    Grid,
    make_grid,
    run_grid,
)
from nanlab.compare.replicas import (
    Problem,
    Replica,
    ReplicaState,
    StepRecord,
    init_replica,
    make_eval_fn,
    make_replica_step,
    replica_train_step,
    replicas_of,
)
from nanlab.compare.report import OUTPUT_FILES, results_table, write_csv, write_plots, write_results_json
from nanlab.compare.runner import (
    CellData,
    CellRun,
    batch_indices,
    chunk_lengths,
    diagnose_first_failure,
    replica_mesh,
    train_group,
)
from nanlab.compare.summary import COLUMNS, per_seed_table, seed_outcomes, summarize_cell

__all__ = [
    "CANONICAL_STRUCTURE", "COLUMNS", "CellData", "CellRun", "Chain", "ClipProbeState", "DEFAULT_CHAINS",
    "DEFAULT_SCENARIOS", "DEFAULT_SEEDS", "DEFAULT_STEPS", "Grid", "LAB_PRESET_OVERRIDES", "OUTPUT_FILES",
    "PASSED_FLAGS", "Problem", "Replica", "ReplicaState", "SKIP_MARKER", "StepRecord", "batch_indices",
    "chain_structure", "chain_thresholds", "chunk_lengths", "diagnose_first_failure", "find_probe_state",
    "init_replica", "make_eval_fn", "make_grid", "make_lab_tx", "make_replica_step", "parse_chain",
    "parse_chains", "per_seed_table", "probe_clip", "replica_mesh", "replica_train_step", "replicas_of",
    "results_table", "run_grid", "seed_outcomes", "summarize_cell", "train_group", "write_csv", "write_plots",
    "write_results_json",
]
