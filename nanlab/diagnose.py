"""From a localization report, the failing batch and the run's history: a verdict and the fix to try.

`diagnose(report, batch=None, history=None, step=None) -> Verdict` applies the rules below in order;
the first that fires gives the verdict. `step` is the failing step's number (0: no update came before
it; None: unknown, and then an empty history stands for "no step before"). `diagnose_history(history)`
applies only the history rules (for runs that stall instead of going NaN, or when no report exists).

| verdict | rule (thresholds are the module constants) |
| --- | --- |
| `bad-data` | the failing batch holds a NaN or Inf (or, without a batch, `report.bad_inputs` is not empty) |
| `unscaled-inputs` | the batch's inputs reach max abs > `UNSCALED_MAX_ABS` (normalized inputs stay within a few units; raw 0-255 pixels do not) |
| `learning-rate-too-high` | the batch is finite, parameters or optimizer state (`report.bad_inputs` paths naming `params`/`opt_state`) were non-finite on entry, and the history rules below find an update ratio >= `HIGH_UPDATE_RATIO` or an exploding grad norm: the previous update overflowed |
| `nonfinite-state` | as above without that history sign, and either no update came before the failing step (`step == 0`, or no step given and no history rows) or a non-finite path names `opt_state` (moments average the gradients, no learning rate enters them, and non-finite gradients are reported at their own step): the state was non-finite from the start (initialization, a restored or imported checkpoint) |
| `learning-rate-too-high` | as above, only parameters non-finite, with updates before the failing step (`step > 0`, or history rows) and no sign in the history: one of them overflowed unchecked (steps without telemetry do not check their update) |
| `low-precision-overflow` | the origin is an overflow whose output dtype is float16 or bfloat16 |
| `unstable-loss` | the origin sits outside every Flax module or in Keras's `compile_loss` scope (the loss) and is a log of 0 or of a negative, or a division by 0 — forward or in its gradient — typically log(sigmoid(x)) saturating |
| `unstable-gradient` | the origin is in the backward pass and is not an overflow: a derivative undefined at its operand (sqrt or a norm at 0, log at 0 inside a module, 0*inf, inf-inf, a custom derivative's NaN constant), computed from finite operands |
| `learning-rate-too-high` | the origin is an overflow in the 'update' phase, or a recent update/param ratio >= `HIGH_UPDATE_RATIO` |
| `exploding-gradients` | the origin is an overflow in the backward pass, or the grad norm grew >= `GRAD_GROWTH` times over the last `WINDOW` rows, or reached `HUGE_GRAD_NORM` |
| `vanishing-gradients` | the per-module grad norms of the latest row fall, from the output side to the input side, by a factor >= 1/`VANISH_RATIO` |
| `unknown` | a non-finite value was found but no rule above explains it: read the report's origin |
| `none` | nothing non-finite and no history rule fired |
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from nanlab._modules import make_callable
from nanlab.config import INCEPTION_V3_BLOCKS

__all__ = ["FIXES", "Verdict", "diagnose", "diagnose_history"]

UNSCALED_MAX_ABS = 20.0  # |x| beyond this is not a normalized input (standardized data rarely passes 6)
HIGH_UPDATE_RATIO = 0.1  # healthy training moves weights by ~1e-3 of their norm per step
GRAD_GROWTH = 10.0  # grad-norm growth over the window that counts as exploding
HUGE_GRAD_NORM = 1e4  # a global grad norm this large is exploding whatever its history
VANISH_RATIO = 1e-3  # input-side grad norm / output-side grad norm below this is vanishing
WINDOW = 10  # recent history rows the trend rules look at

_LOSS_CAUSES = frozenset({"log-of-zero", "log-of-negative", "division-by-zero"})
# The state's trees that `report.bad_inputs` paths run through, in words.
_STATE_TREES = {"params": "the parameters", "opt_state": "the optimizer state"}
# The history verdicts that mean steps big enough to overflow an update.
_OVERFLOWING_HISTORY = ("learning-rate-too-high", "exploding-gradients")
_LOW_PRECISION = frozenset({"float16", "bfloat16"})

FIXES: dict[str, str] = {
    "bad-data": "drop or repair the non-finite examples (check the loader and the preprocessing)",
    "unscaled-inputs": "normalize the inputs (e.g. --normalize standardize, or scale pixels to [0, 1])",
    "low-precision-overflow": "compute in float32 (or scale the loss / clip activations) where float16 "
                              "or bfloat16 overflows; keep reductions and the loss in float32",
    "nonfinite-state": "the parameters/optimizer state held NaN/Inf before any update: check the "
                       "initialization, or the checkpoint/weights they were restored or imported from",
    "unstable-loss": "use the logits form of the loss (nanlab.losses.sigmoid_binary_cross_entropy: "
                     "log_sigmoid, never log(sigmoid(x))); use the double where for log/sqrt",
    "unstable-gradient": "a derivative is undefined at these operand values: keep the operand away from "
                         "the singular point with the double where (jnp.where inside and outside), or "
                         "give the function a custom_jvp with a defined derivative",
    "learning-rate-too-high": "lower the learning rate (or add warmup) and clip the update "
                              "(--clip global_norm:1.0)",
    "exploding-gradients": "clip gradients (--clip global_norm:1.0 or agc:0.01) and check the init "
                           "and normalization layers",
    "vanishing-gradients": "use a non-saturating hidden activation (relu/gelu) or BatchNorm, and a "
                           "variance-preserving init",
    "unknown": "read the report's origin (module, primitive, operands) and fix that computation",
    "none": "nothing to fix",
}

# InceptionV3's blocks from input to output, without the auxiliary head (a side branch, not a
# step of the path from the output back to the input); other models keep their history's order.
INCEPTION_BLOCK_ORDER = tuple(name for name in INCEPTION_V3_BLOCKS if name != "AuxLogits")


@dataclasses.dataclass
class Verdict:
    """The diagnosis: `cause` (a key of `FIXES`), the `evidence` that led to it, and the `fix` to try."""

    cause: str
    evidence: list[str]
    fix: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with keys cause, evidence, fix."""
        return {"cause": self.cause, "evidence": list(self.evidence), "fix": self.fix}

    def __str__(self) -> str:
        lines = [f"verdict: {self.cause}"] + [f"  - {e}" for e in self.evidence] + [f"fix: {self.fix}"]
        return "\n".join(lines)


