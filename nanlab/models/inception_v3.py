"""InceptionV3 in flax.linen, layer for layer the model of `keras.applications.InceptionV3`.

Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (CVPR 2016),
arXiv:1512.00567. The layout, channel counts, paddings and BatchNorm settings follow
Keras's `keras/src/applications/inception_v3.py`, so that the parameter counts match Keras's
exactly at 299x299x3 (23,851,784 in all with 1000 classes, 21,804,833 with 1 class) and Keras
weights import unchanged (`nanlab.models.keras_import`).

Blocks carry TF-slim's stable names (`Conv2d_1a_3x3`, ..., `Mixed_5b`, ..., `Mixed_7c`,
`Logits`), and flax.linen runs every module under `jax.named_scope`, so an operation inside
the model shows up in JAX's name stack as e.g. `InceptionV3/Mixed_5b/Branch_1_Conv2d_0b_5x5/...`,
which is what the NaN localizer reports.

Knobs (all fields of `InceptionV3`):
- `num_classes`: width of the dense head; logits come out in float32, the sigmoid belongs
  to the loss or to `predict`.
- `hidden_activation`: "relu" (Keras, default), "sigmoid", "tanh", or any callable
  array -> array; used after every convolution, never on the logits.
- `use_batchnorm`: Keras's conv -> BatchNorm(scale=False) -> activation. When off, each
  convolution gets a bias instead (BatchNorm's beta was the only shift; without it the
  network could not shift its pre-activations at all), and there is no 'batch_stats'.
- `width_multiplier`: every convolution's output channels become
  `max(8, round(channels * width_multiplier))` (1.0 is Keras's model exactly; the floor of 8
  keeps the thinnest variants trainable).
- `dtype`: computation dtype (e.g. jnp.bfloat16); parameters stay float32
  (`param_dtype=float32`), BatchNorm statistics are computed in float32 by flax, and the
  head runs in float32.
- `dropout_rate`: dropout before the dense head (Keras has none: 0.0); rng name 'dropout'.
- `aux_logits`: the paper's auxiliary classifier on Mixed_6e (off by default; Keras has
  none). It adds 2,556,800 + 769 * num_classes parameters (2,557,569 for one class) and
  1,792 BatchNorm statistics. `__call__(x, train=True)` then returns (logits, aux_logits).
- `include_top`: False drops the dense head (like Keras's `include_top=False,
  pooling="avg"`) and returns the globally averaged features (batch, 2048 at width 1), float32.
- `conv_impl`: passed to every `nanlab.models.conv.Conv` (its formulation on this backend).

Inputs: NHWC, height and width >= 75 (as Keras), any number of channels.

Statistics: when the caller makes the 'stats' collection mutable
(`model.apply(variables, x, train=..., mutable=['stats'])`), every block sows
`stats[block] = {'max_abs': largest finite |output|, 'nonfinite': count of NaN/inf in the
output}`;
otherwise `sow` is a no-op and nothing is computed. `activation_stats` flattens the
collection; `module_grad_norms` gives the global gradient norm per block from a params tree.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nanlab.config import INCEPTION_V3_BLOCKS, MIN_IMAGE_SIZE
from nanlab.models.common import (
    BN_EPSILON,
    BN_MOMENTUM,
    Activation,
    ModelKnobs,
    resolve_activation,
    scaled_channels,
    sow_block_stats,
)
from nanlab.models import conv as conv_lib
from nanlab.models import pooling
from nanlab.models.conv import Conv
from nanlab.numerics import tree_norm

__all__ = [
    "BLOCK_NAMES", "InceptionV3", "abstract_variables", "activation_stats", "init_variables", "module_grad_norms",
    "predict",
]

# Keras's default kernel initializer for Conv2D and Dense; biases and BatchNorm's beta start
# at zero, moving means at zero, moving variances at one (also Keras's and flax's defaults).
KERNEL_INIT = nn.initializers.glorot_uniform()

# The top-level blocks, in network order (names of `stats` entries and of params subtrees).
BLOCK_NAMES: tuple[str, ...] = INCEPTION_V3_BLOCKS

class ConvBN(nn.Module):
    """Keras's `conv2d_bn`: bias-free convolution, BatchNorm(scale=False), activation.

    `features` is Keras's channel count; `width_multiplier` scales it. Without BatchNorm the
    convolution carries a bias.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"
    hidden_activation: Activation = "relu"
    use_batchnorm: bool = True
    width_multiplier: float = 1.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"
    sow_stats: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = Conv(
            features=scaled_channels(self.features, self.width_multiplier),
            kernel_size=self.kernel_size,
            strides=self.strides,
            padding=self.padding,
            use_bias=not self.use_batchnorm,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            impl=self.conv_impl,
            kernel_init=KERNEL_INIT,
            name="Conv",
        )(x)
        if self.use_batchnorm:
            y = nn.BatchNorm(
                use_running_average=not train,
                momentum=BN_MOMENTUM,
                epsilon=BN_EPSILON,
                use_scale=False,
                # Two-pass variance: E[x^2] - E[x]^2 cancels catastrophically for large
                # means, and this lab studies exactly such activations.
                use_fast_variance=False,
                dtype=self.dtype,
                param_dtype=jnp.float32,
                name="BatchNorm",
            )(y)
        y = resolve_activation(self.hidden_activation)(y)
        if self.sow_stats:
            sow_block_stats(self, y)
        return y


