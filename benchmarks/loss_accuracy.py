"""Accuracy of nanlab's losses against optax's, in float32 ULP of an mpmath reference.

Run from the repository root:

    .venv/bin/python benchmarks/loss_accuracy.py [--points 2000] [--seed 0] [--write]

Both libraries are evaluated on the same float32 points (logits log-uniform in magnitude over
[2**-20, 100] with both signs, hard labels {0, 1} and soft labels uniform in [0, 1]). For each loss
and its gradient w.r.t. the logits it prints the max and mean ULP error where the exact value is a
normal float32 number (hard labels: ULP of the exact value; soft-label gradients: ULP of the size
of the terms, max(sigmoid(x), z) for cross-entropy, as the issue states), and, on the same points
plus the extremes (±0, subnormals, ±17, ±88.7, ±104, ±1e9, ±FLT_MAX, ±inf), the count of non-finite
results where the exact value is finite. `--write` stores the table and the command in
benchmarks/results/loss_accuracy.md.
"""

from __future__ import annotations

import argparse
import functools
import math
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import optax

from nanlab import losses, testing

RESULTS = pathlib.Path(__file__).parent / "results" / "loss_accuracy.md"
FOCAL = dict(alpha=0.25, gamma=2.0)


def sample_points(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float32 logits, hard labels and soft labels, one of each per point."""
    rng = np.random.default_rng(seed)
    magnitude = np.exp(rng.uniform(np.log(2.0**-20), np.log(100.0), count))
    logits = (magnitude * rng.choice([-1.0, 1.0], count)).astype(np.float32)
    hard = rng.choice([0.0, 1.0], count).astype(np.float32)
    soft = rng.uniform(0.0, 1.0, count).astype(np.float32)
    return logits, hard, soft


def extreme_points() -> tuple[np.ndarray, np.ndarray]:
    """Every edge logit of nanlab.testing against every edge label (finite-or-infinite logits)."""
    pairs = [(x, z) for x in testing.EDGE_LOGITS for z in testing.EDGE_LABELS]
    logits, labels = zip(*pairs)
    return np.array(logits, np.float32), np.array(labels, np.float32)


def evaluate(fn, logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The per-element loss and its gradient w.r.t. the logits, jitted, as float64 numpy."""
    value = jax.jit(fn)(logits, labels)
    grad = jax.jit(jax.grad(lambda x, z: jnp.sum(fn(x, z))))(logits, labels)
    return np.asarray(value, np.float64), np.asarray(grad, np.float64)


def ulp_stats(computed: np.ndarray, exact: list, scales: list | None) -> tuple[float, float]:
    """(max, mean) ULP error over points whose exact value (and scale) is a normal float32."""
    errors = []
    for index, (value, truth) in enumerate(zip(computed, exact)):
        scale = None if scales is None else scales[index]
        if not testing.representable(truth) or (scale is not None and not testing.representable(scale)):
            continue
        if scale is None and truth == 0:
            continue
        errors.append(testing.ulp_error(float(value), truth, scale))
    errors = np.array(errors)
    return float(errors.max()), float(errors.mean())


def nonfinite_count(computed: np.ndarray, exact: list) -> int:
    """How many results are NaN/inf where the exact value is finite (or NaN where it is inf)."""
    count = 0
    for value, truth in zip(computed, exact):
        truth_finite = mpmath.isfinite(truth) and abs(truth) <= testing.FLT_MAX
        if (truth_finite and not math.isfinite(value)) or math.isnan(value):
            count += 1
    return count


def references(kind: str, logits: np.ndarray, labels: np.ndarray):
    """Exact loss values, gradients and gradient scales for each point."""
    if kind == "bce":
        loss, grad, scale = testing.bce_reference, testing.bce_gradient_reference, testing.bce_gradient_scale
    else:
        loss = functools.partial(testing.focal_reference, **FOCAL)
        grad = functools.partial(testing.focal_gradient_reference, **FOCAL)
        scale = functools.partial(testing.focal_gradient_scale, **FOCAL)
    pairs = [(float(x), float(z)) for x, z in zip(logits, labels)]
    return [loss(*p) for p in pairs], [grad(*p) for p in pairs], [scale(*p) for p in pairs]


IMPLEMENTATIONS = {
    "bce": {
        "nanlab": losses.sigmoid_binary_cross_entropy,
        "optax": optax.sigmoid_binary_cross_entropy,
    },
    "focal": {
        "nanlab": functools.partial(losses.sigmoid_focal_loss, **FOCAL),
        "optax": functools.partial(optax.sigmoid_focal_loss, **FOCAL),
    },
}


def measure(count: int, seed: int) -> list[dict]:
    """One row per (loss, label kind, implementation)."""
    logits, hard, soft = sample_points(count, seed)
    edge_logits, edge_labels = extreme_points()
    rows = []
    for kind, implementations in IMPLEMENTATIONS.items():
        edge_loss, edge_grad, _ = references(kind, edge_logits, edge_labels)
        for label_kind, labels in (("hard", hard), ("soft", soft)):
            exact_loss, exact_grad, scales = references(kind, logits, labels)
            for name, fn in implementations.items():
                value, grad = evaluate(fn, logits, labels)
                edge_value, edge_gradient = evaluate(fn, edge_logits, edge_labels)
                rows.append(
                    {
                        "loss": kind,
                        "labels": label_kind,
                        "impl": name,
                        "loss_ulp": ulp_stats(value, exact_loss, None),
                        "grad_ulp": ulp_stats(grad, exact_grad, None if label_kind == "hard" else scales),
                        "loss_nonfinite": nonfinite_count(np.concatenate([value, edge_value]), exact_loss + edge_loss),
                        "grad_nonfinite": nonfinite_count(np.concatenate([grad, edge_gradient]), exact_grad + edge_grad),
                        "points": len(value) + len(edge_value),
                    }
                )
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "| loss | labels | impl | loss max ULP | loss mean ULP | grad max ULP | grad mean ULP "
        "| non-finite loss | non-finite grad |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {row['loss']} | {row['labels']} | {row['impl']} | {row['loss_ulp'][0]:.2f} | "
            f"{row['loss_ulp'][1]:.3f} | {row['grad_ulp'][0]:.2f} | {row['grad_ulp'][1]:.3f} | "
            f"{row['loss_nonfinite']}/{row['points']} | {row['grad_nonfinite']}/{row['points']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=2000, help="random points per label kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS}")
    args = parser.parse_args(argv)
    if args.points < 1:
        print(f"loss_accuracy: error: --points must be >= 1, got {args.points}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    table = format_table(measure(args.points, args.seed))
    elapsed = time.perf_counter() - start
    command = f".venv/bin/python benchmarks/loss_accuracy.py --points {args.points} --seed {args.seed}"
    print(table)
    print(f"\n{args.points} random points per label kind + {len(extreme_points()[0])} extreme points; {elapsed:.0f} s")
    if args.write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(
            "# Loss accuracy: nanlab vs optax (float32 ULP against mpmath, 60 digits)\n\n"
            f"Command: `{command} --write` (jax {jax.__version__}, optax {optax.__version__}, "
            f"backend {jax.default_backend()}).\n\n"
            "Targets: the loss within 2 ULP (hard labels) / 3 ULP (soft), its gradient within "
            "2 ULP. Focal: alpha=0.25, gamma=2. ULP errors over points whose exact value is a normal "
            "float32; soft-label gradients in ULP of the size of their terms (max(sigmoid(x), z) "
            "for cross-entropy, alpha_t m max(|gamma r BCE|, sigmoid(x), z) for focal). Non-finite: "
            "NaN anywhere, or inf where the exact value is finite, over the random and the extreme "
            "points together.\n\n"
            f"{table}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