def _verdict(cause: str, *evidence: str) -> Verdict:
    return Verdict(cause, [e for e in evidence if e], FIXES[cause])


# ---------------------------------------------------------------------------------------------- batch

def _batch_inputs(batch: Any) -> list[np.ndarray]:
    """The input arrays of a batch: x of an (x, y) pair, 'x'/'image(s)' of a dict, else every leaf."""
    if isinstance(batch, (tuple, list)) and batch:
        return [np.asarray(batch[0])]
    if isinstance(batch, Mapping):
        for key in ("x", "image", "images", "inputs"):
            if key in batch:
                return [np.asarray(batch[key])]
    return [np.asarray(leaf) for leaf in _leaves(batch)]


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, Mapping):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (tuple, list)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


_BATCH_PARTS = ("images", "labels")  # the names of an (x, y) batch's two entries


def _named_leaves(tree: Any, name: str = "batch") -> list[tuple[str, Any]]:
    """(words naming the leaf, leaf): an (x, y) batch's entries are its images and labels."""
    if isinstance(tree, Mapping):
        return [item for k, v in tree.items() for item in _named_leaves(v, f"{name} {k}")]
    if isinstance(tree, (tuple, list)):
        parts = _BATCH_PARTS if name == "batch" and len(tree) == 2 else [f"entry {i}" for i in range(len(tree))]
        return [item for part, v in zip(parts, tree) for item in _named_leaves(v, f"{name} {part}")]
    return [(name, tree)]


def first_bad_example(batch: Any) -> str | None:
    """The first non-finite value of a batch in words (``batch images, example 5``); None if all finite."""
    for name, leaf in _named_leaves(batch):
        a = np.asarray(leaf)
        if a.ndim and np.issubdtype(a.dtype, np.inexact):
            bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
            if bad.any():
                return f"{name}, example {int(np.argmax(bad))}"
    return None


def _nonfinite_count(a: np.ndarray) -> int:
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.inexact):
        try:
            a = a.astype(np.float64)  # bfloat16 and other extension floats
        except (TypeError, ValueError):
            return 0
    return int((~np.isfinite(a)).sum())


# -------------------------------------------------------------------------------------------- history

def _finite_rows(history: Sequence[Mapping[str, Any]] | None, key: str) -> list[float]:
    values = []
    for row in history or ():
        v = row.get(key)
        if isinstance(v, (int, float)) and math.isfinite(v):
            values.append(float(v))
    return values


def _ordered_modules(norms: Mapping[str, Any]) -> list[tuple[str, float]]:
    known = [n for n in INCEPTION_BLOCK_ORDER if n in norms]
    rest = [n for n in norms if n not in INCEPTION_BLOCK_ORDER and n != "AuxLogits"]
    names = known + rest if known else rest
    return [(n, float(norms[n])) for n in names
            if isinstance(norms[n], (int, float)) and math.isfinite(norms[n])]


