"""`python -m nanlab.compare`: the clipping lab.

Does clipping save a diverging run, which clipping, and what does it cost in final loss? The lab
trains a grid of scenarios x gradient-processing chains x seeds and compares every chain against
the unclipped baseline (`none`) of the same scenario, seed by seed.

All seeds of one (scenario, chain) cell train together in ONE jitted computation: the train step
is `jax.vmap`-ped over a leading seed axis (parameters initialised per seed by vmapping the init
over seed keys, a batch per seed, one optimizer state per seed), so a cell costs one compilation
and steps dispatches instead of seeds x steps of them (on GPU/TPU a chunk of steps is one
`lax.scan`, a single dispatch; on a CPU, where XLA runs a loop body slower, one call per step).
With several devices the seed axis is sharded over them (each device trains whole seeds; no
collective in the step); when the seed count does not divide the device count the cell runs on
one device.

A seed whose step goes non-finite (loss, gradients or updates) stops updating: its state is
masked to the last finite one and its first non-finite step is recorded. With the skip-nonfinite
marker the chain itself drops the bad update and the seed trains on (its skipped steps counted).

Chain syntax (`--chains`, one chain per argument): any `--clip` spec of the train CLI
(`none`, `global_norm:1.0`, `value:0.5`, `agc:0.01`, comma-joined like `agc:0.01,global_norm:5`),
optionally followed by `+skip` to wrap the chain with nanlab.optim's skip-nonfinite guard; `skip`
alone means no clipping plus the guard.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanlab import data as data_lib
from nanlab import losses, models, optim
from nanlab.config import BadInput
from nanlab.data import batch_at
from nanlab.step import TrainState, create_train_state, make_eval_step, make_train_step

SKIP_MARKER = "skip"

# ---------------------------------------------------------------------------------------------
# Chain specs
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chain:
    """One gradient-processing chain of the grid.

    Attributes:
      clip: the clip spec in the train CLI's syntax, normalized ("none" when no clipping).
      skip_nonfinite: whether nanlab.optim's skip-nonfinite guard wraps the chain.
    """

    clip: str
    skip_nonfinite: bool

    @property
    def parts(self) -> tuple[tuple[str, float], ...]:
        """The clip parts (name, value) in order; () for no clipping."""
        return optim.parse_clip_spec(self.clip)

    @property
    def label(self) -> str:
        """The chain as written on the command line (normalized)."""
        if self.skip_nonfinite:
            return SKIP_MARKER if self.clip == "none" else f"{self.clip}+{SKIP_MARKER}"
        return self.clip

    @property
    def is_baseline(self) -> bool:
        """True for the unclipped, unguarded chain every other chain is compared against."""
        return self.clip == "none" and not self.skip_nonfinite


def _format_clip(parts: Sequence[tuple[str, float]]) -> str:
    """Clip parts (name, value) back to the spec syntax; () or (("none", ...),) gives "none"."""
    named = [(name, value) for name, value in parts if name != "none"]
    if not named:
        return "none"
    return ",".join(f"{name}:{value:g}" for name, value in named)


def parse_chain(spec: str) -> Chain:
    """Parses one chain spec (a train-CLI clip spec, optionally suffixed `+skip`, or `skip`).

    Args:
      spec: e.g. "none", "global_norm:1.0", "agc:0.01,global_norm:5", "skip", "value:0.5+skip".

    Returns:
      The normalized Chain (so "global_norm:1" and "global_norm:1.0" compare equal).

    Raises:
      ValueError: naming the spec and the offending part.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"chain spec must be a non-empty string, got {spec!r}")
    text = spec.strip()
    pieces = text.split("+")
    skip = False
    if pieces[-1].strip() == SKIP_MARKER:
        skip = True
        pieces = pieces[:-1]
    if len(pieces) > 1:
        raise ValueError(
            f"chain spec {spec!r}: only one '+{SKIP_MARKER}' suffix is allowed after the clip spec"
        )
    clip_text = pieces[0].strip() if pieces else "none"
    if not clip_text:
        raise ValueError(f"chain spec {spec!r}: empty clip spec before '+{SKIP_MARKER}'")
    try:
        parts = optim.parse_clip_spec(clip_text)
    except ValueError as err:
        raise ValueError(f"chain spec {spec!r}: {err}") from None
    return Chain(clip=_format_clip(parts), skip_nonfinite=skip)


def parse_chains(specs: Sequence[str]) -> tuple[Chain, ...]:
    """Parses the grid's chains; duplicates (after normalization) are an error.

    Args:
      specs: chain specs, one per chain.

    Returns:
      The chains in the given order.

    Raises:
      ValueError: on an empty list, a bad spec, or a duplicate chain.
    """
    if not specs:
        raise ValueError("chains: need at least one chain spec")
    chains: list[Chain] = []
    for spec in specs:
        chain = parse_chain(spec)
        if chain in chains:
            raise ValueError(f"duplicate chain {spec!r} (same as {chain.label!r})")
        chains.append(chain)
    return tuple(chains)


# ---------------------------------------------------------------------------------------------
# Chains as data: one compiled program for many chains
# ---------------------------------------------------------------------------------------------

