"""The runner: trains a group of replicas (chains x seeds of one clip structure) in one jitted computation.

`train_group` vmaps the replica step over a leading replica axis (sharded over the local devices
when `replica_mesh` allows), runs the steps in chunks (one `lax.scan` per chunk on GPU/TPU, one
asynchronous call per step on a CPU), evaluates every final state and returns a `CellRun` per
chain. `diagnose_first_failure` replays a cell's first dead seed with the guard's replay
(`nanlab.guard.replay_failure`: nanlab.trace, then nanlab.diagnose).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nanlab.compare.chains import Chain, chain_structure, chain_thresholds
from nanlab.compile_cache import RUN_ONCE_OPTIONS
from nanlab.compare.replicas import Problem, StepRecord, init_replica, make_eval_fn, make_replica_step
from nanlab.compare.replicas import replica_train_step, replicas_of
from nanlab.data import batch_at

__all__ = [
    "CellData", "CellRun", "batch_indices", "chunk_lengths", "diagnose_first_failure", "replica_mesh",
    "train_group",
]

@dataclasses.dataclass(frozen=True)
class CellData:
    """The arrays a cell trains and evaluates on (already normalized).

    Attributes:
      x_train, y_train: training inputs (N, H, W, C) and labels (N, K).
      x_val, y_val: validation inputs and labels.
      num_eval_train: how many leading training examples the final train metrics use.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_eval_train: int


@dataclasses.dataclass(frozen=True)
class CellRun:
    """What the seeds of one (scenario, chain) cell produced; numpy, seeds on the last axis.

    Attributes:
      seeds: (S,) the seeds.
      loss, accuracy, grad_norm: (steps, S) float per step (meaningless where not `ran`).
      finite, clip_active, ran: (steps, S) bool per step.
      final_train_loss, final_train_accuracy, final_val_loss, final_val_accuracy: (S,) floats,
        inference-mode metrics of each seed's final state (its last finite state if it died).
      seconds: wall time of the computation that trained the cell (compilation included; shared
        by all cells trained in the same group).
      final_states: each seed's final ReplicaState on the host (leading seed axis), kept only when
        `train_group(keep_states=True)`; a seed that died without '+skip' holds the state from
        before its first non-finite step, which `diagnose_first_failure` replays.
    """

    seeds: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    grad_norm: np.ndarray
    finite: np.ndarray
    clip_active: np.ndarray
    ran: np.ndarray
    final_train_loss: np.ndarray
    final_train_accuracy: np.ndarray
    final_val_loss: np.ndarray
    final_val_accuracy: np.ndarray
    seconds: float
    final_states: Any = None

    @property
    def nonfinite_event(self) -> np.ndarray:
        """(steps, S) bool: the seed ran this step and the step was non-finite."""
        return self.ran & ~self.finite

    def first_nonfinite_step(self) -> np.ndarray:
        """(S,) float: index of each seed's first non-finite step, NaN if it had none."""
        events = self.nonfinite_event
        first = np.argmax(events, axis=0).astype(np.float64)
        return np.where(events.any(axis=0), first, np.nan)


def batch_indices(num_examples: int, steps: Sequence[int], batch_size: int, seed: int) -> np.ndarray:
    """Example indices of each step's batch for one seed, exactly as the train CLI draws them.

    Uses nanlab.data.batch_at on an index array, so the grid's seed s sees the batches of
    `python -m nanlab.train --seed s`.

    Args:
      num_examples: size of the training set.
      steps: the step numbers.
      batch_size: examples per batch.
      seed: the run's seed.

    Returns:
      (len(steps), batch_size) int32 indices.
    """
    index = np.arange(num_examples)
    return np.stack([np.asarray(batch_at(index, index, step, batch_size, seed)[0]) for step in steps]).astype(
        np.int32
    )


