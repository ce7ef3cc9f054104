"""The compiled-segment evaluator: runs of equations jitted together, checked through finite flags.

A run of equations (`_analysis._segments`) is traced once into a jitted function that returns its
outputs and one finite flag per floating output of every leaf equation inside. Provenance follows
from the flags alone (`_commit`), with the same `EventPolicy` as eager replay; where the policy
needs an event's operand values, the run splits there and the eager evaluator replays the
equations around it. With `compiled_values` (the "compiled-segments" replay) the eager evaluator
instead walks the whole segment again with every equation's outputs taken from one compiled run of
that segment, so an event that only XLA's optimized program produces (a rewrite, a fusion, a
different reduction order) is reported with the values that program computed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from nanlab.trace import _jax
from nanlab.trace._values import _aval_key, _Context, _is_float, _Value


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
    wrote, so that `SegmentEvaluator._commit` can replay provenance from the flags alone.
    """

    records: list[_Record]
    slots: int  # the next value slot (the segment's inputs take the first ones)
    flags: list[Any] = dataclasses.field(default_factory=list)
    top: int = 0  # the segment's top-level equation being traced
    outputs: list[list[Any]] = dataclasses.field(default_factory=list)  # every leaf's outputs, in order

    def leaf(self, eqn: Any, invals: list[_Value], elements: tuple[Any, ...], phase: str, frames: tuple,
             grad_in: bool) -> list[_Value]:
        """Bind, and record the outputs' finite flags as extra results of the segment."""
        outs = _jax.bind(eqn, [a.value for a in invals])
        self.outputs.append(outs)
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


class SegmentEvaluator:
    """Runs equations as compiled segments; `eager` (the `_Interpreter`) replays what needs values.

    The eager evaluator owns the equation counter, the forward index and the event policy; a
    committed segment advances them as its equations would have one by one.
    """

    def __init__(self, eager: Any):
        self.eager = eager
        self.cache: dict[tuple, tuple[Callable, list[_Record], list[tuple]]] = {}

    def run(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
            live: list[tuple[bool, ...]]) -> None:
        """Compiled segments, split around each equation whose event needs operand values."""
        while start < end:
            k = self._jit(jaxpr, start, end, env, ctx, live)
            if k == end:
                return
            if self.eager.compiled_values:
                self._replay_compiled(jaxpr, start, end, env, ctx, live)
                return
            # Flags are deterministic, so the prefix before the event commits; then equations run
            # eagerly while they keep producing recorded events (after a first NaN, the next few
            # equations usually all do), and compiled segments resume for the rest.
            if k > start and self._jit(jaxpr, start, k, env, ctx, live) != k:
                self.eager.eager_range(jaxpr, start, k, env, ctx, live)
            quiet = 0
            while k < end and quiet < _EAGER_WINDOW:
                recorded = self.eager.policy.recorded()
                self.eager.eager_range(jaxpr, k, k + 1, env, ctx, live)
                quiet = 0 if self.eager.policy.recorded() > recorded else quiet + 1
                k += 1
            start = k

    def _jit(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
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
        compiled, records, out_meta, in_vars, out_vars = self._program(jaxpr, start, end, env, ctx, live)
        outs, flags = compiled(*[env[v].value for v in in_vars])
        slot_prov = self._commit(records, np.asarray(flags), [env[v].prov for v in in_vars])
        if isinstance(slot_prov, int):
            return slot_prov
        for v, x, (slot, grad, const) in zip(out_vars, outs, out_meta):
            env[v] = _Value(x, slot_prov.get(slot) if slot is not None else None, grad, const=const)
        return end

    def _replay_compiled(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value],
                         ctx: _Context, live: list[tuple[bool, ...]]) -> None:
        """Replay eqns[start:end] eagerly with each leaf's outputs taken from one compiled run.

        The program is the segment's own (the same equations jitted together, so XLA rewrites and
        fuses them as in the flags run) with every leaf equation's outputs as extra results; the
        eager evaluator then walks the same equations in the same order, reading those outputs
        instead of binding, and so records events, provenance and operand summaries as usual.
        """
        compiled, _, _, in_vars, _ = self._program(jaxpr, start, end, env, ctx, live, export=True)
        _, _, leaf_outputs = compiled(*[env[v].value for v in in_vars])
        self.eager.oracle = iter(leaf_outputs)
        try:
            self.eager.eager_range(jaxpr, start, end, env, ctx, live)
            if next(self.eager.oracle, None) is not None:
                raise RuntimeError("nanlab.trace: a compiled segment recorded more leaf equations than "
                                   "its eager walk evaluated")
        finally:
            self.eager.oracle = None

    def _program(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value], ctx: _Context,
                 live: list[tuple[bool, ...]], export: bool = False) -> tuple[Callable, list[_Record],
                                                                              list[tuple], list, list]:
        """The compiled program of eqns[start:end] (cached), with its input and output variables."""
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
        key = (id(jaxpr), start, end, tuple(live[start:end]), ctx.phase, ctx.frames,
               tuple((type(e), e.name) for e in ctx.stack),
               tuple((_aval_key(env[v].value), env[v].grad, env[v].const) for v in in_vars), export)
        cached = self.cache.get(key)
        if cached is None:
            cached = self._compile(jaxpr, start, end, env, ctx, live, in_vars, out_vars, export)
            self.cache[key] = cached
        return (*cached, in_vars, out_vars)

    def _compile(self, jaxpr: jcore.Jaxpr, start: int, end: int, env: dict[Any, _Value],
                 ctx: _Context, live: list[tuple[bool, ...]], in_vars: list[Any],
                 out_vars: list[Any], export: bool) -> tuple[Callable, list[_Record], list[tuple]]:
        """Trace eqns[start:end] into a jitted function; its records and output metadata come along.

        The function returns (outputs, flags), and with `export` also every leaf equation's outputs
        in evaluation order. Cached by `_program`, so a loop body's segment compiles once, not once
        per iteration.
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
                self.eager.eager_range(jaxpr, i, i + 1, senv, sctx, live)
            out_meta.extend((senv[v].slot, senv[v].grad, senv[v].const) for v in out_vars)
            stacked = jnp.stack(tracer.flags) if tracer.flags else jnp.zeros((0,), bool)
            if export:
                return [senv[v].value for v in out_vars], stacked, tracer.outputs
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
        counter, num_events, forward = self.eager.counter, 0, []
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
            prov, root = self.eager.policy.provenance(in_provs_rec, counter)
            allowed = self.eager.policy.allowed(prov)
            if self.eager.policy.needs_event(root, allowed):
                return rec.top  # a root or a recorded event: the report needs its operand values
            if not allowed:
                num_events += 1
            for slot in bad:
                slot_prov[slot] = prov
        self.eager.counter = counter
        self.eager.policy.count(num_events)
        for key, entry in forward:
            self.eager.forward.add(key, *entry)
        return slot_prov