# Chains whose clip parts appear in this order (each at most once) share one compiled program:
# a part a chain lacks gets an infinite threshold, which `_clip_part` turns into a pass-through.
CANONICAL_STRUCTURE: tuple[str, ...] = ("agc", "value", "global_norm")

_CLIP_FACTORIES: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    # The same optax transforms as nanlab.optim.make_clip_chain, with a traced threshold.
    "global_norm": optax.clip_by_global_norm,
    "value": optax.clip,
    "agc": optax.adaptive_grad_clip,
}


def chain_structure(chain: Chain) -> tuple[str, ...]:
    """The clip structure a chain is compiled with.

    Chains whose part names are an ordered subsequence of `CANONICAL_STRUCTURE` (no repeats)
    map to it, so `none`, `global_norm:1`, `agc:0.01,global_norm:5`, `value:0.1+skip` ... all
    share one program per scenario; any other order keeps its own structure (own program).
    """
    names = tuple(name for name, _ in chain.parts)
    positions = [CANONICAL_STRUCTURE.index(n) for n in names if n in CANONICAL_STRUCTURE]
    if len(positions) == len(names) and positions == sorted(set(positions)):
        return CANONICAL_STRUCTURE
    return names


def chain_thresholds(chain: Chain, structure: Sequence[str]) -> np.ndarray:
    """The chain's clip thresholds laid out on `structure` (inf where a part is off).

    Args:
      chain: the chain.
      structure: `chain_structure(chain)`.

    Returns:
      float32 array of shape (len(structure),).
    """
    parts = chain.parts
    if tuple(structure) == tuple(name for name, _ in parts):
        return np.asarray([value for _, value in parts], np.float32)
    by_name = dict(parts)
    return np.asarray([by_name.get(name, math.inf) for name in structure], np.float32)


def _clip_part(name: str, threshold: jax.Array) -> optax.GradientTransformation:
    """One clip transform whose threshold is a (possibly traced) array; inf means off."""
    base = _CLIP_FACTORIES[name](threshold)

    def update(updates, state, params=None):
        clipped, state = base.update(updates, state, params)
        # Off must be the identity bit for bit: optax's global-norm clip at max_norm=inf would
        # still turn a finite gradient whose norm overflows to inf into inf/inf = NaN.
        off = jnp.isinf(threshold)
        return jax.tree.map(lambda c, g: jnp.where(off, g, c), clipped, updates), state

    return optax.GradientTransformation(base.init, update)


class ClipProbeState(NamedTuple):
    """State of `probe_clip`.

    Attributes:
      clip_state: the wrapped clip chain's state (the clips are stateless: empty).
      active: bool scalar, whether the most recent update changed any gradient element.
    """

    clip_state: Any
    active: jax.Array


