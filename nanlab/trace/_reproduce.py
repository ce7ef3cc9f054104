"""`reproduce`: localize a call known to have gone non-finite, trying other replays when one finds nothing.

A jitted step runs as XLA's optimized program: fused kernels, algebraic rewrites, fast-math
approximations, another reduction order, nondeterministic atomics on a GPU. Replaying it one
equation at a time can then compute slightly different values and miss the NaN. `reproduce` tries,
in order, until one finds it:

1. "op-by-op": `localize` as is (each event's equation bound alone);
2. "compiled-segments": `localize(replay="compiled-segments")`, on the same device: the values are
   those of runs of equations compiled together, as XLA optimizes them;
3. "cpu-op-by-op": `localize` on the CPU backend, the same inputs copied there. Skipped when the
   call already ran on the CPU: it would be the first replay again (same device, same programs).

The report is the one of the replay that found it (`replay` names it; `replays` lists every replay
tried or skipped). When none did, the report says so and `advice` lists what to try.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax

from nanlab.trace._report import Report

# What to try when no replay reproduces a failure (the XLA flags exist in jaxlib 0.10.2 to 0.12).
ADVICE = (
    "jax_debug_nans (nanlab.train --debug-nans, or jax.config.update('jax_debug_nans', True)): JAX "
    "checks every jitted call's outputs as it runs and re-runs the failing call op by op right then",
    "turn XLA's fast math off and rerun: XLA_FLAGS='--xla_cpu_enable_fast_math=false "
    "--xla_cpu_enable_fast_min_max=false' on CPU, XLA_FLAGS='--xla_gpu_enable_fast_min_max=false' on GPU",
    "a deterministic mode, so that reductions add in the same order every run: "
    "XLA_FLAGS='--xla_gpu_deterministic_ops=true' (GPU); a failure that then goes away came from "
    "nondeterministic atomics",
)
CPU_SKIPPED = "the call ran on the CPU: the same replay as op-by-op"
SHARD_MAP_SKIPPED = "shard_map and pmap bodies are replayed op by op only"


def reproduce(fn: Callable[..., Any], *args: Any, allow: Any = None, max_events: int = 8,
              segment_size: int | str = "auto", **kwargs: Any) -> Report:
    """Localize a call that went non-finite: op by op, then compiled segments, then op by op on the CPU.

    Args:
      fn, *args, allow, max_events, segment_size, **kwargs: as for `localize` (`segment_size` also
        sets the compiled segments' size unless it is 0 or "auto": then 128).

    Returns:
      The `Report` of the first replay that found a NaN or Inf, with `replay` naming it ('op-by-op',
      'compiled-segments', 'cpu-op-by-op') and `replays` the replays tried ({'name', 'found',
      'seconds'}) or skipped ({'name', 'skipped': why}); when none found one, the last replay's
      report with `replay` None and `advice` set (`str(report)` then says so plainly).
    """
    from nanlab.trace import localize

    start = time.perf_counter()
    options = dict(allow=allow, max_events=max_events, **kwargs)
    report = localize(fn, *args, segment_size=segment_size, **options)
    tried = list(report.replays)
    if not report.found:
        compiled_size = segment_size if isinstance(segment_size, int) and segment_size > 0 else "auto"
        compiled = localize(fn, *args, segment_size=compiled_size, replay="compiled-segments", **options)
        if compiled.replays[0]["name"] == "compiled-segments":
            tried += compiled.replays
            report = compiled
        else:
            tried.append({"name": "compiled-segments", "skipped": SHARD_MAP_SKIPPED})
    if not report.found:
        if _platform(args) == "cpu":
            tried.append({"name": "cpu-op-by-op", "skipped": CPU_SKIPPED})
        else:
            report = localize(fn, *args, segment_size=segment_size, device=jax.devices("cpu")[0], **options)
            tried.append({**report.replays[0], "name": "cpu-op-by-op"})
    report.replays = tried
    report.replay = tried[-1]["name"] if report.found else None
    report.advice = [] if report.found else list(ADVICE)
    report.seconds = time.perf_counter() - start
    return report


def _platform(args: tuple) -> str:
    """The platform the arguments live on ('cpu', 'gpu', 'tpu'): the first jax.Array's, else the default."""
    for leaf in jax.tree.leaves(args):
        if isinstance(leaf, jax.Array):
            return next(iter(leaf.devices())).platform
    return jax.default_backend()
