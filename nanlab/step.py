"""The train state, the pure train step with its in-jit sentinel, and the eval step.

`make_train_step(model, loss_fn, tx)` returns a pure ``train_step(state, batch) -> (state,
StepStats)``; the caller jits it with ``donate_argnums=0``.

The sentinel, every step: one float32 sum of squares over the gradients, which is also the global
and per-module gradient norm; the loss's and the gradients' finite flags are read off it. The
update then runs under ``lax.cond`` on that flag, so a healthy step updates the donated buffers
in place, as a plain step does. On a 2-core CPU the step then takes 1.008-1.012x a plain step's
time on the cpu preset (batch 32) and 0.997-1.013x at full size. Its fixed ~1 ms (one read of the
gradients and the gate's barrier) is +2-3% of the shortest step benchmarked, batch 8 at ~42 ms
(benchmarks/results/bench_sentinel.md).

`update_telemetry(params_before, params_after)` measures what the step did to the weights: the
parameter norm, the norm of the applied update, their ratio (big_vision's ``l2_params``/
``l2_updates``) and whether the new weights are finite. The loop runs it on the steps it logs
only, so it costs nothing in between.

When a step is non-finite and skipping is off, the returned state equals the input state (the
contract of `nanlab.guard.guard`'s ``gate_kwarg``, through which the train CLI guards it), so the
loop can replay the exact failing step (same state, batch and dropout rng) through
`nanlab.trace.localize`. With skipping on, `nanlab.optim.skip_nonfinite` inside `tx` turns the
update into zeros and leaves the optimizer's inner state untouched; the step also keeps the old
BatchNorm statistics, which the optimizer never sees.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from nanlab.numerics import finite_from_sq_norm, tree_norm, tree_sq_norm, tree_sq_norms

__all__ = [
    "Batch", "LossFn", "StepStats", "TrainState", "activation_max_abs", "batch_accuracy", "create_train_state",
    "find_skip_state", "guard_flag", "make_batch_moments_fn", "make_eval_step", "make_train_step",
    "recalibrated", "update_telemetry",
]

LossFn = Callable[[jax.Array, jax.Array], jax.Array]
Batch = tuple[jax.Array, jax.Array]


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; a pytree, so it jits, shards and checkpoints as is.

    Attributes:
      step: int32 scalar, the number of steps taken (skipped steps included).
      params: the model's 'params' collection.
      batch_stats: the model's 'batch_stats' collection ({} without BatchNorm).
      opt_state: the optax state.
      rng: the run's base PRNG key; step k's dropout key is ``fold_in(rng, k)``.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array


@flax.struct.dataclass
class StepStats:
    """What one step reports; float32 scalars unless stated.

    Attributes:
      loss: mean loss of the batch.
      accuracy: fraction of correct (example, label) decisions, logit > 0 meaning 1.
      grad_norm: global L2 norm of the gradients (NaN when a gradient is NaN or infinite).
      lr: the learning rate of this step.
      loss_finite, grads_finite: bool, each quantity free of NaN and Inf.
      batch_stats_finite: bool, the BatchNorm statistics this step writes are free of NaN and Inf.
      finite: bool, all three (with the skip guard: loss and gradients, and the guard did not
        skip the step).
      skipped: bool, this step's update was dropped by the skip-nonfinite guard.
      total_skipped: int32, steps skipped so far in the run (0 without the guard).
      module_grad_norms: top-level module name -> gradient norm.
      activation_max_abs: block name -> max |activation| ({} unless collected).
    """

    loss: jax.Array
    accuracy: jax.Array
    grad_norm: jax.Array
    lr: jax.Array
    loss_finite: jax.Array
    grads_finite: jax.Array
    batch_stats_finite: jax.Array
    finite: jax.Array
    skipped: jax.Array
    total_skipped: jax.Array
    module_grad_norms: dict[str, jax.Array]
    activation_max_abs: dict[str, jax.Array]


def create_train_state(
    model: nn.Module, tx: optax.GradientTransformation, sample_x: jax.Array, seed: int
) -> TrainState:
    """Initialize the model's variables and the optimizer state.

    Args:
      model: a linen module called as ``model(x, train=...)``.
      tx: the optax transformation the step will apply.
      sample_x: an input batch with the training shape (only its shape and dtype matter).
      seed: the run's seed; init and dropout keys are derived from it.

    Returns:
      A `TrainState` at step 0.
    """
    init_key, params_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed), 3)
    del init_key
    variables = model.init({"params": params_key, "dropout": dropout_key}, sample_x, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=dropout_key,
    )


def update_telemetry(params_before: Any, params_after: Any) -> dict[str, jax.Array]:
    """What one step did to the weights; jit it and give it a copy of the params from before the step.

    Args:
      params_before: the parameters before the step.
      params_after: the parameters after it (same structure).

    Returns:
      float32 scalars ``param_norm`` (before), ``update_norm`` (norm of after - before: the update
      as applied, weight decay included; NaN when not finite), ``update_ratio`` (update_norm / param_norm, 0 for all-zero
      parameters) and the bool ``updates_finite`` (after - before free of NaN and Inf: with finite
      weights before, the new weights are finite).
    """
    applied = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), params_after, params_before)
    update_sq = tree_sq_norm(applied, nan_if_nonfinite=True)
    update_norm, param_norm = jnp.sqrt(update_sq), tree_norm(params_before)
    # A plain where is safe here: nothing is differentiated through this ratio.
    ratio = jnp.where(param_norm > 0, update_norm / jnp.where(param_norm > 0, param_norm, 1.0), 0.0)
    return {"param_norm": param_norm, "update_norm": update_norm, "update_ratio": ratio,
            "updates_finite": finite_from_sq_norm(update_sq)}


def activation_max_abs(stats: Any) -> dict[str, jax.Array]:
    """Flatten a sown 'stats' collection into block name -> max |activation|.

    Args:
      stats: the 'stats' collection; under each top-level block name, every leaf whose key path
        holds ``'max_abs'`` is a sown maximum (sow stores a tuple, one entry per call).

    Returns:
      block name -> float32 scalar, the largest of the block's sown maxima.
    """
    flat = {}
    for name, entry in stats.items():
        values = [
            jnp.asarray(leaf, jnp.float32)
            for path, leaf in jax.tree_util.tree_flatten_with_path(entry)[0]
            if any(getattr(key, "key", None) == "max_abs" for key in path)
        ]
        if values:
            flat[name] = jnp.max(jnp.stack(values))
    return flat


def batch_accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example fraction of correct label decisions (logit > 0 means 1), shape (batch,)."""
    return jnp.mean(((logits > 0) == (labels > 0.5)).astype(jnp.float32), axis=-1)