def probe_clip(clip_tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wraps a clip chain so that its state records whether it changed the gradients.

    The outputs are exactly those of `clip_tx`; only the state gains a flag. The flag lives in
    the optimizer state so that the lab reuses nanlab.step's train step unchanged (it hands
    back the optimizer state, not the gradients) and still measures clip activity.

    Args:
      clip_tx: a clip chain (needs `params` for agc).

    Returns:
      The probed transformation; its state is a `ClipProbeState`.
    """

    def init(params):
        return ClipProbeState(clip_state=clip_tx.init(params), active=jnp.asarray(False))

    def update(updates, state, params=None):
        clipped, clip_state = clip_tx.update(updates, state.clip_state, params)
        return clipped, ClipProbeState(clip_state=clip_state, active=optim.clip_activity(updates, clipped))

    return optax.GradientTransformation(init, update)


def find_probe_state(opt_state: Any) -> ClipProbeState | None:
    """The `ClipProbeState` inside an optax state, or None when the chain has no probe."""
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, ClipProbeState))
        if isinstance(node, ClipProbeState)
    ]
    return found[0] if found else None


def make_lab_tx(
    structure: Sequence[str],
    thresholds: jax.Array,
    optimizer: str,
    schedule: optim.Schedule,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """nanlab.optim.make_tx's chain (clip -> optimizer) with data thresholds, probed, guarded.

    The skip-nonfinite guard is always in the program (it is the identity on finite steps);
    whether a chain *uses* it is decided per replica by the step's mask (`Replica.skip`), so
    chains with and without '+skip' share the compiled program.

    Args:
      structure: clip part names in order (see `chain_structure`).
      thresholds: (len(structure),) thresholds, inf for an absent part.
      optimizer: optimizer name (see `nanlab.optim.make_optimizer`).
      schedule: learning rate or optax schedule.
      weight_decay: see `nanlab.optim.make_optimizer`.

    Returns:
      The optax transformation.
    """
    parts = [_clip_part(name, thresholds[i]) for i, name in enumerate(structure)]
    clip_tx = optax.chain(*parts) if parts else optax.identity()
    inner = optax.chain(probe_clip(clip_tx), optim.make_optimizer(optimizer, schedule, weight_decay))
    return optim.skip_nonfinite(inner)


# ---------------------------------------------------------------------------------------------
# The masked per-replica step (one replica = one (chain, seed) pair)
# ---------------------------------------------------------------------------------------------


class Replica(NamedTuple):
    """What distinguishes one trained replica from another inside a compiled group.

    Attributes:
      seed: int32 seed (init, dropout and batch order, as `python -m nanlab.train --seed`).
      thresholds: float32 clip thresholds on the group's structure (inf = off).
      skip: bool, the chain carries '+skip'.
    """

    seed: jax.Array
    thresholds: jax.Array
    skip: jax.Array


@flax.struct.dataclass
class SeedState:
    """One replica's state in the lab (leading replica axis when vmapped).

    Attributes:
      train: nanlab.step's TrainState.
      alive: False once the replica went non-finite without '+skip'; its TrainState then stays
        the last finite one and its later steps are not recorded.
    """

    train: TrainState
    alive: jax.Array


class StepRecord(NamedTuple):
    """What one step of one replica reports (stacked to (steps, replicas) by the runner).

    Attributes:
      loss: mean training loss of the batch (before the update).
      accuracy: mean elementwise accuracy of the batch (logit > 0 vs label > 0.5).
      grad_norm: global L2 norm of the raw gradients.
      finite: loss, gradients and updates were all finite.
      clip_active: the clipping part of the chain changed the gradients (False on
        non-finite steps).
      ran: the replica was alive at this step (a dead replica's records are to be ignored).
    """

    loss: jax.Array
    accuracy: jax.Array
    grad_norm: jax.Array
    finite: jax.Array
    clip_active: jax.Array
    ran: jax.Array


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything a compiled group trains, except what varies per replica.

    Attributes:
      model: a linen module, `model.apply(variables, x, train=bool)` -> logits.
      loss_fn: per-element loss `(logits, labels) -> array`; the step takes its mean.
      structure: the group's clip structure (see `chain_structure`).
      optimizer: optimizer name.
      schedule: learning rate or optax schedule.
      weight_decay: weight decay (see nanlab.optim.make_optimizer).
      batch_size: examples per step per replica.
    """

    model: nn.Module
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array]
    structure: tuple[str, ...]
    optimizer: str
    schedule: Any
    weight_decay: float
    batch_size: int

    def tx(self, thresholds: jax.Array) -> optax.GradientTransformationExtraArgs:
        """The replica's chain for the given thresholds."""
        return make_lab_tx(self.structure, thresholds, self.optimizer, self.schedule, self.weight_decay)


def init_replica(problem: Problem, sample_x: jax.Array, replica: Replica) -> SeedState:
    """Initialises one replica exactly as the train CLI does for its seed; vmappable.

    Args:
      problem: the group's model and chain structure.
      sample_x: an input batch (only shape and dtype matter).
      replica: the replica's seed and chain data.

    Returns:
      The replica's SeedState, alive.
    """
    return SeedState(
        train=create_train_state(problem.model, problem.tx(replica.thresholds), sample_x, replica.seed),
        alive=jnp.asarray(True),
    )


