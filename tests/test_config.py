"""Tests of nanlab.config: presets, scenario overrides, explicit flags winning, validation."""

import dataclasses

import pytest

from nanlab import config as config_lib
from nanlab.config import SCENARIOS, TrainConfig, make_config, validate


def test_cpu_preset_is_small_and_accelerator_preset_full_size():
    cpu = make_config({}, backend="cpu")
    gpu = make_config({}, backend="gpu")
    assert cpu.preset == "cpu" and gpu.preset == "accelerator"
    assert cpu.width_multiplier <= 0.25 and cpu.image_size == 75 and cpu.dtype == "float32"
    assert gpu.width_multiplier == 1.0 and gpu.image_size == 299 and gpu.dtype == "bfloat16"
    assert gpu.batch_size > cpu.batch_size
    assert make_config({"preset": "cpu"}, backend="tpu").preset == "cpu"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_each_scenario_applies_its_overrides(name):
    description, overrides = SCENARIOS[name]
    config = make_config({"scenario": name}, backend="cpu")
    assert description
    for field, value in overrides.items():
        assert getattr(config, field) == value


def test_scenario_overrides_match_the_seed_recipes():
    assert SCENARIOS["unscaled-inputs"][1] == {"input_scale": 1000.0, "normalize": "none", "dtype": "float16"}
    assert SCENARIOS["naive-loss"][1]["loss"] == "naive_sigmoid_binary_cross_entropy"
    assert SCENARIOS["sigmoid-hidden"][1] == {"hidden_activation": "sigmoid", "use_batchnorm": False}
    assert SCENARIOS["high-lr"][1]["lr"] > 1.0
    assert SCENARIOS["clean"][1] == {}


def test_explicit_flags_win_over_scenario():
    config = make_config({"scenario": "unscaled-inputs", "normalize": "standardize"}, backend="cpu")
    assert config.normalize == "standardize" and config.input_scale == 1000.0
    config = make_config({"scenario": "high-lr", "lr": 1e-4}, backend="cpu")
    assert config.lr == 1e-4


def test_config_is_frozen_and_serializable():
    config = make_config({}, backend="cpu")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3
    assert config.to_dict()["scenario"] == "clean"
    assert TrainConfig(**config.to_dict()) == config


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"scenario": "exploding"}, "unknown scenario 'exploding'"),
        ({"optimizer": "lamb"}, "--optimizer 'lamb'"),
        ({"schedule": "linear"}, "--schedule 'linear'"),
        ({"normalize": "minmax"}, "--normalize 'minmax'"),
        ({"loss": "mse"}, "--loss 'mse'"),
        ({"clip": "global_norm:abc"}, "--clip 'global_norm:abc'"),
        ({"clip": "bogus:1"}, "--clip 'bogus:1'"),
        ({"steps": 0}, "--steps must be a positive number, got 0"),
        ({"batch_size": -4}, "--batch-size must be a positive number, got -4"),
        ({"lr": 0.0}, "--lr must be a positive number, got 0.0"),
        ({"lr": float("nan")}, "--lr must be a positive number, got nan"),
        ({"image_size": 74}, "--image-size 74 is below the minimum 75"),
        ({"width_multiplier": 0.0}, "--width-multiplier must be a positive number"),
        ({"dropout_rate": 1.0}, "--dropout-rate must be in [0, 1)"),
        ({"eval_every": -1}, "--eval-every must be >= 0, got -1"),
        ({"resume": True, "overwrite": True}, "--resume and --overwrite exclude each other"),
        ({"preset": "tiny"}, "unknown preset 'tiny'"),
        ({"no_such_flag": 1}, "unknown config field(s): no_such_flag"),
    ],
)
def test_bad_values_raise_one_clear_line(overrides, message):
    with pytest.raises(ValueError) as info:
        make_config(overrides, backend="cpu")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_validate_accepts_defaults_and_rejects_a_bad_replace():
    config = make_config({}, backend="cpu")
    validate(config)
    with pytest.raises(ValueError, match="--hidden-activation 'swish'"):
        validate(dataclasses.replace(config, hidden_activation="swish"))


def test_describe_scenarios_lists_every_scenario():
    text = config_lib.describe_scenarios()
    for name in SCENARIOS:
        assert name in text
    assert "input_scale=1000.0" in text


def test_scenario_descriptions_stand_on_their_own():
    # "Example 1/2/3" meant the seed's examples, which a user of --list-scenarios never saw.
    for description, _ in config_lib.SCENARIOS.values():
        assert "Example" not in description
