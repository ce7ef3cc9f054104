"""What it costs to watch a train step for NaN/Inf: plain, sentinel, jax_debug_nans, checkify.

Run from the repository root:

    .venv/bin/python benchmarks/bench_sentinel.py                  # the cpu preset: width 0.25, 75x75, batch 32
    .venv/bin/python benchmarks/bench_sentinel.py --batch 8        # its shortest step (~42 ms), the hardest case
    .venv/bin/python benchmarks/bench_sentinel.py --rounds 5 --quick   # a smoke check
    .venv/bin/python benchmarks/bench_sentinel.py --out benchmarks/results/bench_sentinel.md
    .venv/bin/python benchmarks/bench_sentinel.py --rounds 1000 --variants sentinel,"nanlab loop step" \
        --no-localize                                               # the <= 2% question alone

One invocation builds one InceptionV3 train step (sigmoid BCE, SGD with momentum) and times it
four ways, interleaved round by round in a shuffled order so a shared machine's load hits each
alike:

- plain: loss, gradients, optimizer update; nothing else.
- sentinel: the same plus nanlab.step's sentinel as it runs between logged steps: the finite
  flags of the loss and the gradients, read off the float32 sum of squares that is also the
  grad norm, and the update under ``lax.cond`` (a non-finite step keeps the input state).
- jax_debug_nans: the plain step with `jax_debug_nans` on (host checks after every jitted call),
  not donated, as nanlab's loop runs it under --debug-nans.
- checkify: the plain step under `checkify.checkify(errors=float_checks)`, error fetched each step.
- nanlab loop step: `nanlab.guard.guard` over `nanlab.step.make_train_step` with the step's own
  flag and gate (``finite=nanlab.step.guard_flag, gate_kwarg="apply_update"``, check_every 10),
  exactly what the training loop runs on every step; and "(logged)": what it runs on the steps it
  logs (the weights copied before the step, the guard's carry read (`GuardedStep.check`),
  `nanlab.step.update_telemetry` after it).

- the sentinel's two parts, each alone: its gate (the update under ``lax.cond`` on the loss's
  finiteness; no reduction) and its reduction (the gradients' sum of squares and finite flag;
  the update unconditional, so nothing is kept for a replay).
- plain (again): a second, separately jitted copy of the plain step: the A/A control. Its
  ratio to plain is 1 but for noise, so its interval shows what this machine can resolve.

Every variant but jax_debug_nans donates its state, as the loop does.

It prints each variant's median step time, the median of its per-round ratio to plain and a 95%
percentile-bootstrap interval of that median (resampling rounds), then the time
`nanlab.trace.localize` takes to localize one planted NaN in the same step. On a shared machine
the per-round ratios spread by +-5-10%; the interval narrows as 1/sqrt(rounds), so a question
at the 1% level takes about a thousand rounds (`--variants` keeps such a run short).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import statistics
import sys
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import checkify

from nanlab.stats import bootstrap_ci
from nanlab.config import TrainConfig
from nanlab.models.inception_v3 import InceptionV3, init_variables
from nanlab.numerics import finite_from_sq_norm, tree_sq_norm
from nanlab.trace import localize


def bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    # The logits form (log_sigmoid inside optax): finite for every logit.
    return optax.sigmoid_binary_cross_entropy(logits, labels)


def make_step(model: Any, tx: optax.GradientTransformation, *, sentinel: bool | str) -> Callable:
    """A train step `(state, batch) -> (state, metrics)`; state = (params, batch_stats, opt_state).

    `sentinel`: False (plain), True (the sentinel), or one of its two parts alone: "gate" (the
    update under `lax.cond` on the loss's finiteness, no reduction over the gradients) or
    "reduction" (the gradients' sum of squares and flag, the update unconditional).
    """

    def step(state, batch):
        params, batch_stats, opt_state = state
        x, y = batch

        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            return jnp.mean(bce(logits, y)), new["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

        def updated():
            updates, new_opt = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_stats, new_opt

        if not sentinel:
            return updated(), {"loss": loss}
        if sentinel == "gate":
            finite = jnp.isfinite(loss)
            return jax.lax.cond(finite, updated, lambda: state), {"loss": loss, "finite": finite}
        # The sentinel's reduction, as nanlab.step runs it between logged steps: one float32 sum
        # of squares over the gradients, the finite flag read off it.
        grad_sq = tree_sq_norm(grads, nan_if_nonfinite=True)
        finite = jnp.isfinite(loss) & finite_from_sq_norm(grad_sq)
        metrics = {"loss": loss, "finite": finite, "grad_norm": jnp.sqrt(grad_sq)}
        if sentinel == "reduction":
            return updated(), metrics
        # The whole sentinel adds the gate: the update under lax.cond on that flag, so a
        # non-finite step keeps the input state for an exact replay.
        return jax.lax.cond(finite, updated, lambda: state), metrics

    return step


def build(width: float, size: int, batch: int, seed: int = 0):
    model = InceptionV3(num_classes=1, width_multiplier=width)
    tx = optax.sgd(0.01, momentum=0.9)
    kx, ky = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(kx, (batch, size, size, 3))
    y = (jax.random.uniform(ky, (batch, 1)) > 0.5).astype(jnp.float32)
    variables = init_variables(model, jax.random.key(seed), (size, size, 3))  # fast to compile, unlike model.init
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
    return model, tx, state, (x, y)


VARIANTS = ("plain (again)", "sentinel", "sentinel gate only", "sentinel reduction only", "jax_debug_nans",
            "checkify float_checks", "nanlab loop step", "nanlab loop step (logged)")


def run(width: float, size: int, batch: int, rounds: int, variants: list[str] | None = None,
        seed: int = 0) -> dict[str, Any]:
    from nanlab.guard import guard
    from nanlab.step import TrainState, guard_flag, make_train_step, update_telemetry

    model, tx, state, data = build(width, size, batch, seed)
    # Every variant but jax_debug_nans donates its state, as nanlab's loop does (a donated step
    # updates in place; the loop turns donation off under --debug-nans, and so does this bench).
    donated = {"donate_argnums": (0,)}
    plain = jax.jit(make_step(model, tx, sentinel=False), **donated)
    undonated_plain = jax.jit(make_step(model, tx, sentinel=False))
    guarded = jax.jit(make_step(model, tx, sentinel=True), **donated)
    checked = jax.jit(checkify.checkify(make_step(model, tx, sentinel=False), errors=checkify.float_checks),
                      **donated)
    loop_step = guard(make_train_step(model, bce, tx), donate_argnums=0, check_every=10, finite=guard_flag,
                      gate_kwarg="apply_update", verbose=False)
    snapshot = jax.jit(lambda params: jax.tree.map(jnp.copy, params))
    telemetry = jax.jit(update_telemetry)

    def nanlab_state(s):
        return TrainState(step=jnp.zeros((), jnp.int32), params=s[0], batch_stats=s[1], opt_state=s[2],
                          rng=jax.random.key(seed))

    # Each variant threads its own copy of the state (donation consumes the input buffers).
    states: dict[str, Any] = {}
    plain_again = jax.jit(make_step(model, tx, sentinel=False), **donated)
    gate_only = jax.jit(make_step(model, tx, sentinel="gate"), **donated)
    reduction_only = jax.jit(make_step(model, tx, sentinel="reduction"), **donated)
    steppers: dict[str, Callable[[Any], Any]] = {
        "plain": lambda s: plain(s, data)[0],
        "plain (again)": lambda s: plain_again(s, data)[0],
        "sentinel": lambda s: guarded(s, data)[0],
        "sentinel gate only": lambda s: gate_only(s, data)[0],
        "sentinel reduction only": lambda s: reduction_only(s, data)[0],
        "jax_debug_nans": lambda s: _with_debug_nans(undonated_plain, s, data)[0],
        "checkify float_checks": lambda s: _checkify_step(checked, s, data)[0],
        "nanlab loop step": lambda s: loop_step(s, data)[0],
        "nanlab loop step (logged)": lambda s: _logged_step(loop_step, snapshot, telemetry, s, data),
    }
    if variants is not None:
        steppers = {name: fn for name, fn in steppers.items() if name == "plain" or name in variants}
    for name in steppers:
        fresh = jax.tree.map(jnp.copy, state)
        states[name] = nanlab_state(fresh) if name.startswith("nanlab") else fresh

    def timed_step(name: str) -> float:
        start = time.perf_counter()
        states[name] = jax.block_until_ready(steppers[name](states[name]))
        return time.perf_counter() - start

    for name in steppers:  # compile (and warm) each outside the timing
        timed_step(name)
        timed_step(name)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    order = list(steppers)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            times[name].append(timed_step(name))
    # (median ratio, 95% low, 95% high) per variant: the rounds resampled, pairs kept together.
    ratios = {name: bootstrap_ci([t / p for t, p in zip(times[name], times["plain"])], statistic=np.median)
              for name in steppers}
    medians = {name: statistics.median(times[name]) for name in steppers}
    return {"medians": medians, "ratios": ratios, "rounds": rounds, "model": model, "tx": tx,
            "state": state, "data": data}


def time_localize(model: Any, tx: Any, state: Any, data: Any) -> dict[str, Any]:
    """Localize one planted overflow: a Mixed_5b kernel set to 3e38 (finite) so its convolution overflows."""
    params = jax.tree.map(lambda a: a, state[0])
    conv = params["Mixed_5b"]["Branch_1_Conv2d_0a_1x1"]["Conv"]
    conv["kernel"] = jnp.full_like(conv["kernel"], 3e38)  # x its >= 0 inputs (after ReLU), summed: inf
    bad_state = (params, state[1], state[2])
    before = resident_gib()
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # the localization's own peak (ru_maxrss would include the compilations above)
        while not done.wait(0.2):
            peak[0] = max(peak[0], resident_gib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    report = localize(make_step(model, tx, sentinel=True), bad_state, data)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return {"localize_s": seconds, "report": report, "rss_before_gib": before,
            "rss_peak_gib": max(peak[0], resident_gib())}


def resident_gib() -> float:
    """This process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


def _with_debug_nans(step: Callable, state: Any, data: Any) -> Any:
    with jax.debug_nans(True):
        return step(state, data)


def _logged_step(loop_step: Any, snapshot: Callable, telemetry: Callable, state: Any, data: Any) -> Any:
    """A step the loop logs: the weights copied before it, the guard's carry read, update_telemetry."""
    before = snapshot(state.params)
    loop_step(state, data)
    new_state = loop_step.check()[0]
    jax.block_until_ready(telemetry(before, new_state.params))
    return new_state


def _checkify_step(step: Callable, state: Any, data: Any) -> Any:
    err, out = step(state, data)
    err.throw()  # fetches the error to the host, as a user of checkify must
    return out


def to_markdown(result: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    lines = [
        "# Sentinel cost: plain vs sentinel vs jax_debug_nans vs checkify",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on "
        f"{jax.default_backend()}; InceptionV3 width {args.width}, {args.image_size}x{args.image_size}, "
        f"batch {args.batch}; {result['rounds']} paired rounds (shuffled order each round).",
        "",
        "| variant | median step (ms) | median ratio to plain | 95% interval |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, median in result["medians"].items():
        ratio, low, high = result["ratios"][name]
        lines.append(f"| {name} | {1e3 * median:.1f} | {ratio:.3f} | {low:.3f}-{high:.3f} |")
    report = result.get("report")
    if report is None:
        lines += ["", "Localization: not measured (--no-localize, or the run stopped before it).", ""]
        return "\n".join(lines)
    origin = report.origin
    where = origin.where() if origin else "(none)"
    lines += [
        "",
        f"Localizing one planted NaN (a Mixed_5b 1x1 kernel set to 3e38) with `nanlab.trace.localize`: "
        f"{result['localize_s']:.1f} s, {report.num_equations} equations; origin: {where}, "
        f"cause {report.cause}. Resident memory: {result['rss_before_gib']:.1f} GiB before, "
        f"{result['rss_peak_gib']:.1f} GiB peak during the localization (sampled every 0.2 s).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # The defaults are the model and batch `python -m nanlab.train` trains on a CPU (its cpu preset;
    # the bench keeps SGD with momentum, whose update reads less than the preset's Adam).
    preset = TrainConfig()
    parser.add_argument("--width", type=float, default=preset.width_multiplier)
    parser.add_argument("--image-size", type=int, default=preset.image_size)
    parser.add_argument("--batch", type=int, default=preset.batch_size)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="width 0.125, 5 rounds")
    parser.add_argument("--out", default="", help="write the markdown table here")
    parser.add_argument("--variants", default="",
                        help=f"comma-separated subset of: {', '.join(VARIANTS)} (plain always runs)")
    parser.add_argument("--no-localize", action="store_true", help="time the steps only")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()] or None
    unknown = sorted(set(variants or ()) - set(VARIANTS))
    if unknown:
        print(f"bench_sentinel: unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}",
              file=sys.stderr)
        return 2
    if args.quick:
        args.width, args.rounds = 0.125, min(args.rounds, 5)
    for name in ("width", "image_size", "batch", "rounds"):
        if getattr(args, name) <= 0:
            print(f"bench_sentinel: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    if args.image_size < 75:
        print(f"bench_sentinel: --image-size must be >= 75 (InceptionV3), got {args.image_size}",
              file=sys.stderr)
        return 2
    result = run(args.width, args.image_size, args.batch, args.rounds, variants)
    command = "python " + shlex.join(["benchmarks/bench_sentinel.py"] + (argv if argv is not None else sys.argv[1:]))
    write(to_markdown(result, args, command), args.out)  # the step timings survive a slow localization
    if args.no_localize:
        return 0
    result.update(time_localize(result["model"], result["tx"], result["state"], result["data"]))
    write(to_markdown(result, args, command), args.out)
    print(result["report"])
    return 0


def write(text: str, path: str) -> None:
    print(text, flush=True)
    if path:
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    sys.exit(main())