def _select(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise `where` on a scalar predicate (no Python branch on a traced value)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def replica_train_step(problem: Problem, thresholds: jax.Array) -> Callable:
    """nanlab.step's train step for one replica's clip thresholds (the guard is in the chain)."""
    return make_train_step(
        problem.model, problem.loss_fn, problem.tx(thresholds), schedule=problem.schedule, skip_nonfinite=True
    )


def replicas_of(problem: Problem, pairs: Sequence[tuple[Chain, int]]) -> Replica:
    """The stacked `Replica` of (chain, seed) pairs, leading axis = the pairs in order."""
    return Replica(
        seed=np.asarray([seed for _, seed in pairs], np.int32),
        thresholds=np.stack([chain_thresholds(chain, problem.structure) for chain, _ in pairs]).reshape(
            len(pairs), len(problem.structure)
        ),
        skip=np.asarray([chain.skip_nonfinite for chain, _ in pairs]),
    )


def make_replica_step(problem: Problem) -> Callable[[Replica, SeedState, jax.Array, jax.Array], tuple]:
    """Builds the pure lab step `step(replica, state, xb, yb) -> (state, StepRecord)`.

    It is nanlab.step's train step (with the guard in the chain) plus a mask: a replica that is
    not alive keeps its state; a non-finite step kills a replica without '+skip' (its state stays
    the one before the step), while a '+skip' replica takes the guarded step (zero update,
    moments and BatchNorm statistics untouched) and trains on. The runner vmaps this step over
    the replica axis.

    Args:
      problem: the group's model, loss and chain structure.

    Returns:
      The step function (not jitted).
    """

    def step(replica: Replica, state: SeedState, xb: jax.Array, yb: jax.Array):
        train_step = replica_train_step(problem, replica.thresholds)
        new_train, stats = train_step(state.train, (xb, yb))
        probe = find_probe_state(new_train.opt_state)
        clip_active = stats.finite & probe.active
        commit = state.alive & (stats.finite | replica.skip)
        new_state = SeedState(train=_select(commit, new_train, state.train), alive=commit)
        record = StepRecord(
            loss=stats.loss,
            accuracy=stats.accuracy,
            grad_norm=stats.grad_norm,
            finite=stats.finite,
            clip_active=clip_active,
            ran=state.alive,
        )
        return new_state, record

    return step


def make_eval_fn(problem: Problem) -> Callable[[SeedState, jax.Array, jax.Array, jax.Array], dict]:
    """nanlab.step's eval step on a SeedState: `(state, x, y, mask) -> sums` (inference mode)."""
    eval_step = make_eval_step(problem.model, problem.loss_fn)

    def eval_fn(state: SeedState, x: jax.Array, y: jax.Array, mask: jax.Array) -> dict:
        return eval_step(state.train, (x, y), mask)

    return eval_fn


# ---------------------------------------------------------------------------------------------
# Running a group of replicas
# ---------------------------------------------------------------------------------------------


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
      final_states: each seed's final SeedState on the host (leading seed axis), kept only when
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
        init=jax.jit(init),
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
    step) and that step's batch are replayed through `nanlab.trace.localize` with the replica's
    own train step; `nanlab.diagnose.diagnose` names the cause from the report, the batch and the
    seed's loss and grad-norm history. One seed per cell: replaying costs about as much as
    compiling the step, and the seeds of a cell usually fail the same way.

    Args:
      problem: the cell's group problem.
      data: the data it trained on.
      chain: the cell's chain.
      run: its CellRun, trained with `keep_states=True`.

    Returns:
      None when no seed of the cell died (or the chain carries '+skip': a guarded seed trains on,
      so the state before its first non-finite step is not kept); else a dict with seed, step,
      cause and origin (the trace's), verdict, evidence and fix (the diagnosis's).
    """
    from nanlab import diagnose, trace

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
    report = trace.localize(train_step, state.train, batch)
    history = [{"step": t, "loss": float(run.loss[t, i]), "grad_norm": float(run.grad_norm[t, i])} for t in range(step)]
    verdict = diagnose.diagnose(report, batch=batch, history=history)
    return {
        "seed": seed,
        "step": step,
        "cause": report.cause,
        "origin": report.origin.where() if report.origin is not None else "",
        "verdict": verdict.cause,
        "evidence": list(verdict.evidence),
        "fix": verdict.fix,
    }


# ---------------------------------------------------------------------------------------------
# Statistics of a cell
# ---------------------------------------------------------------------------------------------

# results.csv / results.json columns, in order, with their meaning (the README lists these).
COLUMNS: dict[str, str] = {
    "scenario": "the train CLI's scenario",
    "chain": "the chain spec (normalized; '+skip' = skip-nonfinite guard)",
    "clip": "the clip part of the chain ('none' for no clipping)",
    "skip_nonfinite": "whether the skip-nonfinite guard wraps the chain",
    "seeds": "number of seeds",
    "steps": "training steps per seed",
    "nonfinite_frac": "fraction of seeds with at least one non-finite step (loss, grads or updates)",
    "failed_frac": "fraction of seeds whose run failed: stopped by a non-finite step (no guard), or "
    "still non-finite at the last step (guard)",
    "first_nonfinite_median": "median step index (0-based) of the first non-finite step, over seeds with one",
    "first_nonfinite_q25": "25th percentile of that step",
    "first_nonfinite_q75": "75th percentile of that step",
    "skipped_steps_mean": "mean number of steps the guard skipped per seed (0 without the guard)",
    "final_train_loss": "mean over seeds that did not fail of the inference-mode loss on the first "
    "training examples (as many as the validation set has, at most)",
    "final_train_accuracy": "the same for accuracy",
    "final_val_loss": "mean over seeds that did not fail of the validation loss",
    "final_val_accuracy": "the same for validation accuracy",
    "grad_norm_mean": "mean global gradient norm over the finite steps of all seeds",
    "clip_active_frac": "fraction of finite steps in which the clip changed the gradients",
    "delta_failed_frac": "failed_frac minus the baseline's ('none' chain, same scenario), paired by seed",
    "delta_failed_ci_low": "95% bootstrap CI of delta_failed_frac over seeds, lower end",
    "delta_failed_ci_high": "upper end",
    "delta_val_loss": "mean over seeds that failed in neither of final_val_loss minus the baseline's",
    "delta_val_loss_ci_low": "95% bootstrap CI of delta_val_loss, lower end",
    "delta_val_loss_ci_high": "upper end",
    "delta_pairs": "number of seeds behind delta_val_loss",
    "verdict": "with --diagnose: nanlab.diagnose's verdict on the first non-finite step of the cell's "
    "first seed that died (empty otherwise, and for '+skip' chains, whose seeds train on)",
    "seconds": "wall time of the cell (compilation included)",
}

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def bootstrap_ci(
    values: Sequence[float],
    *,
    statistic: Callable[..., np.ndarray] = np.mean,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = 0.95,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float, float]:
    """A statistic of `values` and its percentile-bootstrap confidence interval.

    Args:
      values: the samples (finite), e.g. per-seed outcomes or per-round timing ratios.
      statistic: reduces along ``axis=1`` (np.mean, np.median, ...).
      resamples: bootstrap resamples.
      level: coverage of the interval, in (0, 1).
      seed: seed of numpy's generator (fixed: the same values always give the same interval).

    Returns:
      (statistic, low, high); all NaN for no values; (v, v, v) for a single value.
    """
    data = np.asarray(values, np.float64).ravel()
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    if data.size == 0:
        return math.nan, math.nan, math.nan
    if not np.all(np.isfinite(data)):
        raise ValueError(f"values must be finite, got {data.tolist()}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, data.size, size=(resamples, data.size))
    stats = statistic(data[picks], axis=1)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(stats, [tail, 100.0 - tail])
    return float(statistic(data[None], axis=1)[0]), float(low), float(high)


def bootstrap_mean_ci(values: Sequence[float], **kwargs: Any) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap confidence interval of the mean; see `bootstrap_ci`."""
    return bootstrap_ci(values, statistic=np.mean, **kwargs)


