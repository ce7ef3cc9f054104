"""`nanlab.guard`: the sentinel, the exact replay and the verdict around any pure train step.

```python
from nanlab.guard import guard, NonFiniteError

train_step = guard(train_step, donate_argnums=0)      # or @guard / @guard(donate_argnums=0)
for batch in data:
    state, metrics = train_step(state, batch)         # NonFiniteError at the first non-finite call
train_step.check()                                     # the last calls' flags, read before leaving
```

The guarded function is one jitted executable: the user's step ``f(state, *args) -> state`` or
``-> (state, aux)``, then

- the finite flag: one fused float32 sum of squares over every floating output, formed so that it
  is NaN exactly when an output holds a NaN or an Inf (`nanlab.numerics.tree_sq_norm` with
  ``nan_if_nonfinite``), or the flag the step hands over itself (``finite=``);
- the gate: the output state is the input state when the call is non-finite, or when an earlier
  failure is still waiting for the host ("held"). The state of the failing call therefore
  survives on the device even when it was donated, and every later call is a no-op on it;
- a four-int32 carry (`Carry`) that the next call takes back: the number of calls, the index of
  the first unreported failure, the skipped count and whether failures hold the state.

The host never waits for the call it has just dispatched: every ``check_every`` calls it starts an
asynchronous copy of that call's carry and reads it one call later, while the next call runs. When
the carry names a failed call, the guard replays that call exactly (the held state, the arguments
it kept, the same rng inside them) through `nanlab.trace.reproduce` (op by op; when that finds
nothing, compiled segments, then the CPU backend: the report's `replay` names the one that found it,
or says that none did and what to try), runs `nanlab.diagnose.diagnose`
(with the history of the metrics the step returned, or the rows passed as ``history=``), prints both,
writes ``report.json`` into ``workdir`` and then, by ``on_failure``:

- ``"raise"``: raises `NonFiniteError` (``.report``, ``.verdict``, ``.step``, ``.inputs``);
- ``"skip"``: the failing update is dropped (the state, optimizer moments and BatchNorm statistics
  never see it), counted in ``.skipped``, and training goes on; only the first event is replayed
  and reported, later ones are only counted, without holding anything;
- a callable: called with the `NonFiniteError` (not raised) for every failure; if it returns,
  the update is dropped as with "skip".

After a reported failure in the last two modes, the calls that were held while the host had not
yet seen it are run again from the restored state, so training continues exactly as if they had
never been held; only the metrics those held calls returned (computed on the held state) differ.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nanlab._modules import make_callable

__all__ = ["guard", "GuardedStep", "NonFiniteError", "Carry", "gate", "outputs_finite", "replay_failure"]

ON_FAILURE_MODES = ("raise", "skip")
HISTORY_ROWS = 10  # metric rows kept for diagnose (its trend rules read the last `diagnose.WINDOW`)


class NonFiniteError(FloatingPointError):
    """A guarded step went non-finite; raised by `guard` (a FloatingPointError, like jax_debug_nans').

    Attributes:
      report: the `nanlab.trace.Report` of the replayed call.
      verdict: the `nanlab.diagnose.Verdict`.
      step: the 0-based index of the failing call of the guarded function.
      inputs: the failing call's positional arguments ``(state, *args)``, exactly as it got them
        (the state from before the failing update, kept on the device by the gate).
      payload: the report.json contents (JSON-ready dict).
      seconds: from the host's seeing the failure to the verdict (replay included).
    """

    def __init__(self, report: Any, verdict: Any, *, step: int, inputs: tuple, payload: dict[str, Any],
                 seconds: float = math.nan):
        self.report, self.verdict, self.step, self.inputs = report, verdict, step, inputs
        self.payload, self.seconds = payload, seconds
        super().__init__(f"call {step} of the guarded step went non-finite: "
                         f"{getattr(verdict, 'cause', '?')} — {_origin_line(report)}")


class Carry(NamedTuple):
    """The guard's device state between calls, packed in one int32[4] so one copy reads it all.

    Fields, by position: ``calls`` (calls run so far), ``failed_at`` (index of the first failing
    call not yet handled by the host, -1 for none), ``skipped`` (non-finite calls whose update was
    dropped), ``hold`` (1: a failure freezes the state until the host handles it).
    """

    calls: int
    failed_at: int
    skipped: int
    hold: int

    def array(self) -> jax.Array:
        return jnp.asarray(np.array(self, np.int32))


# ------------------------------------------------------------------------------------- in the jit


def outputs_finite(tree: Any) -> jax.Array:
    """Bool scalar: every floating leaf of `tree` is free of NaN and Inf, from one fused reduction.

    The sum of squares is formed as ``x*x + x*0`` in float32 (`nanlab.numerics.tree_sq_norm`): x*0 is NaN
    for +-inf, so the sum is NaN exactly when a value is NaN or infinite, while an inf sum is only an
    overflow of finite values; one pass thus gives the flag with no second, elementwise check.
    """
    from nanlab.numerics import finite_from_sq_norm, tree_sq_norm

    floats = [leaf for leaf in jax.tree.leaves(tree) if _is_float_array(leaf)]
    return finite_from_sq_norm(tree_sq_norm(floats, nan_if_nonfinite=True))


def _is_float_array(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _returns_bare_state(outputs: Any, state: Any) -> bool:
    """True when the step returns its state alone, False for (state, aux, ...), by structure.

    The step returns a state shaped like its first argument, or a tuple whose first entry is one.
    """
    state_def = jax.tree.structure(state)
    if jax.tree.structure(outputs) == state_def:
        return True
    if isinstance(outputs, tuple) and outputs and jax.tree.structure(outputs[0]) == state_def:
        return False
    raise TypeError(
        "the guarded step must return its state (the same pytree structure as its first argument) "
        f"or (state, aux); its first argument has structure {state_def}, its outputs "
        f"{jax.tree.structure(outputs)}")


def gate(accept: jax.Array, new_state: Any, old_state: Any) -> Any:
    """`new_state` where `accept`, else `old_state`, leaf by leaf (shapes and dtypes must agree).

    The guard's gate, also the lab's per-replica freeze (`nanlab.compare.replicas`: vmapped, `accept`
    is then one flag per replica).
    """

    def pick(path, new, old):
        new, old = jnp.asarray(new), jnp.asarray(old)
        if new.shape != old.shape or new.dtype != old.dtype:
            raise TypeError(f"the step changed the state leaf {jax.tree_util.keystr(path)} from "
                            f"{old.dtype}{list(old.shape)} to {new.dtype}{list(new.shape)}; a guarded "
                            "step must return a state of the same shapes and dtypes")
        # A select of two values the step has already computed: XLA fuses it into the update's own
        # elementwise pass, and with the state donated it writes the input buffers in place.
        return lax.select(accept, new, old)

    return jax.tree_util.tree_map_with_path(pick, new_state, old_state)


def _guarded_body(fn: Callable, finite: Callable | None, gate_kwarg: str | None,
                  layout: dict[str, bool]) -> Callable:
    """The function the guard jits: ``(carry, state, *args) -> (outputs, carry)``.

    Tracing it records in ``layout["bare"]`` whether the step returns its state alone.
    """

    def body(carry: jax.Array, state: Any, *args: Any) -> tuple[Any, jax.Array]:
        calls, failed_at, skipped, hold = carry[0], carry[1], carry[2], carry[3]
        held = (hold > 0) & (failed_at >= 0)  # an earlier failure waits for the host
        extra = {gate_kwarg: ~held} if gate_kwarg else {}
        # The input state's leaves, taken before the step runs: a step may mutate the containers it
        # was given (nnx.merge reuses the State's Variable objects and the optimizer updates them
        # in place), while the traced arrays themselves are immutable.
        state_leaves, state_def = jax.tree.flatten(state)
        outputs = fn(state, *args, **extra)
        state = jax.tree.unflatten(state_def, state_leaves)
        layout["bare"] = _returns_bare_state(outputs, state)
        if not any(_is_float_array(leaf) for leaf in jax.tree.leaves(outputs)):
            raise TypeError("the guarded step's outputs hold no floating-point arrays: there is nothing "
                            "to check (it must return its state, or (state, aux), as arrays)")
        ok = jnp.asarray(finite(outputs) if finite is not None else outputs_finite(outputs), jnp.bool_)
        if ok.shape != ():
            raise TypeError(f"finite= must return a bool scalar, got shape {ok.shape}")
        accept = ok & ~held
        if gate_kwarg is None:
            gated = gate(accept, state_of(outputs, layout), state)
            outputs = with_state(outputs, gated, layout)
        failure = ~ok & ~held
        carry = jnp.stack([
            calls + 1,
            jnp.where(failure & (hold > 0), calls, failed_at),
            skipped + failure.astype(jnp.int32),
            hold,
        ])
        return outputs, carry

    return body


# ------------------------------------------------------------------------------------ on the host


@dataclasses.dataclass
class _Call:
    """What the host keeps of one call until its flag is read: its arguments and aux outputs."""

    args: tuple
    aux: Any


class GuardedStep:
    """A guarded, jitted step; build it with `guard`. Call it like the step itself.

    Attributes:
      fn: the user's step.
      events: the handled failures, as `NonFiniteError` objects (not raised in "skip" mode).
    """

    def __init__(self, fn: Callable, *, donate_argnums: int | Sequence[int] = (),
                 static_argnums: int | Sequence[int] = (), check_every: int = 1,
                 on_failure: str | Callable[[NonFiniteError], Any] = "raise", allow: Any = None,
                 workdir: str | Path | None = None, history: Sequence[Mapping[str, Any]] | None = None,
                 finite: Callable[[Any], Any] | None = None, gate_kwarg: str | None = None,
                 verbose: bool = True, replay: Callable[[int, tuple, Any], NonFiniteError] | None = None,
                 compiler_options: Mapping[str, Any] | None = None, jit: Callable[..., Any] | None = None):
        if not callable(fn):
            raise TypeError(f"guard needs a callable step, got {fn!r}")
        if not (isinstance(check_every, int) and check_every >= 1):
            raise ValueError(f"check_every must be a positive int, got {check_every!r}")
        if not (callable(on_failure) or on_failure in ON_FAILURE_MODES):
            raise ValueError(f"on_failure must be one of {ON_FAILURE_MODES} or a callable, got {on_failure!r}")
        if finite is not None and not callable(finite):
            raise TypeError(f"finite must be a callable outputs -> bool, got {finite!r}")
        if replay is not None and not callable(replay):
            raise TypeError(f"replay must be a callable (step, inputs, aux) -> NonFiniteError, got {replay!r}")
        self.donate_argnums = _argnums(donate_argnums, "donate_argnums")
        self.static_argnums = _argnums(static_argnums, "static_argnums")
        if set(self.donate_argnums) - {0}:
            raise ValueError("guard may donate only the state (argument 0): it keeps the other arguments "
                             f"of recent calls to replay a failure, got donate_argnums={donate_argnums!r}")
        if 0 in self.static_argnums:
            raise ValueError("the state (argument 0) cannot be static")
        self.fn, self.check_every, self.on_failure, self.allow = fn, check_every, on_failure, allow
        self.workdir = None if workdir is None else Path(workdir)
        self.history, self.verbose, self.replay = history, verbose, replay
        self.events: list[NonFiniteError] = []
        self._layout: dict[str, bool] = {}
        self._jitted = (jit or jax.jit)(_guarded_body(fn, finite, gate_kwarg, self._layout),
                               donate_argnums=tuple(i + 1 for i in self.donate_argnums),
                               static_argnums=tuple(i + 1 for i in self.static_argnums),
                               compiler_options=None if compiler_options is None else dict(compiler_options))
        self._hold = 1
        self._carry = Carry(0, -1, 0, self._hold).array()
        self._calls = 0  # calls dispatched (the host's count; the carry holds the device's)
        self._kept: dict[int, _Call] = {}  # calls not yet known to be finite, by index
        self._rows: collections.deque[tuple[int, Any]] = collections.deque(maxlen=HISTORY_ROWS)
        self._pending: jax.Array | None = None  # a carry whose copy to the host is under way
        self._last_outputs: Any = None
        functools.update_wrapper(self, fn, updated=())

    # -------------------------------------------------------------------------------- the call

    def __call__(self, state: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError("a guarded step takes positional arguments only; bind keyword arguments "
                            f"with functools.partial (got {sorted(kwargs)})")
        outputs = self._dispatch(state, args)
        pending, self._pending = self._pending, None
        if pending is not None:
            outputs = self._handle(np.asarray(pending), outputs)
        if self._calls % self.check_every == 0 and self._pending is None:
            self._pending = self._carry
            self._pending.copy_to_host_async()  # read at the next call, while that call runs
        return outputs

    def check(self) -> Any:
        """Wait for the latest call, handle a failure among the calls not yet checked, return its outputs.

        Call it after the loop (the last calls' flags are otherwise read only at a next call), or
        before saving a checkpoint you want to be sure of: ``state, metrics = train_step.check()``.
        Use the outputs it returns: after a skipped failure the calls held since then are run again,
        and their new outputs replace (and, when donated, consume) the ones the loop holds.

        Returns:
          The outputs of the latest call (None before the first call).
        """
        if self._last_outputs is None:
            return None
        self._pending = None
        self._last_outputs = self._handle(np.asarray(self._carry), self._last_outputs)
        return self._last_outputs

    @property
    def skipped(self) -> int:
        """Non-finite calls whose update was dropped so far (reads the device: a sync)."""
        return int(np.asarray(self._carry)[2])

    @property
    def calls(self) -> int:
        """Calls of the guarded step so far."""
        return self._calls

    def lower(self, state: Any, *args: Any):
        """`jax.jit(...).lower` of the guarded executable: for inspection (cost analysis, HLO), or
        ``.compile()`` ahead of the first call (arrays or `jax.ShapeDtypeStruct`s with the shardings
        of that call's arguments; the first call then reuses the executable)."""
        return self._jitted.lower(_carry_like(self._carry, state), state, *args)

    def prepare(self, state: Any, *args: Any) -> None:
        """Compile the guarded executable ahead of the first call, for arguments like these (arrays or
        `jax.ShapeDtypeStruct`s): in a background thread when the guard's `jit` can (a
        `nanlab.program_store.ProgramStore.jit`: the step is traced here, XLA compiles beside the
        caller's next work), else now, as ``lower(...).compile()``."""
        prepare = getattr(self._jitted, "prepare", None)
        if prepare is None:
            self.lower(state, *args).compile()
        else:
            prepare(_carry_like(self._carry, state), state, *args)

    def _dispatch(self, state: Any, args: tuple) -> Any:
        index = self._calls
        try:
            outputs, self._carry = self._jitted(_carry_like(self._carry, state), state, *args)
        except TypeError:
            _check_arrays((state, *args), self.static_argnums)
            raise
        self._calls += 1
        if "bare" not in self._layout:  # an executable loaded by `jit=` ran without tracing the body
            self._layout["bare"] = _returns_bare_state(outputs, state)
        aux = aux_of(outputs, self._layout)
        self._kept[index] = _Call(args, aux)
        self._rows.append((index, aux))
        self._last_outputs = outputs
        return outputs

    # ------------------------------------------------------------------------- a read carry

    def _handle(self, carry: np.ndarray, outputs: Any) -> Any:
        """Act on a carry read from the device; returns the outputs to give the caller."""
        calls, failed_at = int(carry[0]), int(carry[1])
        if failed_at < 0:
            # Every call before `calls` is finite (or, without holding, only counted): forget them.
            for index in [i for i in self._kept if i < calls]:
                del self._kept[index]
            return outputs
        return self._fail(failed_at, int(carry[2]), outputs)

    def _fail(self, failed_at: int, skipped: int, outputs: Any) -> Any:
        seen = time.perf_counter()
        # Held since the failure: the latest outputs carry the failing call's input state.
        state = state_of(self._last_outputs, self._layout)
        call = self._kept[failed_at]
        error = self._report(failed_at, (state, *call.args), call.aux)
        error.seconds = time.perf_counter() - seen
        self.events.append(error)
        if self.on_failure == "raise":
            raise error
        if callable(self.on_failure):
            self.on_failure(error)
        else:
            self._hold = 0  # "skip": the first event is reported; later ones are only counted
        return self._resume(failed_at, skipped, state)

    def _resume(self, failed_at: int, skipped: int, state: Any) -> Any:
        """Run again, from the restored state, the calls that were held after `failed_at`."""
        held = sorted(i for i in self._kept if i > failed_at)
        kept = {i: self._kept[i] for i in held}
        self._kept = {}
        self._calls = failed_at + 1
        self._carry = Carry(failed_at + 1, -1, skipped, self._hold).array()
        self._rows = collections.deque(((i, aux) for i, aux in self._rows if i < failed_at),
                                       maxlen=HISTORY_ROWS)
        outputs = self._last_outputs
        for index in held:
            outputs = self._dispatch(state, kept[index].args)
            state = state_of(outputs, self._layout)
        self._last_outputs = outputs
        return outputs

    def _report(self, step: int, inputs: tuple, aux: Any) -> NonFiniteError:
        if self.replay is not None:
            return self.replay(step, inputs, aux)
        history = list(self.history) if self.history is not None else self._history(before=step)
        return replay_failure(self.fn, inputs, step=step, static_argnums=self.static_argnums,
                              allow=self.allow, history=history, workdir=self.workdir, verbose=self.verbose)

    def _history(self, *, before: int) -> list[dict[str, Any]]:
        """Metric rows from the aux outputs of the calls before `before` (scalars only)."""
        rows = []
        for index, aux in self._rows:
            if index < before:
                row = _scalar_row(aux)
                if row:
                    rows.append({"step": index, **row})
        return rows


# ---------------------------------------------------------------------------------------- helpers


def guard(fn: Callable | None = None, /, *, donate_argnums: int | Sequence[int] = (),
          static_argnums: int | Sequence[int] = (), check_every: int = 1,
          on_failure: str | Callable[[NonFiniteError], Any] = "raise", allow: Any = None,
          workdir: str | Path | None = None, history: Sequence[Mapping[str, Any]] | None = None,
          finite: Callable[[Any], Any] | None = None, gate_kwarg: str | None = None,
          verbose: bool = True, replay: Callable[[int, tuple, Any], NonFiniteError] | None = None,
          compiler_options: Mapping[str, Any] | None = None, jit: Callable[..., Any] | None = None,
          ) -> GuardedStep | Callable[[Callable], GuardedStep]:
    """Jit a pure step with nanlab's sentinel, gate and replay; usable as ``@guard`` or ``@guard(...)``.

    Args:
      fn: ``fn(state, *args) -> state`` or ``-> (state, aux)``; pure (same inputs, same outputs),
        arguments pytrees of arrays. Plain or already jitted.
      donate_argnums: as `jax.jit`'s; only the state (0) may be donated: the guard keeps the other
        arguments of recent calls to replay a failure.
      static_argnums: as `jax.jit`'s (not 0).
      check_every: read the finite flag every this many calls (asynchronously, one call later).
      on_failure: "raise" (`NonFiniteError`), "skip" (drop the update, count it, report the first
        event only, go on) or a callable taking the `NonFiniteError` (then as "skip", but every event
        is replayed and passed to it).
      allow: passed to `nanlab.trace.localize` (module globs or a predicate: intentional -inf masks).
      workdir: write report.json there on a failure.
      history: metric rows (dicts with loss, grad_norm, ... ) for `diagnose`, e.g. a list the loop
        appends to; by default the scalar entries of the aux outputs of the last calls.
      finite: ``finite(outputs) -> bool scalar``, traced in the jit, instead of the scan of every
        floating output (a step that already computes its flag, e.g. from its gradients).
      gate_kwarg: the step gates its own update and takes the bool "apply the update" through this
        keyword argument (nanlab's train step: 'apply_update'); the guard passes False while an
        earlier failure is held and does not gate the outputs itself. The step must then return its
        input state whenever its flag is False.
      verbose: print the report and the verdict.
      replay: ``replay(step, inputs, aux) -> NonFiniteError``, called instead of `replay_failure`
        with the options above (allow, history, workdir, verbose) when a call fails: the failing
        call's index, its inputs ``(held state, *args)`` and its aux outputs (the metrics it
        returned). For a caller that presents the failure its own way (``python -m nanlab.train``
        numbers steps from a resumed run's start and writes its own report.json keys).
      compiler_options: as `jax.jit`'s: XLA options for the guarded executable (e.g.
        `nanlab.models.conv.compiler_options(library)`).
      jit: what compiles the guarded program, called as `jax.jit` (the default) with the keyword
        arguments above; e.g. `nanlab.program_store.ProgramStore.jit`, which loads the executable a
        previous run stored instead of tracing the step again.

    Returns:
      A `GuardedStep`.
    """
    options = dict(donate_argnums=donate_argnums, static_argnums=static_argnums, check_every=check_every,
                   on_failure=on_failure, allow=allow, workdir=workdir, history=history, finite=finite,
                   gate_kwarg=gate_kwarg, verbose=verbose, replay=replay, compiler_options=compiler_options,
                   jit=jit)
    if fn is None:
        return lambda f: GuardedStep(f, **options)
    return GuardedStep(fn, **options)


def replay_failure(fn: Callable, inputs: tuple, *, step: int, static_argnums: tuple[int, ...] = (),
                   allow: Any = None, history: Sequence[Mapping[str, Any]] | None = None,
                   workdir: str | Path | None = None, verbose: bool = True, what: str = "call",
                   extra: Mapping[str, Any] | None = None) -> NonFiniteError:
    """Replay a failing call through `nanlab.trace.reproduce`, diagnose it, print both, write report.json.

    `reproduce` replays it op by op and, when that finds nothing, with compiled segments and then on
    the CPU; the report names the replay that reproduced the failure, or says that none did.

    Args:
      fn: the pure step that failed.
      inputs: its positional arguments ``(state, *args)`` as the failing call got them.
      step: the index of the failing call (or batch), for the messages and the payload.
      static_argnums: positions in `inputs` that are static (bound, not traced).
      allow: passed to `localize`.
      history: metric rows for `diagnose` (oldest first).
      workdir: where to write report.json (None: not written).
      verbose: print the report and the verdict.
      what: what `step` counts, for the messages ("call", "batch").
      extra: more JSON-ready entries for the payload.

    Returns:
      The `NonFiniteError` (not raised).
    """
    from nanlab import diagnose, trace

    name = getattr(fn, "__name__", type(fn).__name__)
    if verbose:
        print(f"nanlab.guard: {what} {step} of {name} went non-finite; replaying it to localize the "
              "origin...", file=sys.stderr)
    # The call was non-finite: when the op-by-op replay finds nothing, `reproduce` tries compiled
    # segments, then the CPU (the report's `replay` names the replay that found it).
    report = trace.reproduce(_with_statics(fn, inputs, static_argnums), *_dynamic(inputs, static_argnums),
                             allow=allow)
    args = _dynamic(inputs, static_argnums)[1:]
    batch = args[0] if len(args) == 1 else args
    verdict = diagnose.diagnose(report, batch=jax.device_get(batch), history=list(history or ()), step=step)
    payload = {"step": step, "function": name, **(extra or {}), "report": report.to_dict(),
               "verdict": verdict.to_dict()}
    if verbose:
        print(f"\nnon-finite at {what} {step} of {name}")
        print(report)
        print(f"\n{verdict}")
    if workdir is not None:
        from nanlab.runlog import write_json

        Path(workdir).mkdir(parents=True, exist_ok=True)
        write_json(Path(workdir) / "report.json", payload)
    return NonFiniteError(report, verdict, step=step, inputs=inputs, payload=payload)


def _carry_like(carry: jax.Array, state: Any) -> jax.Array:
    """The carry placed as the guarded call will return it: replicated over the state's mesh when the
    state lives on one, else as it is. A fresh carry (the first call, or after a handled failure) is
    on the default device; the call returns it replicated over the mesh, and a carry that changed
    its placement between calls would retrace and compile the whole step a second time."""
    if getattr(carry, "committed", True):
        return carry
    # On a single device the carry a call returns stays uncommitted, so this runs on every call:
    # the state's first array decides where the state lives, without walking every leaf.
    sharding = next((leaf.sharding for leaf in jax.tree.leaves(state) if hasattr(leaf, "sharding")), None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(carry, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec()))
    return carry


def _argnums(value: int | Sequence[int], name: str) -> tuple[int, ...]:
    values = (value,) if isinstance(value, int) else tuple(value)
    if not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(f"{name} must be non-negative ints, got {value!r}")
    return values


def _check_arrays(args: tuple, static_argnums: tuple[int, ...]) -> None:
    """Raise a TypeError naming the first argument leaf that is not an array (nor a number)."""
    for position, arg in enumerate(args):
        if position in static_argnums:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(arg)[0]:
            if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")) and not isinstance(leaf, (bool, int, float, complex)):
                raise TypeError(
                    f"argument {position} of the guarded step holds {type(leaf).__name__} {leaf!r:.60} at "
                    f"{jax.tree_util.keystr(path) or 'its root'}: a guarded step takes pytrees of arrays "
                    "(mark the argument in static_argnums, close over it, or split it off: "
                    "eqx.partition(model, eqx.is_array), nnx.split(model))")


def state_of(outputs: Any, layout: Mapping[str, bool]) -> Any:
    """The state inside a step's outputs: the outputs themselves, or their first entry."""
    return outputs if layout["bare"] else outputs[0]


def with_state(outputs: Any, state: Any, layout: Mapping[str, bool]) -> Any:
    """`outputs` with `state` in the state's place."""
    return state if layout["bare"] else (state, *outputs[1:])


def aux_of(outputs: Any, layout: Mapping[str, bool]) -> Any:
    """The aux outputs (metrics) of a step's outputs; None for a bare state."""
    if layout["bare"]:
        return None
    return outputs[1] if len(outputs) == 2 else outputs[1:]


def _dynamic(inputs: tuple, static_argnums: tuple[int, ...]) -> tuple:
    return tuple(a for i, a in enumerate(inputs) if i not in static_argnums)


def _with_statics(fn: Callable, inputs: tuple, static_argnums: tuple[int, ...]) -> Callable:
    """`fn` over the dynamic arguments only, the static ones bound (what localize can trace)."""
    if not static_argnums:
        return fn
    statics = {i: inputs[i] for i in static_argnums if i < len(inputs)}

    def dynamic_fn(*dynamic):
        it = iter(dynamic)
        return fn(*[statics[i] if i in statics else next(it) for i in range(len(inputs))])

    return dynamic_fn


def _scalar_row(aux: Any) -> dict[str, float]:
    """The scalar entries of a metrics mapping or dataclass, as floats (others left out)."""
    if dataclasses.is_dataclass(aux):
        aux = {f.name: getattr(aux, f.name) for f in dataclasses.fields(aux)}
    if not isinstance(aux, Mapping):
        return {}
    row = {}
    for key, value in aux.items():
        if np.ndim(value) == 0 and hasattr(value, "dtype") or isinstance(value, (int, float)):
            try:
                row[str(key)] = float(value)
            except (TypeError, ValueError):
                continue
    return row


def _origin_line(report: Any) -> str:
    origin = getattr(report, "origin", None)
    if origin is None:
        return f"{getattr(report, 'cause', '?')} (no origin inside the step)"
    return f"{origin.cause} at {origin.where()}"


# ``nanlab.guard(step)``, ``@nanlab.guard`` and ``nanlab.guard.NonFiniteError`` all work (nanlab/_modules.py).
make_callable(__name__, guard)
