"""What `nanlab.guard` costs around a user's step: plain jit vs guard vs jax_debug_nans vs checkify.

Run from the repository root:

    .venv/bin/python benchmarks/bench_guard.py                       # both models, 30 rounds
    .venv/bin/python benchmarks/bench_guard.py --models nnx --rounds 200
    .venv/bin/python benchmarks/bench_guard.py --rounds 5 --quick    # a smoke check
    .venv/bin/python benchmarks/bench_guard.py --out benchmarks/results/bench_guard.md

Two steps, each a user's own pure step ``(state, batch) -> (state, metrics)`` with donated state:

- inception: nanlab's InceptionV3 at the cpu preset (`nanlab.config.TrainConfig()`: width 0.25,
  75x75, batch 32), sigmoid BCE, SGD with momentum, BatchNorm statistics in the state; the step of
  bench_sentinel, written as a user would (no sentinel of its own).
- nnx: a Flax NNX stack of pre-LayerNorm residual MLP blocks (the feed-forward half of a transformer
  block; width 256, hidden 1024, 4 blocks, 512 tokens a batch), Adam, trained through
  ``nnx.split``/``nnx.merge`` inside a pure step.

Variants, interleaved round by round in a shuffled order so a shared machine's load hits each alike:
plain (`jax.jit`, donated), plain (again) (a second jit of the same step: the A/A control, whose
interval shows what the machine can resolve), guard (`nanlab.guard.guard(step, donate_argnums=0)`,
the flag of the previous call read every call), guard check_every=10, the cheap path (the same step
written with its own flag: nanlab's sentinel, one sum of squares over the gradients and the loss's
isfinite, and its update under ``lax.cond`` on that flag and an ``apply_update`` argument), jitted
alone as "own flag (jit)" and guarded as "guard own flag" (``guard(own_step, donate_argnums=0,
finite=..., gate_kwarg="apply_update")``, as ``python -m nanlab.train`` runs its step),
jax_debug_nans (not donated: it re-runs a failing call on its arguments) and checkify float_checks
(error fetched every step). On the NNX step also the cheap path gated by a select
(`nanlab.guard.gate`) instead of ``lax.cond``: "own flag select (jit)" and "guard own flag select".
Two references: output flag only (jit) (the plain step and the guard's
flag over its outputs, no gate: one read of every output, the floor of any sound output scan) and
plain undonated (the plain step without donation: what jax_debug_nans' figure is relative to).
Each variant's time is one call through to a ready state (`block_until_ready`), so the guard's
host-side work is inside it.

It prints the median step time, the median of the per-round ratio to plain and a 95% percentile
bootstrap interval of that median, then, per model, the time from a planted failure to the report:
from dispatching the failing call to the `NonFiniteError` (the next call, the replay through
`nanlab.trace.localize` and `nanlab.diagnose`).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shlex
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.experimental import checkify

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ as a package

from benchmarks.bench_sentinel import write  # noqa: E402  (print the table, and write it with --out)
from nanlab.guard import NonFiniteError, gate, guard, outputs_finite  # noqa: E402
from nanlab.machine import cpu_model  # noqa: E402
from nanlab.numerics import finite_from_sq_norm, tree_sq_norm  # noqa: E402
from nanlab.stats import bootstrap_ci  # noqa: E402

VARIANTS = ("plain (again)", "guard", "guard check_every=10", "own flag (jit)", "guard own flag",
            "jax_debug_nans", "checkify float_checks", "output flag only (jit)", "plain undonated",
            "own flag select (jit)", "guard own flag select")
MODELS = ("inception", "nnx")


# ------------------------------------------------------------------------------------------ the steps


def inception_case(width: float, size: int, batch: int, seed: int = 0) -> dict[str, Any]:
    """nanlab's InceptionV3 step as a user would write it; state = (params, batch_stats, opt_state)."""
    from nanlab.models.inception_v3 import InceptionV3, init_variables

    model = InceptionV3(num_classes=1, width_multiplier=width)
    tx = optax.sgd(0.01, momentum=0.9)
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (batch, size, size, 3))
    y = (jax.random.uniform(ky, (batch, 1)) > 0.5).astype(jnp.float32)
    variables = init_variables(model, jax.random.key(seed), (size, size, 3))
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def loss_and_grads(state, batch):
        params, batch_stats, _ = state
        x, y = batch

        def loss_fn(p):
            logits, new = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"])
            return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y)), new["batch_stats"]

        return jax.value_and_grad(loss_fn, has_aux=True)(params)

    def step(state, batch):
        params, _, opt_state = state
        (loss, new_stats), grads = loss_and_grads(state, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), {"loss": loss}

    def own_step(state, batch, apply_update=True):
        """`step` with its own flag (nanlab's sentinel) and its update under lax.cond: the cheap path."""
        params, _, opt_state = state
        (loss, new_stats), grads = loss_and_grads(state, batch)
        finite = own_flag(loss, grads, new_stats)

        def update():
            updates, new_opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), new_stats, new_opt_state)

        return lax.cond(finite & apply_update, update, lambda: state), {"loss": loss, "finite": finite}

    def plant(state):
        """The state with one Mixed_5b 1x1 kernel at 3e38: its convolution overflows (forward)."""
        params = jax.tree.map(lambda a: a, state[0])
        conv = params["Mixed_5b"]["Branch_1_Conv2d_0a_1x1"]["Conv"]
        conv["kernel"] = jnp.full_like(conv["kernel"], 3e38)
        return (params, state[1], state[2])

    return {"step": step, "own_step": own_step, "state": state, "batch": (x, y), "plant": plant,
            "skip": ("own flag select (jit)", "guard own flag select"),  # written for the NNX step only
            "about": f"InceptionV3 width {width}, {size}x{size}, batch {batch}, SGD momentum"}


