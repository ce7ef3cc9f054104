"""Pick each convolution's formulation by timing it on the machine that runs it, and remember the pick.

How a convolution and its gradients are written changes their speed several-fold on XLA's CPU
backend, and the fastest way differs between CPUs (AVX-512 or not, cache sizes, core counts). So
for every convolution shape of a model (input, kernel, strides, padding, dtype) this module times
each candidate once on this machine (forward, input gradient and kernel gradient together, as a
train step runs them) and keeps the fastest:

- "xla": `lax.conv` with XLA's own transposed convolutions;
- "fast:<kernel grad>": `nanlab.models.conv`'s "fast" path (1x1s as channel matmuls, taps that
  only see padding dropped, VALID stride-1 as SAME plus a crop) with each kernel-gradient
  formulation, "xla", "im2col", "taps" and "swap" ("fast" alone for a 1x1: there it is a matmul).

The choices are cached in a JSON file keyed by machine (CPU model, core count, JAX version,
backend), under the user's cache directory next to the compilation cache, so later runs start with
them; `activate` hands a table to `conv.Conv(impl="tuned")` (the CPU default). Without an active
table, or for a shape it lacks, "tuned" is "fast" with its fixed choices (`conv.choose_kernel_grad`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanlab.machine import cpu_model
from nanlab.models import conv as conv_lib

__all__ = ["ENV_VAR", "candidates", "machine_id", "default_path", "record_conv_keys", "conv_keys_of",
           "time_choice", "tune", "load", "save", "activate", "active", "traced_with", "ensure_tuned", "ensure_tuned_model",
           "fastest", "ensure_program_library", "CachedPickError"]

ENV_VAR = "NANLAB_CONV_TUNING"  # 'off' keeps the fixed choices; a path moves the cache file
KERNEL_GRAD_CHOICES = tuple(f"fast:{name}" for name in conv_lib.KERNEL_GRADS)


def parse_key(key: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, int], str, str]:
    """(x shape, kernel shape, strides, padding, dtype) back from `conv.conv_key`."""
    x, k, s, padding, dtype = key.split("-")
    shape = lambda text: tuple(int(d) for d in text[1:].split("x"))  # noqa: E731
    return shape(x), shape(k), shape(s), padding, dtype  # type: ignore[return-value]


def candidates(key: str) -> tuple[str, ...]:
    """The choices worth timing for one convolution."""
    _, kernel_shape, _, _, _ = parse_key(key)
    if kernel_shape[:2] == (1, 1):
        return ("xla", "fast")  # "fast" is a channel matmul there, whatever the kernel gradient
    return ("xla",) + KERNEL_GRAD_CHOICES


def machine_id(library: str = "default") -> str:
    """What the timings depend on: the CPU model, its core count, the JAX version and backend, and
    the library that runs the convolutions (`conv.LIBRARIES`; named only when not XLA's default)."""
    machine = f"{cpu_model()} | {os.cpu_count()} cores | jax {jax.__version__} | {jax.default_backend()}"
    conv_lib.compiler_options(library)  # a bad name raises
    return machine if library == "default" else f"{machine} | conv library {library}"


def default_path() -> Path | None:
    """The cache file: NANLAB_CONV_TUNING (a path, or 'off' for None), else beside the compile cache."""
    from nanlab import compile_cache

    choice = os.environ.get(ENV_VAR, "").strip()
    if choice.lower() == "off":
        return None
    return Path(choice).expanduser() if choice else compile_cache.default_dir().parent / "conv-tuning.json"


# ------------------------------------------------------------------------------------- collecting


@contextlib.contextmanager
def record_conv_keys() -> Iterator[list[str]]:
    """Collect the keys of every "tuned" convolution traced inside the block, in order."""
    keys: list[str] = []
    conv_lib._RECORDERS.append(keys)
    try:
        yield keys
    finally:
        conv_lib._RECORDERS.remove(keys)


def conv_keys_of(fn: Callable[..., Any], *args: Any) -> list[str]:
    """The distinct convolution keys `fn(*args)` traces (abstractly: nothing is computed)."""
    with record_conv_keys() as keys:
        # A fresh function each time: JAX caches traces by function, and a cached trace would run
        # no Python, so no convolution would be recorded.
        jax.eval_shape(lambda *a: fn(*a), *args)
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------- timing


def _operands(key: str) -> tuple[jax.Array, jax.Array, jax.Array, tuple[int, int], str]:
    x_shape, kernel_shape, strides, padding, dtype = parse_key(key)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), dtype)
    kernel = jnp.asarray(rng.normal(size=kernel_shape) * 0.1, dtype)
    y = jax.eval_shape(lambda a, b: conv_lib.conv(a, b, strides, padding, "xla"), x, kernel)
    cotangent = jnp.asarray(rng.normal(size=y.shape), dtype)
    return x, kernel, cotangent, strides, padding


