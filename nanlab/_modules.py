"""A submodule callable as the function it is named after (`nanlab.diagnose(...)`, `nanlab.guard(...)`).

The package re-exports some functions under their module's own name. Importing the submodule binds
that name on the package to the module, whichever was imported first, so the module itself is made
callable as the function: both `nanlab.guard(step)` and `nanlab.guard.NonFiniteError` then work.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Turn the (already imported) module `module_name` into one whose call is `function`'s."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

    CallableModule.__doc__ = f"The module {module_name}, callable as {function.__name__}."
    sys.modules[module_name].__class__ = CallableModule
