"""What every model of the lab shares: the knobs' meanings, BatchNorm's settings, the stats contract.

InceptionV3 and SmallCNN take the same knobs (`hidden_activation` resolved by
`resolve_activation`, `width_multiplier` applied by `scaled_channels`) and record activation
statistics the same way (`sow_block_stats`): for each top-level block, when the caller makes the
'stats' collection mutable, ``stats[block] = {'max_abs': largest finite |output|, 'nonfinite':
count of NaN/inf entries}``; otherwise nothing is computed.
"""

from __future__ import annotations

from typing import Any, Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = [
    "ACTIVATIONS", "Activation", "BN_EPSILON", "BN_MOMENTUM", "MIN_CHANNELS", "ModelKnobs", "resolve_activation",
    "scaled_channels", "sow_block_stats",
]

Activation = Union[str, Callable[[jax.Array], jax.Array]]

MIN_CHANNELS = 8
# Keras's BatchNormalization defaults, used unchanged by keras.applications.InceptionV3.
# Keras updates moving = moving * momentum + batch * (1 - momentum), as flax does with its
# `momentum`, so the number carries over as is.
BN_MOMENTUM = 0.99
BN_EPSILON = 1e-3

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}


def resolve_activation(activation: Activation) -> Callable[[jax.Array], jax.Array]:
    """Turns a `hidden_activation` knob into a function.

    Args:
      activation: "relu", "sigmoid", "tanh", or a callable array -> array.

    Returns:
      The activation function.

    Raises:
      ValueError: for an unknown name; TypeError for anything else that is not callable.
    """
    if isinstance(activation, str):
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"hidden_activation={activation!r} is not one of {sorted(ACTIVATIONS)} "
                "(or pass a callable)"
            )
        return ACTIVATIONS[activation]
    if callable(activation):
        return activation
    raise TypeError(f"hidden_activation={activation!r} is neither a name nor a callable")


def scaled_channels(channels: int, width_multiplier: float) -> int:
    """Output channels of a convolution under `width_multiplier`.

    Args:
      channels: Keras's channel count.
      width_multiplier: the model's knob (> 0).

    Returns:
      `max(MIN_CHANNELS, round(channels * width_multiplier))`; `channels` at 1.0.
    """
    return max(MIN_CHANNELS, int(round(channels * width_multiplier)))


def sow_block_stats(module: nn.Module, y: jax.Array) -> None:
    """Sows max finite |y| and the count of NaN/inf entries of a block's output into 'stats'.

    A Python check of the collection's mutability (static, not a traced value) skips the
    reductions entirely when the caller did not ask for statistics; `init` sows nothing,
    so its variables hold only 'params' and 'batch_stats'.
    """
    if module.is_initializing() or not module.is_mutable_collection("stats"):
        return
    finite = jnp.isfinite(y)
    # The largest FINITE magnitude: whether a max reduction propagates NaN differs between
    # XLA backends (CPU's vectorized max drops it), so non-finite entries are masked out and
    # counted separately. float32 so a bf16 model's maximum is not rounded again.
    max_abs = jnp.max(jnp.where(finite, jnp.abs(y.astype(jnp.float32)), 0.0))
    nonfinite = jnp.sum(jnp.logical_not(finite), dtype=jnp.int32)
    # Combine rather than overwrite, should a block ever run twice in one apply.
    module.sow("stats", "max_abs", max_abs, init_fn=lambda: -jnp.inf, reduce_fn=jnp.maximum)
    module.sow("stats", "nonfinite", nonfinite, init_fn=lambda: 0, reduce_fn=jnp.add)


class ModelKnobs(nn.Module):
    """The knobs every model of the lab takes (`nanlab.models.model_knobs` fills them from a TrainConfig).

    Attributes:
      num_classes: width of the dense head; float32 logits out.
      hidden_activation: "relu", "sigmoid", "tanh" or a callable, after every convolution.
      use_batchnorm: BatchNorm after each convolution; off, the convolution carries a bias.
      width_multiplier: scales every convolution's channels (`scaled_channels`).
      dtype: the compute dtype; parameters stay float32.
      dropout_rate: dropout before the dense head (rng name 'dropout').
    """

    num_classes: int = 1
    hidden_activation: Activation = "relu"
    use_batchnorm: bool = True
    width_multiplier: float = 1.0
    dtype: Any = jnp.float32
    dropout_rate: float = 0.0