def _train_pass(choice: str, strides: tuple[int, int], padding: str, library: str = "default") -> Callable:
    """jitted (x, kernel, cotangent) -> (y, dx, dkernel) under one choice, as a train step runs it."""
    impl, _, kernel_grad = choice.partition(":")

    @functools.partial(jax.jit, compiler_options=conv_lib.compiler_options(library))
    def run(x, kernel, cotangent):
        convolve = lambda a, k: conv_lib.conv(a, k, strides, padding, impl, kernel_grad=kernel_grad or None)  # noqa: E731
        y, vjp = jax.vjp(convolve, x, kernel)
        return (y, *vjp(cotangent))

    return run


def time_choice(key: str, choice: str, *, repeats: int = 3, clock: Callable[[], float] = time.perf_counter,
                library: str = "default") -> float:
    """Seconds of one forward + both gradients of the convolution `key` under `choice` (best of repeats),
    compiled for the convolution library `library` (`conv.LIBRARIES`).

    The first call compiles and is not timed; the best of `repeats` calls is the least disturbed
    by other work on the machine.
    """
    x, kernel, cotangent, strides, padding = _operands(key)
    run = _train_pass(choice, strides, padding, library)
    jax.block_until_ready(run(x, kernel, cotangent))
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        jax.block_until_ready(run(x, kernel, cotangent))
        best = min(best, clock() - start)
    return best


def tune(keys: Iterable[str], *, repeats: int = 3,
         timer: Callable[[str, str], float] | None = None,
         progress: Callable[[int, int, str], None] | None = None, library: str = "default") -> dict[str, str]:
    """Time every candidate of every key and keep the fastest: key -> choice.

    Args:
      keys: convolution keys (`conv.conv_key`), e.g. from `conv_keys_of`.
      repeats: timed calls per candidate (after one compiling call).
      timer: `(key, choice) -> seconds`; the default times it on this machine (`time_choice`).
      progress: called as `progress(done, total, key)` after each key.
      library: the convolution library the default timer compiles for (`conv.LIBRARIES`).
    """
    keys = list(dict.fromkeys(keys))
    timer = timer or (lambda key, choice: time_choice(key, choice, repeats=repeats, library=library))
    table = {}
    for i, key in enumerate(keys):
        seconds = {choice: timer(key, choice) for choice in candidates(key)}
        table[key] = min(seconds, key=seconds.get)  # ties: the first, "xla"
        if progress is not None:
            progress(i + 1, len(keys), key)
    return table


# ----------------------------------------------------------------------------------------- cache