def seed_outcomes(run: CellRun, skip_nonfinite: bool) -> dict[str, np.ndarray]:
    """Per-seed outcomes of a cell.

    Args:
      run: the cell's CellRun.
      skip_nonfinite: whether the chain had the guard.

    Returns:
      {"nonfinite", "failed" (bool), "first_nonfinite_step" (float, NaN if none),
      "skipped_steps" (int)} arrays of shape (S,).
    """
    events = run.nonfinite_event
    nonfinite = events.any(axis=0)
    if skip_nonfinite:
        # The guard kept the run going; it failed only if it was still broken at the end.
        failed = events[-1] | ~np.isfinite(run.final_val_loss)
        skipped = events.sum(axis=0)
    else:
        failed = nonfinite
        skipped = np.zeros_like(nonfinite, dtype=np.int64)
    return {
        "nonfinite": nonfinite,
        "failed": failed,
        "first_nonfinite_step": run.first_nonfinite_step(),
        "skipped_steps": skipped.astype(np.int64),
    }


def _mean_or_nan(values: np.ndarray) -> float:
    return float(np.mean(values)) if values.size else math.nan


def summarize_cell(
    scenario: str, chain: Chain, run: CellRun, baseline: CellRun | None
) -> dict[str, Any]:
    """One results row (the `COLUMNS`) for a cell.

    Args:
      scenario: the scenario name.
      chain: the cell's chain.
      run: the cell's CellRun.
      baseline: the CellRun of the same scenario's 'none' chain with the same seeds, or None
        (then the delta columns are NaN).

    Returns:
      A dict with every key of `COLUMNS` (floats may be NaN).
    """
    outcome = seed_outcomes(run, chain.skip_nonfinite)
    ok = ~outcome["failed"]
    first = outcome["first_nonfinite_step"]
    first = first[np.isfinite(first)]
    q25, median, q75 = (np.percentile(first, [25, 50, 75]) if first.size else (math.nan,) * 3)
    good_steps = run.ran & run.finite
    row: dict[str, Any] = {
        "scenario": scenario,
        "chain": chain.label,
        "clip": chain.clip,
        "skip_nonfinite": chain.skip_nonfinite,
        "seeds": int(run.seeds.size),
        "steps": int(run.loss.shape[0]),
        "nonfinite_frac": float(outcome["nonfinite"].mean()),
        "failed_frac": float(outcome["failed"].mean()),
        "first_nonfinite_median": float(median),
        "first_nonfinite_q25": float(q25),
        "first_nonfinite_q75": float(q75),
        "skipped_steps_mean": float(outcome["skipped_steps"].mean()),
        "final_train_loss": _mean_or_nan(run.final_train_loss[ok]),
        "final_train_accuracy": _mean_or_nan(run.final_train_accuracy[ok]),
        "final_val_loss": _mean_or_nan(run.final_val_loss[ok]),
        "final_val_accuracy": _mean_or_nan(run.final_val_accuracy[ok]),
        "grad_norm_mean": _mean_or_nan(run.grad_norm[good_steps]),
        "clip_active_frac": _mean_or_nan(run.clip_active[good_steps].astype(np.float64)),
        "seconds": float(run.seconds),
        "verdict": "",  # filled by run_grid(diagnose=True)
    }
    delta = dict.fromkeys(
        ["delta_failed_frac", "delta_failed_ci_low", "delta_failed_ci_high", "delta_val_loss",
         "delta_val_loss_ci_low", "delta_val_loss_ci_high"], math.nan
    )
    delta["delta_pairs"] = 0
    if baseline is not None:
        if not np.array_equal(baseline.seeds, run.seeds):
            raise ValueError(f"baseline seeds {baseline.seeds.tolist()} differ from {run.seeds.tolist()}")
        base_failed = seed_outcomes(baseline, skip_nonfinite=False)["failed"]
        failed_diff = outcome["failed"].astype(np.float64) - base_failed.astype(np.float64)
        (delta["delta_failed_frac"], delta["delta_failed_ci_low"],
         delta["delta_failed_ci_high"]) = bootstrap_mean_ci(failed_diff)
        pairs = ok & ~base_failed & np.isfinite(run.final_val_loss) & np.isfinite(baseline.final_val_loss)
        loss_diff = run.final_val_loss[pairs] - baseline.final_val_loss[pairs]
        (delta["delta_val_loss"], delta["delta_val_loss_ci_low"],
         delta["delta_val_loss_ci_high"]) = bootstrap_mean_ci(loss_diff)
        delta["delta_pairs"] = int(pairs.sum())
    row.update(delta)
    return {key: row[key] for key in COLUMNS}