def _max_pool_3x3_s2(x: jax.Array, conv_impl: str) -> jax.Array:
    """Keras's MaxPooling2D((3, 3), strides=(2, 2)), padding "valid".

    Besides "xla" (XLA's own gradient, the reference), with the gradient of `nanlab.models.pooling`:
    XLA's select-and-gather lowering was 16% of the train step's kernel time on CPU.
    """
    if conv_lib.resolve_impl(conv_impl) == "xla":
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
    return pooling.max_pool(x, (3, 3), (2, 2))


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """Keras's AveragePooling2D((3, 3), strides=(1, 1), padding="same").

    Keras divides by the number of valid (unpadded) entries at the border, as does
    count_include_pad=False.
    """
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)


class _Block(nn.Module):
    """Shared knobs of the Inception blocks; `conv` builds a ConvBN with them."""

    hidden_activation: Activation = "relu"
    use_batchnorm: bool = True
    width_multiplier: float = 1.0
    dtype: Any = jnp.float32
    conv_impl: str = "auto"

    def conv(self, features, kernel_size, name, strides=(1, 1), padding="SAME") -> ConvBN:
        return ConvBN(
            features=features,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            hidden_activation=self.hidden_activation,
            use_batchnorm=self.use_batchnorm,
            width_multiplier=self.width_multiplier,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
            name=name,
        )


class InceptionA(_Block):
    """Mixed_5b-5d (Keras mixed0-2): 35x35 block, four branches."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b0 = self.conv(64, (1, 1), "Branch_0_Conv2d_0a_1x1")(x, train=train)
        b1 = self.conv(48, (1, 1), "Branch_1_Conv2d_0a_1x1")(x, train=train)
        b1 = self.conv(64, (5, 5), "Branch_1_Conv2d_0b_5x5")(b1, train=train)
        b2 = self.conv(64, (1, 1), "Branch_2_Conv2d_0a_1x1")(x, train=train)
        b2 = self.conv(96, (3, 3), "Branch_2_Conv2d_0b_3x3")(b2, train=train)
        b2 = self.conv(96, (3, 3), "Branch_2_Conv2d_0c_3x3")(b2, train=train)
        b3 = _avg_pool_3x3_same(x)
        b3 = self.conv(self.pool_features, (1, 1), "Branch_3_Conv2d_0b_1x1")(b3, train=train)
        y = jnp.concatenate([b0, b1, b2, b3], axis=-1)
        sow_block_stats(self, y)
        return y


class InceptionB(_Block):
    """Mixed_6a (Keras mixed3): grid reduction 35x35 -> 17x17."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b0 = self.conv(384, (3, 3), "Branch_0_Conv2d_1a_3x3", (2, 2), "VALID")(x, train=train)
        b1 = self.conv(64, (1, 1), "Branch_1_Conv2d_0a_1x1")(x, train=train)
        b1 = self.conv(96, (3, 3), "Branch_1_Conv2d_0b_3x3")(b1, train=train)
        b1 = self.conv(96, (3, 3), "Branch_1_Conv2d_1a_3x3", (2, 2), "VALID")(b1, train=train)
        b2 = _max_pool_3x3_s2(x, self.conv_impl)
        y = jnp.concatenate([b0, b1, b2], axis=-1)
        sow_block_stats(self, y)
        return y


