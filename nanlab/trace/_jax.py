"""The localizer's JAX adapter: every jaxpr internal that `nanlab.trace` reads, in one place.

nanlab supports jax 0.10.2 through 0.12.x, and JAX changed three of the internals the replay needs
in that range (../shared/notes/jax-internals.md has the commits):

- 0.11.0 merged `ClosedJaxpr` into `Jaxpr`: a jaxpr carries its own `consts`, `ClosedJaxpr` is only
  an alias and `.jaxpr` a legacy accessor slated for removal. `open_jaxpr` reads both shapes
  without touching either name on the newer side.
- 0.11.0 replaced scan's `num_consts`/`num_carry` params by flat trees `ft_in` (consts, carry, xs)
  and `ft_out` (carry, ys). `scan_counts` reads whichever the running JAX wrote.
- 0.11.2 removed `closed_call`: those equations are now `eval_jaxpr` (param `call_jaxpr`). The call
  table is built from `jax.extend.core.primitives`, so it holds the running JAX's names.

Everything else used here (`Var`, `Literal`, `DropVar`, `jaxprs_in_params`, the name stack, the
traceback frames, `get_bind_params`/`bind`) is unchanged across the range.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jcore
from jax.extend.core import primitives as _prims
from jax.extend.source_info_util import NameStack

from nanlab.compile_cache import RUN_ONCE_OPTIONS
from nanlab.trace import _frameworks

# Call-like primitives whose body the replay enters, each with the param that holds the body.
CALL_BODIES: dict[str, str] = {
    _prims.jit_p.name: "jaxpr",
    # 'closed_call' up to jax 0.11.1, 'eval_jaxpr' since 0.11.2 (scan under remat + grad makes one).
    _prims.closed_call_p.name: "call_jaxpr",
    _prims.custom_jvp_call_p.name: "call_jaxpr",
    _prims.custom_vjp_call_p.name: "call_jaxpr",
    _prims.remat_p.name: "jaxpr",
}
COND = _prims.cond_p.name
SCAN = _prims.scan_p.name
WHILE = _prims.while_p.name
CONTROL_FLOW = frozenset({COND, SCAN, WHILE})


def is_jaxpr(x: Any) -> bool:
    """True for a jaxpr in either shape: `Jaxpr`, or (jax < 0.11) a `ClosedJaxpr` wrapping one."""
    return isinstance(x, jcore.Jaxpr) or isinstance(getattr(x, "jaxpr", None), jcore.Jaxpr)


def open_jaxpr(x: Any) -> tuple[jcore.Jaxpr, list[Any]]:
    """(the jaxpr whose `eqns`/`invars`/`constvars` to walk, the values of its constvars)."""
    # Since 0.11 a Jaxpr holds its consts itself; before, a ClosedJaxpr held (jaxpr, consts).
    inner = x if isinstance(x, jcore.Jaxpr) else x.jaxpr
    return inner, list(getattr(x, "consts", ()))


def call_body(eqn: Any) -> tuple[jcore.Jaxpr, list[Any]] | None:
    """The body of a call-like equation (jit, eval_jaxpr, custom_jvp/vjp, remat); None otherwise."""
    param = CALL_BODIES.get(eqn.primitive.name)
    body = eqn.params.get(param) if param else None
    return open_jaxpr(body) if body is not None and is_jaxpr(body) else None


def scan_counts(params: Mapping[str, Any]) -> tuple[int, int]:
    """(number of consts, number of carries) among a scan equation's operands."""
    if "ft_in" in params:
        # jax >= 0.11: a flat tree of three parts (consts, carry, xs); each part's leaves are operands.
        consts, carry, _ = params["ft_in"].unpack()
        return len(tuple(consts.vals)), len(tuple(carry.vals))
    return params["num_consts"], params["num_carry"]


def name_stack_elements(source_info: Any) -> tuple[Any, ...]:
    """The equation's name stack, outermost first: Scope (module names) and Transform (jvp, transpose)."""
    return tuple(source_info.name_stack.stack)


# jax.extend exports NameStack but not its element classes: take them from a NameStack's own
# `extend` (a scope, e.g. a Flax module name) and `transform` (jvp, transpose, vmap, ...).
_SCOPE = type(NameStack().extend("scope").stack[0])
_TRANSFORM = type(NameStack().transform("transform").stack[0])


def is_scope(element: Any) -> bool:
    return isinstance(element, _SCOPE)


def is_transform(element: Any) -> bool:
    return isinstance(element, _TRANSFORM)


def traceback_frames(source_info: Any) -> list[tuple[str, int, str]]:
    """(file, line, function) of the frames that created the equation, innermost first."""
    traceback = getattr(source_info, "traceback", None)
    if traceback is None:
        return []
    return [(f.file_name, f.line_num, f.function_name) for f in traceback.frames]


# ----------------------------------------------------------------------------------- name stack, frames

_LIBRARY_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (jax, np)
) + tuple(
    os.sep + name + os.sep for name in ("site-packages", "jaxlib", "flax", "optax", "orbax")
)
# Scope names that name-stack machinery pushes and that are not Flax modules.
_NON_MODULE_SCOPES = frozenset({"rematted_computation", "checkpoint", "remat"})


def transforms(elements: Sequence[Any]) -> set[str]:
    """The transformation names (jvp, transpose, vmap, ...) among name-stack elements."""
    return {e.name for e in elements if is_transform(e)}