def per_seed_table(chain: Chain, run: CellRun) -> list[dict[str, Any]]:
    """Per-seed outcomes of a cell as JSON-ready rows (for results.json)."""
    outcome = seed_outcomes(run, chain.skip_nonfinite)
    rows = []
    for i, seed in enumerate(run.seeds.tolist()):
        rows.append({
            "seed": int(seed),
            "nonfinite": bool(outcome["nonfinite"][i]),
            "failed": bool(outcome["failed"][i]),
            "first_nonfinite_step": _json_float(outcome["first_nonfinite_step"][i]),
            "skipped_steps": int(outcome["skipped_steps"][i]),
            "final_train_loss": _json_float(run.final_train_loss[i]),
            "final_val_loss": _json_float(run.final_val_loss[i]),
            "final_val_accuracy": _json_float(run.final_val_accuracy[i]),
        })
    return rows


def _json_float(value: Any) -> float | None:
    """A float for JSON; NaN and inf become None (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------
# Outputs: results.csv, results.json, plots, terminal table
# ---------------------------------------------------------------------------------------------

OUTPUT_FILES = ("results.csv", "results.json", "loss_curves.png", "nonfinite_rate.png", "grad_norms.png")


def write_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Writes the results rows as CSV with the `COLUMNS` header; NaN is written as an empty field."""
    import csv

    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({
                key: ("" if isinstance(value, float) and not math.isfinite(value) else value)
                for key, value in row.items()
            })


def write_json(payload: dict[str, Any], path: str) -> None:
    """Writes results.json; NaN/inf floats anywhere become null (strict JSON)."""
    import json

    def clean(value):
        if isinstance(value, float):
            return _json_float(value)
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    with open(path, "w") as handle:
        json.dump(clean(payload), handle, indent=1, allow_nan=False)
        handle.write("\n")


