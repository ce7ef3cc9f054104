"""Replicas: one (chain, seed) pair of the grid, its state, and the masked step the runner vmaps.

`make_replica_step(problem)` is nanlab.step's train step with the skip guard always in the chain
plus a mask: a replica that went non-finite without '+skip' keeps its last finite state and stops;
a '+skip' replica takes the guarded (zero) update and trains on. `Replica` holds what differs per
replica (seed, clip thresholds, skip flag) as data, so all of a group's replicas share one program.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanlab.compare.chains import Chain, chain_thresholds, find_probe_state, make_lab_tx
from nanlab.guard import gate
from nanlab.step import TrainState, create_train_state, make_eval_step, make_train_step

__all__ = [
    "Problem", "Replica", "ReplicaState", "StepRecord", "init_replica", "make_eval_fn", "make_replica_step",
    "replica_train_step", "replicas_of",
]

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
class ReplicaState:
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


def init_replica(problem: Problem, sample_x: jax.Array, replica: Replica) -> ReplicaState:
    """Initialises one replica exactly as the train CLI does for its seed; vmappable.

    Args:
      problem: the group's model and chain structure.
      sample_x: an input batch (only shape and dtype matter).
      replica: the replica's seed and chain data.

    Returns:
      The replica's ReplicaState, alive.
    """
    return ReplicaState(
        train=create_train_state(problem.model, problem.tx(replica.thresholds), sample_x, replica.seed),
        alive=jnp.asarray(True),
    )


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


def make_replica_step(problem: Problem) -> Callable[[Replica, ReplicaState, jax.Array, jax.Array], tuple]:
    """Builds the pure lab step `step(replica, state, xb, yb) -> (state, StepRecord)`.

    It is nanlab.step's train step (with the guard in the chain) plus a mask, `nanlab.guard.gate`
    on the step's own finite flag (the flag `python -m nanlab.train` hands the guard): a replica that is
    not alive keeps its state; a non-finite step kills a replica without '+skip' (its state stays
    the one before the step), while a '+skip' replica takes the guarded step (zero update,
    moments and BatchNorm statistics untouched) and trains on. The runner vmaps this step over
    the replica axis.

    Args:
      problem: the group's model, loss and chain structure.

    Returns:
      The step function (not jitted).
    """

    def step(replica: Replica, state: ReplicaState, xb: jax.Array, yb: jax.Array):
        train_step = replica_train_step(problem, replica.thresholds)
        new_train, stats = train_step(state.train, (xb, yb))
        probe = find_probe_state(new_train.opt_state)
        clip_active = stats.finite & probe.active
        commit = state.alive & (stats.finite | replica.skip)
        new_state = ReplicaState(train=gate(commit, new_train, state.train), alive=commit)
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


def make_eval_fn(problem: Problem) -> Callable[[ReplicaState, jax.Array, jax.Array, jax.Array], dict]:
    """nanlab.step's eval step on a ReplicaState: `(state, x, y, mask) -> sums` (inference mode)."""
    eval_step = make_eval_step(problem.model, problem.loss_fn)

    def eval_fn(state: ReplicaState, x: jax.Array, y: jax.Array, mask: jax.Array) -> dict:
        return eval_step(state.train, (x, y), mask)

    return eval_fn
