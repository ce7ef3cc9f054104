"""The evaluators: eager replay (one `bind` per equation) and compiled segments (per-output finite flags)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from nanlab.trace import _jax, _shards
from nanlab.trace._analysis import _cached_live, _JaxprKey, _last_use, _segments
from nanlab.trace._causes import _SINGULAR_DERIVATIVE, classify
from nanlab.trace._policy import EventPolicy
from nanlab.trace._report import Event, _format_frame, summarize
from nanlab.trace._values import _aval_key, _Context, _finite, _is_float, _Shard, _Value


@dataclasses.dataclass
class _Record:
    """One leaf equation traced inside a compiled segment (what the host needs to replay its flags)."""

    primitive: str
    module: str
    phase: str
    frames: tuple
    in_slots: list[int | None]
    float_slots: list[int]
    n_flags: int  # finite flags this equation adds to the segment's flag vector
    top: int  # index of the segment's top-level equation that holds this one
    const: bool  # all operands are constants: folded, never an event


@dataclasses.dataclass
class _SegmentTracer:
    """One segment being traced into a compiled function: carried in `_Context.segment`.

    Its leaf equations bind on tracers, give each output a slot, and add one finite flag per
    floating output to the segment's results; `records` say which slots each equation read and
    wrote, so that `_Interpreter._commit` can replay provenance from the flags alone.
    """

    records: list[_Record]
    slots: int  # the next value slot (the segment's inputs take the first ones)
    flags: list[Any] = dataclasses.field(default_factory=list)
    top: int = 0  # the segment's top-level equation being traced

    def leaf(self, eqn: Any, invals: list[_Value], elements: tuple[Any, ...], phase: str, frames: tuple,
             grad_in: bool) -> list[_Value]:
        """Bind, and record the outputs' finite flags as extra results of the segment."""
        outs = _jax.bind(eqn, [a.value for a in invals])
        grad_out = grad_in or phase in ("backward", "update")
        const = all(a.const for a in invals)
        values, n_flags, float_slots = [], 0, []
        for o in outs:
            slot = self.slots
            self.slots += 1
            if _is_float(o):
                # One fused scalar reduction per output: the only data that leaves the device.
                self.flags.append(jnp.isfinite(o).all())
                n_flags += 1
                float_slots.append(slot)
            values.append(_Value(o, None, grad_out, slot, const))
        self.records.append(_Record(
            primitive=eqn.primitive.name, module=_jax.module_path(elements), phase=phase, frames=frames,
            in_slots=[a.slot for a in invals], float_slots=float_slots, n_flags=n_flags, top=self.top,
            const=const))
        return values


# After an event that needed operand values, equations keep running eagerly until this many in a
# row record nothing new; then compiled segments resume.
_EAGER_WINDOW = 4