class InceptionC(_Block):
    """Mixed_6b-6e (Keras mixed4-7): 17x17 block with factorized 7x7 convolutions."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        c = self.channels_7x7
        b0 = self.conv(192, (1, 1), "Branch_0_Conv2d_0a_1x1")(x, train=train)
        b1 = self.conv(c, (1, 1), "Branch_1_Conv2d_0a_1x1")(x, train=train)
        b1 = self.conv(c, (1, 7), "Branch_1_Conv2d_0b_1x7")(b1, train=train)
        b1 = self.conv(192, (7, 1), "Branch_1_Conv2d_0c_7x1")(b1, train=train)
        b2 = self.conv(c, (1, 1), "Branch_2_Conv2d_0a_1x1")(x, train=train)
        b2 = self.conv(c, (7, 1), "Branch_2_Conv2d_0b_7x1")(b2, train=train)
        b2 = self.conv(c, (1, 7), "Branch_2_Conv2d_0c_1x7")(b2, train=train)
        b2 = self.conv(c, (7, 1), "Branch_2_Conv2d_0d_7x1")(b2, train=train)
        b2 = self.conv(192, (1, 7), "Branch_2_Conv2d_0e_1x7")(b2, train=train)
        b3 = _avg_pool_3x3_same(x)
        b3 = self.conv(192, (1, 1), "Branch_3_Conv2d_0b_1x1")(b3, train=train)
        y = jnp.concatenate([b0, b1, b2, b3], axis=-1)
        sow_block_stats(self, y)
        return y


class InceptionD(_Block):
    """Mixed_7a (Keras mixed8): grid reduction 17x17 -> 8x8."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b0 = self.conv(192, (1, 1), "Branch_0_Conv2d_0a_1x1")(x, train=train)
        b0 = self.conv(320, (3, 3), "Branch_0_Conv2d_1a_3x3", (2, 2), "VALID")(b0, train=train)
        b1 = self.conv(192, (1, 1), "Branch_1_Conv2d_0a_1x1")(x, train=train)
        b1 = self.conv(192, (1, 7), "Branch_1_Conv2d_0b_1x7")(b1, train=train)
        b1 = self.conv(192, (7, 1), "Branch_1_Conv2d_0c_7x1")(b1, train=train)
        b1 = self.conv(192, (3, 3), "Branch_1_Conv2d_1a_3x3", (2, 2), "VALID")(b1, train=train)
        b2 = _max_pool_3x3_s2(x, self.conv_impl)
        y = jnp.concatenate([b0, b1, b2], axis=-1)
        sow_block_stats(self, y)
        return y