def nnx_case(width: int = 256, hidden: int = 1024, blocks: int = 4, tokens: int = 512,
             seed: int = 0) -> dict[str, Any]:
    """A Flax NNX residual MLP stack with Adam, stepped through nnx.split/merge."""
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.norm = nnx.LayerNorm(width, rngs=rngs)
            self.up = nnx.Linear(width, hidden, rngs=rngs)
            self.down = nnx.Linear(hidden, width, rngs=rngs)

        def __call__(self, x):
            return x + self.down(jax.nn.gelu(self.up(self.norm(x))))

    class Stack(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.blocks = nnx.List([Block(rngs) for _ in range(blocks)]) if hasattr(nnx, "List") else \
                [Block(rngs) for _ in range(blocks)]
            self.head = nnx.Linear(width, 1, rngs=rngs)

        def __call__(self, x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    model = Stack(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (tokens, width))
    y = jax.random.normal(ky, (tokens, 1))

    def step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        x, y = batch
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return nnx.state((model, optimizer)), {"loss": loss}

    def own_step(state, batch, apply_update=True):
        """`step` with its own flag (nanlab's sentinel) and its update under lax.cond: the cheap path."""
        # Merged from a copy of the containers: nnx.merge reuses the State's Variables, and the
        # optimizer's update inside the cond branch must not write into those of the other branch.
        model, _ = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
        x, y = batch
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        finite = own_flag(loss, grads)

        def update():
            model, optimizer = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
            optimizer.update(model, grads)
            return nnx.state((model, optimizer))

        return lax.cond(finite & apply_update, update, lambda: state), {"loss": loss, "finite": finite}

    def own_step_select(state, batch, apply_update=True):
        """`own_step` gating with `nanlab.guard.gate` (a select) instead of lax.cond: the flag is known
        before the update, so XLA can fuse the select into Adam's elementwise pass over the state."""
        model, optimizer = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
        x, y = batch
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        finite = own_flag(loss, grads)
        optimizer.update(model, grads)
        return gate(finite & apply_update, nnx.state((model, optimizer)), state), {"loss": loss, "finite": finite}

    def plant(state):
        """The state with the second block's down-projection kernel at 3e38: its matmul overflows."""
        model, optimizer = nnx.merge(graphdef, jax.tree.map(lambda a: a, state))
        model.blocks[1].down.kernel.value = jnp.full((hidden, width), 3e38, jnp.float32)
        return nnx.state((model, optimizer))

    # checkify cannot run it: NNX refuses to mutate a Variable from checkify's trace level
    # (flax.errors.TraceContextError), whether the gradient is nnx's or jax's.
    return {"step": step, "own_step": own_step, "own_step_select": own_step_select, "state": state,
            "batch": (x, y), "plant": plant, "skip": ("checkify float_checks",),
            "about": f"NNX MLP stack {blocks} x ({width} -> {hidden} -> {width}), {tokens} tokens, Adam"}


def own_flag(loss: jax.Array, grads: Any, *more: Any) -> jax.Array:
    """nanlab's sentinel: the loss is finite and one float32 sum of squares over the gradients (and
    `more`, e.g. new BatchNorm statistics) is not NaN (`nanlab.numerics`, as `nanlab.step`)."""
    return jnp.isfinite(loss) & finite_from_sq_norm(tree_sq_norm((grads, *more), nan_if_nonfinite=True))


# ------------------------------------------------------------------------------------------ the timing


def guard_own(own_step: Callable):
    """The cheap path: the step hands the guard its own flag and gates its own update."""
    return guard(own_step, donate_argnums=0, finite=lambda outputs: outputs[1]["finite"],
                 gate_kwarg="apply_update", verbose=False)


def steppers(step: Callable, own_step: Callable, batch: Any, variants: list[str],
             own_step_select: Callable | None = None) -> dict[str, Callable[[Any], Any]]:
    """Variant name -> ``state -> new state`` (one call of that variant)."""
    plain = jax.jit(step, donate_argnums=0)
    own = jax.jit(own_step, donate_argnums=0)
    guarded_own = guard_own(own_step)
    plain_again = jax.jit(step, donate_argnums=0)
    undonated = jax.jit(step)
    guarded = guard(step, donate_argnums=0, verbose=False)
    guarded_10 = guard(step, donate_argnums=0, check_every=10, verbose=False)
    checked = jax.jit(checkify.checkify(step, errors=checkify.float_checks), donate_argnums=0)
    # The floor of any sound output scan: the plain step plus one reduction that reads every
    # output once (the guard's flag, without its gate); no guard can check the outputs for less.
    flag_only = jax.jit(lambda s, b: (lambda out: (out, outputs_finite(out)))(step(s, b)), donate_argnums=0)

    def debug_nans(s):
        with jax.debug_nans(True):
            return undonated(s, batch)[0]

    def checkified(s):
        err, out = checked(s, batch)
        err.throw()  # fetches the error to the host, as a user of checkify must
        return out[0]

    every = {
        "plain": lambda s: plain(s, batch)[0],
        "plain (again)": lambda s: plain_again(s, batch)[0],
        "guard": lambda s: guarded(s, batch)[0],
        "guard check_every=10": lambda s: guarded_10(s, batch)[0],
        "own flag (jit)": lambda s: own(s, batch)[0],
        "guard own flag": lambda s: guarded_own(s, batch)[0],
        "jax_debug_nans": debug_nans,
        "output flag only (jit)": lambda s: flag_only(s, batch)[0][0],
        **(_select_steppers(own_step_select, batch) if own_step_select is not None else {}),
        "plain undonated": lambda s: undonated(s, batch)[0],
        "checkify float_checks": checkified,
    }
    return {name: fn for name, fn in every.items() if name == "plain" or name in variants}


def _select_steppers(own_step_select: Callable, batch: Any) -> dict[str, Callable[[Any], Any]]:
    """The own-flag step gated by a select, jitted alone and guarded."""
    own = jax.jit(own_step_select, donate_argnums=0)
    guarded = guard_own(own_step_select)
    return {"own flag select (jit)": lambda s: own(s, batch)[0],
            "guard own flag select": lambda s: guarded(s, batch)[0]}


def time_variants(case: dict[str, Any], rounds: int, variants: list[str], seed: int = 0) -> dict[str, Any]:
    runs = steppers(case["step"], case["own_step"], case["batch"],
                    [v for v in variants if v not in case.get("skip", ())], case.get("own_step_select"))
    states = {name: jax.tree.map(jnp.copy, case["state"]) for name in runs}  # donation consumes each

    def timed(name: str) -> float:
        start = time.perf_counter()
        states[name] = jax.block_until_ready(runs[name](states[name]))
        return time.perf_counter() - start

    for name in runs:  # compile and warm outside the timing
        timed(name)
        timed(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    order, rng = list(runs), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            times[name].append(timed(name))
    ratios = {name: bootstrap_ci([t / p for t, p in zip(times[name], times["plain"])], statistic=np.median)
              for name in runs}
    # The guard's own price on the cheap path: the guarded own-flag step against the same step jitted.
    pairs = {"guard own flag / own flag (jit)": ("guard own flag", "own flag (jit)")}
    paired = {label: bootstrap_ci([t / b for t, b in zip(times[top], times[base])], statistic=np.median)
              for label, (top, base) in pairs.items() if top in runs and base in runs}
    return {"medians": {name: statistics.median(times[name]) for name in runs}, "ratios": ratios, "paired": paired}


def time_to_report(case: dict[str, Any], failing_call: int = 3) -> dict[str, Any]:
    """Run the guarded step with a failure planted at `failing_call`; time dispatch -> NonFiniteError."""
    guarded = guard(case["step"], donate_argnums=0, verbose=False)
    state = jax.tree.map(jnp.copy, case["state"])
    start = None
    try:
        for call in range(failing_call + 3):
            if call == failing_call:
                state = case["plant"](jax.block_until_ready(state))
                start = time.perf_counter()
            state, _ = guarded(state, case["batch"])
        guarded.check()
    except NonFiniteError as error:
        origin = error.report.origin
        return {"seconds": time.perf_counter() - start, "replay_s": error.report.seconds,
                "step": error.step, "where": origin.where() if origin else "(none)",
                "cause": error.report.cause, "verdict": error.verdict.cause}
    return {"seconds": float("nan"), "where": "not detected", "step": None}


# ------------------------------------------------------------------------------------------ the report


def to_markdown(results: dict[str, dict[str, Any]], rounds: int, command: str) -> str:
    lines = [
        "# Guard cost: plain jit vs nanlab.guard vs jax_debug_nans vs checkify",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on "
        f"{jax.default_backend()}, Python {platform.python_version()}; {rounds} paired rounds "
        "(shuffled order each round).",
    ]
    for name, result in results.items():
        lines += ["", f"## {name}: {result['about']}", "",
                  "| variant | median step (ms) | median ratio to plain | 95% interval |",
                  "| --- | ---: | ---: | ---: |"]
        for variant, median in result["medians"].items():
            ratio, low, high = result["ratios"][variant]
            lines.append(f"| {variant} | {1e3 * median:.1f} | {ratio:.3f} | {low:.3f}-{high:.3f} |")
        for variant in result.get("skip", ()):
            lines.append(f"| {variant} | n/a | n/a | n/a |")
        for label, (ratio, low, high) in result.get("paired", {}).items():
            lines += ["", f"{label}: median ratio {ratio:.3f}, 95% interval {low:.3f}-{high:.3f}."]
        failure = result.get("failure")
        if failure:
            lines += ["", f"Failure to report: {failure['seconds']:.1f} s from dispatching the failing call "
                      f"(call {failure['step']}) to the NonFiniteError, of which the replay "
                      f"{failure.get('replay_s', float('nan')):.1f} s; origin {failure['where']}, cause "
                      f"{failure['cause']}, verdict {failure.get('verdict')}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from nanlab.config import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = TrainConfig()
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--width", type=float, default=preset.width_multiplier, help="InceptionV3 width")
    parser.add_argument("--image-size", type=int, default=preset.image_size)
    parser.add_argument("--batch", type=int, default=preset.batch_size)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of: {', '.join(VARIANTS)} (plain always runs)")
    parser.add_argument("--quick", action="store_true", help="InceptionV3 width 0.125, 5 rounds")
    parser.add_argument("--no-report", action="store_true", help="skip the failure-to-report timing")
    parser.add_argument("--out", default="", help="write the markdown there too")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = sorted(set(models) - set(MODELS)) + sorted(set(variants) - set(VARIANTS))
    if bad or args.rounds <= 0:
        print(f"bench_guard: unknown model/variant {bad} or rounds <= 0", file=sys.stderr)
        return 2
    if args.quick:
        args.width, args.rounds = 0.125, min(args.rounds, 5)
    command = "python " + shlex.join(["benchmarks/bench_guard.py"] + (argv if argv is not None else sys.argv[1:]))
    results: dict[str, dict[str, Any]] = {}
    for name in models:
        case = inception_case(args.width, args.image_size, args.batch) if name == "inception" else nnx_case()
        results[name] = {"about": case["about"], "skip": case.get("skip", ()),
                         **time_variants(case, args.rounds, variants)}
        write(to_markdown(results, args.rounds, command), args.out)  # the timings survive a slow replay
        if not args.no_report:
            results[name]["failure"] = time_to_report(case)
            write(to_markdown(results, args.rounds, command), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
