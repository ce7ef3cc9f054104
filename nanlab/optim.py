"""Gradient processing and optimizers: chain specs -> optax transformations, and the skip guard.

Everything here is built from optax; only what optax lacks is written by hand:

* `parse_clip_spec` / `make_clip_chain`: a `--clip` spec such as ``"agc:0.01,global_norm:5"``
  becomes ``optax.chain(optax.adaptive_grad_clip(0.01), optax.clip_by_global_norm(5.0))``.
* `make_schedule` / `make_optimizer`: names -> optax schedules and optimizers.
* `skip_nonfinite`: a guard that closes the gaps of ``optax.apply_if_finite`` (which gives up
  after ``max_consecutive_errors`` and then lets NaN into Adam's moments, and which looks only at
  the incoming gradients). It checks the loss, the gradients and the inner updates, and on a bad
  step returns zero updates and leaves the inner state untouched -- forever.
* `make_tx`: clip -> optimizer, optionally wrapped by the guard.
* `clip_activity`: cheap telemetry for the clipping lab (float32 norms: `nanlab.numerics`).

All transformations are jit-safe: no Python ``if`` on traced values.

The transformation returned by `make_tx` is a ``GradientTransformationExtraArgs``; call it as
``tx.update(grads, opt_state, params, loss=loss)`` (``params`` is required by ``agc``; ``loss`` is
used by the guard and ignored otherwise).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from nanlab.config import OPTIMIZERS, SCHEDULES

__all__ = [
    "CLIP_FACTORIES", "CLIP_NAMES", "ClipSpec", "Schedule", "SkipNonfiniteState", "clip_activity",
    "make_clip_chain", "make_optimizer", "make_schedule", "make_tx", "parse_clip_spec", "skip_nonfinite",
    "tree_all_finite",
]

# Clip name -> optax factory taking the threshold (a float, or a traced array in the clipping lab).
CLIP_FACTORIES: dict[str, Callable[[Any], optax.GradientTransformation]] = {
    "global_norm": optax.clip_by_global_norm,  # max global L2 norm
    "value": optax.clip,  # max |g| per element
    "agc": optax.adaptive_grad_clip,  # max unit-wise |g| / |param|
}
CLIP_NAMES = tuple(CLIP_FACTORIES)

# Momentum of the "momentum" optimizer (SGD with heavy-ball momentum), the usual choice.
MOMENTUM = 0.9

ClipSpec = tuple[tuple[str, float], ...]
Schedule = Union[float, Callable[[Any], Any]]


# --------------------------------------------------------------------------------------------
# Clip specs
# --------------------------------------------------------------------------------------------


def parse_clip_spec(spec: str) -> ClipSpec:
    """Parses a gradient-clipping chain spec.

    Grammar: ``none`` or one or more ``NAME:VALUE`` parts joined by commas, NAME in
    ``global_norm`` (max global L2 norm), ``value`` (max |g| per element), ``agc`` (max ratio of
    unit-wise gradient norm to parameter norm). VALUE is a finite number > 0. Parts apply in the
    order written. Whitespace around parts is ignored.

    Args:
      spec: the spec string, e.g. ``"none"``, ``"global_norm:1.0"``, ``"agc:0.01,global_norm:5"``.

    Returns:
      A tuple of ``(name, value)`` pairs; empty for ``"none"``.

    Raises:
      TypeError: spec is not a string.
      ValueError: a malformed part, naming that part.
    """
    if not isinstance(spec, str):
        raise TypeError(f"clip spec must be a string, got {type(spec).__name__}: {spec!r}")
    parts = [part.strip() for part in spec.split(",")]
    if parts == ["none"]:
        return ()
    parsed = []
    for part in parts:
        if part == "":
            raise ValueError(f"clip spec {spec!r} has an empty part (stray comma?)")
        if part == "none":
            raise ValueError(f"clip spec {spec!r}: 'none' cannot be combined with other parts")
        name, sep, value_text = part.partition(":")
        name = name.strip()
        if name not in CLIP_NAMES:
            raise ValueError(
                f"clip spec part {part!r}: unknown clip {name!r} "
                f"(choose from none, {', '.join(n + ':X' for n in CLIP_NAMES)})"
            )
        if not sep or value_text.strip() == "":
            raise ValueError(f"clip spec part {part!r}: missing value, write e.g. {name}:1.0")
        try:
            value = float(value_text)
        except ValueError:
            raise ValueError(f"clip spec part {part!r}: value {value_text.strip()!r} is not a number") from None
        if not math.isfinite(value) or value <= 0.0:
            raise ValueError(f"clip spec part {part!r}: value must be a finite number > 0, got {value_text.strip()}")
        parsed.append((name, value))
    return tuple(parsed)


def _clip_transform(name: str, value: float) -> optax.GradientTransformation:
    """One parsed clip part -> its optax transformation."""
    if name not in CLIP_FACTORIES:
        raise ValueError(f"unknown clip {name!r}")
    return CLIP_FACTORIES[name](value)


def make_clip_chain(spec: Union[str, ClipSpec]) -> optax.GradientTransformation:
    """Builds the gradient-processing chain of a clip spec.

    Args:
      spec: a spec string (see `parse_clip_spec`) or an already-parsed tuple of (name, value).

    Returns:
      ``optax.identity()`` for ``none``; the single optax transform for one part; otherwise an
      ``optax.chain`` of the parts in order. ``agc`` needs ``params`` in ``update``.
    """
    parsed = parse_clip_spec(spec) if isinstance(spec, str) else tuple(spec)
    transforms = [_clip_transform(name, float(value)) for name, value in parsed]
    if not transforms:
        return optax.identity()
    if len(transforms) == 1:
        return transforms[0]
    return optax.chain(*transforms)


# --------------------------------------------------------------------------------------------
# Schedules and optimizers
# --------------------------------------------------------------------------------------------


def _check_positive_finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def make_schedule(name: str, lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
    """Builds a learning-rate schedule.

    Args:
      name: ``constant`` (lr at every step), ``cosine`` (cosine decay from lr to 0 over
        total_steps) or ``warmup-cosine`` (linear warmup from 0 to lr over warmup_steps, then cosine
        decay to 0 at total_steps).
      lr: the peak learning rate, finite and > 0.
      total_steps: number of training steps, >= 1.
      warmup_steps: warmup length for ``warmup-cosine``; must be < total_steps there.

    Returns:
      An optax schedule: ``step -> learning rate``.

    Raises:
      ValueError: unknown name or out-of-range numbers, naming the argument and its value.
    """
    lr = _check_positive_finite("lr", lr)
    total_steps = _check_int("total_steps", total_steps, 1)
    warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=total_steps)
    if name == "warmup-cosine":
        if warmup_steps >= total_steps:
            raise ValueError(
                f"warmup_steps must be < total_steps for warmup-cosine, got {warmup_steps} >= {total_steps}"
            )
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=lr, warmup_steps=warmup_steps, decay_steps=total_steps, end_value=0.0
        )
    raise ValueError(f"unknown schedule {name!r} (choose from {', '.join(SCHEDULES)})")


def make_optimizer(name: str, schedule: Schedule, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Builds an optax optimizer by name.

    Weight decay: ``adamw`` uses optax's decoupled decay (``optax.adamw(weight_decay=...)``); for
    the others a positive weight_decay adds ``weight_decay * params`` to the gradients before the
    optimizer (classic coupled L2, ``optax.add_decayed_weights``), which needs ``params`` in update.

    Args:
      name: ``adam``, ``adamw``, ``sgd``, ``momentum`` (SGD with momentum 0.9) or ``rmsprop``.
      schedule: a learning rate (float) or an optax schedule (step -> learning rate).
      weight_decay: finite and >= 0.

    Returns:
      The optax transformation (it outputs updates to add to params).
    """
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(f"weight_decay must be a number, got {type(weight_decay).__name__}: {weight_decay!r}")
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if name == "adamw":
        return optax.adamw(schedule, weight_decay=float(weight_decay))
    builders = {
        "adam": lambda: optax.adam(schedule),
        "sgd": lambda: optax.sgd(schedule),
        "momentum": lambda: optax.sgd(schedule, momentum=MOMENTUM),
        "rmsprop": lambda: optax.rmsprop(schedule),
    }
    if name not in builders:
        raise ValueError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    optimizer = builders[name]()
    if weight_decay > 0:
        return optax.chain(optax.add_decayed_weights(float(weight_decay)), optimizer)
    return optimizer