class InceptionE(_Block):
    """Mixed_7b-7c (Keras mixed9-10): 8x8 block with expanded 1x3/3x1 filter banks."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        b0 = self.conv(320, (1, 1), "Branch_0_Conv2d_0a_1x1")(x, train=train)
        b1 = self.conv(384, (1, 1), "Branch_1_Conv2d_0a_1x1")(x, train=train)
        b1 = jnp.concatenate(
            [
                self.conv(384, (1, 3), "Branch_1_Conv2d_0b_1x3")(b1, train=train),
                self.conv(384, (3, 1), "Branch_1_Conv2d_0c_3x1")(b1, train=train),
            ],
            axis=-1,
        )
        b2 = self.conv(448, (1, 1), "Branch_2_Conv2d_0a_1x1")(x, train=train)
        b2 = self.conv(384, (3, 3), "Branch_2_Conv2d_0b_3x3")(b2, train=train)
        b2 = jnp.concatenate(
            [
                self.conv(384, (1, 3), "Branch_2_Conv2d_0c_1x3")(b2, train=train),
                self.conv(384, (3, 1), "Branch_2_Conv2d_0d_3x1")(b2, train=train),
            ],
            axis=-1,
        )
        b3 = _avg_pool_3x3_same(x)
        b3 = self.conv(192, (1, 1), "Branch_3_Conv2d_0b_1x1")(b3, train=train)
        y = jnp.concatenate([b0, b1, b2, b3], axis=-1)
        sow_block_stats(self, y)
        return y


def _dense_logits(module: nn.Module, features: jax.Array, num_classes: int) -> jax.Array:
    """The float32 dense layer 'Dense' of a head, called inside `module`'s compact method; sows its stats."""
    logits = nn.Dense(num_classes, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init=KERNEL_INIT,
                      name="Dense")(features)
    sow_block_stats(module, logits)
    return logits


class InceptionAux(_Block):
    """The paper's auxiliary classifier on the 17x17 grid (torchvision's InceptionAux).

    At 299x299 exactly the paper's: 5x5/3 average pooling (17 -> 5), 1x1 conv to 128, 5x5
    "valid" conv to 768 (5 -> 1), dense. For smaller inputs, whose grid is below 5x5, the
    pooling and the 5x5 convolution switch to "SAME" padding (a static choice on shapes) and
    a global average follows, so any input >= 75x75 works; the parameters are the same.
    """

    num_classes: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        pool_padding = "VALID" if min(x.shape[1:3]) >= 5 else "SAME"
        y = nn.avg_pool(
            x, (5, 5), strides=(3, 3), padding=pool_padding, count_include_pad=False
        )
        y = self.conv(128, (1, 1), "Conv2d_1b_1x1")(y, train=train)
        conv_padding = "VALID" if min(y.shape[1:3]) >= 5 else "SAME"
        y = self.conv(768, (5, 5), "Conv2d_2a_5x5", padding=conv_padding)(y, train=train)
        features = jnp.mean(y.astype(jnp.float32), axis=(1, 2))
        return _dense_logits(self, features, self.num_classes)


class Head(nn.Module):
    """Keras's top: global average pooling, (dropout), dense; float32 logits."""

    num_classes: int = 1
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        # Pool and classify in float32: the logits feed a sigmoid cross-entropy whose
        # stability needs their full precision, and the head costs nothing.
        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        features = nn.Dropout(rate=self.dropout_rate, deterministic=not train)(features)
        return _dense_logits(self, features, self.num_classes)


