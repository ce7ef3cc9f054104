"""Building an `Event` from an equation's values, and naming the forward function behind a backward one."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from nanlab.trace import _jax
from nanlab.trace._causes import _SINGULAR_DERIVATIVE, classify
from nanlab.trace._report import Event, _format_frame, summarize
from nanlab.trace._values import _Context, _finite, _Shard, _Value


class ForwardIndex:
    """User source frames -> the forward equations evaluated there (primitive, module), in order.

    Both evaluators add every forward equation with user frames; a backward event looks up the
    forward function whose derivative it computes (the 'forward_primitive' of its event).
    """

    def __init__(self) -> None:
        self.by_frames: dict[tuple, list[tuple[str, str]]] = {}

    def add(self, frames: tuple, primitive: str, module: str) -> None:
        self.by_frames.setdefault(frames, []).append((primitive, module))

    def forward_of(self, frames: tuple, primitive: str, module: str) -> tuple[str, str]:
        """The forward equation at the same user source whose derivative a backward equation computes."""
        if not frames:
            return "", ""
        candidates = self.by_frames.get(frames, [])
        same_module = [p for p, m in candidates if m == module]
        if not same_module:
            # A custom_vjp backward rule runs at the call site; its forward rule's frames end there.
            for key, prims in self.by_frames.items():
                if len(key) > len(frames) and key[len(key) - len(frames):] == frames:
                    if any(m == module for _, m in prims):
                        return f"custom_vjp rule {key[0][2]}", _format_frame(key[0])
        pool = same_module or [p for p, _ in candidates]
        if not pool:
            return "", ""
        singular = [p for p in pool if p in _SINGULAR_DERIVATIVE]
        if singular:
            return singular[-1], _format_frame(frames[0])
        return (primitive if primitive in pool else pool[-1]), _format_frame(frames[0])


def make_event(index: int, eqn: Any, invals: list[_Value], outs: list[Any], bad: list[int], ctx: _Context,
               module: str, phase: str, frames: tuple, root: bool, forward: ForwardIndex) -> Event:
    """The `Event` of equation `index`: operand summaries (that shard's, inside shard_map), kind, cause."""
    shard_info = None
    if ctx.shard is not None:
        # Name the first shard holding a bad value, and summarize that shard's operands.
        sh = ctx.shard
        coords = _first_bad_shard(outs[bad[0]], sh)
        shard_info = {"mesh": dict(zip(sh.axes, coords)),
                      "device": _jax.shard_map_device(sh.params, dict(zip(sh.axes, coords))),
                      "shards": [dict(zip(sh.axes, c)) for c in _bad_shards(outs, bad, sh)]}
        invals = [dataclasses.replace(a, value=np.asarray(a.value)[coords])
                  if sh.stacked(a.value, v.aval) else a for a, v in zip(invals, eqn.invars)]
        outs = [np.asarray(o)[coords] if sh.stacked(o, v.aval) else o for o, v in zip(outs, eqn.outvars)]
    inputs = [summarize(a.value) for a in invals]
    outputs = [summarize(o) for o in outs]
    first_bad = outputs[bad[0]]
    kind = "nan" if any(outputs[k]["nan"] for k in bad) else "inf"
    fwd_prim, fwd_source = ("", "")
    if phase == "backward":
        fwd_prim, fwd_source = forward.forward_of(frames, eqn.primitive.name, module)
    cause = classify(eqn.primitive.name, inputs, first_bad, root=root, forward_primitive=fwd_prim)
    return Event(
        index=index, primitive=eqn.primitive.name, module=module, phase=phase,
        source=_format_frame(frames[0] if frames else None), kind=kind, cause=cause, root=root,
        iterations=[_iteration(it) for it in ctx.iterations],
        forward_primitive=fwd_prim, forward_source=fwd_source, inputs=inputs, outputs=outputs,
        shard=shard_info)


def _bad_shards(outs: Sequence[Any], bad: Sequence[int], shard: _Shard) -> list[tuple[int, ...]]:
    found: list[tuple[int, ...]] = []
    for c in np.ndindex(*shard.sizes):
        if any(not _finite(np.asarray(outs[k])[c]) for k in bad) and c not in found:
            found.append(c)
    return found


def _first_bad_shard(out: Any, shard: _Shard) -> tuple[int, ...]:
    for c in np.ndindex(*shard.sizes):
        if not _finite(np.asarray(out)[c]):
            return c
    return (0,) * len(shard.sizes)


def _iteration(it: tuple) -> dict[str, Any]:
    """A loop iteration for an event: the loop, the index, and (vmapped while) the running lanes."""
    out: dict[str, Any] = {"loop": it[0], "index": it[1]}
    if len(it) > 2:
        out["lanes"] = list(it[2])
    return out
