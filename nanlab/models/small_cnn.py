"""SmallCNN: three strided conv blocks, a global mean and a dense head; the loop's behaviour in seconds.

It takes InceptionV3's knobs (`hidden_activation`, `use_batchnorm`, `width_multiplier`, `dtype`,
`dropout_rate`) and keeps its statistics contract (`nanlab.models.common.sow_block_stats`, blocks
``Conv1``..``Conv3``), so every flag and scenario of the train CLI runs on it. It compiles in
seconds where InceptionV3's train step takes minutes on a CPU: for quick checks and tests, not
for results.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nanlab.models import common

__all__ = ["SmallCNN"]

FEATURES = (16, 32, 64)  # channels of Conv1..Conv3 at width 1


class ConvBlock(nn.Module):
    """A 3x3 stride-2 convolution, BatchNorm (or a bias), activation; sows its statistics."""

    features: int
    hidden_activation: common.Activation
    use_batchnorm: bool
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        h = nn.Conv(self.features, (3, 3), (2, 2), use_bias=not self.use_batchnorm, dtype=self.dtype)(x)
        if self.use_batchnorm:
            h = nn.BatchNorm(use_running_average=not train, momentum=common.BN_MOMENTUM)(h)
        h = common.resolve_activation(self.hidden_activation)(h)
        common.sow_block_stats(self, h)
        return h


class SmallCNN(common.ModelKnobs):
    """Three strided conv blocks -> global mean -> dense; float32 logits (batch, num_classes)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        h = x.astype(self.dtype)
        for index, features in enumerate(FEATURES, start=1):
            block = ConvBlock(common.scaled_channels(features, self.width_multiplier), self.hidden_activation,
                              self.use_batchnorm, self.dtype, name=f"Conv{index}")
            h = block(h, train=train)
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
        return nn.Dense(self.num_classes, name="Logits")(h)