class InceptionV3(ModelKnobs):
    """InceptionV3 with the knobs of the lab (`ModelKnobs`' and its own); see the module docstring.

    `__call__(x, *, train)` -> float32 logits (batch, num_classes); with aux_logits=True and
    train=True, (logits, aux_logits); with include_top=False, pooled features.
    """

    aux_logits: bool = False
    conv_impl: str = "auto"
    include_top: bool = True

    def _check(self, x: jax.Array) -> None:
        """Validates the knobs and the input shape (static Python checks only)."""
        resolve_activation(self.hidden_activation)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r} must be a positive integer")
        if not self.width_multiplier > 0:
            raise ValueError(f"width_multiplier={self.width_multiplier!r} must be > 0")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate={self.dropout_rate!r} must be in [0, 1)")
        if x.ndim != 4:
            raise ValueError(f"input shape {x.shape} is not NHWC (batch, height, width, channels)")
        if min(x.shape[1:3]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"input shape {x.shape}: height and width must be >= {MIN_IMAGE_SIZE}"
            )

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool):
        self._check(x)
        knobs = dict(
            hidden_activation=self.hidden_activation,
            use_batchnorm=self.use_batchnorm,
            width_multiplier=self.width_multiplier,
            dtype=self.dtype,
            conv_impl=self.conv_impl,
        )

        def stem(features, kernel_size, name, strides=(1, 1), padding="SAME"):
            return ConvBN(features, kernel_size, strides, padding, sow_stats=True, name=name, **knobs)

        x = x.astype(self.dtype)
        x = stem(32, (3, 3), "Conv2d_1a_3x3", (2, 2), "VALID")(x, train=train)
        x = stem(32, (3, 3), "Conv2d_2a_3x3", padding="VALID")(x, train=train)
        x = stem(64, (3, 3), "Conv2d_2b_3x3")(x, train=train)
        x = _max_pool_3x3_s2(x, self.conv_impl)  # MaxPool_3a_3x3
        x = stem(80, (1, 1), "Conv2d_3b_1x1", padding="VALID")(x, train=train)
        x = stem(192, (3, 3), "Conv2d_4a_3x3", padding="VALID")(x, train=train)
        x = _max_pool_3x3_s2(x, self.conv_impl)  # MaxPool_5a_3x3

        x = InceptionA(pool_features=32, name="Mixed_5b", **knobs)(x, train=train)
        x = InceptionA(pool_features=64, name="Mixed_5c", **knobs)(x, train=train)
        x = InceptionA(pool_features=64, name="Mixed_5d", **knobs)(x, train=train)
        x = InceptionB(name="Mixed_6a", **knobs)(x, train=train)
        x = InceptionC(channels_7x7=128, name="Mixed_6b", **knobs)(x, train=train)
        x = InceptionC(channels_7x7=160, name="Mixed_6c", **knobs)(x, train=train)
        x = InceptionC(channels_7x7=160, name="Mixed_6d", **knobs)(x, train=train)
        x = InceptionC(channels_7x7=192, name="Mixed_6e", **knobs)(x, train=train)
        aux = None
        if self.aux_logits:
            # Always built (so its parameters exist whatever `train` init saw); in inference
            # its result is unused and jit drops the computation.
            aux = InceptionAux(num_classes=self.num_classes, name="AuxLogits", **knobs)(
                x, train=train
            )
        x = InceptionD(name="Mixed_7a", **knobs)(x, train=train)
        x = InceptionE(name="Mixed_7b", **knobs)(x, train=train)
        x = InceptionE(name="Mixed_7c", **knobs)(x, train=train)

        if not self.include_top:
            return jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits = Head(self.num_classes, self.dropout_rate, name="Logits")(x, train=train)
        if self.aux_logits and train:
            return logits, aux
        return logits


