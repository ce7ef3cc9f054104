"""`TrainConfig`, its two presets, and the scenarios (the seed's failure recipes) as overrides.

A run's configuration is built in three layers, each winning over the one before:

1. the preset: ``cpu`` (small and fast, the default on a CPU) or ``accelerator`` (full-size
   InceptionV3, 299x299, bfloat16; chosen when ``jax.default_backend() != "cpu"``);
2. the scenario's overrides (``SCENARIOS[name][1]``);
3. the flags the user gave explicitly.

This module imports nothing heavy: building and validating a config never touches a device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

__all__ = [
    "BUILTIN_DATA", "BadInput", "DTYPES", "HIDDEN_ACTIVATIONS", "INCEPTION_V3_BLOCKS", "LOSSES", "MIN_IMAGE_SIZE",
    "MODELS", "NORMALIZE_MODES", "ON_BAD_IMAGE", "OPTIMIZERS", "PRESETS", "PRESET_OVERRIDES", "SCENARIOS", "SCHEDULES",
    "TrainConfig", "default_preset", "describe_scenarios", "make_config", "validate",
]

PRESETS = ("cpu", "accelerator")
OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "rmsprop")
SCHEDULES = ("constant", "cosine", "warmup-cosine")
NORMALIZE_MODES = ("none", "unit", "standardize")
BUILTIN_DATA = ("builtin", "builtin-multilabel")  # generated in memory; anything else is a path
ON_BAD_IMAGE = ("error", "skip")  # what a streamed run does with an unreadable image (--on-bad-image)
DTYPES = ("float32", "bfloat16", "float16")
HIDDEN_ACTIVATIONS = ("relu", "sigmoid", "tanh")
MODELS = ("inception_v3", "small_cnn")
# InceptionV3's convolution formulations (`nanlab.models.conv`): auto is "fast" on CPU, "xla" elsewhere;
# "tuned" times each convolution shape's formulations on this machine at first use and caches the picks.
CONV_IMPLS = ("auto", "fast", "xla", "tuned")
# Who runs the convolutions of the train step and of evaluation on CPU (`nanlab.models.conv.LIBRARIES`):
# XLA's default (YNNPACK) or Eigen for both; "eigen-eval"/"eigen-train" Eigen for one of them only;
# "tuned" times both libraries for each program at first use on this machine and caches the picks.
CONV_LIBRARIES = ("default", "eigen", "eigen-eval", "eigen-train", "tuned")
LOSSES = (
    "sigmoid_binary_cross_entropy",
    "naive_sigmoid_binary_cross_entropy",
    "sigmoid_focal_loss",
    "naive_sigmoid_focal_loss",
)
MIN_IMAGE_SIZE = 75  # InceptionV3's stem and reductions need at least 75x75 inputs.
# InceptionV3's top-level blocks, input to output (names of its `stats` entries and params subtrees).
INCEPTION_V3_BLOCKS: tuple[str, ...] = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "AuxLogits", "Mixed_7a", "Mixed_7b", "Mixed_7c", "Logits",
)


class BadInput(ValueError):
    """A problem with the user's input (flags, data, workdir): one line on stderr, exit code 2."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; one field per flag of `python -m nanlab.train`.

    Defaults are the ``cpu`` preset; `make_config` applies the preset that fits the backend.
    """

    preset: str = "cpu"
    scenario: str = "clean"
    # Run length and batching.
    steps: int = 200
    batch_size: int = 32
    seed: int = 0
    # Data.
    data: str = "builtin"
    image_size: int = 75
    num_train: int = 2048
    num_val: int = 512
    normalize: str = "standardize"
    input_scale: float = 1.0  # multiplies the raw pixels before normalization (unscaled-inputs)
    # Streamed data (a folder, .npz or .array_record): decode processes (None: one per core but
    # one, nanlab.streaming.default_workers) and the policy for an unreadable image.
    data_workers: int | None = None
    on_bad_image: str = "error"
    prefetch: int = 2  # batches placed on the devices ahead of the running step; 0: none
    allow_nonfinite_data: bool = False  # NaN/inf pixels or labels in --data: bad input unless asked for
    # Model.
    model: str = "inception_v3"  # small_cnn: a 3-conv net that compiles in seconds (quick checks, tests)
    width_multiplier: float = 0.25
    hidden_activation: str = "relu"
    use_batchnorm: bool = True
    dtype: str = "float32"
    conv_impl: str = "auto"  # tuned: per convolution shape, the formulation measured fastest here (opt-in)
    conv_library: str = "default"  # who runs the convolutions on CPU: default (YNNPACK), eigen, ..., tuned
    dropout_rate: float = 0.0
    bn_recalibration_batches: int = 8  # training batches whose BatchNorm moments evaluation uses
    # Loss and optimizer.
    loss: str = "sigmoid_binary_cross_entropy"
    optimizer: str = "adam"
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip: str = "none"
    skip_nonfinite: bool = False
    # Debugging.
    debug_nans: bool = False
    debug_infs: bool = False
    # Output, logging, checkpoints.
    workdir: str | None = None
    resume: bool = False
    overwrite: bool = False
    log_every: int = 10
    eval_every: int = 50
    stats_every: int = 25
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    tensorboard: bool = False
    plots: bool = True
    progress: bool = True
    data_parallel: bool = True
    # JAX's persistent compilation cache: a directory, 'off', or None for $NANLAB_COMPILE_CACHE or
    # the user's cache directory (nanlab.compile_cache).
    compile_cache: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-ready dict (field name -> value)."""
        return dataclasses.asdict(self)


