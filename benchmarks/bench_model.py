"""Train/inference speed of nanlab's InceptionV3 against Keras 3 on the JAX backend.

Run from the repository root (Keras is in the `bench` and `test` extras):

    .venv/bin/python benchmarks/bench_model.py             # batch 8 at 299 and batch 32 at 75
    .venv/bin/python benchmarks/bench_model.py --quick     # a small smoke check (a minute)
    .venv/bin/python benchmarks/bench_model.py --full      # GPU sizes: bf16, larger batches
    .venv/bin/python benchmarks/bench_model.py --conv-shapes --image-size 299 --batch 8
    .venv/bin/python benchmarks/bench_model.py --profile --impls fast   # where the step's time goes
    .venv/bin/python benchmarks/bench_model.py --max-pool-ablation      # the max-pool gradient's gain
    .venv/bin/python benchmarks/bench_model.py --conv-libraries default,eigen   # who runs the convolutions

One invocation builds, per setting, nanlab's InceptionV3 (binary head, sigmoid BCE, Adam; one
jitted train step) with `conv_impl="fast"` and with `conv_impl="xla"` (the ablation), and
`keras.applications.InceptionV3(weights=None, classes=1, classifier_activation=None)` compiled
with Adam and `train_on_batch`. The timed steps are interleaved (nanlab-fast, nanlab-xla, Keras,
nanlab-fast, ...) so that the load of a shared machine hits every contestant alike; it prints
medians and the median of the per-round ratios. `--conv-shapes` instead times every distinct
convolution of the network under each formulation of `nanlab.models.conv` (forward, input
gradient, kernel gradient): the figures behind `nanlab.models.conv.choose_kernel_grad`.

`conv_impl="tuned"` (the CPU default) first times each convolution shape's formulations on this
machine (`nanlab.models.conv_tuning`; cached per machine, so only the first run pays) and prints
how long that took. The peers, PyTorch (torchvision's inception_v3) and Keras 3 on TensorFlow, run
in the same invocation, each in its own process (`benchmarks/peer_models.py`, with `--peer-python`
or this interpreter; install them with the `peers` extra) after nanlab's rounds of each setting;
the bench says which peers it skipped. The machine's float32 matmul rate is measured first, in the
same invocation, and every contestant's train GFLOP/s is given as a share of it.

`--profile` instead traces nanlab's train step (each of `--impls`, each setting) with
`jax.profiler`, maps every XLA kernel event to its HLO instruction, classes the instruction by
what it computes (convolution, matmul, max-pool and its gradient, reductions, the iota index maps
of the max-pool gradient, layout changes, elementwise) and prints thread-milliseconds per step by
class.

`--conv-libraries default,eigen` adds nanlab rows whose programs (train step and inference) XLA
compiles with another convolution library (`nanlab.models.conv.LIBRARIES`: YNNPACK, XLA's default
since jax 0.10, or Eigen), the choice behind `python -m nanlab.train --conv-library`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

os.environ.setdefault("KERAS_BACKEND", "jax")  # before any keras import: Keras 3 on JAX

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from nanlab import allocator  # noqa: E402
from nanlab.models import conv as conv_lib  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Per-convolution timings.


ConvShape = collections.namedtuple(
    "ConvShape", "block height width cin cout kh kw stride padding"
)


def _out(size: int, k: int, stride: int, padding: str) -> int:
    return -(-size // stride) if padding == "SAME" else (size - k) // stride + 1


def inception_v3_conv_shapes(image_size: int) -> list[ConvShape]:
    """Every convolution of Keras's InceptionV3 (no top), in order, at `image_size` x `image_size`.

    Args:
      image_size: input height = width (>= 75).

    Returns:
      One ConvShape per convolution layer (94 of them), with the input spatial size it sees.
    """
    shapes: list[ConvShape] = []
    size = image_size

    def add(block, h, cin, cout, kh, kw, stride=1, padding="SAME"):
        shapes.append(ConvShape(block, h, h, cin, cout, kh, kw, stride, padding))
        return _out(h, kh, stride, padding)  # the 1xn/nx1 ones are SAME, stride 1: size kept

    size = add("Conv2d_1a_3x3", size, 3, 32, 3, 3, 2, "VALID")
    size = add("Conv2d_2a_3x3", size, 32, 32, 3, 3, 1, "VALID")
    size = add("Conv2d_2b_3x3", size, 32, 64, 3, 3, 1, "SAME")
    size = _out(size, 3, 2, "VALID")  # max pool
    size = add("Conv2d_3b_1x1", size, 64, 80, 1, 1, 1, "VALID")
    size = add("Conv2d_4a_3x3", size, 80, 192, 3, 3, 1, "VALID")
    size = _out(size, 3, 2, "VALID")  # max pool
    cin = 192
    for block, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
        add(block, size, cin, 64, 1, 1)
        add(block, size, cin, 48, 1, 1)
        add(block, size, 48, 64, 5, 5)
        add(block, size, cin, 64, 1, 1)
        add(block, size, 64, 96, 3, 3)
        add(block, size, 96, 96, 3, 3)
        add(block, size, cin, pool_features, 1, 1)
        cin = 64 + 64 + 96 + pool_features
    add("Mixed_6a", size, cin, 384, 3, 3, 2, "VALID")
    add("Mixed_6a", size, cin, 64, 1, 1)
    add("Mixed_6a", size, 64, 96, 3, 3)
    add("Mixed_6a", size, 96, 96, 3, 3, 2, "VALID")
    size, cin = _out(size, 3, 2, "VALID"), 768
    for block, c in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        add(block, size, cin, 192, 1, 1)
        add(block, size, cin, c, 1, 1)
        add(block, size, c, c, 1, 7)
        add(block, size, c, 192, 7, 1)
        add(block, size, cin, c, 1, 1)
        add(block, size, c, c, 7, 1)
        add(block, size, c, c, 1, 7)
        add(block, size, c, c, 7, 1)
        add(block, size, c, 192, 1, 7)
        add(block, size, cin, 192, 1, 1)
    add("Mixed_7a", size, cin, 192, 1, 1)
    add("Mixed_7a", size, 192, 320, 3, 3, 2, "VALID")
    add("Mixed_7a", size, cin, 192, 1, 1)
    add("Mixed_7a", size, 192, 192, 1, 7)
    add("Mixed_7a", size, 192, 192, 7, 1)
    add("Mixed_7a", size, 192, 192, 3, 3, 2, "VALID")
    size, cin = _out(size, 3, 2, "VALID"), 1280
    for block in ("Mixed_7b", "Mixed_7c"):
        add(block, size, cin, 320, 1, 1)
        add(block, size, cin, 384, 1, 1)
        add(block, size, 384, 384, 1, 3)
        add(block, size, 384, 384, 3, 1)
        add(block, size, cin, 448, 1, 1)
        add(block, size, 448, 384, 3, 3)
        add(block, size, 384, 384, 1, 3)
        add(block, size, 384, 384, 3, 1)
        add(block, size, cin, 192, 1, 1)
        cin = 2048
    return shapes


def conv_flops(shape: ConvShape, batch: int) -> float:
    """Multiply-adds x 2 of one forward pass of this convolution (its gradients cost the same each)."""
    ho = _out(shape.height, shape.kh, shape.stride, shape.padding)
    wo = _out(shape.width, shape.kw, shape.stride, shape.padding)
    return 2.0 * batch * ho * wo * shape.kh * shape.kw * shape.cin * shape.cout


def _median_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_shape(shape: ConvShape, batch: int, formulations: list[str], repeats: int) -> dict:
    """Seconds of forward, input gradient and kernel gradient for one shape.

    Returns:
      {"fwd:xla", "fwd:matmul" (1x1 only), "dx:xla", "dx:matmul", "dk:<kernel grad>", ...}.
    """
    rng = np.random.default_rng(0)
    strides = (shape.stride, shape.stride)
    pads = conv_lib.explicit_padding((shape.height, shape.width), (shape.kh, shape.kw), strides, shape.padding)
    x = jnp.asarray(rng.normal(size=(batch, shape.height, shape.width, shape.cin)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(shape.kh, shape.kw, shape.cin, shape.cout)), jnp.float32)
    y = conv_lib.conv_xla(x, k, strides, pads)
    g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    out = {}
    out["fwd:xla"] = _median_seconds(
        jax.jit(lambda a, b: conv_lib.conv_xla(a, b, strides, pads)), (x, k), repeats
    )
    out["dx:xla"] = _median_seconds(
        jax.jit(lambda a, b, c: jax.vjp(lambda a_: conv_lib.conv_xla(a_, b, strides, pads), a)[1](c)[0]),
        (x, k, g), repeats,
    )
    if (shape.kh, shape.kw) == (1, 1):
        mm = lambda a, b: conv_lib.conv_1x1_matmul(a, b, strides)  # noqa: E731
        out["fwd:matmul"] = _median_seconds(jax.jit(mm), (x, k), repeats)
        out["dx:matmul"] = _median_seconds(
            jax.jit(lambda a, b, c: jax.vjp(lambda a_: mm(a_, b), a)[1](c)[0]), (x, k, g), repeats
        )
        out["dk:matmul"] = _median_seconds(
            jax.jit(lambda a, b, c: jax.vjp(lambda b_: mm(a, b_), b)[1](c)[0]), (x, k, g), repeats
        )
    for name in formulations:
        fn = conv_lib._KERNEL_GRAD_FNS[name]
        out[f"dk:{name}"] = _median_seconds(
            jax.jit(lambda a, c, fn=fn: fn(a, c, (shape.kh, shape.kw), strides, pads)),
            (x, g), repeats,
        )
    return out




# ---------------------------------------------------------------------------------------------
# Whole-model benchmark.


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark size: images of image_size x image_size x 3, `batch` per step."""

    image_size: int
    batch: int
    dtype: str = "float32"


