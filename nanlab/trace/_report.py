"""The localizer's report: `Event`, `Report`, operand summaries and their text form."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanlab.trace._causes import CAUSES


def summarize(x: Any) -> dict[str, Any]:
    """Summarize an array for a report: shape, dtype, finite min/max and special-value counts.

    Args:
      x: an array (jax or numpy) or a Python scalar.

    Returns:
      dict with keys shape, dtype, min, max (over the finite entries; None when there are none or the
      dtype is not numeric), nan, posinf, neginf, zeros (counts; 0 for non-float dtypes).
    """
    dtype = getattr(x, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        return {"shape": list(x.shape), "dtype": str(dtype), "min": None, "max": None,
                "nan": 0, "posinf": 0, "neginf": 0, "zeros": 0}
    a = np.asarray(x)
    out: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype), "min": None, "max": None,
                           "nan": 0, "posinf": 0, "neginf": 0, "zeros": 0}
    is_float = jnp.issubdtype(a.dtype, jnp.inexact)  # jax's dtype tree knows bfloat16 and fp8
    if a.dtype == bool or not (is_float or np.issubdtype(a.dtype, np.number)):
        return out
    if np.issubdtype(a.dtype, np.complexfloating):
        a = np.abs(a)  # magnitudes: a complex value is non-finite when its modulus is
    if is_float:
        a = a.astype(np.float64)  # numpy has no reductions for bfloat16/fp8; float64 holds them exactly
        finite = np.isfinite(a)
        out["nan"] = int(np.isnan(a).sum())
        out["posinf"] = int(np.isposinf(a).sum())
        out["neginf"] = int(np.isneginf(a).sum())
        vals = a[finite]
    else:
        vals = a.reshape(-1)
    out["zeros"] = int((vals == 0).sum())
    if vals.size:
        out["min"] = float(vals.min())
        out["max"] = float(vals.max())
    return out


def _format_summary(s: dict[str, Any]) -> str:
    shape = "x".join(str(d) for d in s["shape"]) or "scalar"
    text = f"{s['dtype']}[{shape}] min={_fmt(s['min'])} max={_fmt(s['max'])} zeros={s['zeros']}"
    specials = [f"{k}={s[k]}" for k in ("nan", "posinf", "neginf") if s[k]]
    return text + (" " + " ".join(specials) if specials else "")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


@dataclasses.dataclass
class Event:
    """One equation whose output holds a NaN or an Inf. Fields are documented in the module docstring."""

    index: int
    primitive: str
    module: str
    phase: str
    source: str
    kind: str
    cause: str
    root: bool
    iterations: list[dict[str, Any]]
    forward_primitive: str = ""
    forward_source: str = ""
    inputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    outputs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    shard: dict[str, Any] | None = None  # inside shard_map/pmap only

    def to_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict (keys as in the module docstring; 'shard' only inside shard_map)."""
        d = dataclasses.asdict(self)
        if d["shard"] is None:
            del d["shard"]
        return d

    def where(self) -> str:
        """One line: primitive, phase, module, loop iterations and source."""
        loops = "".join(f" {it['loop']} iteration {it['index']}" for it in self.iterations)
        module = self.module or "<top level>"
        if self.shard is not None:
            coords = ", ".join(f"{a}={i}" for a, i in self.shard["mesh"].items())
            loops += f" on shard ({coords}) device {self.shard['device']}"
        text = f"{self.primitive} ({self.phase}) in module '{module}'{loops} at {self.source or '?'}"
        if self.phase == "backward" and self.forward_primitive:
            text += f" — the gradient of {self.forward_primitive}"
            if self.forward_source and self.forward_source != self.source:
                text += f" at {self.forward_source}"
        return text


@dataclasses.dataclass
class Report:
    """What `localize` found. Keys and meaning are documented in the module docstring."""

    found: bool
    cause: str
    origin: Event | None
    first_nan: Event | None
    bad_inputs: list[str]
    events: list[Event]
    num_events: int
    num_equations: int
    seconds: float
    replay: str | None = None  # the replay that found it: 'op-by-op', 'compiled-segments', 'cpu-op-by-op'
    replays: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    advice: list[str] = dataclasses.field(default_factory=list)  # set when no replay reproduced a failure

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-serializable dict (documented keys)."""
        return {
            "found": self.found,
            "cause": self.cause,
            "origin": self.origin.to_dict() if self.origin else None,
            "first_nan": self.first_nan.to_dict() if self.first_nan else None,
            "bad_inputs": list(self.bad_inputs),
            "events": [e.to_dict() for e in self.events],
            "num_events": self.num_events,
            "num_equations": self.num_equations,
            "seconds": self.seconds,
            "replay": self.replay,
            "replays": [dict(r) for r in self.replays],
            "advice": list(self.advice),
        }

    def __str__(self) -> str:
        if not self.found and self.advice:
            lines = [f"nanlab.trace: the call went non-finite, but no replay reproduced it "
                     f"({self.seconds:.1f} s): {_format_replays(self.replays)}",
                     "what to try:"]
            return "\n".join(lines + [f"  - {line}" for line in self.advice])
        if not self.found:
            return (f"nanlab.trace: no NaN or Inf in {self.num_equations} equations "
                    f"({self.seconds:.1f} s)")
        lines = [f"nanlab.trace: non-finite values in {self.num_events} of {self.num_equations} "
                 f"equations ({self.seconds:.1f} s)",
                 f"cause: {self.cause} — {CAUSES.get(self.cause, '')}"]
        if len(self.replays) > 1:
            lines.append(f"reproduced by the {self.replay} replay: {_format_replays(self.replays)}")
        if self.bad_inputs:
            lines.append("non-finite on entry: " + ", ".join(self.bad_inputs))
        for title, event in (("origin", self.origin), ("first NaN", self.first_nan)):
            if event is None:
                continue
            if title == "first NaN" and event is self.origin:
                lines.append("first NaN: the origin itself")
                continue
            lines.append(f"{title}: {event.kind} from {event.where()}")
            lines.append(f"  cause: {event.cause}")
            for i, s in enumerate(event.inputs):
                lines.append(f"  input {i}: {_format_summary(s)}")
            for i, s in enumerate(event.outputs):
                lines.append(f"  output {i}: {_format_summary(s)}")
        return "\n".join(lines)


def _format_replays(replays: list[dict[str, Any]]) -> str:
    """The replays tried, one clause each: 'op-by-op found nothing; compiled-segments found it'."""
    clauses = []
    for r in replays:
        if "skipped" in r:
            clauses.append(f"{r['name']} skipped ({r['skipped']})")
        else:
            clauses.append(f"{r['name']} {'found it' if r['found'] else 'found nothing'}")
    return "; ".join(clauses)


def _format_frame(frame: tuple[str, int, str] | None) -> str:
    """A user frame as the report's `source`: relative path:line (function)."""
    if frame is None:
        return ""
    path, line, function = frame
    try:
        path = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        pass
    return f"{path}:{line} ({function})"