_FIELDS = {field.name: field for field in dataclasses.fields(TrainConfig)}

# The cpu preset is TrainConfig's own defaults; the accelerator preset scales it up.
PRESET_OVERRIDES: dict[str, dict[str, Any]] = {
    "cpu": {},
    "accelerator": {
        "preset": "accelerator",
        "steps": 2000,
        "batch_size": 128,
        "image_size": 299,
        "num_train": 16384,
        "num_val": 2048,
        "width_multiplier": 1.0,
        "dtype": "bfloat16",
        "log_every": 50,
        "eval_every": 500,
        "stats_every": 100,
        "checkpoint_every": 500,
    },
}

# name -> (description, overrides). Each reproduces one failure of the seed.
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "clean": (
        "the healthy baseline: standardized inputs, stable logits-form loss, Adam at 1e-3",
        {},
    ),
    "unscaled-inputs": (
        "raw pixels x1000, no normalization, float16 compute as in mixed-precision training: "
        "255,000 overflows float16 (max 65,504) on entry and the step goes non-finite. In float32 "
        "(--dtype float32) the BatchNorm after the first convolution absorbs the scale: no NaN, but "
        "learning stalls",
        {"input_scale": 1000.0, "normalize": "none", "dtype": "float16"},
    ),
    "naive-loss": (
        "the textbook -(z log p + (1-z) log(1-p)) on p = sigmoid(logits), with Adam at 1.0 so that "
        "logits saturate within a few steps: sigmoid rounds to 0 or 1 and the loss takes log(0). The stable "
        "logits-form loss trains at that rate (measured); at 1e-2 the naive loss survives 60 steps",
        {"loss": "naive_sigmoid_binary_cross_entropy", "lr": 1.0},
    ),
    "high-lr": (
        "plain SGD at 1e4: weights and activations feed each other until the backward pass overflows (cpu "
        "preset: non-finite at step 3, in a BatchNorm's rsqrt gradient). Adam at 1e4 stays finite there: "
        "its step is bounded by the lr and BatchNorm absorbs the weights' growth (measured)",
        {"lr": 1e4, "optimizer": "sgd"},
    ),
    "sigmoid-hidden": (
        "sigmoid hidden activations without BatchNorm; gradients vanish toward the input, "
        "training stalls",
        {"hidden_activation": "sigmoid", "use_batchnorm": False},
    ),
}


def default_preset(backend: str | None = None) -> str:
    """The preset fitting a JAX backend: ``cpu`` on a CPU, ``accelerator`` otherwise.

    Args:
      backend: a JAX backend name; None asks `jax.default_backend()`.

    Returns:
      ``"cpu"`` or ``"accelerator"``.
    """
    if backend is None:
        import jax  # imported here so that building a config for a given backend stays light

        backend = jax.default_backend()
    return "cpu" if backend == "cpu" else "accelerator"


def make_config(explicit: Mapping[str, Any] | None = None, *, backend: str | None = None) -> TrainConfig:
    """Build and validate a config: preset, then the scenario's overrides, then `explicit`.

    Args:
      explicit: field name -> value for each flag the user gave (these win over everything).
        ``preset`` may be among them to force a preset.
      backend: JAX backend name used to pick the preset when `explicit` names none.

    Returns:
      The validated `TrainConfig`.

    Raises:
      ValueError: an unknown field, scenario or preset, or any value `validate` rejects.
    """
    explicit = dict(explicit or {})
    unknown = sorted(set(explicit) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown config field(s): {', '.join(unknown)}")
    preset = explicit.get("preset") or default_preset(backend)
    if preset not in PRESET_OVERRIDES:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    scenario = explicit.get("scenario", "clean")
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose one of {', '.join(SCENARIOS)}")
    fields = {**PRESET_OVERRIDES[preset], **SCENARIOS[scenario][1], **explicit}
    fields["preset"], fields["scenario"] = preset, scenario
    config = TrainConfig(**fields)
    validate(config)
    return config


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"--{name.replace('_', '-')} {value!r} is not one of {', '.join(choices)}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value!r}")