def diagnose_history(history: Sequence[Mapping[str, Any]] | None) -> Verdict:
    """The history rules alone: learning rate, exploding and vanishing gradients.

    Args:
      history: metrics.jsonl rows (dicts with step, loss, grad_norm, param_norm, update_ratio and
        optionally module_grad_norms: module name -> grad norm), oldest first.

    Returns:
      A `Verdict`; cause 'none' when no rule fires.
    """
    if history is not None and not isinstance(history, Sequence):
        raise TypeError(f"history must be a list of metric rows, got {type(history).__name__}")
    recent = list(history or ())[-WINDOW:]
    ratios = _finite_rows(recent, "update_ratio")
    if ratios and max(ratios) >= HIGH_UPDATE_RATIO:
        return _verdict("learning-rate-too-high",
                        f"update/param ratio reached {max(ratios):.3g} (>= {HIGH_UPDATE_RATIO}; "
                        f"healthy steps are ~1e-3)")
    grads = _finite_rows(recent, "grad_norm")
    if grads and max(grads) >= HUGE_GRAD_NORM:
        return _verdict("exploding-gradients", f"global grad norm reached {max(grads):.3g} "
                                               f"(>= {HUGE_GRAD_NORM:g})")
    if len(grads) >= 2 and grads[0] > 0 and grads[-1] / grads[0] >= GRAD_GROWTH:
        return _verdict("exploding-gradients",
                        f"global grad norm grew {grads[-1] / grads[0]:.3g}x over the last "
                        f"{len(grads)} rows ({grads[0]:.3g} -> {grads[-1]:.3g})")
    rows = [r for r in recent if isinstance(r.get("module_grad_norms"), Mapping)]
    if rows:
        modules = _ordered_modules(rows[-1]["module_grad_norms"])
        if len(modules) >= 2:
            (first, g_in), (last, g_out) = modules[0], modules[-1]
            if g_out > 0 and g_in / g_out < VANISH_RATIO:
                losses = _finite_rows(recent, "loss")
                stall = (f"loss moved {abs(losses[-1] - losses[0]):.3g} over the last {len(losses)} rows"
                         if len(losses) >= 2 else "")
                return _verdict("vanishing-gradients",
                                f"grad norm falls from {g_out:.3g} at {last} to {g_in:.3g} at {first} "
                                f"(ratio {g_in / g_out:.2g} < {VANISH_RATIO:g})", stall)
    return _verdict("none")


# ------------------------------------------------------------------------------------------- diagnose

def diagnose(report: Any, batch: Any = None, history: Sequence[Mapping[str, Any]] | None = None,
             step: int | None = None) -> Verdict:
    """Name the cause of a failure in the lab's vocabulary, with evidence and a fix.

    Args:
      report: a `nanlab.trace.Report` (or None: history rules only).
      batch: the failing batch: (x, y), a dict with 'x', or an array of inputs; optional.
      history: metrics.jsonl rows before the failure, oldest first; optional.
      step: the failing step's number in the run (0: no update came before it); optional.

    Returns:
      A `Verdict` (rules and thresholds in the module docstring).

    Raises:
      TypeError: `report` is not a Report-like object (needs found, origin, bad_inputs, cause).
    """
    if report is not None and not all(hasattr(report, a) for a in ("found", "origin", "bad_inputs", "cause")):
        raise TypeError(f"report must be a nanlab.trace.Report or None, got {type(report).__name__}")
    origin = getattr(report, "origin", None)
    found = bool(getattr(report, "found", False))

    if batch is not None:
        bad = sum(_nonfinite_count(leaf) for leaf in _leaves(batch))
        if bad:
            where = first_bad_example(batch)
            return _verdict("bad-data", f"the failing batch holds {bad} NaN/Inf values"
                            + (f"; the first in {where}" if where else ""), _report_line(report))
        inputs = _batch_inputs(batch)
        max_abs = max((float(np.max(np.abs(a.astype(np.float64)))) for a in inputs if a.size), default=0.0)
        if max_abs > UNSCALED_MAX_ABS:
            return _verdict("unscaled-inputs",
                            f"input max |x| = {max_abs:.4g} (> {UNSCALED_MAX_ABS:g}: not normalized)",
                            _report_line(report))
    elif found and report.bad_inputs:
        return _verdict("bad-data", "non-finite on entry: " + ", ".join(report.bad_inputs))
    state_paths = [p for p in getattr(report, "bad_inputs", ()) if any(tree in p for tree in _STATE_TREES)]
    if found and state_paths:
        return _nonfinite_state_verdict(state_paths, history, step)

    if origin is not None:
        dtypes = {s.get("dtype") for s in origin.outputs}
        if origin.cause == "overflow" and dtypes & _LOW_PRECISION:
            return _verdict("low-precision-overflow",
                            f"{origin.primitive} overflowed its {'/'.join(sorted(dtypes & _LOW_PRECISION))} "
                            f"range (float16 max 65504)", _report_line(report))
        if _in_loss(origin.module) and origin.cause in _LOSS_CAUSES:
            saturated = ("the log's operand holds exact zeros: a saturated sigmoid (or 1 - sigmoid)"
                         if origin.cause == "log-of-zero" else "")
            return _verdict("unstable-loss", _report_line(report), saturated)
        # A backward root is computed from finite values only (the forward pass and the incoming
        # cotangent were finite), so anything but an overflow is a derivative undefined there.
        if origin.phase == "backward" and origin.cause != "overflow":
            return _verdict("unstable-gradient", _report_line(report),
                            "born in the gradient computation from finite operands (not an overflow)")
        if origin.cause == "overflow" and origin.phase == "update":
            return _verdict("learning-rate-too-high", _report_line(report),
                            "the parameter update itself overflowed")

    from_history = diagnose_history(history)
    if from_history.cause in _OVERFLOWING_HISTORY:
        from_history.evidence.append(_report_line(report))
        from_history.evidence[:] = [e for e in from_history.evidence if e]
        return from_history
    if origin is not None and origin.cause == "overflow" and origin.phase == "backward":
        return _verdict("exploding-gradients", _report_line(report))
    if from_history.cause == "vanishing-gradients":
        return from_history
    if found:
        return _verdict("unknown", _report_line(report))
    return from_history