def find_skip_state(opt_state: Any) -> Any | None:
    """The skip-nonfinite guard's state inside an optax state (a node with `total_skips`), or None."""
    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=lambda n: hasattr(n, "total_skips"))
        if hasattr(node, "total_skips")
    ]
    return found[0] if found else None


def _apply_model(model, params, batch_stats, x, *, train, rngs=None, collect_stats=False):
    """Run `model`; return (float32 logits, aux logits or None, new batch_stats, stats collection)."""
    variables = {"params": params}
    mutable = []
    if batch_stats:
        variables["batch_stats"] = batch_stats
        if train:
            mutable.append("batch_stats")
    if collect_stats:
        mutable.append("stats")
    outputs = model.apply(variables, x, train=train, rngs=rngs, mutable=mutable or False)
    outputs, new_collections = outputs if mutable else (outputs, {})
    logits, aux_logits = outputs if isinstance(outputs, tuple) else (outputs, None)
    # Losses and metrics are computed in float32 whatever the model's compute dtype.
    logits = logits.astype(jnp.float32)
    aux_logits = None if aux_logits is None else aux_logits.astype(jnp.float32)
    new_batch_stats = new_collections.get("batch_stats", batch_stats)
    return logits, aux_logits, new_batch_stats, new_collections.get("stats", {})