@dataclasses.dataclass
class Runner:
    """A contestant: `train()` runs one training step, `infer()` one forward pass, both blocking.

    Attributes:
      name: label in the table.
      compile_s: seconds to build and compile the train step (first call for Keras).
      train_flops: XLA cost-analysis FLOPs of one train step (None when unknown).
      infer_flops: the same for one inference pass.
    """

    name: str
    train: Callable[[], None]
    infer: Callable[[], None]
    compile_s: float
    train_flops: float | None = None
    infer_flops: float | None = None
    train_hlo: str | None = None  # the compiled train step's optimized HLO (for --profile)


def _batch(setting: Setting, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(setting.batch, setting.image_size, setting.image_size, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=(setting.batch, 1)).astype(np.float32)
    return x, y


def _flops(compiled) -> float | None:
    """FLOPs from XLA's cost analysis of a compiled computation (a dict, or a list of them)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


def _bce_mean(logits: jax.Array, labels: jax.Array) -> jax.Array:
    try:
        from nanlab.losses import sigmoid_binary_cross_entropy
    except ImportError:  # the losses module not landed: optax's is the same formula
        return optax.sigmoid_binary_cross_entropy(logits, labels).mean()
    return sigmoid_binary_cross_entropy(logits, labels, reduction="mean")


def nanlab_runner(setting: Setting, impl: str, library: str = "default") -> Runner:
    """nanlab's InceptionV3 (binary head), Adam, sigmoid BCE; one jitted, donated train step, its
    convolutions run by `library` (`nanlab.models.conv.LIBRARIES`), as is the inference program."""
    from nanlab.models.inception_v3 import InceptionV3

    dtype = jnp.bfloat16 if setting.dtype == "bfloat16" else jnp.float32
    model = InceptionV3(num_classes=1, dtype=dtype, conv_impl=impl)
    x_np, y_np = _batch(setting)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    variables = jax.jit(lambda k: model.init(k, x[:1], train=False))(jax.random.key(0))
    if conv_lib.resolve_impl(impl) == "tuned":
        from nanlab.models import conv_tuning

        start = time.perf_counter()
        table, fresh = conv_tuning.ensure_tuned_model(model, x, path=conv_tuning.default_path(), library=library)
        print(f"# {_nanlab_name(impl, library)} at {setting.image_size}x{setting.batch}: {fresh} of {len(table)} convolution "
              f"shapes timed now ({time.perf_counter() - start:.0f} s), the rest from the cache; choices "
              f"{dict(collections.Counter(table.values()))}", flush=True)
    tx = optax.adam(1e-3)
    state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))

    def train_step(state, x, y):
        params, batch_stats, opt_state = state

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
            )
            return _bce_mean(logits, y), updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    options = conv_lib.compiler_options(library)
    start = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=0, compiler_options=options).lower(state, x, y).compile()
    compile_s = time.perf_counter() - start
    infer = jax.jit(lambda v, x: model.apply(v, x, train=False), compiler_options=options).lower(variables, x).compile()
    box = {"state": state}

    def train() -> None:
        box["state"], loss = step(box["state"], x, y)
        loss.block_until_ready()

    def run_infer() -> None:
        params, batch_stats, _ = box["state"]
        np.asarray(infer({"params": params, "batch_stats": batch_stats}, x))

    return Runner(_nanlab_name(impl, library), train, run_infer, compile_s, _flops(step), _flops(infer),
                  step.as_text())


def _nanlab_name(impl: str, library: str) -> str:
    return f"nanlab[{impl}]" if library == "default" else f"nanlab[{impl}, {library}]"


def keras_runner(setting: Setting) -> Runner:
    """keras.applications.InceptionV3 on Keras 3's JAX backend, Adam, BCE from logits."""
    import keras

    if setting.dtype == "bfloat16":
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(0)
    model = keras.applications.InceptionV3(
        weights=None,
        classes=1,
        classifier_activation=None,
        input_shape=(setting.image_size, setting.image_size, 3),
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    x, y = _batch(setting)
    start = time.perf_counter()
    model.train_on_batch(x, y)  # traces and compiles, then runs one step
    compile_s = time.perf_counter() - start
    model.predict_on_batch(x)  # compiles the inference function
    return Runner(
        "keras-jax",
        lambda: model.train_on_batch(x, y),
        lambda: model.predict_on_batch(x),
        compile_s,
    )


def time_interleaved(runners: list[Runner], kind: str, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each runner's `kind` ("train"/"infer"), in interleaved rounds.

    Returns:
      {runner name: [seconds of round 0, round 1, ...]} (warm-up rounds dropped).
    """
    seconds: dict[str, list[float]] = {r.name: [] for r in runners}
    for round_ in range(warmup + steps):
        for runner in runners:
            fn = getattr(runner, kind)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if round_ >= warmup:
                seconds[runner.name].append(elapsed)
    return seconds


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """This machine's float32 matmul rate through JAX (best of `repeats` n x n products), GFLOP/s."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


PEERS = ("torch", "keras-tf")


def run_peer(peer: str, setting: Setting, steps: int, python: str, peer_allocator: str = "default") -> dict | None:
    """One peer in its own process (benchmarks/peer_models.py); None when its framework is missing.

    `peer_allocator` "default" runs it on its framework's own allocator (what its users get: this
    process's mimalloc preload is not passed on), "mimalloc" with mimalloc preloaded as nanlab's CLIs are.
    """
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_models.py")
    env = {k: v for k, v in allocator.without_preload(dict(os.environ)).items() if k not in ("XLA_FLAGS", "KERAS_BACKEND")}
    if peer_allocator == "mimalloc":
        env["LD_PRELOAD"] = str(allocator.mimalloc_library())
    done = subprocess.run([python, script, peer, "--image-size", str(setting.image_size), "--batch",
                           str(setting.batch), "--steps", str(steps)], capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 3 or not lines:
        reason = json.loads(lines[-1]).get("missing", "") if lines else done.stderr.strip().splitlines()[-1:]
        print(f"# skipped peer {peer}: {reason or 'no result'}", flush=True)
        return None
    return json.loads(lines[-1])


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of speed(numerator)/speed(denominator) = t_den/t_num of the same round."""
    return statistics.median(d / n for n, d in zip(numerator, denominator))


def benchmark_setting(setting: Setting, impls: list[str], with_keras: bool, steps: int, warmup: int,
                      peak: float, peers: list[str], peer_python: str,
                      libraries: tuple[str, ...] = ("default",), peer_allocator: str = "default") -> list[str]:
    """Builds the contestants, times them, runs the peers, and returns the markdown rows of this setting."""
    runners = [nanlab_runner(setting, impl, library) for impl in impls for library in libraries]
    if with_keras:
        runners.append(keras_runner(setting))
    # Keras's model is the same network: XLA's count for nanlab's step stands for both. Count
    # the plain "xla" program when there is one: "fast" skips taps that only see padding, so
    # its count is lower than the network's on small maps (75x75).
    counted = sorted((r for r in runners if r.train_flops), key=lambda r: r.name != "nanlab[xla]")
    train_flops = counted[0].train_flops if counted else None
    infer_flops = counted[0].infer_flops if counted else None
    load_before = os.getloadavg()[0]
    train = time_interleaved(runners, "train", steps, warmup)
    infer = time_interleaved(runners, "infer", steps, warmup)
    load_after = os.getloadavg()[0]
    baseline = runners[-1].name
    per_image = train_flops / setting.batch if train_flops else float("nan")

    def row(name, t_train, t_infer, train_ratio, infer_ratio, compile_s, load):
        gflops = (train_flops or float("nan")) / t_train / 1e9
        return (f"| {setting.image_size} | {setting.batch} | {setting.dtype} | {name} "
                f"| {setting.batch / t_train:.2f} | {setting.batch / t_infer:.2f} | {train_ratio} | {infer_ratio} "
                f"| {compile_s:.1f} | {per_image / 1e9:.1f} | {gflops:.1f} | {100 * gflops / peak:.0f}% | {load} |")

    rows, rates = [], {}
    for runner in runners:
        t_train = statistics.median(train[runner.name])
        t_infer = statistics.median(infer[runner.name])
        rates[runner.name] = (setting.batch / t_train, setting.batch / t_infer)
        rows.append(row(runner.name, t_train, t_infer, f"{paired_ratio(train[runner.name], train[baseline]):.2f}",
                        f"{paired_ratio(infer[runner.name], infer[baseline]):.2f}", runner.compile_s,
                        f"{load_before:.1f}-{load_after:.1f}"))
    for peer in peers:
        # Peers run after nanlab's rounds, in their own process: their ratios are of medians, not paired.
        result = run_peer(peer, setting, steps, peer_python, peer_allocator)
        if result is None:
            continue
        t_train, t_infer = result["train_median_s"], result["infer_median_s"]
        rates[result["peer"]] = (setting.batch / t_train, setting.batch / t_infer)
        base_train, base_infer = rates[baseline]
        rows.append(row(result["peer"], t_train, t_infer, f"{setting.batch / t_train / base_train:.2f}",
                        f"{setting.batch / t_infer / base_infer:.2f}", result["compile_s"],
                        f"{os.getloadavg()[0]:.1f}"))
    if infer_flops:
        rows.append(f"<!-- {setting.image_size}x{setting.batch}: inference {infer_flops / setting.batch / 1e9:.1f} GFLOP/image -->")
    ours = [name for name in rates if name.startswith("nanlab")]
    others = [name for name in rates if not name.startswith("nanlab")]
    for name in ours:
        for other in others:
            rows.append(f"<!-- {setting.image_size}x{setting.batch}: {name} / {other}: train "
                        f"{rates[name][0] / rates[other][0]:.2f}x, inference {rates[name][1] / rates[other][1]:.2f}x -->")
    return rows


TABLE_HEADER = (
    "| image | batch | dtype | model | train img/s | infer img/s | train ratio vs keras-jax | "
    "infer ratio vs keras-jax | compile s | train GFLOP/img | train GFLOP/s | share of matmul peak | load 1-min |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def settings_for(mode: str) -> list[Setting]:
    """The sizes of a mode: quick (smoke check), default (this CPU), full (a GPU)."""
    if mode == "quick":
        return [Setting(75, 4)]
    if mode == "full":
        return [Setting(299, 128, "bfloat16"), Setting(75, 512, "bfloat16")]
    return [Setting(299, 8), Setting(75, 32)]


def environment_line() -> str:
    """jax version and backend, device, XLA flags, CPU count, load: what the figures depend on."""
    return (
        f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, {os.cpu_count()} CPUs, "
        f"{platform.machine()}, allocator {allocator.current()}, loadavg {tuple(round(v, 1) for v in os.getloadavg())}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )


def run_conv_shapes(image_size: int, batch: int, formulations: list[str], repeats: int) -> None:
    """Prints the per-convolution timing table (see module docstring)."""
    counts = collections.Counter(inception_v3_conv_shapes(image_size))
    print(f"# {environment_line()}; image {image_size}, batch {batch}", flush=True)
    totals: collections.Counter = collections.Counter()
    for shape, count in counts.items():
        gflop = conv_flops(shape, batch) / 1e9
        times = time_shape(shape, batch, formulations, repeats)
        for key, seconds in times.items():
            totals[key] += count * seconds
        rates = " ".join(f"{key}={gflop / s:6.1f}" for key, s in times.items())
        print(
            f"{shape.block:14s} x{count} {shape.height:3d}x{shape.width:<3d} {shape.cin:4d}->{shape.cout:<4d} "
            f"{shape.kh}x{shape.kw} s{shape.stride} {shape.padding:5s} {gflop:7.3f} GFLOP | GFLOP/s {rates}",
            flush=True,
        )
    print("# seconds weighted by occurrences: " + " ".join(f"{k}={v:.3f}" for k, v in sorted(totals.items())))


# ---------------------------------------------------------------------------------------------
# Where a train step's time goes: a jax.profiler trace of the steps, each XLA thunk event mapped
# to its HLO instruction and classed by what the instruction computes.

OP_CLASSES = ("convolution", "matmul (dot)", "max-pool (reduce-window, its gradient)", "reduction",
              "iota (index maps of the max-pool gradient)", "layout (copy, transpose, slice, pad, concat)",
              "elementwise", "other")
_LAYOUT_OPS = {"copy", "transpose", "slice", "dynamic-slice", "pad", "concatenate", "bitcast", "reshape",
               "broadcast", "parameter", "constant", "tuple", "get-tuple-element", "reverse",
               "dynamic-update-slice", "copy-start", "copy-done"}


def _hlo_instructions(hlo_text: str) -> tuple[dict[str, list[tuple[str, str, str]]], str]:
    """{computation: [(instruction, opcode, rest of line)]} of an HLO module's text, and the entry's name."""
    computations: dict[str, list[tuple[str, str, str]]] = {}
    current, entry = None, ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            header = line.split()
            is_entry = header[0] == "ENTRY"
            current = header[1 if is_entry else 0].lstrip("%")
            entry = current if is_entry else entry
            computations[current] = []
            continue
        if current is None or " = " not in line:
            continue
        name, _, rest = line.strip().removeprefix("ROOT ").partition(" = ")
        if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
            depth, end = 0, 0
            for end, char in enumerate(rest):
                depth += char == "("
                depth -= char == ")"
                if depth == 0:
                    break
            rest = rest[end + 1:].lstrip()
        else:
            rest = rest.partition(" ")[2]
        opcode = rest.partition("(")[0]
        computations[current].append((name.lstrip("%"), opcode, rest))
    return computations, entry


def hlo_op_classes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op class (`OP_CLASSES`) for every instruction of a compiled module."""
    computations, _ = _hlo_instructions(hlo_text)

    def opcodes_of(computation: str, seen: frozenset = frozenset()) -> set[str]:
        found = set()
        for _, opcode, rest in computations.get(computation, ()):
            found.add(opcode)
            for called in re.findall(r"(?:calls|to_apply)=%?([\w.-]+)", rest):
                if called not in seen:
                    found |= opcodes_of(called, seen | {computation})
        return found

    def op_class(opcode: str, rest: str) -> str:
        ops = {opcode}
        if opcode == "fusion":
            called = re.search(r"calls=%?([\w.-]+)", rest)
            ops = opcodes_of(called.group(1)) if called else ops
        for marker, label in (("convolution", OP_CLASSES[0]), ("dot", OP_CLASSES[1]),
                              ("reduce-window", OP_CLASSES[2]), ("select-and-scatter", OP_CLASSES[2]),
                              ("reduce", OP_CLASSES[3]), ("iota", OP_CLASSES[4])):
            if marker in ops:
                return label
        return OP_CLASSES[5] if ops <= _LAYOUT_OPS else OP_CLASSES[6]

    return {name: op_class(opcode, rest) for instructions in computations.values()
            for name, opcode, rest in instructions}


def profile_by_op_class(run: Callable[[], None], hlo_text: str, steps: int = 5) -> dict[str, float]:
    """Thread-milliseconds per step by op class: `steps` calls of `run` under `jax.profiler.trace`.

    The times are summed over XLA's threads (a kernel split over 2 cores counts twice), so they
    give each class's share of the work, not of the wall time.
    """
    import glob
    import tempfile

    from jax.profiler import ProfileData

    classes = hlo_op_classes(hlo_text)
    totals = collections.Counter({label: 0.0 for label in OP_CLASSES})
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory):
            for _ in range(steps):
                run()
        data = ProfileData.from_file(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[0])
        for plane in data.planes:
            for line in plane.lines:
                if not line.name.startswith("tf_XLA"):
                    continue  # the Python thread's events are the host's, not XLA's kernels
                for event in line.events:
                    if event.name in classes:  # executor and thread-pool events are containers, not work
                        totals[classes[event.name]] += event.duration_ns / 1e6 / steps
    return dict(totals)


def print_profile(name: str, setting: "Setting", totals: dict[str, float]) -> None:
    whole = sum(totals.values()) or float("nan")
    print(f"\n## Profile of {name}'s train step at {setting.image_size}x{setting.batch} ({setting.dtype}): "
          "thread-ms per step by op class\n")
    print("| op class | thread-ms / step | share |\n|---|---:|---:|")
    for label, ms in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"| {label} | {ms:.1f} | {ms / whole:.0%} |")
    print(f"| all XLA kernels | {whole:.1f} | 100% |", flush=True)


def max_pool_ablation(setting: "Setting", impl: str, steps: int, warmup: int) -> str:
    """nanlab's train step as is (max pools through `nanlab.models.pooling.max_pool`) against the same
    step with flax's max_pool (XLA's select-and-gather gradient), interleaved; one result line."""
    import flax.linen as nn

    from nanlab.models import pooling

    ours = nanlab_runner(setting, impl)
    ours.name = "pooling.max_pool"
    own = pooling.max_pool
    pooling.max_pool = lambda x, window, strides: nn.max_pool(x, window, strides=strides, padding="VALID")
    try:  # the step traces (and compiles) inside nanlab_runner, while the stand-in is in place
        theirs = nanlab_runner(setting, impl)
    finally:
        pooling.max_pool = own
    theirs.name = "flax max_pool"
    times = time_interleaved([ours, theirs], "train", steps, warmup)
    ratios = [b / a for a, b in zip(times[ours.name], times[theirs.name])]
    return (f"| {setting.image_size} | {setting.batch} | {impl} | {statistics.median(times[ours.name]):.4f} | "
            f"{statistics.median(times[theirs.name]):.4f} | {statistics.median(ratios):.3f} | "
            f"{min(ratios):.3f}-{max(ratios):.3f} |")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a small smoke check (75x75, batch 4, 3 steps)")
    mode.add_argument("--full", action="store_true", help="GPU sizes: bf16, batch 128 at 299 and 512 at 75")
    mode.add_argument("--conv-shapes", action="store_true", help="time each convolution shape instead")
    mode.add_argument("--profile", action="store_true",
                      help="instead: where nanlab's train step spends its time, by op class (jax.profiler)")
    mode.add_argument("--max-pool-ablation", action="store_true",
                      help="instead: nanlab's train step with its max-pool gradient against XLA's, interleaved")
    parser.add_argument("--steps", type=int, default=None, help="timed rounds (default 7; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds after compilation")
    parser.add_argument("--impls", default="tuned,fast,xla", help="nanlab conv_impl values to run")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated peers run in their own processes ({', '.join(PEERS)}; 'none')")
    parser.add_argument("--peer-python", default=sys.executable,
                        help="the interpreter with the peers installed (default: this one)")
    parser.add_argument("--no-keras", action="store_true", help="skip Keras (nanlab only)")
    parser.add_argument("--image-size", type=int, default=None, help="one setting: this image size")
    parser.add_argument("--batch", type=int, default=None, help="one setting: this batch size")
    parser.add_argument("--formulations", default="xla,im2col,taps,swap", help="--conv-shapes: kernel grads")
    parser.add_argument("--conv-libraries", default="default",
                        help=f"nanlab rows per convolution library too: {', '.join(conv_lib.LIBRARIES)} (comma-separated)")
    parser.add_argument("--allocator", default="mimalloc", choices=allocator.ALLOCATORS,
                        help="the allocator of this process (nanlab's rows and Keras-JAX); the CLIs run on mimalloc")
    parser.add_argument("--peer-allocator", default="default", choices=("default", "mimalloc"),
                        help="the peers' allocator: their frameworks' own (default) or mimalloc preloaded")
    args = parser.parse_args(argv)
    if "mimalloc" in (args.allocator, args.peer_allocator) and allocator.mimalloc_library() is None:
        return _fail("mimalloc is not installed (the cmeel-mimalloc wheel, Linux x86_64): pass --allocator system")
    os.environ[allocator.ALLOCATOR_ENV] = args.allocator
    allocator.rerun_with_mimalloc()  # the same command again, on mimalloc, unless --allocator system

    steps = args.steps if args.steps is not None else (3 if args.quick else 7)
    if steps < 1:
        return _fail(f"--steps {steps}: need at least 1 timed round")
    if args.warmup < 0:
        return _fail(f"--warmup {args.warmup}: must be >= 0")
    for name, value in (("--image-size", args.image_size), ("--batch", args.batch)):
        if value is not None and value < 1:
            return _fail(f"{name} {value}: must be a positive integer")
    if args.image_size is not None and args.image_size < 75:
        return _fail(f"--image-size {args.image_size}: InceptionV3 needs >= 75")
    impls = [i for i in args.impls.split(",") if i]
    for impl in impls:
        if impl not in conv_lib.IMPLS:
            return _fail(f"--impls: unknown {impl!r}; choose from {', '.join(conv_lib.IMPLS)}")
    libraries = tuple(name for name in args.conv_libraries.split(",") if name)
    for name in libraries or ("",):
        if name not in conv_lib.LIBRARIES:
            return _fail(f"--conv-libraries: unknown {name!r}; choose from {', '.join(conv_lib.LIBRARIES)}")
    formulations = args.formulations.split(",")
    for name in formulations:
        if name not in conv_lib.KERNEL_GRADS:
            return _fail(f"--formulations: unknown {name!r}; choose from {', '.join(conv_lib.KERNEL_GRADS)}")

    if args.conv_shapes:
        run_conv_shapes(args.image_size or 299, args.batch or 8, formulations, max(steps // 2, 1))
        return 0
    settings = settings_for("quick" if args.quick else "full" if args.full else "default")
    if args.image_size or args.batch:
        base = settings[0]
        settings = [dataclasses.replace(base, image_size=args.image_size or base.image_size, batch=args.batch or base.batch)]
    if not impls and args.no_keras:
        return _fail("--impls is empty and --no-keras: nothing to run")
    peers = [p for p in args.peers.split(",") if p and p != "none"]
    for peer in peers:
        if peer not in PEERS:
            return _fail(f"--peers: unknown {peer!r}; choose from {', '.join(PEERS)} or none")

    command = "python benchmarks/bench_model.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"# {command.strip()}")
    print(f"# {environment_line()}")
    if args.max_pool_ablation:
        print("| image | batch | impl | s/step, pooling.max_pool | s/step, flax max_pool | speed-up (median of "
              "rounds) | range |\n|---|---|---|---:|---:|---:|---|")
        for setting in settings:
            print(max_pool_ablation(setting, impls[0] if impls else "fast", steps, args.warmup), flush=True)
        return 0
    if args.profile:
        for setting in settings:
            for impl, library in ((i, lib) for i in impls for lib in libraries):
                runner = nanlab_runner(setting, impl, library)
                for _ in range(1 + args.warmup):
                    runner.train()
                print_profile(runner.name, setting, profile_by_op_class(runner.train, runner.train_hlo, steps))
        return 0
    peak = matmul_peak_gflops()
    print(f"# float32 matmul peak of this machine through JAX (2048^3, best of 10): {peak:.1f} GFLOP/s")
    print(f"# median of {steps} interleaved rounds after {args.warmup} warm-up; ratios: median per-round "
          f"speed ratio against the last nanlab-process row of the setting "
          f"({'keras-jax' if not args.no_keras else impls[-1]}); peers: ratio of medians")
    print(TABLE_HEADER, flush=True)
    for setting in settings:
        for row in benchmark_setting(setting, impls, not args.no_keras, steps, args.warmup, peak, peers,
                                     args.peer_python, libraries, args.peer_allocator):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