def validate(config: TrainConfig) -> None:
    """Check every field of `config`; raise one clear line for the first bad value.

    Args:
      config: the config to check.

    Raises:
      ValueError: naming the flag and the offending value.
    """
    _check_choice("preset", config.preset, PRESETS)
    _check_choice("scenario", config.scenario, tuple(SCENARIOS))
    _check_choice("optimizer", config.optimizer, OPTIMIZERS)
    _check_choice("schedule", config.schedule, SCHEDULES)
    _check_choice("normalize", config.normalize, NORMALIZE_MODES)
    _check_choice("dtype", config.dtype, DTYPES)
    _check_choice("hidden_activation", config.hidden_activation, HIDDEN_ACTIVATIONS)
    _check_choice("loss", config.loss, LOSSES)
    _check_choice("model", config.model, MODELS)
    _check_choice("conv_impl", config.conv_impl, CONV_IMPLS)
    _check_choice("conv_library", config.conv_library, CONV_LIBRARIES)
    _check_choice("on_bad_image", config.on_bad_image, ON_BAD_IMAGE)
    for name in ("steps", "batch_size", "num_train", "num_val", "log_every", "keep_checkpoints"):
        _check_positive(name, getattr(config, name))
    for name in ("lr", "width_multiplier", "input_scale"):
        _check_positive(name, getattr(config, name))
    for name in ("weight_decay", "warmup_steps", "eval_every", "stats_every", "checkpoint_every",
                 "bn_recalibration_batches", "prefetch"):
        _check_non_negative(name, getattr(config, name))
    if config.data_workers is not None:
        _check_non_negative("data_workers", config.data_workers)
    for name in ("prefetch", "data_workers"):
        value = getattr(config, name)
        if value is not None and (isinstance(value, bool) or value != int(value)):
            raise ValueError(f"--{name.replace('_', '-')} must be a whole number, got {value!r}")
    if not 0.0 <= config.dropout_rate < 1.0:
        raise ValueError(f"--dropout-rate must be in [0, 1), got {config.dropout_rate!r}")
    if config.image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"--image-size {config.image_size} is below the minimum {MIN_IMAGE_SIZE} of InceptionV3")
    if config.schedule == "warmup-cosine" and config.warmup_steps >= config.steps:
        raise ValueError(f"--warmup-steps {config.warmup_steps} must be below --steps {config.steps}")
    if config.resume and config.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    from nanlab import optim  # light (optax only); owns the clip-spec grammar

    try:
        optim.parse_clip_spec(config.clip)
    except ValueError as error:
        raise ValueError(f"--clip {config.clip!r}: {error}") from None


def conv_library_of(config: TrainConfig, program: str) -> str:
    """The convolution library (`nanlab.models.conv.LIBRARIES`) of the train step (program "train")
    or of the forward-only programs, evaluation and BatchNorm recalibration ("eval")."""
    if program not in ("train", "eval"):
        raise ValueError(f"program must be 'train' or 'eval', got {program!r}")
    if config.conv_library == "tuned":
        raise ValueError("conv_library 'tuned' is resolved by measuring (nanlab.train) before it names a library")
    if config.conv_library in ("eigen-eval", "eigen-train"):
        return "eigen" if config.conv_library == f"eigen-{program}" else "default"
    return config.conv_library


def conv_library_mode(train: str, eval: str) -> str:
    """The `CONV_LIBRARIES` mode that runs the train step with `train` and evaluation with `eval`."""
    if train == eval:
        return train
    return "eigen-train" if train == "eigen" else "eigen-eval"


def describe_scenarios() -> str:
    """A table of the scenarios, one per line: name, overrides, description."""
    lines = []
    for name, (description, overrides) in SCENARIOS.items():
        shown = ", ".join(f"{key}={value}" for key, value in overrides.items()) or "(no overrides)"
        lines.append(f"{name:16s} {shown}\n{'':16s} {description}")
    return "\n".join(lines)