def make_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    *,
    schedule: Callable[[jax.Array], jax.Array] | float = 0.0,
    skip_nonfinite: bool = False,
    collect_stats: bool = False,
    aux_loss_weight: float = 0.4,
) -> Callable[[TrainState, Batch], tuple[TrainState, StepStats]]:
    """Build the pure train step.

    Args:
      model: linen module, ``model(x, train=True)`` -> logits (or (logits, aux_logits)).
      loss_fn: per-element loss ``loss_fn(logits, labels)``; the step takes its mean.
      tx: the optax transformation; it receives the loss as the extra arg ``loss=``, which
        `nanlab.optim.skip_nonfinite` checks.
      schedule: the learning-rate schedule (only reported in the stats), or a constant.
      skip_nonfinite: `tx` holds the skip guard: a non-finite step advances the step counter
        with a zero update instead of returning the input state.
      collect_stats: also sow and return per-block activation max |a| (the 'stats' collection).
      aux_loss_weight: weight of the auxiliary head's loss when the model returns aux logits.

    Returns:
      ``train_step(state, batch, apply_update=True) -> (state, StepStats)``, pure; jit it with
      donate_argnums=0. `apply_update` (a Python bool or a traced bool scalar) False computes the
      step's stats but returns the input state: the loop freezes its state that way after a
      failure, inside the same executable.
    """
    pass_loss = isinstance(tx, optax.GradientTransformationExtraArgs)

    def train_step(state: TrainState, batch: Batch,
                   apply_update: bool | jax.Array = True) -> tuple[TrainState, StepStats]:
        x, labels = batch
        dropout_key = jax.random.fold_in(state.rng, state.step)

        def compute_loss(params):
            logits, aux_logits, new_batch_stats, stats = _apply_model(
                model, params, state.batch_stats, x, train=True,
                rngs={"dropout": dropout_key}, collect_stats=collect_stats,
            )
            loss = jnp.mean(loss_fn(logits, labels))
            if aux_logits is not None:
                loss = loss + aux_loss_weight * jnp.mean(loss_fn(aux_logits, labels))
            return loss, (logits, new_batch_stats, stats)

        (loss, (logits, new_batch_stats, stats)), grads = jax.value_and_grad(
            compute_loss, has_aux=True
        )(state.params)
        extra = {"loss": loss} if pass_loss else {}

        # The sentinel: one float32 sum of squares over the gradients (it is also the grad norm
        # and the per-module norms); the finite flag is read off it, with the loss's.
        grad_sq = tree_sq_norms(grads, nan_if_nonfinite=True)
        grad_sq_total = sum(grad_sq.values(), jnp.zeros((), jnp.float32))
        loss_finite = jnp.isfinite(loss)
        grads_finite = finite_from_sq_norm(grad_sq_total)
        # BatchNorm's running statistics bypass the gradients: huge activations can overflow the
        # running variance (bfloat16: high-lr) in a step whose loss and gradients are finite, and
        # only the next step would meet it. One more small sum of squares (per-channel vectors).
        stats_finite = finite_from_sq_norm(tree_sq_norm(new_batch_stats, nan_if_nonfinite=True))
        inputs_ok = loss_finite & grads_finite

        def update():
            # Finite gradients give non-finite updates only through an overflow inside the
            # optimizer (a huge step); the step does not pay a pass over the updates for that
            # rare case: the next step's loss meets the non-finite weights, and `update_telemetry`
            # on logged steps flags it.
            updates, new_opt_state = tx.update(grads, state.opt_state, state.params, **extra)
            batch_stats = new_batch_stats
            if skip_nonfinite:
                # The guard already zeroed the update; BatchNorm's statistics bypass the
                # optimizer, so a NaN forward pass must not reach them either (small arrays).
                batch_stats = jax.tree.map(lambda new, old: jnp.where(inputs_ok & stats_finite, new, old),
                                           new_batch_stats, state.batch_stats)
            return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                                 batch_stats=batch_stats, opt_state=new_opt_state)

        # The update runs under lax.cond, keyed on the loss and gradients only: a healthy step
        # then updates the donated buffers in place as a plain step does. Probes on the cpu
        # preset: a where over the state cost +3-5% keyed so, +35-45% keyed on the updates'
        # finiteness too (updates materialized, old and new state side by side); a second
        # cond level around it +7-17%. Non-finite, or frozen by the caller (`apply_update`
        # False): the input state comes back, so the loop can replay the step exactly.
        proceed = apply_update if skip_nonfinite else inputs_ok & stats_finite & apply_update
        if proceed is True:
            new_state = update()
        else:
            new_state = lax.cond(proceed, update, lambda: state)
        finite = inputs_ok if skip_nonfinite else inputs_ok & stats_finite
        skip_state = find_skip_state(new_state.opt_state) if skip_nonfinite else None
        total_skipped = (
            jnp.asarray(skip_state.total_skips, jnp.int32) if skip_state is not None else jnp.zeros((), jnp.int32)
        )
        if skip_state is not None:
            # The guard also skips on non-finite updates, which the step itself does not check.
            finite = finite & ~skip_state.last_skipped
        lr = schedule(state.step) if callable(schedule) else schedule
        step_stats = StepStats(
            loss=loss.astype(jnp.float32),
            accuracy=jnp.mean(batch_accuracy(logits, labels)),
            grad_norm=jnp.sqrt(grad_sq_total),
            lr=jnp.asarray(lr, jnp.float32),
            loss_finite=loss_finite,
            grads_finite=grads_finite,
            batch_stats_finite=stats_finite,
            finite=finite,
            skipped=jnp.logical_and(skip_nonfinite, ~finite),
            total_skipped=total_skipped,
            module_grad_norms={name: jnp.sqrt(sq) for name, sq in grad_sq.items()},
            activation_max_abs=activation_max_abs(stats),
        )
        return new_state, step_stats

    return train_step