def _nonfinite_state_verdict(state_paths: list[str], history: Sequence[Mapping[str, Any]] | None,
                             step: int | None) -> Verdict:
    """The batch is clean but the weights or optimizer state were non-finite on entry: who wrote them."""
    shown = ", ".join(state_paths[:3]) + (f" and {len(state_paths) - 3} more" if len(state_paths) > 3 else "")
    on_entry = f"the weights were already non-finite on entry ({shown}) while the batch was finite"
    from_history = diagnose_history(history)
    if from_history.cause in _OVERFLOWING_HISTORY:
        # Steps that big before this one: the previous update overflowed the weights.
        return _verdict("learning-rate-too-high", f"{on_entry}: the previous update overflowed",
                        *from_history.evidence)
    held = f"{_state_words(state_paths)} held NaN/Inf on entry ({shown})"
    if _first_step(step, history):
        # No update ran before, so none can have written them: they were non-finite from the start.
        return _verdict("nonfinite-state", f"{held}, the run's first step: before any update")
    if any("opt_state" in p for p in state_paths):
        # The optimizer's moments are running averages of the gradients: no learning rate enters
        # them, and a step whose gradients are non-finite is reported at that step. Moments that no
        # huge gradient in the history explains were non-finite before the updates began.
        return _verdict("nonfinite-state", held, "the optimizer state is built from the gradients alone "
                        "(no learning rate enters it), and every earlier step's gradients were finite")
    # Updates ran before and the batch is clean, so one of them wrote the non-finite weights: an
    # overflow inside the optimizer (finite gradients times a huge step), which steps run without
    # telemetry do not check (nanlab.step) and the next step's loss catches.
    return _verdict("learning-rate-too-high", f"{on_entry}: the previous update overflowed")


def _first_step(step: int | None, history: Sequence[Mapping[str, Any]] | None) -> bool:
    """Whether no update came before the failing step: step 0, or (step unknown) no history row."""
    # Without the step number, an empty history is the only sign; rows are logged only every few
    # steps, so callers that know the step should pass it.
    return step == 0 if step is not None else not history


def _state_words(state_paths: list[str]) -> str:
    """'the parameters', 'the optimizer state' or both, after the trees the paths run through."""
    return " and ".join(words for tree, words in _STATE_TREES.items() if any(tree in p for p in state_paths))


def _in_loss(module: str) -> bool:
    """Whether a module path is the loss: outside every module, or in Keras's loss scope."""
    # Keras 3 computes the compiled loss under the name scope 'compile_loss/<loss name>'.
    return module == "" or module.split("/")[0] == "compile_loss"


def _report_line(report: Any) -> str:
    """One line of evidence from a report: the cause and where it was born."""
    if report is None or not getattr(report, "found", False):
        return ""
    origin = report.origin
    if origin is None:
        return f"trace: {report.cause} (non-finite on entry: {', '.join(report.bad_inputs)})"
    return f"trace: {origin.cause} at {origin.where()}"


# ``nanlab.diagnose(report)`` and ``nanlab.diagnose.diagnose_history(...)`` both work (nanlab/_modules.py).
make_callable(__name__, diagnose)
