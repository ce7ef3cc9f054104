"""Module paths for frameworks that do not put them on JAX's name stack: Flax NNX and Equinox.

Flax linen and Keras 3 (JAX backend) push each layer's name onto JAX's name stack as they call it,
so every equation a layer emits carries its path. Flax NNX and Equinox modules are plain Python
objects called by their parent, and push nothing. While `localize` traces the function,
`module_scopes()` wraps the `__call__` of every NNX and Equinox module class (the classes that exist
at that moment; nothing is imported here that the user has not imported) so that calling a child
module pushes its attribute name in the parent onto the name stack:

- NNX: the attribute path, `encoder/dense` (`layers/0` for an item of a list attribute or of
  `nnx.List`/`nnx.Sequential`), as in `nnx.iter_modules`.
- Equinox: the pytree path, `encoder.dense` (`layers[0]`), as `jax.tree_util.keystr` writes it.

The outermost module called has no name of its own (its path is ''). Only `__call__` is wrapped: a
submodule used through another method (`self.encoder.encode(x)`) is named after the closest enclosing
module called through `__call__`. The classes are restored when tracing ends, also on error.

Cost: the wrapper runs once per module call while tracing (not per equation, and never in the
replay): a dictionary lookup in the parent's attributes and one name-stack push. When it wraps
anything, JAX's in-memory trace and compilation caches are cleared first, so that a step jitted
before (its trace cached without the scopes) is traced again; the user's jitted functions then
compile once more on their next call.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax

_NNX, _EQUINOX = "nnx", "equinox"
# Equinox implements filter_grad, filter_jit, ... as Modules with a __call__; they are not layers.
_INTERNAL = ("equinox._",)


def _frameworks() -> list[tuple[str, type]]:
    """The module base classes of the frameworks the user has imported (none is imported here)."""
    found = []
    if "flax.nnx" in sys.modules:
        found.append((_NNX, sys.modules["flax.nnx"].Module))
    if "equinox" in sys.modules:
        found.append((_EQUINOX, sys.modules["equinox"].Module))
    return found


def _subclasses(base: type) -> list[type]:
    seen, stack = [], [base]
    while stack:
        cls = stack.pop()
        for sub in type.__subclasses__(cls):
            if sub not in seen:
                seen.append(sub)
                stack.append(sub)
    return seen


def child_name(framework: str, parent: Any, child: Any) -> str | None:
    """The scope name of `child` inside `parent` (one step of the path), or None if not an attribute."""
    try:
        attributes = vars(parent)
    except TypeError:
        return None
    for name, value in attributes.items():
        if value is child:
            return name if framework == _NNX else "." + name
        items: Any = None
        if isinstance(value, Mapping):
            items = value.items()
        elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            items = enumerate(value)
        if items is None:
            continue
        try:
            for key, item in items:
                if item is child:
                    return f"{name}/{key}" if framework == _NNX else f".{name}[{key!r}]"
        except Exception:  # an exotic container: do not let naming break the trace
            continue
    return None


class _Calls:
    """The stack of module instances being called while tracing."""

    def __init__(self) -> None:
        self.stack: list[Any] = []


def _wrap(framework: str, call: Any, calls: _Calls) -> Any:
    # Equinox stores methods as descriptors that bind `self`; plain functions bind the same way.
    @functools.wraps(getattr(call, "__wrapped__", call))
    def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        bound = call.__get__(self, type(self))
        if calls.stack and calls.stack[-1] is self:  # super().__call__ of a wrapped class
            return bound(*args, **kwargs)
        name = child_name(framework, calls.stack[-1], self) if calls.stack else None
        calls.stack.append(self)
        try:
            with jax.named_scope(name) if name else contextlib.nullcontext():
                return bound(*args, **kwargs)
        finally:
            calls.stack.pop()

    wrapped.__nanlab_wrapped__ = True
    return wrapped


@contextlib.contextmanager
def module_scopes() -> Iterator[None]:
    """While active, calling an NNX or Equinox submodule pushes its path onto JAX's name stack."""
    calls = _Calls()
    patched: list[tuple[type, Any]] = []
    try:
        for framework, base in _frameworks():
            for cls in [base, *_subclasses(base)]:
                if cls.__module__.startswith(_INTERNAL):
                    continue
                call = cls.__dict__.get("__call__")
                if call is None or getattr(call, "__nanlab_wrapped__", False) or not hasattr(call, "__get__"):
                    continue
                type.__setattr__(cls, "__call__", _wrap(framework, call, calls))
                patched.append((cls, call))
        if patched:
            # JAX reuses a jitted function's cached trace, which ran no Python and so pushed no
            # scopes (an eqx.filter_jit or nnx.jit step traced before the failure): drop them. Later
            # calls compile again once (or load from the persistent compilation cache).
            jax.clear_caches()
        yield
    finally:
        for cls, call in reversed(patched):
            type.__setattr__(cls, "__call__", call)


def join_scopes(scopes: Sequence[str]) -> str:
    """A module path from scope names: '/' between them, none before an Equinox '.x' or '[k]' step."""
    path = ""
    for s in scopes:
        if s.startswith((".", "[")):
            path += s
        else:
            path += ("/" if path else "") + s
    return path.lstrip(".")