class _Interpreter:
    """Evaluate a jaxpr equation by equation, recording non-finite events."""

    def __init__(self, policy: EventPolicy, segment_size: int):
        self.policy = policy
        self.segment_size = segment_size
        self.mesh: Any = None  # the mesh of the function's shard_maps, a context outside their bodies
        self.segment_cache: dict[tuple, tuple[Callable, list[_Record], list[tuple]]] = {}
        self.counter = 0
        self.forward_index: dict[tuple, list[tuple[str, str]]] = {}

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
        if ctx.segment is not None or ctx.shard is not None:  # inline everything / shards: eager
            self._eager_range(jaxpr, 0, len(jaxpr.eqns), env, ctx, live)
            return [self._read(env, v) for v in jaxpr.outvars]
        for start, end, jittable in _segments(_JaxprKey(jaxpr), self.segment_size):
            if jittable:
                self._run_range(jaxpr, start, end, env, ctx, live)
            else:
                self._eager_range(jaxpr, start, end, env, ctx, live)
            for i in range(start, end):
                for v in last_use.get(i, ()):
                    env.pop(v, None)  # free values after their last use: keeps eager memory near jit's
        return [self._read(env, v) for v in jaxpr.outvars]

    def _eager_range(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
                     live: list[tuple[bool, ...]]) -> None:
        for i in range(start, end):
            eqn = jaxpr.eqns[i]
            invals = [self._read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, invals, ctx, live[i])
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o

    def _run_range(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
                   live: list[tuple[bool, ...]]) -> None:
        """Compiled segments, split around each equation whose event needs operand values."""
        while start < end:
            k = self._jit_segment(jaxpr, start, end, env, ctx, live)
            if k == end:
                return
            # Flags are deterministic, so the prefix before the event commits; then equations run
            # eagerly while they keep producing recorded events (after a first NaN, the next few
            # equations usually all do), and compiled segments resume for the rest.
            if k > start and self._jit_segment(jaxpr, start, k, env, ctx, live) != k:
                self._eager_range(jaxpr, start, k, env, ctx, live)
            quiet = 0
            while k < end and quiet < _EAGER_WINDOW:
                recorded = self.policy.recorded()
                self._eager_range(jaxpr, k, k + 1, env, ctx, live)
                quiet = 0 if self.policy.recorded() > recorded else quiet + 1
                k += 1
            start = k

    def _jit_segment(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
                     live: list[tuple[bool, ...]]) -> int:
        """Run eqns[start:end] as one compiled function that also returns every output's finite flags.

        Compiling a few hundred equations at once costs a fraction of compiling each alone (eager
        dispatch compiles one executable per primitive and shape). If the flags show an event that
        needs operand values (a root, or one of the first recorded events), nothing is committed and
        the caller replays the segment eagerly; otherwise provenance is updated from the flags alone.

        Returns:
          `end` when the segment's results were committed to `env`; else the index of the first
          equation whose event needs operand values (nothing committed).
        """
        eqns = jaxpr.eqns[start:end]
        defined = {v for e in eqns for v in e.outvars if not isinstance(v, jcore.DropVar)}
        in_vars: list[Any] = []
        for e in eqns:
            for v in e.invars:
                if isinstance(v, jcore.Var) and v not in defined and v not in in_vars:
                    in_vars.append(v)
        later = {v for e in jaxpr.eqns[end:] for v in e.invars if isinstance(v, jcore.Var)}
        later.update(v for v in jaxpr.outvars if isinstance(v, jcore.Var))
        out_vars = [v for v in defined if v in later]
        in_values = [env[v].value for v in in_vars]
        key = (id(jaxpr), start, end, tuple(live[start:end]), ctx.phase, ctx.frames,
               tuple((type(e).__name__, e.name) for e in ctx.stack),
               tuple((_aval_key(x), env[v].grad, env[v].const) for v, x in zip(in_vars, in_values)))
        cached = self.segment_cache.get(key)
        if cached is None:
            cached = self._compile_segment(jaxpr, start, end, env, ctx, live, in_vars, out_vars)
            self.segment_cache[key] = cached
        compiled, records, out_meta = cached
        outs, flags = compiled(*in_values)
        slot_prov = self._commit(records, np.asarray(flags), [env[v].prov for v in in_vars])
        if isinstance(slot_prov, int):
            return slot_prov
        for v, x, (slot, grad, const) in zip(out_vars, outs, out_meta):
            env[v] = _Value(x, slot_prov.get(slot) if slot is not None else None, grad, const=const)
        return end

    def _compile_segment(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value],
                         ctx: _Context, live: list[tuple[bool, ...]], in_vars: list[Any],
                         out_vars: list[Any]) -> tuple[Callable, list[_Record], list[tuple]]:
        """Trace eqns[start:end] into a jitted function; its records and output metadata come along.

        Cached by the caller, so a loop body's segment compiles once, not once per iteration.
        """
        records: list[_Record] = []
        out_meta: list[tuple[int | None, bool, bool]] = []

        def segment(*values: Any) -> tuple[list[Any], Any]:
            records.clear()
            out_meta.clear()
            tracer = _SegmentTracer(records, len(in_vars))
            sctx = dataclasses.replace(ctx, segment=tracer)
            senv = {v: _Value(x, None, env[v].grad, k, env[v].const)
                    for k, (v, x) in enumerate(zip(in_vars, values))}
            for i in range(start, end):
                tracer.top = i
                self._eager_range(jaxpr, i, i + 1, senv, sctx, live)
            out_meta.extend((senv[v].slot, senv[v].grad, senv[v].const) for v in out_vars)
            stacked = jnp.stack(tracer.flags) if tracer.flags else jnp.zeros((0,), bool)
            return [senv[v].value for v in out_vars], stacked

        # Records and out_meta fill when jit traces `segment` (at its first call); a retrace refills
        # them identically.
        return jax.jit(segment), records, out_meta

    def _commit(self, records: list[_Record], flags: np.ndarray,
                in_provs: list[frozenset | None]) -> dict[int, frozenset] | int:
        """Propagate provenance through a compiled segment from its flags.

        Returns:
          slot -> provenance of the non-finite values, or (when an event needs operand values) the
          index of the top-level equation holding that event.
        """
        slot_prov: dict[int, frozenset] = {k: p for k, p in enumerate(in_provs) if p is not None}
        counter, num_events, forward = self.counter, 0, []
        row = 0
        for rec in records:
            counter += 1
            rec_flags = flags[row:row + rec.n_flags]
            row += rec.n_flags
            bad = [slot for slot, finite in zip(rec.float_slots, rec_flags) if not finite]
            if rec.const:
                if bad:
                    return rec.top  # a non-finite constant: its latent root needs the operand values
                continue
            if rec.phase == "forward" and rec.frames:
                forward.append((rec.frames, (rec.primitive, rec.module)))
            if not bad:
                continue
            in_provs_rec = [slot_prov[s] for s in rec.in_slots if s is not None and s in slot_prov]
            prov, root = self.policy.provenance(in_provs_rec, counter)
            allowed = self.policy.allowed(prov)
            if self.policy.needs_event(root, allowed):
                return rec.top  # a root or a recorded event: the report needs its operand values
            if not allowed:
                num_events += 1
            for slot in bad:
                slot_prov[slot] = prov
        self.counter = counter
        self.policy.count(num_events)
        for key, entry in forward:
            self.forward_index.setdefault(key, []).append(entry)
        return slot_prov

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
        if ctx.shard is None:
            with jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext():
                outs = _jax.bind(eqn, [a.value for a in invals])
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
            self.forward_index.setdefault(frames, []).append((eqn.primitive.name, module))
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

    def _event(self, eqn: Any, invals: list[_Value], outs: list[Any], bad: list[int], ctx: _Context,
               module: str, phase: str, frames: tuple, root: bool) -> Event:
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
            fwd_prim, fwd_source = self._forward_of(frames, eqn.primitive.name, module)
        cause = classify(eqn.primitive.name, inputs, first_bad, root=root, forward_primitive=fwd_prim)
        return Event(
            index=self.counter, primitive=eqn.primitive.name, module=module, phase=phase,
            source=_format_frame(frames[0] if frames else None), kind=kind, cause=cause, root=root,
            iterations=[_iteration(it) for it in ctx.iterations],
            forward_primitive=fwd_prim, forward_source=fwd_source, inputs=inputs, outputs=outputs,
            shard=shard_info)

    def _forward_of(self, frames: tuple, primitive: str, module: str) -> tuple[str, str]:
        """The forward equation at the same user source whose derivative a backward equation computes."""
        if not frames:
            return "", ""
        candidates = self.forward_index.get(frames, [])
        same_module = [p for p, m in candidates if m == module]
        if not same_module:
            # A custom_vjp backward rule runs at the call site; its forward rule's frames end there.
            for key, prims in self.forward_index.items():
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
