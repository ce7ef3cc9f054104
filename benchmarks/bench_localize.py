"""How long `nanlab.trace.localize` takes, and what it compiles, on a planted overflow and on small functions.

Run from the repository root:

    .venv/bin/python benchmarks/bench_localize.py                 # full size: width 1.0, 299x299, batch 8
    .venv/bin/python benchmarks/bench_localize.py --quick         # width 0.125, 75x75, batch 2
    .venv/bin/python benchmarks/bench_localize.py --segment-size 0   # pure eager replay (passed to localize)

The planted case is `benchmarks/bench_sentinel.py`'s: its InceptionV3 train step (sigmoid BCE, SGD
with momentum, the sentinel's gate) with one Mixed_5b 1x1 kernel set to 3e38, a finite value whose
convolution overflows; built and localized by that bench's own `build`, `make_step` and
`time_localize`. The issue's goal (#14): the full-size case in <= 60 s with the same report.

It prints the localization's wall time, `report.num_equations`, the number of distinct backend
compilations during the localization (counted through `jax.monitoring`'s
`/jax/core/compile/backend_compile_duration` events), the process's peak resident memory
(`ru_maxrss`, which includes building the model) and the localization's own peak (sampled every
0.2 s), the origin, the CPU model and the jax version. Then it times each case of the JAX peer
suite (`tests/test_trace_peers.py`, JAX's own debug_nans tests) and prints the slowest: the goal
there is under 1 s each.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import shlex
import sys
import time
from typing import Any

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, benchmarks/

import benchmarks.bench_sentinel as sentinel  # noqa: E402
from nanlab.trace import localize  # noqa: E402
from nanlab.machine import cpu_model  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts backend compilations (and their seconds) while `active`: one event per XLA compile."""

    def __init__(self) -> None:
        self.active = False
        self.count = 0
        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_: Any) -> None:
        if self.active and event == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def start(self) -> None:
        self.count, self.seconds, self.active = 0, 0.0, True

    def stop(self) -> tuple[int, float]:
        self.active = False
        return self.count, self.seconds


def max_rss_gib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def planted(width: float, size: int, batch: int, segment_size: int | None,
            counter: CompileCounter) -> dict[str, Any]:
    """Build bench_sentinel's train step, plant its overflow, and localize it once."""
    t0 = time.perf_counter()
    model, tx, state, data = sentinel.build(width, size, batch)
    jax.block_until_ready(state)
    build_s = time.perf_counter() - t0
    original = sentinel.localize
    if segment_size is not None:
        sentinel.localize = functools.partial(localize, segment_size=segment_size)
    counter.start()
    try:
        result = sentinel.time_localize(model, tx, state, data)
    finally:
        compiles, compile_s = counter.stop()
        sentinel.localize = original
    result.update(build_s=build_s, compiles=compiles, compile_s=compile_s, max_rss_gib=max_rss_gib())
    return result


def peer_cases(counter: CompileCounter) -> list[tuple[str, float, int, bool]]:
    """(name, seconds, compilations, found) for each case of tests/test_trace_peers.py, in order."""
    from tests.test_trace_peers import CASES

    rows = []
    for name, _, fn, args, _ in CASES:
        counter.start()
        t0 = time.perf_counter()
        report = localize(fn, *args)
        seconds = time.perf_counter() - t0
        compiles, _ = counter.stop()
        rows.append((name, seconds, compiles, report.found))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="width 0.125, 75x75, batch 2")
    parser.add_argument("--segment-size", type=int, default=None,
                        help="passed to localize (default: its 'auto')")
    parser.add_argument("--no-peers", action="store_true", help="skip timing the peer-suite cases")
    parser.add_argument("--no-planted", action="store_true", help="time the peer-suite cases only")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.image_size, args.batch = 0.125, 75, 2
    if args.width <= 0 or args.batch <= 0 or args.image_size < 75:
        print("bench_localize: --width and --batch must be > 0, --image-size >= 75 (InceptionV3)", file=sys.stderr)
        return 2
    if args.segment_size is not None and args.segment_size < 0:
        print(f"bench_localize: --segment-size must be >= 0, got {args.segment_size}", file=sys.stderr)
        return 2
    command = "python " + shlex.join(["benchmarks/bench_localize.py"] + (argv if argv is not None else sys.argv[1:]))
    print(f"command: {command}")
    print(f"cpu: {cpu_model()} ({os.cpu_count()} cores); jax {jax.__version__} on {jax.default_backend()}; "
          f"python {platform.python_version()}", flush=True)
    counter = CompileCounter()
    if not args.no_planted:
        r = planted(args.width, args.image_size, args.batch, args.segment_size, counter)
        report = r["report"]
        origin = report.origin
        segment = "auto" if args.segment_size is None else args.segment_size
        print(f"planted overflow: InceptionV3 width {args.width}, {args.image_size}x{args.image_size}, "
              f"batch {args.batch}, segment_size {segment}")
        print(f"  localize: {r['localize_s']:.1f} s (model built in {r['build_s']:.1f} s before it)")
        print(f"  equations: {report.num_equations}; events: {report.num_events}")
        print(f"  distinct compilations: {r['compiles']} ({r['compile_s']:.1f} s compiling)")
        print(f"  peak memory: {r['max_rss_gib']:.2f} GiB ru_maxrss (process); localization "
              f"{r['rss_before_gib']:.2f} GiB before, {r['rss_peak_gib']:.2f} GiB peak (sampled)")
        print(f"  origin: {origin.kind + ' from ' + origin.where() if origin else '(none)'}; cause {report.cause}",
              flush=True)
    if not args.no_peers:
        rows = peer_cases(counter)
        slowest = max(rows, key=lambda row: row[1])
        total = sum(row[1] for row in rows)
        print(f"peer suite: {len(rows)} cases in {total:.2f} s; slowest {slowest[0]!r} {slowest[1]:.2f} s "
              f"({slowest[2]} compilations); over 1 s: {sum(row[1] > 1.0 for row in rows)}")
        for name, seconds, compiles, found in sorted(rows, key=lambda row: -row[1])[:5]:
            print(f"  {seconds:6.2f} s  {compiles:3d} compilations  found={found!s:5}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