def module_path(elements: Sequence[Any]) -> str:
    """The module path the name-stack scopes spell (Flax, NNX and Equinox names joined)."""
    scopes = [e.name for e in elements if is_scope(e) and e.name not in _NON_MODULE_SCOPES]
    return _frameworks.join_scopes(scopes)


def user_frames(source_info: Any) -> tuple[tuple[str, int, str], ...]:
    """(file, line, function) of the frames outside jax, numpy and installed libraries, innermost first."""
    return tuple(
        (path, line, function) for path, line, function in traceback_frames(source_info)
        if not (any(d in path for d in _LIBRARY_DIRS) or path.startswith("<frozen"))
    )


def bind(eqn: Any, values: Sequence[Any]) -> list[Any]:
    """Apply an equation's primitive to concrete (or traced) values, in the equation's own context."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with eqn.ctx.manager:
        raw = eqn.primitive.bind(*values, **params)
    return list(raw) if eqn.primitive.multiple_results else [raw]


# Compiling one program per distinct (primitive, parameters, shapes) is most of an eager replay's
# time on CPU; a one-primitive program has nothing for XLA's optimization passes to fuse, and
# compiles ~3x faster without them (see `nanlab.compile_cache.RUN_ONCE_OPTIONS`).
@functools.lru_cache(maxsize=8192)
def _eager_program(primitive: Any, params: tuple) -> Callable[..., Any]:
    kwargs = dict(params)
    return jax.jit(lambda *values: primitive.bind(*values, **kwargs), compiler_options=RUN_ONCE_OPTIONS)


def bind_eager(eqn: Any, values: Sequence[Any]) -> list[Any]:
    """`bind` on concrete CPU values through a program compiled without XLA's optimization passes."""
    params = eqn.primitive.get_bind_params(eqn.params)
    try:
        program = _eager_program(eqn.primitive, tuple(sorted(params.items())))
    except TypeError:  # unhashable parameters: JAX's own dispatch
        return bind(eqn, values)
    with eqn.ctx.manager:
        raw = program(*values)
    return list(raw) if eqn.primitive.multiple_results else [raw]


# ------------------------------------------------------------------------------------------ shard_map
# jax.pmap traces to jit(shard_map) since jax 0.10, so shard_map covers both. Params (0.10.2-0.12):
# jaxpr, mesh, in_specs, out_specs (one PartitionSpec per operand/result), check_vma,
# newly_manual_axes (the mesh axes the body sees per shard).
SHARD_MAP = "shard_map"
# Casts that only change the varying-manual-axes type of a value: identities on a shard's data.
VMA_CASTS = frozenset({"pvary", "pcast"})


def shard_map_meshes(jaxpr: jcore.Jaxpr) -> list[Any]:
    """The distinct concrete meshes of the shard_map equations anywhere in a jaxpr."""
    meshes: list[Any] = []
    stack = [jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            mesh = eqn.params.get("mesh") if eqn.primitive.name == SHARD_MAP else None
            if mesh is not None and getattr(mesh, "devices", None) is not None and mesh not in meshes:
                meshes.append(mesh)
            stack.extend(open_jaxpr(j)[0] for j in jcore.jaxprs_in_params(eqn.params))
    return meshes


def shard_map_axes(params: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(the manual mesh axes in mesh order, their sizes) of a shard_map equation."""
    mesh = params["mesh"]
    manual = params["newly_manual_axes"]
    names = tuple(a for a in mesh.axis_names if a in manual)
    return names, tuple(int(mesh.shape[a]) for a in names)


def shard_map_device(params: Mapping[str, Any], coords: Mapping[str, int]) -> int | None:
    """The id of the device at these mesh coordinates (other axes at 0); None for an abstract mesh."""
    mesh = params["mesh"]
    devices = getattr(mesh, "devices", None)
    if devices is None:
        return None
    index = tuple(coords.get(a, 0) for a in mesh.axis_names)
    return int(devices[index].id)


def spec_axes(spec: Any, ndim: int) -> list[tuple[str, ...]]:
    """Per array dimension, the mesh axes a PartitionSpec splits it over (major first)."""
    entries = list(tuple(spec)) if spec is not None else []
    entries += [None] * (ndim - len(entries))
    out = []
    for e in entries[:ndim]:
        if e is None:
            out.append(())
        elif isinstance(e, str):
            out.append((e,))
        else:
            out.append(tuple(e))
    return out


def bind_per_shard(eqn: Any, values: Sequence[Any], stacked: Sequence[bool], axes: Sequence[str],
                   sizes: Sequence[int]) -> list[Any]:
    """Apply a shard_map body's equation to every shard at once: vmap over the leading mesh axes.

    Stacked values hold one block per shard in leading dimensions (one per manual mesh axis, in mesh
    order); collectives (psum, all_gather, axis_index, ...) see the mesh axis names through vmap's
    `axis_name`. Outputs are stacked the same way.
    """
    if eqn.primitive.name in VMA_CASTS:
        return list(values) if eqn.primitive.multiple_results else [values[0]]
    fn = lambda *vals: tuple(bind(eqn, vals))  # noqa: E731
    for name, size in reversed(list(zip(axes, sizes))):
        fn = _vmap_axis(fn, stacked, name, size)
    return list(fn(*values))


def _vmap_axis(fn: Any, stacked: Sequence[bool], name: str, size: int) -> Any:
    in_axes = tuple(0 if s else None for s in stacked)
    return jax.vmap(fn, in_axes=in_axes, out_axes=0, axis_name=name, axis_size=size)
