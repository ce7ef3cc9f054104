"""Localize the first NaN or Inf of any JAX function, equation by equation.

`localize(fn, *args)` traces `fn` to a jaxpr, then evaluates that jaxpr eagerly, one equation at a
time (each primitive's own `bind`), checking every floating output for NaN and Inf. It descends into
jit, eval_jaxpr (closed_call before jax 0.11.2), custom_jvp, custom_vjp, remat/checkpoint, cond (the
branch taken), scan and while loops (the iteration is named), and shard_map and pmap (the body is
replayed for all shards at once, vmapped over the mesh axes so collectives work, and the event names
the shard: mesh coordinates and device). The JAX internals it reads are all in
`nanlab/trace/_jax.py`, which handles jax 0.10.2 through 0.12.x. When `fn` takes a gradient inside (a train step), the transposed equations of the
backward pass are part of the same jaxpr and are replayed too.

Vocabulary of a `Report` (and of `Report.to_dict()`, JSON; other tools read these keys):

| key            | meaning |
| ---            | --- |
| `found`        | bool: some value was NaN or Inf (after the allow-list) |
| `cause`        | one word from `CAUSES` (below) for the origin; 'none' when nothing was found |
| `origin`       | event: the first equation whose output is non-finite while none of its inputs carried a non-finite value from the arguments or an earlier equation — where the trouble was created. Among several such roots, the first whose non-finite value reaches a non-finite output of `fn` wins; if none reaches an output, the first root. `null` when the trouble came in through the arguments (see `bad_inputs`) |
| `first_nan`    | event: the first equation whose output holds a NaN (often after the origin: log(0) = -inf, then 0 * -inf = NaN) |
| `bad_inputs`   | list of argument paths (`jax.tree_util.keystr` of the positional-argument tuple, e.g. `[1]['x']`) non-finite on entry |
| `events`       | list of events: every root and the first `max_events` non-finite equations, in evaluation order. A NaN or Inf computed from constants only is folded (not an event) unless it reaches an output of `fn`; then the equation that made it is a root with cause 'non-finite-constant' (a `cond` branch or `jit` body returning `jnp.nan` is named by that `cond`/`jit`) |
| `num_events`   | int: all equations with a non-finite output, recorded or not |
| `num_equations`| int: equations evaluated (loop bodies count once per iteration) |
| `seconds`      | float: wall time of the localization (of every replay tried, for `reproduce`) |
| `replay`       | the replay that found it: 'op-by-op' (the default: each event's equation bound alone), 'compiled-segments' (the values of runs of equations compiled together, as XLA optimizes them), 'cpu-op-by-op' (op by op on the CPU backend, `reproduce` only); `null` when nothing was found |
| `replays`      | list, in order, of the replays tried (`{'name', 'found', 'seconds'}`) or skipped (`{'name', 'skipped': why}`); one entry for `localize` |
| `advice`       | list of str: what to try when `reproduce` replayed a call known to be non-finite and no replay found it (jax_debug_nans, XLA flags that turn fast math off, a deterministic mode); else empty |

Each event is a dict with keys: `index` (evaluation order), `primitive` (JAX's name), `module` (the Flax
module path from the name stack, '' at top level), `phase` ('forward': the function's primal
computation; 'backward': exists only for the gradient — transposed equations and the derivative
coefficients computed during linearization, such as 0.5/sqrt(0); 'update': computed after the gradient
from gradient values outside any differentiation, e.g. the optimizer), `source` (user file:line
(function)), `kind` ('nan' or 'inf'), `cause`, `root` (bool: created here), `iterations` (list of
{'loop': 'scan'|'while', 'index': int} from the outermost loop in; a vmapped while loop whose predicate is
batched also has 'lanes': the lanes still running at that iteration, each of which is at that same
iteration, as XLA runs the body while any lane runs and keeps finished lanes' carry), `forward_primitive` and
`forward_source` (for backward events: the forward equation whose derivative produced it, '' when not
found), `inputs` and `outputs` (summaries: shape, dtype, min and max over the finite entries (null when
there are none), nan, posinf, neginf, zeros), and `shard`, present only for events inside a shard_map or
pmap body: {'mesh': {axis: index} of the first shard holding a non-finite value, 'device': its device
id, 'shards': every such shard}; the operand summaries are then that shard's blocks.

The allow-list (`allow=`) takes a glob pattern over module paths (or a list of them), or a predicate
`event -> bool`; an allowed event, and any later event whose non-finite inputs all came from allowed
events, is not reported (intentional -inf attention masks).

`reproduce(fn, *args)` is `localize` for a call known to have gone non-finite (what the guard and
the train CLI call): a jitted step runs as XLA's optimized program (fusion, rewrites, fast math,
another reduction order), so when the op-by-op replay finds nothing it tries the compiled-segment
replay on the same device, then the op-by-op replay on the CPU backend with the arguments copied
there (skipped when they already are on the CPU: that would be the first replay again); when none
finds it, `str(report)` says so plainly with what to try (`advice`).

Layout: this module holds `localize` and re-exports the public names; `_reproduce` holds `reproduce`; `_jax` is the JAX adapter,
`_causes` the cause rules (keyed by primitive), `_policy` the event policy both evaluators share,
`_interpreter` the eager evaluator and `_compiled` the compiled-segment one, `_events` builds an
event from an equation's values, `_analysis` is the static analysis of a jaxpr, `_report` the
report types, `_values` what the evaluators carry per value.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import time
from collections.abc import Callable
from typing import Any

import jax

from nanlab.trace import _frameworks, _jax
from nanlab.trace._analysis import _cached_live, _last_use, _leaf_count, _segments, _signature_counts
from nanlab.trace._causes import CAUSES, classify
from nanlab.trace._interpreter import _Interpreter
from nanlab.trace._policy import EventPolicy
from nanlab.trace._report import Event, Report, summarize
from nanlab.trace._values import _Context, _finite, _has_nan, _Value

__all__ = ["CAUSES", "Event", "Report", "classify", "localize", "reproduce", "summarize"]

LOCALIZE_REPLAYS = ("op-by-op", "compiled-segments")  # `localize(replay=...)`; `reproduce` adds cpu-op-by-op


# Compiling costs per program: one eager primitive costs about five kernels of a compiled segment
# (measured on InceptionV3's train step), and a segment compiles ~2 kernels per equation (the
# equation and its finite flag). Eager wins when distinct equations are few.
_AUTO_UNIQUE_FRACTION = 0.3
_AUTO_SEGMENT_SIZE = 128


def _allow_predicate(allow: Any) -> Callable[[Event], bool] | None:
    if allow is None:
        return None
    if callable(allow):
        return allow
    if isinstance(allow, str):
        patterns = [allow]
    elif isinstance(allow, (list, tuple)) and all(isinstance(p, str) for p in allow):
        patterns = list(allow)
    else:
        raise TypeError(f"allow must be a glob pattern, a list of patterns or a predicate, got {allow!r}")
    return lambda event: any(fnmatch.fnmatchcase(event.module, p) for p in patterns)


def localize(fn: Callable[..., Any], *args: Any, allow: Any = None, max_events: int = 8,
             segment_size: int | str = "auto", replay: str = "op-by-op", device: Any = None,
             **kwargs: Any) -> Report:
    """Replay `fn(*args, **kwargs)` equation by equation and report the first NaN or Inf.

    Args:
      fn: any JAX-traceable function (a jitted train step included); its gradient, if it takes one,
        is replayed too.
      *args: positional arguments (pytrees of arrays); traced, so their values are what is checked.
      allow: None, a glob pattern over Flax module paths (e.g. '*/attention*'), a list of patterns, or
        a predicate `Event -> bool`: events it accepts (and values derived only from them) are not
        reported.
      max_events: how many non-root events to record in detail (roots are always recorded).
      segment_size: runs of up to this many equations are compiled together and checked through
        per-equation flags; a run whose flags show a new event is replayed one equation at a time.
        0 replays everything one equation at a time: one compilation per distinct (primitive,
        parameters, shapes), which repeated layers share. "auto" (the default) picks 0 when
        distinct equations are under `_AUTO_UNIQUE_FRACTION` of all (deep networks of repeated
        blocks: InceptionV3's train step has ~1,300 distinct among ~10,400), else 128.
      replay: "op-by-op" (the default): every equation whose output is non-finite is bound alone to
        build its event, so compiled segments only speed up the stretches that stay finite.
        "compiled-segments": a segment whose flags show an event is walked with every equation's
        outputs taken from one compiled run of that segment (XLA's optimized program, fused and
        rewritten as in a jitted step), so a NaN that only the compiled program makes is reported;
        `segment_size` must then not be 0 ("auto" gives 128). A function holding shard_map or pmap
        is always replayed op by op (the report's `replays` then names "op-by-op").
      device: replay on this device (e.g. `jax.devices("cpu")[0]`): the arguments and the traced
        function's constants are copied there first. None: where the arguments are.
      **kwargs: closed over as static (not traced), e.g. `train=True`.

    Returns:
      A `Report` (see the module docstring for its keys).

    Raises:
      TypeError: `fn` is not callable or `allow` has the wrong type.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if not isinstance(max_events, int) or max_events < 0:
        raise ValueError(f"max_events must be a non-negative int, got {max_events!r}")
    if segment_size != "auto" and (not isinstance(segment_size, int) or segment_size < 0):
        raise ValueError(f"segment_size must be 'auto' or a non-negative int, got {segment_size!r}")
    if replay not in LOCALIZE_REPLAYS:
        raise ValueError(f"replay must be one of {LOCALIZE_REPLAYS}, got {replay!r}")
    if replay == "compiled-segments" and segment_size == 0:
        raise ValueError("the compiled-segments replay needs segment_size > 0 (or 'auto')")
    predicate = _allow_predicate(allow)
    start = time.perf_counter()
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        report = _localize(fn, args, kwargs, predicate, max_events, segment_size, replay, device, start)
    report.replay = report.replays[0]["name"] if report.found else None
    return report


def _localize(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any], predicate: Any, max_events: int,
              segment_size: int | str, replay: str, device: Any, start: float) -> Report:
    """`localize` once its options are checked (under `jax.default_device(device)` when one is given)."""
    if device is not None:
        args = jax.device_put(args, device)

    def target(*positional: Any) -> Any:
        # A fresh function object per call: JAX caches traces by function, and a trace cached
        # earlier (the user's own jit of `fn`) ran without the module scopes pushed below.
        return fn(*positional, **kwargs)

    with _frameworks.module_scopes():  # NNX and Equinox submodule calls push their paths
        jaxpr, consts = _jax.open_jaxpr(jax.make_jaxpr(target)(*args))
    if device is not None:
        consts = [jax.device_put(c, device) if isinstance(c, jax.Array) else c for c in consts]
    leaves_with_paths, _ = jax.tree_util.tree_flatten_with_path(args)
    meshes = _jax.shard_map_meshes(jaxpr)
    if meshes:
        # Replayed eagerly, all shards at once (see `_Interpreter._shard_map`).
        segment_size = 0
        replay = "op-by-op"
    elif segment_size == "auto" and replay == "compiled-segments":
        segment_size = _AUTO_SEGMENT_SIZE
    elif segment_size == "auto":
        leaves, unique = _signature_counts(jaxpr)
        segment_size = 0 if unique < _AUTO_UNIQUE_FRACTION * leaves else _AUTO_SEGMENT_SIZE
    interp = _Interpreter(EventPolicy(predicate, max_events), segment_size,
                          compiled_values=replay == "compiled-segments")
    inputs: list[_Value] = []
    bad_inputs: list[str] = []
    input_roots: dict[int, str] = {}
    for k, (path, leaf) in enumerate(leaves_with_paths):
        if _finite(leaf):
            inputs.append(_Value(leaf, None, False))
            continue
        key = -(k + 1)  # negative ids: arguments, ordered before every equation
        input_roots[key] = "nan-input" if _has_nan(leaf) else "inf-input"
        bad_inputs.append(jax.tree_util.keystr(path))
        inputs.append(_Value(leaf, frozenset({key}), False))
    try:
        # The mesh as a context: equations around an explicitly sharded shard_map (reshard, ...) need it.
        interp.mesh = meshes[0] if len(meshes) == 1 else None
        with jax.debug_nans(False), jax.debug_infs(False):  # we want the values, not an exception
            outs = interp.run(jaxpr, consts, inputs, _Context(), [True] * len(jaxpr.outvars))
    finally:
        for cache in (_cached_live, _last_use, _leaf_count, _segments):
            cache.cache_clear()  # the keys hold this function's jaxprs alive
    report = interp.policy.report(outs, input_roots, bad_inputs, interp.counter, start)
    report.replays = [{"name": replay, "found": report.found, "seconds": report.seconds}]
    return report


from nanlab.trace._reproduce import reproduce  # noqa: E402  (it calls `localize`, defined above)
