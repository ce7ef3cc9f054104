"""The lab's models, and the one factory that builds a model from a TrainConfig.

`build(config, num_classes)` looks ``config.model`` up in `BUILDERS` (name -> ``builder(config,
num_classes) -> flax module``) and passes the config's model knobs. The train CLI, the clipping
lab, the benchmarks and the tests all build their models here; a test swaps a model by replacing
its entry (``monkeypatch.setitem(models.BUILDERS, "inception_v3", ...)``).

Modules: `inception_v3` (the lab's model), `small_cnn` (quick checks), `common` (the knobs and
statistics both share), `conv` (convolution formulations), `keras_import` (Keras weights). The
model modules are imported on first use, so importing this package stays light.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["BUILDERS", "build", "model_knobs"]


def model_knobs(config: Any, num_classes: int) -> dict[str, Any]:
    """The keyword arguments every model of the lab takes, from a TrainConfig."""
    import jax.numpy as jnp

    return dict(
        num_classes=num_classes,
        hidden_activation=config.hidden_activation,
        use_batchnorm=config.use_batchnorm,
        width_multiplier=config.width_multiplier,
        dtype=jnp.dtype(config.dtype),
        dropout_rate=config.dropout_rate,
    )


def _inception_v3(config: Any, num_classes: int):
    from nanlab.models.inception_v3 import InceptionV3

    return InceptionV3(**model_knobs(config, num_classes), conv_impl=config.conv_impl)


def _small_cnn(config: Any, num_classes: int):
    from nanlab.models.small_cnn import SmallCNN

    return SmallCNN(**model_knobs(config, num_classes))


# One entry per name of nanlab.config.MODELS (tests/models/test_factory.py checks they agree).
BUILDERS: dict[str, Callable[[Any, int], Any]] = {
    "inception_v3": _inception_v3,
    "small_cnn": _small_cnn,
}


def build(config: Any, num_classes: int):
    """The flax module `config.model` names, with the config's knobs and `num_classes` outputs.

    Raises:
      ValueError: an unknown model name.
    """
    if config.model not in BUILDERS:
        raise ValueError(f"unknown model {config.model!r}; choose one of {', '.join(BUILDERS)}")
    return BUILDERS[config.model](config, num_classes)
