"""nanlab: reproduce, localize and fix non-finite values in JAX training.

What users call, re-exported here and imported on first use (PEP 562), so that ``import nanlab``
loads no JAX, Flax or Keras:

* `localize`, `Report` (nanlab.trace): where the first NaN/Inf of any JAX function was born;
* `diagnose`, `diagnose_history`, `Verdict` (nanlab.diagnose): its cause in the lab's words, and the fix;
* the stable losses and their textbook forms (nanlab.losses);
* `check_binary_loss` (nanlab.testing): the property battery for a user's own loss;
* `guard`, `NonFiniteError`, `GuardedStep` (nanlab.guard): the sentinel, replay and verdict around a
  user's own train step (the Keras callback is `nanlab.keras.LocalizeOnNaN`, imported on demand).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    "localize": "nanlab.trace",
    "Report": "nanlab.trace",
    "diagnose": "nanlab.diagnose",
    "diagnose_history": "nanlab.diagnose",
    "Verdict": "nanlab.diagnose",
    "sigmoid_binary_cross_entropy": "nanlab.losses",
    "sigmoid_focal_loss": "nanlab.losses",
    "binary_cross_entropy_from_probabilities": "nanlab.losses",
    "softmax_cross_entropy": "nanlab.losses",
    "softmax_cross_entropy_with_integer_labels": "nanlab.losses",
    "naive_sigmoid_binary_cross_entropy": "nanlab.losses",
    "naive_sigmoid_focal_loss": "nanlab.losses",
    "check_binary_loss": "nanlab.testing",
    "guard": "nanlab.guard",
    "NonFiniteError": "nanlab.guard",
    "GuardedStep": "nanlab.guard",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    # Called only for names not yet in the module: import the defining module, cache the value.
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nanlab' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    # `diagnose` and `guard` name both a submodule and its function: the submodule is callable as
    # the function (nanlab/_modules.py).
    value = module if _EXPORTS[name] == f"nanlab.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
