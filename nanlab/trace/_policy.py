"""The event policy: which non-finite equations are roots, which are allowed, counted and recorded.

Both evaluators ask the same questions of it. The eager one (`_Interpreter._leaf`) calls
`observe` for each equation with a non-finite output; the compiled-segment one
(`_Interpreter._commit`) reads only finite flags, so it asks `needs_event` first and, when the
answer is yes, replays the segment eagerly so that `observe` gets the operand values; when no, it
only counts the event (`count`).

Provenance: a non-finite value carries the ids of the roots it came from (equation indices;
arguments have negative ids). An equation whose non-finite output has no operand with provenance
is a root (it created the trouble). A value whose roots were all accepted by `allow` is allowed:
neither counted nor recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from nanlab.trace._report import Event, Report
from nanlab.trace._values import _finite, _Value


class EventPolicy:
    """Roots, the allow-list, `max_events` and the first NaN: one decision for both evaluators."""

    def __init__(self, allow: Callable[[Event], bool] | None, max_events: int):
        self.allow = allow
        self.max_events = max_events
        self.events: list[Event] = []  # every root and the first `max_events` other events
        self.root_events: dict[int, Event] = {}
        self.allowed_roots: set[int] = set()
        self.num_events = 0
        self.first_nan: Event | None = None
        self.const_roots: dict[int, Event] = {}  # latent roots: non-finite values made from constants

    @staticmethod
    def provenance(in_provs: Sequence[frozenset], index: int) -> tuple[frozenset, bool]:
        """(the roots a new non-finite output came from, whether equation `index` is itself a root)."""
        if not in_provs:
            return frozenset({index}), True
        return frozenset().union(*in_provs), False

    def allowed(self, prov: frozenset) -> bool:
        return bool(prov) and prov <= self.allowed_roots

    def needs_event(self, root: bool, allowed: bool) -> bool:
        """Whether an equation's `Event` (operand summaries, cause) must be built.

        Roots always (the allow-list judges the event, and the origin is a root); other events
        that are not allowed while the first NaN is unknown (its kind needs the values) or while
        fewer than `max_events` are recorded.
        """
        return root or (not allowed and (self.first_nan is None or len(self.events) < self.max_events))

    def count(self, n: int) -> None:
        """Count `n` events that need no `Event` (not allowed, past `max_events`, first NaN known)."""
        self.num_events += n

    def recorded(self) -> int:
        """How many events and roots are recorded so far (the segment evaluator's eager window)."""
        return len(self.events) + len(self.root_events)

    def observe(self, index: int, prov: frozenset, root: bool, make_event: Callable[[], Event]) -> None:
        """An equation with a non-finite output: count it, and record its event as the policy says."""
        allowed = self.allowed(prov)
        event = make_event() if self.needs_event(root, allowed) else None
        if root and self.allow is not None and self.allow(event):
            self.allowed_roots.add(index)
            return
        if allowed:
            return
        self.num_events += 1
        if event is None:
            return
        if root:
            self.root_events[index] = event
        if root or len(self.events) < self.max_events:
            self.events.append(event)
        if self.first_nan is None and event.kind == "nan":
            self.first_nan = event

    def const_root(self, event: Event) -> frozenset:
        """A latent root: a non-finite value made from constants only, reported if it reaches an output."""
        event.cause = "non-finite-constant"
        self.const_roots[event.index] = event
        return frozenset({event.index})

    def report(self, outs: Sequence[_Value], input_roots: dict[int, str], bad_inputs: list[str],
               num_equations: int, start: float) -> Report:
        """The `Report` once the function's outputs are known (they decide the origin among roots)."""
        reaching = set().union(*[o.prov for o in outs if o.prov is not None]) - self.allowed_roots
        # A non-finite output computed from constants only (a cond branch or a jitted function returning
        # jnp.nan) is always reported, with the equation that made it.
        const_reaching = set().union(*[o.cprov for o in outs if o.cprov is not None and not _finite(o.value)])
        const_events = [self.const_roots[r] for r in sorted(const_reaching)]
        events = self.events
        if const_events:
            events = sorted(events + const_events, key=lambda e: e.index)
            reaching |= const_reaching
        roots = {**self.root_events, **{e.index: e for e in const_events}}
        origin, cause = _choose_origin(roots, input_roots, reaching)
        literal_out = any(o.const and o.cprov is None and not _finite(o.value) for o in outs)
        if origin is None and not bad_inputs and literal_out:
            cause = "non-finite-constant"  # the function returns a NaN/Inf literal: no equation made it
        first_nan = self.first_nan or next((e for e in const_events if e.kind == "nan"), None)
        found = bool(roots or bad_inputs or self.num_events or literal_out)
        return Report(
            found=found, cause=cause if found else "none", origin=origin, first_nan=first_nan,
            bad_inputs=bad_inputs, events=events, num_events=self.num_events + len(const_events),
            num_equations=num_equations, seconds=time.perf_counter() - start)


def _choose_origin(roots: dict[int, Event], input_roots: dict[int, str],
                   reaching: set[int]) -> tuple[Event | None, str]:
    """Pick the origin: the earliest root reaching a non-finite output, else the earliest root."""
    ordered = sorted(set(roots) | set(input_roots))  # arguments (negative ids) come first
    preferred = [r for r in ordered if r in reaching] or ordered
    if not preferred:
        return None, "none"
    first = preferred[0]
    if first in input_roots:
        return None, input_roots[first]
    return roots[first], roots[first].cause