# --------------------------------------------------------------------------------------------
# The skip-nonfinite guard
# --------------------------------------------------------------------------------------------


class SkipNonfiniteState(NamedTuple):
    """State of `skip_nonfinite`.

    Attributes:
      inner_state: the wrapped transformation's state; never touched by a skipped step, so it
        can never hold a NaN that came from a bad step.
      consecutive_skips: int32 scalar, skipped steps in a row; reset to 0 by a good step.
      total_skips: int32 scalar, skipped steps since init; never reset.
      last_skipped: bool scalar, whether the most recent step was skipped.
    """

    inner_state: Any
    consecutive_skips: jax.Array
    total_skips: jax.Array
    last_skipped: jax.Array


def tree_all_finite(tree: Any) -> jax.Array:
    """Bool scalar: every inexact element of every leaf is finite (True for an empty tree)."""
    flags = [
        jnp.all(jnp.isfinite(leaf))
        for leaf in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    ]
    if not flags:
        return jnp.array(True)
    return jnp.all(jnp.stack(flags))


def _saturating_increment(count: jax.Array) -> jax.Array:
    # Stop at int32 max instead of wrapping to a negative count on very long runs.
    return jnp.where(count < jnp.iinfo(jnp.int32).max, count + 1, count)


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Wraps `inner` so that a non-finite step never reaches the params or the inner state.

    Differences from ``optax.apply_if_finite`` (its gaps, each covered by a test):

    * it never gives up: there is no ``max_consecutive_errors`` after which a NaN update is let
      through and poisons e.g. Adam's moments;
    * it checks the loss (extra arg ``loss=``), the incoming gradients AND the updates the inner
      transformation produced (finite gradients can still give inf updates, e.g. an overflow
      inside the optimizer).

    On a bad step the returned updates are zeros (so ``optax.apply_updates`` leaves params as
    they are) and the inner state is returned unchanged; the counters of `SkipNonfiniteState`
    record the skip.

    Args:
      inner: the transformation to guard (e.g. clip -> optimizer).

    Returns:
      A ``GradientTransformationExtraArgs``; ``update(updates, state, params=None, *, loss=None,
      **extra_args)``; other extra args are forwarded to `inner`.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return SkipNonfiniteState(
            inner_state=inner.init(params),
            consecutive_skips=jnp.zeros([], jnp.int32),
            total_skips=jnp.zeros([], jnp.int32),
            last_skipped=jnp.array(False),
        )

    def update(updates, state, params=None, *, loss=None, **extra_args):
        loss_finite = jnp.array(True) if loss is None else jnp.all(jnp.isfinite(loss))
        inputs_finite = jnp.logical_and(loss_finite, tree_all_finite(updates))

        def run_inner(_):
            return inner.update(updates, state.inner_state, params, **extra_args)

        # Zeros shaped like the inner *outputs* (their dtypes may differ from the gradients').
        out_shapes = jax.eval_shape(run_inner, None)[0]

        def skip_inner(_):
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out_shapes)
            return zeros, state.inner_state

        # lax.cond: on bad inputs the inner transformation does not even run.
        new_updates, new_inner_state = jax.lax.cond(inputs_finite, run_inner, skip_inner, None)
        step_ok = jnp.logical_and(inputs_finite, tree_all_finite(new_updates))
        # Second gate: finite inputs can still give non-finite updates; select the old state then.
        new_updates = jax.tree.map(lambda u: jnp.where(step_ok, u, jnp.zeros_like(u)), new_updates)
        new_inner_state = jax.tree.map(
            lambda new, old: jnp.where(step_ok, new, old), new_inner_state, state.inner_state
        )
        skipped = jnp.logical_not(step_ok)
        new_state = SkipNonfiniteState(
            inner_state=new_inner_state,
            consecutive_skips=jnp.where(skipped, _saturating_increment(state.consecutive_skips), 0).astype(
                jnp.int32
            ),
            total_skips=jnp.where(skipped, _saturating_increment(state.total_skips), state.total_skips).astype(
                jnp.int32
            ),
            last_skipped=skipped,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init=init, update=update)