def load(path: Path, machine: str, valid: Iterable[str] | None = None) -> dict[str, str]:
    """This machine's table from the cache file ({} when the file or the machine is not there).

    A cache file that does not parse is treated as empty (it is rewritten whole on the next save);
    entries whose value is not in `valid` (default: the formulation choices) are dropped.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    table = data.get(machine, {}) if isinstance(data, dict) else {}
    valid = set(valid) if valid is not None else set(KERNEL_GRAD_CHOICES) | {"xla", "fast"}
    return {k: v for k, v in table.items() if isinstance(v, str) and v in valid}


def save(path: Path, machine: str, table: dict[str, str]) -> None:
    """Merge `table` into the cache file under `machine`, atomically (other machines' tables kept)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        data = data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        data = {}
    data[machine] = {**data.get(machine, {}), **table}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as out:
        try:
            json.dump(data, out, indent=1, sort_keys=True)
            out.flush()  # a full disk fails here for a small file, while the file is still ours to remove
        except OSError:  # a full disk: leave no half-written temporary file behind
            out.close()
            os.unlink(out.name)
            raise
    os.replace(out.name, path)  # a reader sees the old file or the new one, never half of one


def activate(table: dict[str, str]) -> None:
    """Make `table` the choices of every `Conv(impl="tuned")` traced from now on (replacing the last)."""
    conv_lib._TUNED.clear()
    conv_lib._TUNED.update(table)


def active() -> dict[str, str]:
    """A copy of the active table."""
    return dict(conv_lib._TUNED)


def traced_with(table: dict[str, str], fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` whose traces choose formulations from `table`, whichever table is active around them.

    For programs of one run that run on different convolution libraries, each with the picks timed
    for its library: the table is active only while `fn` runs (is traced), then the previous one is.
    """

    @functools.wraps(fn)
    def with_table(*args: Any, **kwargs: Any) -> Any:
        before = active()
        activate(table)
        try:
            return fn(*args, **kwargs)
        finally:
            activate(before)

    return with_table


def ensure_tuned(fn: Callable[..., Any], *args: Any, path: Path | None,
                 progress: Callable[[int, int, str], None] | None = None,
                 timer: Callable[[str, str], float] | None = None,
                 library: str = "default") -> tuple[dict[str, str], int]:
    """Tune what `fn(*args)` convolves that the cache lacks, activate the whole table, save it.

    Raises:
      OSError: the cache file could not be written (the table is active all the same).

    Args:
      fn, args: what to trace for its convolutions (e.g. the model's training forward pass).
      path: the cache file; None tunes without caching.
      library: the convolution library `fn`'s program will be compiled for: the picks are timed
        and cached for it (`conv.LIBRARIES`).

    Returns:
      (the table activated for `fn`'s convolutions, how many keys were timed now).
    """
    machine = machine_id(library)
    cached = load(path, machine) if path is not None else {}
    keys = conv_keys_of(fn, *args)
    missing = [k for k in keys if k not in cached]
    fresh = tune(missing, progress=progress, timer=timer, library=library) if missing else {}
    table = {k: {**cached, **fresh}[k] for k in keys}
    activate(table)  # first: a cache that cannot be written (a full disk) leaves the picks in use
    if fresh and path is not None:
        save(path, machine, fresh)
    return table, len(missing)


def ensure_tuned_model(model: Any, x: Any, *, path: Path | None,
                       library: str = "default") -> tuple[dict[str, str], int]:
    """`ensure_tuned` for a Flax linen model's training forward pass on a batch shaped like `x`.

    The variables are traced (`jax.eval_shape` of the init), never computed: only the shapes the
    convolutions see matter.
    """
    variables = jax.eval_shape(lambda batch: model.init(jax.random.key(0), batch, train=False), x)
    return ensure_tuned(lambda v, batch: model.apply(v, batch, train=True, mutable=["batch_stats"]),
                        variables, x, path=path, library=library)


# ------------------------------------------------------------------- a whole program's library


def fastest(runs: dict[str, Callable[[], Any]], *, rounds: int = 3,
            clock: Callable[[], float] = time.perf_counter) -> tuple[str, dict[str, float]]:
    """The fastest of whole-program variants, timed interleaved on this machine.

    Each run is called once untimed (it compiles), then `rounds` times in turn with the others, so
    that a change in the machine's load hits every variant alike; ties go to the first.

    Returns:
      (the name whose median call was shortest, {name: median seconds}).
    """
    if not runs:
        raise ValueError("fastest needs at least one run")
    for run in runs.values():
        run()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = clock()
            run()
            seconds[name].append(clock() - start)
    medians = {name: float(np.median(times)) for name, times in seconds.items()}
    return min(medians, key=medians.get), medians


def ensure_program_library(program: str, time_program: Callable[[str], Callable[[], Any]], *,
                           path: Path | None, rounds: int = 3) -> tuple[str, dict[str, float] | None]:
    """The convolution library (`conv.LIBRARIES`) a program runs fastest with here, timed once and cached.

    Args:
      program: the cache key of the program: what its speed depends on besides the machine (which
        program, the model, its shapes and dtype, the formulations).
      time_program: ``library -> run``: builds the program compiled for that library and returns
        a call of it on representative inputs (blocking until its outputs are ready).
      path: the cache file; None measures every time.

    Returns:
      (the library, {library: median seconds} when measured now or None when read from the cache).

    Raises:
      CachedPickError: (an OSError) the cache file could not be written; it carries the pick.
    """
    key = f"{machine_id()} | programs"
    cached = load(path, key, valid=conv_lib.LIBRARIES) if path is not None else {}
    if program in cached:
        return cached[program], None
    library, medians = fastest({name: time_program(name) for name in conv_lib.LIBRARIES}, rounds=rounds)
    if path is not None:
        try:
            save(path, key, {program: library})
        except OSError as error:
            raise CachedPickError(library, medians, error) from error
    return library, medians


class CachedPickError(OSError):
    """A measured pick whose cache file could not be written; the pick is in `.library`."""

    def __init__(self, library: str, medians: dict[str, float], error: OSError):
        super().__init__(error.errno, error.strerror or str(error))
        self.library, self.medians = library, medians