def chunk_lengths(steps: int, target: int) -> list[int]:
    """Splits `steps` into scan chunks of about `target` steps.

    Prefers a divisor of `steps` (one compiled chunk length) when one is at least half the target;
    otherwise full chunks plus one shorter remainder (a second compilation).

    Args:
      steps: total steps, >= 1.
      target: wanted chunk length, >= 1.

    Returns:
      Chunk lengths summing to `steps`.
    """
    target = max(1, min(target, steps))
    for length in range(target, max(1, target // 2) - 1, -1):
        if steps % length == 0:
            return [length] * (steps // length)
    full, rest = divmod(steps, target)
    return [target] * full + ([rest] if rest else [])


def replica_mesh(num_replicas: int) -> jax.sharding.Mesh | None:
    """A 1-D mesh over the local devices with axis "replica", or None when it cannot be used.

    The replica axis is sharded (each device trains whole replicas; the step has no collective)
    when there is more than one device and the replica count is a multiple of the device count.
    """
    devices = jax.local_devices()
    if len(devices) < 2 or num_replicas % len(devices):
        return None
    return jax.sharding.Mesh(np.asarray(devices), ("replica",))


class _Compiled(NamedTuple):
    init: Callable
    run_chunk: Callable
    evaluate: Callable
    evaluate_looped: Callable  # vmapped: one replica after another inside one program; else = evaluate


def _compile(problem: Problem, vmapped: bool) -> _Compiled:
    """Jitted init, chunk runner and evaluator, vmapped over a leading replica axis or not.

    Cached per (problem, vmapped, backend): groups with equal problems and shapes reuse the
    compiled code.
    """
    return _compile_for(problem, vmapped, scan=jax.default_backend() != "cpu")


@functools.lru_cache(maxsize=8)
def _compile_for(problem: Problem, vmapped: bool, scan: bool) -> _Compiled:
    """`_compile` with the chunk runner chosen: `scan` True runs a chunk as one `lax.scan`."""
    step = make_replica_step(problem)
    eval_fn = make_eval_fn(problem)

    def init(sample_x, replica):
        return init_replica(problem, sample_x, replica)

    evaluate = evaluate_looped = jax.jit(eval_fn)
    if vmapped:
        step = jax.vmap(step, in_axes=(0, 0, 0, 0))
        init = jax.vmap(init, in_axes=(None, 0))
        evaluate = jax.jit(jax.vmap(eval_fn, in_axes=(0, None, None, None)))
        evaluate_looped = jax.jit(lambda state, x, y, mask: jax.lax.map(lambda one: eval_fn(one, x, y, mask), state))

    def one_step(replica, state, x_train, y_train, step_indices):
        # step_indices: ([replicas,] batch); the gather runs on device, the data stays put.
        return step(replica, state, x_train[step_indices], y_train[step_indices])

    def scan_chunk(replica, state, x_train, y_train, indices):
        # indices: (chunk, [replicas,] batch)
        return jax.lax.scan(lambda carry, idx: one_step(replica, carry, x_train, y_train, idx), state, indices)

    if not scan:
        # XLA's CPU backend ran the lab step 1.6x slower as a while-loop body (72 ms per step
        # on the cpu preset) than as its own jitted call (44 ms), so on a CPU a chunk is a
        # Python loop of asynchronous dispatches (no host sync inside a chunk); elsewhere one
        # scan per chunk saves the dispatches.
        jitted_step = jax.jit(one_step, donate_argnums=1)

        def run_chunk(replica, state, x_train, y_train, indices):
            records = []
            for step_indices in indices:
                state, record = jitted_step(replica, state, x_train, y_train, step_indices)
                records.append(record)
            return state, jax.tree.map(lambda *fields: jnp.stack(fields), *records)
    else:
        run_chunk = jax.jit(scan_chunk, donate_argnums=1)

    return _Compiled(
        init=jax.jit(init, compiler_options=RUN_ONCE_OPTIONS),  # runs once: no optimization passes
        run_chunk=run_chunk,
        evaluate=evaluate,
        evaluate_looped=evaluate_looped,
    )


def _evaluate(evaluate: Callable, state, x: np.ndarray, y: np.ndarray, batch: int):
    """Mean loss and accuracy per replica over (x, y), in masked batches of one shape."""
    count = x.shape[0]
    batch = min(batch, count)
    loss_sum, correct_sum = 0.0, 0.0
    for start in range(0, count, batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        mask = np.ones(batch, np.float32)
        if xb.shape[0] < batch:
            # Pad the last batch to the compiled shape; the mask drops the padded rows.
            pad = batch - xb.shape[0]
            mask[batch - pad:] = 0.0
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
        sums = evaluate(state, xb, yb, mask)
        loss_sum = loss_sum + np.asarray(sums["loss_sum"], np.float64)
        correct_sum = correct_sum + np.asarray(sums["correct_sum"], np.float64)
    return loss_sum / count, correct_sum / count


def train_group(
    problem: Problem,
    data: CellData,
    chains: Sequence[Chain],
    seeds: Sequence[int],
    steps: int,
    *,
    vmapped: bool = True,
    chunk_steps: int = 10,
    eval_batch: int = 128,
    on_steps: Callable[[int], None] | None = None,
    keep_states: bool = False,
) -> dict[Chain, CellRun]:
    """Trains every (chain, seed) replica of a group and evaluates the final states.

    Args:
      problem: the group's model, loss, optimizer and clip structure; every chain must have
        `chain_structure(chain) == problem.structure`.
      data: normalized arrays.
      chains: the chains (C >= 1).
      seeds: the seeds (S >= 1); every chain trains every seed.
      steps: training steps per replica.
      vmapped: True trains all C x S replicas in one vmapped computation (sharded over the
        replica axis when `replica_mesh` allows); False trains them one after another with the
        same, unvmapped step (the baseline of benchmarks/bench_multiseed.py and the reference of
        the equality test).
      chunk_steps: steps per chunk: one `lax.scan` call, or on a CPU that many step calls
        (`on_steps` fires once per chunk).
      eval_batch: batch size of the final evaluation.
      on_steps: called with the number of replica-steps just finished (for a progress bar).
      keep_states: copy every replica's final state to the host (`CellRun.final_states`).

    Returns:
      chain -> its CellRun (seeds in the given order).
    """
    seeds = [int(seed) for seed in seeds]
    if not seeds or not chains:
        raise ValueError(f"need at least one chain and one seed, got {len(chains)} chains, {len(seeds)} seeds")
    for chain in chains:
        if chain_structure(chain) != tuple(problem.structure):
            raise ValueError(f"chain {chain.label!r} does not have the group's structure {problem.structure}")
    started = time.perf_counter()
    compiled = _compile(problem, vmapped)
    x_train, y_train = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    sample_x = data.x_train[: problem.batch_size]
    lengths = chunk_lengths(steps, chunk_steps)
    x_eval_train = data.x_train[: data.num_eval_train]
    y_eval_train = data.y_train[: data.num_eval_train]
    seed_batches = {s: batch_indices(data.x_train.shape[0], range(steps), problem.batch_size, s) for s in seeds}
    pairs = [(chain, seed) for chain in chains for seed in seeds]

    def run(group):
        replica = replicas_of(problem, group)
        indices = np.stack([seed_batches[seed] for _, seed in group], axis=1)  # (steps, R, batch)
        if not vmapped:
            replica = jax.tree.map(lambda a: a[0], replica)
            indices = indices[:, 0]
        state = compiled.init(sample_x, replica)
        mesh = replica_mesh(len(group)) if vmapped else None
        if mesh is not None:
            spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("replica"))
            state, replica = jax.device_put((state, replica), spec)
        chunks, done = [], 0
        for length in lengths:
            state, record = compiled.run_chunk(replica, state, x_train, y_train, indices[done:done + length])
            jax.block_until_ready(record)
            chunks.append(record)
            done += length
            if on_steps is not None:
                on_steps(length * len(group))
        records = StepRecord(*(np.concatenate([np.asarray(c[i]) for c in chunks]) for i in range(len(StepRecord._fields))))
        # Inference at eval_batch is where XLA's CPU backend loses most to the seed axis: a
        # convolution whose kernel differs per replica becomes a grouped convolution, which ran
        # 3.1x slower than the same replicas one after another in one program (lax.map; cpu
        # preset, 8 seeds, batch 128). Sharded replicas and other backends keep the vmap.
        looped = mesh is None and jax.default_backend() == "cpu"
        evaluate = compiled.evaluate_looped if looped else compiled.evaluate
        train_metrics = _evaluate(evaluate, state, x_eval_train, y_eval_train, eval_batch)
        val_metrics = _evaluate(evaluate, state, data.x_val, data.y_val, eval_batch)
        host_state = jax.device_get(state) if keep_states else None
        if not vmapped:
            records = StepRecord(*(field[:, None] for field in records))
            train_metrics = tuple(np.atleast_1d(m) for m in train_metrics)
            val_metrics = tuple(np.atleast_1d(m) for m in val_metrics)
            host_state = jax.tree.map(lambda a: np.asarray(a)[None], host_state) if keep_states else None
        return records, train_metrics + val_metrics, host_state

    results = [run(pairs)] if vmapped else [run([pair]) for pair in pairs]
    states = jax.tree.map(lambda *a: np.concatenate(a), *[r[2] for r in results]) if keep_states else None
    records = StepRecord(*(np.concatenate([r[0][i] for r in results], axis=1) for i in range(len(StepRecord._fields))))
    finals = [np.concatenate([r[1][i] for r in results]) for i in range(4)]
    seconds = time.perf_counter() - started
    runs = {}
    for c, chain in enumerate(chains):
        cols = slice(c * len(seeds), (c + 1) * len(seeds))
        runs[chain] = CellRun(
            seeds=np.asarray(seeds),
            loss=records.loss[:, cols],
            accuracy=records.accuracy[:, cols],
            grad_norm=records.grad_norm[:, cols],
            finite=records.finite[:, cols],
            clip_active=records.clip_active[:, cols],
            ran=records.ran[:, cols],
            final_train_loss=finals[0][cols],
            final_train_accuracy=finals[1][cols],
            final_val_loss=finals[2][cols],
            final_val_accuracy=finals[3][cols],
            seconds=seconds,
            final_states=jax.tree.map(lambda a: a[cols], states) if keep_states else None,
        )
    return runs


def diagnose_first_failure(problem: Problem, data: CellData, chain: Chain, run: CellRun) -> dict[str, Any] | None:
    """Localize and diagnose the first non-finite step of a cell's first seed that died.

    The seed's frozen state (`CellRun.final_states`, the state before its first non-finite
    step) and that step's batch are replayed by the guard's `nanlab.guard.replay_failure`
    (`nanlab.trace.reproduce` with the replica's own train step: op by op, then the fallbacks;
    then `nanlab.diagnose.diagnose`, which names the cause from the report, the batch and the
    seed's loss and grad-norm history).
    The lab does not run the full `GuardedStep`: its replicas are vmapped in one program, each
    with its own flag (`alive`), and a dead replica stops while the others train on. One seed per
    cell: replaying costs about as much as compiling the step, and the seeds of a cell usually
    fail the same way.

    Args:
      problem: the cell's group problem.
      data: the data it trained on.
      chain: the cell's chain.
      run: its CellRun, trained with `keep_states=True`.

    Returns:
      None when no seed of the cell died (or the chain carries '+skip': a guarded seed trains on,
      so the state before its first non-finite step is not kept); else a dict with seed, step,
      cause, origin and replay (the trace's: the replay that reproduced it, None when none did),
      verdict, evidence and fix (the diagnosis's).
    """
    from nanlab.guard import replay_failure

    if run.final_states is None:
        raise ValueError("diagnose_first_failure needs the final states: train the cell with keep_states=True")
    if chain.skip_nonfinite:
        return None
    first = run.first_nonfinite_step()
    dead = np.flatnonzero(np.isfinite(first))
    if not dead.size:
        return None
    i, step = int(dead[0]), int(first[dead[0]])
    seed = int(run.seeds[i])
    state = jax.tree.map(lambda a: a[i], run.final_states)
    rows = batch_indices(data.x_train.shape[0], [step], problem.batch_size, seed)[0]
    batch = (data.x_train[rows], data.y_train[rows])
    train_step = replica_train_step(problem, jnp.asarray(chain_thresholds(chain, problem.structure)))
    history = [{"step": t, "loss": float(run.loss[t, i]), "grad_norm": float(run.grad_norm[t, i])} for t in range(step)]
    # The guard's replay (trace.reproduce, then diagnose), silent: the lab prints its own table.
    error = replay_failure(train_step, (state.train, batch), step=step, history=history, verbose=False, what="step")
    report, verdict = error.report, error.verdict
    return {
        "seed": seed,
        "step": step,
        "cause": report.cause,
        "origin": report.origin.where() if report.origin is not None else "",
        "replay": report.replay,
        "verdict": verdict.cause,
        "evidence": list(verdict.evidence),
        "fix": verdict.fix,
    }
