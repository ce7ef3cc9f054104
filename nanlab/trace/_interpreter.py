"""The eager evaluator: replays a jaxpr one `bind` per equation, descending into calls, loops and shard_map."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from nanlab.trace import _eager, _jax, _shards
from nanlab.trace._analysis import _cached_live, _JaxprKey, _last_use, _segments
from nanlab.trace._compiled import SegmentEvaluator
from nanlab.trace._events import ForwardIndex, make_event
from nanlab.trace._policy import EventPolicy
from nanlab.trace._report import Event
from nanlab.trace._values import _Context, _finite, _Shard, _Value


class _Interpreter:
    """The eager evaluator: a jaxpr equation by equation, each bound alone, recording non-finite events.

    `run` hands runs of equations that `_analysis._segments` marks jittable to the compiled-segment
    evaluator (`self.segments`), which comes back here for the equations whose events need values,
    and traces its segments through `eqn` with a `_SegmentTracer` in the context. With
    `compiled_values`, a segment whose flags show an event is walked here again with each leaf's
    outputs read from `oracle` (that segment's compiled results, in evaluation order), not bound.
    """

    def __init__(self, policy: EventPolicy, segment_size: int, compiled_values: bool = False):
        self.policy = policy
        self.segment_size = segment_size
        self.compiled_values = compiled_values
        self.oracle: Iterator[list[Any]] | None = None
        self.mesh: Any = None  # the mesh of the function's shard_maps, a context outside their bodies
        self.counter = 0
        self.forward = ForwardIndex()  # forward equations by user frames, for backward events
        self.segments = SegmentEvaluator(self)

    # -- jaxpr level --------------------------------------------------------------------------------

    def run(self, jaxpr: jcore.Jaxpr, consts: Sequence[Any], args: Sequence[_Value], ctx: _Context,
            out_live: Sequence[bool]) -> list[_Value]:
        env: dict[Any, _Value] = {}
        for v, c in zip(jaxpr.constvars, consts):
            # Constants carry no provenance: an equation turning a constant -inf into output is a root.
            env[v] = _Value(c, None, False, const=True)
        for v, a in zip(jaxpr.invars, args):
            env[v] = a
        in_transpose = "transpose" in _jax.transforms(ctx.stack) or ctx.phase == "backward"
        ref = _JaxprKey(jaxpr)
        live = _cached_live(ref, tuple(bool(f) for f in out_live), in_transpose)
        last_use = _last_use(ref)
        if ctx.segment is not None or ctx.shard is not None or self.oracle is not None:
            # Inline everything: traced into a segment, all shards at once, or read from the oracle
            # (the leaves in the order the segment traced them).
            self.eager_range(jaxpr, 0, len(jaxpr.eqns), env, ctx, live)
            return [self._read(env, v) for v in jaxpr.outvars]
        for start, end, jittable in _segments(_JaxprKey(jaxpr), self.segment_size):
            if jittable:
                self.segments.run(jaxpr, start, end, env, ctx, live)
            else:
                self.eager_range(jaxpr, start, end, env, ctx, live)
            for i in range(start, end):
                for v in last_use.get(i, ()):
                    env.pop(v, None)  # free values after their last use: keeps eager memory near jit's
        return [self._read(env, v) for v in jaxpr.outvars]

    def eager_range(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
                     live: list[tuple[bool, ...]]) -> None:
        for i in range(start, end):
            eqn = jaxpr.eqns[i]
            invals = [self._read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, invals, ctx, live[i])
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o

    @staticmethod
    def _read(env: dict[Any, _Value], v: Any) -> _Value:
        if isinstance(v, jcore.Literal):
            return _Value(v.val, None, False, const=True)
        return env[v]

    # -- equation level -----------------------------------------------------------------------------

    def eqn(self, eqn: Any, invals: list[_Value], ctx: _Context, out_live: tuple[bool, ...]) -> list[_Value]:
        live = any(out_live)
        elements = ctx.stack + _jax.name_stack_elements(eqn.source_info)
        transforms = _jax.transforms(elements)
        grad_in = any(a.grad for a in invals)
        if ctx.phase in ("backward", "update"):
            phase = ctx.phase
        elif "transpose" in transforms or ("jvp" in transforms and not live):
            phase = "backward"
        elif "jvp" not in transforms and grad_in:
            phase = "update"
        else:
            phase = "forward"
        frames = _jax.user_frames(eqn.source_info) or ctx.frames
        inner = _Context(elements, phase if phase != "forward" else "", ctx.iterations, frames, ctx.shard,
                         ctx.segment)
        name = eqn.primitive.name
        params = eqn.params
        if ctx.shard is not None and (name in _jax.CONTROL_FLOW or name == _jax.SHARD_MAP):
            # Per-shard branches and loops: bound whole for all shards (not descended).
            return self._leaf(eqn, invals, ctx, elements, phase, frames, grad_in)
        if name == _jax.SHARD_MAP:
            return self._shard_map(eqn, invals, inner, out_live)
        body = _jax.call_body(eqn)
        if body is not None:
            sub, consts = body
            n = len(sub.invars)
            outs = self.run(sub, consts, invals[len(invals) - n:], inner, list(out_live))
            if ctx.segment is not None:  # segments never hold such calls (see _returns_constant)
                return outs
            return self._const_outputs(eqn, invals, outs, ctx, elements, phase, frames)
        if name == _jax.COND:
            index = int(np.asarray(invals[0].value))
            branches = params["branches"]
            index = min(max(index, 0), len(branches) - 1)  # lax.cond clamps the index the same way
            sub, consts = _jax.open_jaxpr(branches[index])
            outs = self.run(sub, consts, invals[1:], inner, list(out_live))
            if ctx.segment is not None:  # segments never hold such calls (see _returns_constant)
                return outs
            return self._const_outputs(eqn, invals, outs, ctx, elements, phase, frames)
        if name == _jax.SCAN:
            return self._scan(eqn, invals, inner, out_live)
        if name == _jax.WHILE:
            return self._while(eqn, invals, inner, live)
        if ctx.segment is not None:
            return ctx.segment.leaf(eqn, invals, elements, phase, frames, grad_in)
        return self._leaf(eqn, invals, ctx, elements, phase, frames, grad_in)

    def _scan(self, eqn: Any, invals: list[_Value], ctx: _Context, out_live: tuple[bool, ...]) -> list[_Value]:
        p = eqn.params
        body, consts = _jax.open_jaxpr(p["jaxpr"])
        n_consts, n_carry = _jax.scan_counts(p)
        length = p["length"]
        const_vals = invals[:n_consts]
        carry = invals[n_consts:n_consts + n_carry]
        xs = invals[n_consts + n_carry:]
        # Carries feed the next iteration, so they are live when any output is; ys map one to one.
        body_live = [any(out_live)] * n_carry + list(out_live[n_carry:])
        ys_steps: list[list[_Value]] = []
        for step in range(length):
            i = length - 1 - step if p["reverse"] else step
            x_i = [_Value(x.value[i], x.prov, x.grad, const=x.const) for x in xs]
            ictx = dataclasses.replace(ctx, iterations=ctx.iterations + (("scan", i),))
            outs = self.run(body, consts, const_vals + carry + x_i, ictx, body_live)
            carry, ys = outs[:n_carry], outs[n_carry:]
            ys_steps.append(ys)
        if p["reverse"]:
            ys_steps.reverse()
        stacked = []
        for k, y_aval in enumerate(eqn.outvars[n_carry:]):
            parts = [s[k] for s in ys_steps]
            if parts:
                value = jnp.stack([jnp.asarray(s.value) for s in parts])
            else:
                value = jnp.zeros(y_aval.aval.shape, y_aval.aval.dtype)
            provs = [s.prov for s in parts if s.prov is not None]
            prov = frozenset().union(*provs) if provs else None
            cprovs = [s.cprov for s in parts if s.cprov is not None]
            stacked.append(_Value(value, prov, any(s.grad for s in parts), const=all(s.const for s in parts),
                                  cprov=frozenset().union(*cprovs) if cprovs else None))
        return list(carry) + stacked

    def _while(self, eqn: Any, invals: list[_Value], ctx: _Context, live: bool) -> list[_Value]:
        p = eqn.params
        cond, cond_consts = _jax.open_jaxpr(p["cond_jaxpr"])
        body, body_consts = _jax.open_jaxpr(p["body_jaxpr"])
        nc, nb = p["cond_nconsts"], p["body_nconsts"]
        cvals, bvals, carry = invals[:nc], invals[nc:nc + nb], invals[nc + nb:]
        i = 0
        while True:
            ictx = dataclasses.replace(ctx, iterations=ctx.iterations + ((("while", i),)))
            (keep_going,) = self.run(cond, cond_consts, cvals + carry, ictx, [live])
            pred = np.asarray(keep_going.value)
            if not pred.any():
                return carry
            if pred.ndim:
                # vmap with a batched predicate: XLA runs the body while any lane is running and keeps
                # the old carry in the finished lanes (the predicate's shape prefixes every carry's).
                lanes = tuple(int(k) for k in np.flatnonzero(pred.reshape(-1)))
                ictx = dataclasses.replace(ctx, iterations=ctx.iterations + (("while", i, lanes),))
                new = self.run(body, body_consts, bvals + carry, ictx, [live] * len(body.outvars))
                carry = [_select_lanes(pred, n, c) for n, c in zip(new, carry)]
            else:
                carry = self.run(body, body_consts, bvals + carry, ictx, [live] * len(body.outvars))
            i += 1

    def _leaf(self, eqn: Any, invals: list[_Value], ctx: _Context, elements: tuple[Any, ...], phase: str,
              frames: tuple, grad_in: bool) -> list[_Value]:
        self.counter += 1
        if self.oracle is not None:
            outs = list(next(self.oracle))  # the compiled segment's values (see `compiled_values`)
        elif ctx.shard is None:
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                outs = _eager.evaluate(eqn, [a.value for a in invals])
        else:
            stacked = [ctx.shard.stacked(a.value, v.aval) for a, v in zip(invals, eqn.invars)]
            outs = _jax.bind_per_shard(eqn, [a.value for a in invals], stacked, ctx.shard.axes,
                                       ctx.shard.sizes)
        module = _jax.module_path(elements)
        grad_out = grad_in or phase in ("backward", "update")
        if all(a.const for a in invals):
            # Constant folding (e.g. jnp.var's NaN fill value, a broadcast -inf): not an event by
            # itself; an equation mixing it with the arguments' data into a non-finite value is.
            # A non-finite constant is a latent root, reported only if it reaches an output.
            bad = [k for k, o in enumerate(outs) if not _finite(o)]
            cprov = self._const_prov(eqn, invals, outs, bad, ctx, module, phase, frames) if bad else None
            return [_Value(o, None, grad_out, const=True, cprov=cprov if k in bad else None)
                    for k, o in enumerate(outs)]
        if phase == "forward" and frames:
            self.forward.add(frames, eqn.primitive.name, module)
        bad = [k for k, o in enumerate(outs) if not _finite(o)]
        if not bad:
            return [_Value(o, None, grad_out) for o in outs]
        prov, root = self.policy.provenance([a.prov for a in invals if a.prov is not None], self.counter)
        self.policy.observe(self.counter, prov, root,
                            lambda: self._event(eqn, invals, outs, bad, ctx, module, phase, frames, root))
        return [_Value(o, prov if k in bad else None, grad_out) for k, o in enumerate(outs)]

    def _const_prov(self, eqn: Any, invals: list[_Value], outs: list[Any], bad: list[int], ctx: _Context,
                    module: str, phase: str, frames: tuple) -> frozenset:
        """Latent roots behind a non-finite value computed from constants only (a new one if none)."""
        earlier = [a.cprov for a in invals if a.cprov is not None]
        if earlier:
            return frozenset().union(*earlier)
        return self.policy.const_root(self._event(eqn, invals, outs, bad, ctx, module, phase, frames, True))

    def _const_outputs(self, eqn: Any, invals: list[_Value], outs: list[_Value], ctx: _Context,
                       elements: tuple[Any, ...], phase: str, frames: tuple) -> list[_Value]:
        """A call or cond whose body returns a non-finite literal or constant: that equation made it."""
        bad = [k for k, o in enumerate(outs) if o.const and o.cprov is None and not _finite(o.value)]
        if not bad:
            return outs
        self.counter += 1
        cprov = self._const_prov(eqn, invals, [o.value for o in outs], bad, ctx, _jax.module_path(elements),
                                 phase, frames)
        return [dataclasses.replace(o, cprov=cprov) if k in bad else o for k, o in enumerate(outs)]

    def _event(self, eqn: Any, invals: list[_Value], outs: list[Any], bad: list[int], ctx: _Context,
               module: str, phase: str, frames: tuple, root: bool) -> Event:
        return make_event(self.counter, eqn, invals, outs, bad, ctx, module, phase, frames, root, self.forward)

    def _shard_map(self, eqn: Any, invals: list[_Value], ctx: _Context, out_live: tuple[bool, ...]) -> list[_Value]:
        """Replay a shard_map (or pmap) body for all shards at once, each shard's block stacked."""
        p = eqn.params
        axes, sizes = _jax.shard_map_axes(p)
        shard = _Shard(axes, sizes, p)
        body, consts = _jax.open_jaxpr(p["jaxpr"])
        blocks = [dataclasses.replace(a, value=_shards.to_shards(a.value, spec, axes, sizes))
                  for a, spec in zip(invals, p["in_specs"])]
        outs = self.run(body, consts, blocks, dataclasses.replace(ctx, shard=shard), list(out_live))
        results = []
        for o, spec, v, g in zip(outs, p["out_specs"], body.outvars, eqn.outvars):
            value = _shards.from_shards(o.value, spec, axes, sizes, g.aval, shard.stacked(o.value, v.aval))
            if getattr(p["mesh"], "devices", None) is not None:
                # Laid out as shard_map lays out its results, for the equations that follow.
                value = jax.device_put(value, jax.sharding.NamedSharding(p["mesh"], spec))
            results.append(dataclasses.replace(o, value=value))
        return results

def _select_lanes(pred: np.ndarray, new: _Value, old: _Value) -> _Value:
    """The carry after one step of a while loop with a batched predicate: new where running, else old."""
    mask = jnp.reshape(pred, pred.shape + (1,) * (np.ndim(new.value) - pred.ndim))
    value = jnp.where(mask, new.value, old.value)
    kept = [v for v, in_use in ((new, True), (old, not pred.all())) if in_use]
    prov = [v.prov for v in kept if v.prov is not None]
    cprov = [v.cprov for v in kept if v.cprov is not None]
    finite = _finite(value)
    return _Value(value, frozenset().union(*prov) if prov and not finite else None, new.grad or old.grad,
                  const=new.const and old.const,
                  cprov=frozenset().union(*cprov) if cprov and not finite else None)
