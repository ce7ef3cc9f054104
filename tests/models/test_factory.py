"""The model factory (nanlab.models.build) and SmallCNN's statistics contract."""

import jax
import jax.numpy as jnp
import numpy as np

from nanlab import config as config_lib
from nanlab import models
from nanlab.models.inception_v3 import InceptionV3
from nanlab.models.small_cnn import SmallCNN


def test_every_configurable_model_has_a_builder():
    assert set(models.BUILDERS) == set(config_lib.MODELS)


def test_build_passes_the_config_knobs():
    config = config_lib.make_config({"model": "small_cnn", "width_multiplier": 0.5, "dtype": "bfloat16",
                                     "hidden_activation": "tanh", "dropout_rate": 0.1}, backend="cpu")
    model = models.build(config, 3)
    assert isinstance(model, SmallCNN)
    assert (model.num_classes, model.width_multiplier, model.hidden_activation, model.dropout_rate) == (3, 0.5, "tanh", 0.1)
    assert model.dtype == jnp.bfloat16
    assert isinstance(models.build(config_lib.make_config({}, backend="cpu"), 1), InceptionV3)


def test_small_cnn_sows_finite_max_and_nonfinite_count_like_inception():
    model = SmallCNN(width_multiplier=0.5)
    x = jnp.ones((2, 16, 16, 3)).at[0, 0, 0, 0].set(jnp.nan)
    variables = model.init(jax.random.key(0), x, train=False)
    assert set(variables) == {"params", "batch_stats"}  # init sows nothing
    _, mutated = model.apply(variables, x, train=False, mutable=["stats"])
    stats = mutated["stats"]
    assert set(stats) == {"Conv1", "Conv2", "Conv3"}
    for entry in stats.values():
        assert set(entry) == {"max_abs", "nonfinite"}
        assert np.isfinite(float(entry["max_abs"]))  # the largest FINITE |a|, not NaN
    assert int(stats["Conv1"]["nonfinite"]) > 0  # the NaN pixel reaches Conv1's output and is counted