def guard_flag(outputs: tuple[TrainState, StepStats]) -> jax.Array:
    """The flag `nanlab.guard.guard` takes from `make_train_step`'s outputs (``finite=``): the
    step's own sentinel, `StepStats.finite`, which sees the gradients the output scan cannot."""
    return outputs[1].finite


def make_eval_step(model: nn.Module, loss_fn: LossFn) -> Callable[[TrainState, Batch, jax.Array], dict]:
    """Build the pure eval step (inference mode: BatchNorm running statistics, no dropout).

    Args:
      model: the linen module.
      loss_fn: per-element loss ``loss_fn(logits, labels)``.

    Returns:
      ``eval_step(state, batch, mask) -> {"loss_sum", "correct_sum", "count"}``, float32 sums over
      the examples whose mask is 1 (the mask lets the last, padded batch keep the same shape).
    """

    def eval_step(state: TrainState, batch: Batch, mask: jax.Array) -> dict[str, jax.Array]:
        x, labels = batch
        logits, _, _, _ = _apply_model(model, state.params, state.batch_stats, x, train=False)
        per_example_loss = jnp.mean(loss_fn(logits, labels), axis=-1)
        mask = mask.astype(jnp.float32)
        return {
            "loss_sum": jnp.sum(per_example_loss * mask),
            "correct_sum": jnp.sum(batch_accuracy(logits, labels) * mask),
            "count": jnp.sum(mask),
        }

    return eval_step


def make_batch_moments_fn(model: nn.Module, momentum: float) -> Callable[[TrainState, jax.Array], Any]:
    """Build ``batch_moments(state, x) -> batch_stats`` holding the exact BatchNorm moments of `x`.

    Used to recalibrate BatchNorm before evaluating ("precise BN"): a short run's running averages
    still remember the early weights (with momentum 0.99 they span ~100 steps), so inference-mode
    accuracy lags far behind; averaging the moments of a few training batches under the current
    weights fixes that without touching the training state.

    Args:
      model: the linen module (its BatchNorms must use `momentum`).
      momentum: the BatchNorms' running-average momentum m (running <- m running + (1 - m) batch).

    Returns:
      A pure function; jit it. Returns {} for a model without BatchNorm.
    """

    def batch_moments(state: TrainState, x: jax.Array) -> Any:
        if not state.batch_stats:
            return {}
        zeros = jax.tree.map(jnp.zeros_like, state.batch_stats)
        _, updated = model.apply({"params": state.params, "batch_stats": zeros}, x, train=True,
                                 mutable=["batch_stats"])
        # From zero running statistics one update leaves exactly (1 - m) * (batch moment).
        return jax.tree.map(lambda v: v / (1.0 - momentum), updated["batch_stats"])

    return batch_moments


def recalibrated(state: TrainState, batch_moments: Callable[[TrainState, jax.Array], Any], xs) -> TrainState:
    """`state` with batch_stats replaced by the mean of `batch_moments` over the batches `xs`.

    Args:
      state: the train state (not modified).
      batch_moments: from `make_batch_moments_fn` (jitted).
      xs: an iterable of input batches (e.g. the first few training batches).

    Returns:
      A new TrainState; unchanged when the model has no BatchNorm or `xs` is empty.
    """
    if not state.batch_stats:
        return state
    moments = [batch_moments(state, x) for x in xs]
    if not moments:
        return state
    return state.replace(batch_stats=_mean_of_trees(moments, np.float32(len(moments))))


@jax.jit
def _mean_of_trees(trees: list[Any], count: jax.Array) -> Any:
    # One program for every BatchNorm layer (eager, each shape's add and divide compiled apart).
    # `count` is an operand, not a constant: XLA turns a division by a constant into a
    # multiplication by its reciprocal, which rounds differently from the mean's division.
    total = functools.reduce(lambda a, b: jax.tree.map(jnp.add, a, b), trees)
    return jax.tree.map(lambda t: t / count.astype(t.dtype), total)