# make_tx's flag argument shadows the function's name inside make_tx.
_guard = skip_nonfinite


def make_tx(
    clip: Union[str, ClipSpec] = "none",
    optimizer: str = "adam",
    schedule: Schedule = 1e-3,
    weight_decay: float = 0.0,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """The full gradient transformation: clip chain -> optimizer, optionally guarded.

    Args:
      clip: a clip spec (see `parse_clip_spec`) or a parsed tuple.
      optimizer: an optimizer name (see `make_optimizer`).
      schedule: a learning rate or an optax schedule.
      weight_decay: see `make_optimizer`.
      skip_nonfinite: wrap the chain in `skip_nonfinite` (then ``opt_state`` is a
        `SkipNonfiniteState`).

    Returns:
      A ``GradientTransformationExtraArgs``; ``update(grads, opt_state, params, loss=loss)`` works
      with or without the guard (the loss is ignored without it).
    """
    chain = optax.chain(make_clip_chain(clip), make_optimizer(optimizer, schedule, weight_decay))
    if skip_nonfinite:
        return _guard(chain)
    return chain


# --------------------------------------------------------------------------------------------
# Telemetry
# --------------------------------------------------------------------------------------------


def clip_activity(raw_grads: Any, clipped_grads: Any) -> jax.Array:
    """Bool scalar: did the clip chain change any element?

    NaN in the same place on both sides counts as unchanged (NaN != NaN would otherwise say
    "changed" for every NaN gradient).

    Args:
      raw_grads: gradients before clipping.
      clipped_grads: the same pytree after the clip chain.

    Returns:
      A bool scalar, True if some element differs.
    """
    raw_leaves = jax.tree.leaves(raw_grads)
    clipped_leaves = jax.tree.leaves(clipped_grads)
    if len(raw_leaves) != len(clipped_leaves):
        raise ValueError(
            f"raw_grads and clipped_grads differ in structure: {len(raw_leaves)} vs {len(clipped_leaves)} leaves"
        )
    if not raw_leaves:
        return jnp.array(False)
    changed = [
        jnp.any((raw != clipped) & ~(jnp.isnan(raw) & jnp.isnan(clipped)))
        for raw, clipped in zip(raw_leaves, clipped_leaves)
    ]
    return jnp.any(jnp.stack(changed))