def predict(model: InceptionV3, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """Probabilities of each class (independent sigmoids), inference mode.

    Args:
      model: an InceptionV3 with include_top=True.
      variables: its {'params', 'batch_stats'} variables.
      x: NHWC images.

    Returns:
      float32 array (batch, num_classes) of sigmoid(logits).
    """
    if not model.include_top:
        raise ValueError("predict needs include_top=True (the model returns features otherwise)")
    return jax.nn.sigmoid(model.apply(variables, x, train=False))


def abstract_variables(model: InceptionV3, image_shape=(75, 75, 3)) -> dict[str, Any]:
    """Shapes and dtypes of the model's variables (jax.eval_shape of `init`: costs nothing).

    Args:
      model: the InceptionV3.
      image_shape: (height, width, channels) of one input image.

    Returns:
      {'params', 'batch_stats'?} of jax.ShapeDtypeStruct leaves.
    """
    x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def init_variables(model: InceptionV3, key: jax.Array, image_shape=(75, 75, 3)) -> dict[str, Any]:
    """Variables drawn from model.init's distributions with ONE random draw.

    `model.init` samples each of the ~200 parameters with its own threefry call, and XLA's
    CPU compiler takes tens of seconds over those; here one uniform draw in [-1, 1) is cut
    into the kernels and scaled to Glorot-uniform's bound sqrt(6 / (fan_in + fan_out)),
    which compiles in a few seconds. Same shapes and distributions as `model.init`
    (KERNEL_INIT, zero biases and betas, zero means, unit variances), other values.

    Args:
      model: the InceptionV3.
      key: a jax PRNG key; the result is a deterministic function of it.
      image_shape: (height, width, channels) of one input image (shapes only).

    Returns:
      {'params', 'batch_stats'?} of float32 arrays.
    """
    abstract = abstract_variables(model, image_shape)
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [tuple(getattr(k, "key", str(k)) for k in path) for path, _ in flat]
    sizes = [leaf.size if name[-1] == "kernel" else 0 for name, (_, leaf) in zip(names, flat)]
    noise = jax.random.uniform(key, (sum(sizes),), jnp.float32, -1.0, 1.0)
    leaves, offset = [], 0
    for name, (_, leaf), size in zip(names, flat, sizes):
        if name[-1] == "kernel":
            receptive = int(np.prod(leaf.shape[:-2])) if len(leaf.shape) > 2 else 1
            fan_in, fan_out = receptive * leaf.shape[-2], receptive * leaf.shape[-1]
            bound = np.sqrt(6.0 / (fan_in + fan_out))
            leaves.append(bound * noise[offset : offset + size].reshape(leaf.shape))
            offset += size
        elif name[-1] == "var":
            leaves.append(jnp.ones(leaf.shape, leaf.dtype))
        else:  # biases, betas, moving means
            leaves.append(jnp.zeros(leaf.shape, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def activation_stats(stats_collection: Mapping[str, Any]) -> dict[str, dict[str, jax.Array]]:
    """Flattens the 'stats' collection into {block: {'max_abs': ..., 'nonfinite': ...}}.

    Works inside jit (values stay scalar arrays; call `float()` on them outside jit).
    Blocks come in network order.

    Args:
      stats_collection: the 'stats' collection returned by
        `model.apply(..., mutable=['stats'])` (the collection itself, or the whole
        mutated-variables dict holding it under 'stats').

    Returns:
      {block name: {'max_abs': float32 scalar, 'nonfinite': int32 scalar}}.
    """
    if "stats" in stats_collection and not any(k in stats_collection for k in BLOCK_NAMES):
        stats_collection = stats_collection["stats"]
    order = {name: i for i, name in enumerate(BLOCK_NAMES)}
    flat = {}
    for block in sorted(stats_collection, key=lambda b: (order.get(b, len(order)), b)):
        entry = stats_collection[block]
        flat[block] = {
            "max_abs": jnp.asarray(_unwrap(entry["max_abs"]), jnp.float32),
            "nonfinite": jnp.asarray(_unwrap(entry["nonfinite"]), jnp.int32),
        }
    return flat


def _unwrap(value: Any) -> Any:
    """A sown value as stored: bare (our reduce_fn), or in a 1-tuple (flax's default sow)."""
    if isinstance(value, tuple) and len(value) == 1:
        return value[0]
    return value


def module_grad_norms(grads: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Global L2 norm of the gradients of each top-level block.

    Args:
      grads: gradients with the params tree's structure ({'Conv2d_1a_3x3': {...}, ...}),
        or a variables-like dict holding them under 'params'.

    Returns:
      {block name: float32 scalar norm}, blocks in network order; usable inside jit.
    """
    if "params" in grads and not any(k in grads for k in BLOCK_NAMES):
        grads = grads["params"]
    order = {name: i for i, name in enumerate(BLOCK_NAMES)}
    norms = {}
    for block in sorted(grads, key=lambda b: (order.get(b, len(order)), b)):
        norms[block] = tree_norm(grads[block])  # float32 squares even for bf16/f16 gradients
    return norms