def _loss_bands(run: CellRun) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step median and IQR of the loss over the seeds alive with a finite loss at that step."""
    loss = np.where(run.ran & np.isfinite(run.loss), run.loss, np.nan)
    median, q25, q75 = (np.full(loss.shape[0], np.nan) for _ in range(3))
    has = np.isfinite(loss).any(axis=1)
    if has.any():
        q25[has], median[has], q75[has] = np.nanpercentile(loss[has], [25, 50, 75], axis=1)
    return median, q25, q75


def _save_figure(fig, workdir: str, filename: str) -> str:
    """Lay out, write and close one figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = os.path.join(workdir, filename)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_plots(
    scenarios: Sequence[str],
    chains: Sequence[Chain],
    runs: dict[tuple[str, Chain], CellRun],
    rows: Sequence[dict[str, Any]],
    workdir: str,
) -> list[str]:
    """Writes the three PNG plots (one panel per scenario in each).

    loss_curves.png: training loss per step, median over live seeds with the IQR as a band, one
    line per chain (log scale). nonfinite_rate.png: per chain, the fraction of seeds with a
    non-finite step and the fraction that failed. grad_norms.png: per chain, the distribution
    (box plot, log scale) of the finite steps' global gradient norms over all seeds.

    Returns:
      The written paths.
    """

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(5.0, 5.0 * len(scenarios))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    paths = []

    fig, axes = plt.subplots(1, len(scenarios), figsize=(width, 4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        for i, chain in enumerate(chains):
            run = runs[(scenario, chain)]
            median, q25, q75 = _loss_bands(run)
            steps = np.arange(median.size)
            color = colors[i % len(colors)]
            ax.plot(steps, median, color=color, label=chain.label, lw=1.2)
            ax.fill_between(steps, q25, q75, color=color, alpha=0.2, lw=0)
        ax.set_yscale("log")
        ax.set_title(f"{scenario}: train loss (median, IQR over seeds)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    paths.append(_save_figure(fig, workdir, "loss_curves.png"))

    fig, axes = plt.subplots(1, len(scenarios), figsize=(width, 4), squeeze=False)
    by_cell = {(row["scenario"], row["chain"]): row for row in rows}
    for ax, scenario in zip(axes[0], scenarios):
        positions = np.arange(len(chains))
        nonfinite = [by_cell[(scenario, c.label)]["nonfinite_frac"] for c in chains]
        failed = [by_cell[(scenario, c.label)]["failed_frac"] for c in chains]
        ax.bar(positions - 0.2, nonfinite, width=0.4, label="had a non-finite step")
        ax.bar(positions + 0.2, failed, width=0.4, label="failed")
        ax.set_xticks(positions, [c.label for c in chains], rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{scenario}: fraction of seeds")
        ax.legend(fontsize=7)
    paths.append(_save_figure(fig, workdir, "nonfinite_rate.png"))

    fig, axes = plt.subplots(1, len(scenarios), figsize=(width, 4), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        samples = []
        for chain in chains:
            run = runs[(scenario, chain)]
            norms = run.grad_norm[run.ran & run.finite & (run.grad_norm > 0)]
            samples.append(np.log10(norms) if norms.size else np.array([np.nan]))
        ax.boxplot(samples, showfliers=False)
        ax.set_xticks(np.arange(1, len(chains) + 1), [c.label for c in chains], rotation=30, ha="right",
                      fontsize=7)
        ax.set_ylabel("log10 global grad norm")
        ax.set_title(f"{scenario}: gradient norms (finite steps)")
    paths.append(_save_figure(fig, workdir, "grad_norms.png"))
    return paths


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.{digits}g}"
    return str(value)


def _fmt_ci(mean: float, low: float, high: float) -> str:
    if not math.isfinite(mean):
        return "-"
    return f"{mean:+.3g} [{low:+.3g}, {high:+.3g}]"


def results_table(rows: Sequence[dict[str, Any]]):
    """A rich Table of the results rows (the terminal summary)."""
    from rich.table import Table

    table = Table(title="nanlab.compare: clipping lab")
    with_verdicts = any(row["verdict"] for row in rows)
    for name in ("scenario", "chain", "non-finite", "failed", "first NaN step (IQR)", "val loss",
                 "val acc", "clip active", "Δ failed [95% CI]", "Δ val loss [95% CI]") + (
                     ("verdict",) if with_verdicts else ()):
        table.add_column(name, overflow="fold")
    for row in rows:
        first = "-"
        if math.isfinite(row["first_nonfinite_median"]):
            first = (f"{row['first_nonfinite_median']:g} ({row['first_nonfinite_q25']:g}-"
                     f"{row['first_nonfinite_q75']:g})")
        table.add_row(
            row["scenario"], row["chain"], _fmt(row["nonfinite_frac"], 2), _fmt(row["failed_frac"], 2),
            first, _fmt(row["final_val_loss"]), _fmt(row["final_val_accuracy"]),
            _fmt(row["clip_active_frac"], 2),
            _fmt_ci(row["delta_failed_frac"], row["delta_failed_ci_low"], row["delta_failed_ci_high"]),
            _fmt_ci(row["delta_val_loss"], row["delta_val_loss_ci_low"], row["delta_val_loss_ci_high"]),
            *((row["verdict"] or "-",) if with_verdicts else ()),
        )
    return table


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------

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
    from nanlab import config as config_lib

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


def run_grid(
    grid: Grid,
    *,
    chunk_steps: int = 10,
    progress: bool = True,
    console=None,
    diagnose: bool = False,
) -> tuple[list[dict[str, Any]], dict[tuple[str, Chain], CellRun], list[dict[str, Any]]]:
    """Trains the whole grid: per scenario, one vmapped computation per clip structure.

    Args:
      grid: a Grid from `make_grid`.
      chunk_steps: steps per scan chunk (progress granularity).
      diagnose: localize and diagnose each cell's first dead seed (`diagnose_first_failure`);
        the verdict goes to the row's "verdict" and the details to its per-seed entry.
      progress: show a rich progress bar.
      console: a rich Console to draw on (None: a new one on stderr).

    Returns:
      (rows: one results row per cell, in grid order; runs: (scenario, chain) -> CellRun;
       per_seed: the per-seed table of every cell, with its "diagnosis" (None if none)).

    Raises:
      nanlab.train.BadInput: unreadable data or a batch larger than the data.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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

    rows, per_seed = [], []
    for scenario in grid.scenarios:
        baseline_chain = next((c for c in grid.chains if c.is_baseline), None)
        baseline = runs[(scenario, baseline_chain)] if baseline_chain is not None else None
        for chain in grid.chains:
            run = runs[(scenario, chain)]
            row = summarize_cell(scenario, chain, run, None if chain.is_baseline else baseline)
            diagnosis = diagnoses.get((scenario, chain))
            row["verdict"] = diagnosis["verdict"] if diagnosis else ""
            rows.append(row)
            per_seed.append({"scenario": scenario, "chain": chain.label, "seeds": per_seed_table(chain, run),
                             "diagnosis": diagnosis})
    return rows, runs, per_seed


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------

PROG = "nanlab.compare"
EXIT_OK, EXIT_BAD_INPUT = 0, 2


def build_parser():
    """The argument parser; every flag's help states its default."""
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # noqa: D401 - argparse's hook
            import sys

            print(f"{PROG}: error: {message}", file=sys.stderr)
            raise SystemExit(EXIT_BAD_INPUT)

    p = Parser(
        prog=f"python -m {PROG}",
        description="The clipping lab: train scenarios x gradient-processing chains x seeds (seeds and chains "
        "vmapped together) and compare every chain with the unclipped baseline 'none'.",
    )
    add = p.add_argument
    add("--scenarios", nargs="+", default=None,
        help="scenarios of the train CLI, space- or comma-separated (default: "
        f"{' '.join(DEFAULT_SCENARIOS)})")
    add("--chains", nargs="+", default=list(DEFAULT_CHAINS),
        help="chains, one per argument: a --clip spec of the train CLI (none, global_norm:X, value:X, agc:X, "
        "comma-joined parts), optionally suffixed '+skip' for the skip-nonfinite guard; 'skip' alone = no clip "
        f"+ guard (default: {' '.join(DEFAULT_CHAINS)})")
    add("--seeds", type=int, default=DEFAULT_SEEDS, help=f"number of seeds, 0..N-1 (default: {DEFAULT_SEEDS})")
    add("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps per seed (default: {DEFAULT_STEPS})")
    add("--workdir", default="runs/compare", help="output folder (default: runs/compare)")
    add("--overwrite", action="store_true", help="replace results already in --workdir (default: off)")
    add("--chunk-steps", type=int, default=10,
        help="steps per chunk: one jitted scan, or on a CPU as many step calls (default: 10)")
    add("--diagnose", action="store_true",
        help="replay the first non-finite step of each cell's first dead seed through nanlab.trace and "
        "nanlab.diagnose: a 'verdict' per cell (default: off; each replay costs about one compilation "
        "of the step)")
    add("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar (default: on)")
    train_flags = p.add_argument_group("train-CLI flags (default: the preset's and the scenario's values)")
    tadd = train_flags.add_argument
    tadd("--preset", help="cpu or accelerator (default: cpu on a CPU, accelerator otherwise)")
    tadd("--width-multiplier", type=float, help="InceptionV3 channel multiplier")
    tadd("--image-size", type=int, help="square input side, >= 75")
    tadd("--batch-size", type=int, help="batch size per seed (default: 8 on the cpu preset, 32 on accelerator)")
    tadd("--num-train", type=int,
         help="training examples of the built-in data (default: 512 cpu, 4096 accelerator)")
    tadd("--num-val", type=int,
         help="validation examples of the built-in data (default: 128 cpu, 512 accelerator)")
    tadd("--lr", type=float, help="peak learning rate")
    tadd("--optimizer", help="adam, adamw, sgd, momentum, rmsprop")
    tadd("--schedule", help="constant, cosine, warmup-cosine")
    tadd("--warmup-steps", type=int, help="warmup of warmup-cosine")
    tadd("--weight-decay", type=float, help="weight decay")
    tadd("--data", help="builtin, builtin-multilabel, an image folder or an .npz")
    tadd("--normalize", help="none, unit, standardize")
    tadd("--dtype", help="float32, bfloat16, float16")
    return p


def _split_scenarios(values: Sequence[str]) -> list[str]:
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def check_workdir(workdir: str, overwrite: bool) -> None:
    """Refuses an unwritable folder, or one holding results without `overwrite`.

    Raises:
      ValueError: one line naming the folder.
    """

    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} exists and is not a folder")
    existing = [name for name in OUTPUT_FILES if os.path.exists(os.path.join(workdir, name))]
    if existing and not overwrite:
        raise ValueError(f"--workdir {workdir} already holds results ({existing[0]}); pass --overwrite to replace them")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".nanlab-write-probe")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise ValueError(f"--workdir {workdir} is not writable: {error.strerror or error}") from None


def grid_from_args(args) -> tuple[Grid, dict[str, Any]]:
    """The grid the parsed flags ask for, and the train-CLI overrides behind it.

    Overrides stack as: the lab's preset defaults (`LAB_PRESET_OVERRIDES`), then explicit flags.

    Raises:
      ValueError: see `make_grid`.
    """
    from nanlab import config as config_lib

    explicit = {name: getattr(args, name) for name in PASSED_FLAGS if getattr(args, name) is not None}
    preset = explicit.get("preset") or config_lib.default_preset()
    overrides = {**LAB_PRESET_OVERRIDES.get(preset, {}), **explicit}
    scenarios = list(DEFAULT_SCENARIOS) if args.scenarios is None else _split_scenarios(args.scenarios)
    return make_grid(scenarios, args.chains, args.seeds, args.steps, overrides), overrides


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the lab from command-line arguments.

    Returns:
      0 on success, 2 on bad input (one line on stderr, nothing written).
    """
    import shlex
    import sys

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
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        rows, runs, per_seed = run_grid(grid, chunk_steps=args.chunk_steps, progress=args.progress, console=console,
                                        diagnose=args.diagnose)
    except BadInput as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    seconds = time.perf_counter() - started
    command = "python -m nanlab.compare" + ("" if argv is None and len(sys.argv) < 2 else " ") + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    write_csv(rows, os.path.join(args.workdir, "results.csv"))
    write_json(
        {
            "command": command.rstrip(),
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
        os.path.join(args.workdir, "results.json"),
    )
    write_plots(grid.scenarios, grid.chains, runs, rows, args.workdir)
    Console().print(results_table(rows))
    print(f"{len(rows)} cells, {len(grid.seeds)} seeds, {grid.steps} steps in {seconds:.0f} s; "
          f"results in {args.workdir}/ ({', '.join(OUTPUT_FILES)})")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
