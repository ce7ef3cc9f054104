"""Throughput of the streamed input pipeline (nanlab.streaming) against the train step it feeds.

Run from the repository root:

    .venv/bin/python benchmarks/bench_data.py                 # 96 images per format, workers 1..cores
    .venv/bin/python benchmarks/bench_data.py --quick         # a smoke check (~1 minute)
    .venv/bin/python benchmarks/bench_data.py --no-train-step # skip compiling the model
    .venv/bin/python benchmarks/bench_data.py --quick --feed-only  # host batch vs device step only

One invocation:

1. writes synthetic photos (smooth gradients, shapes and sensor-like noise, `--source-size`,
   default 500x375, about an ImageNet photo) as JPEG (quality 90) and PNG into a temporary
   folder, two classes, and packs each folder into an ArrayRecord file;
2. per worker: decodes + resizes every image in this process, one thread, to 299 and to 75,
   from the folder and from the ArrayRecord file: images/s of one worker (best of `--rounds`);
3. scaling: streams training batches through the Grain pipeline with 1..N worker processes
   (`--max-workers`, default the core count) and reports images/s after the first batch (worker
   start-up excluded) -- on a machine with N cores the main process shares them;
4. the consumer: the cpu preset's train step (`nanlab.config.TrainConfig()`'s model, image size
   and batch; Adam; uint8 batches normalized inside the jitted step), images/s over
   `--train-steps` steps after compilation.

5. feeding the device: the train CLI's own feed (`nanlab.train`'s `_Feed`, a streamed JPEG folder)
   and loop step on one run: host batch time (the next decoded batch, `--feed-workers`
   processes; 0 = decoded in this process) vs device step time (placed batch, step blocked), and
   the loop's time per step without prefetch and with `--prefetch` 2 (the batch of step s+1
   prepared and placed while step s runs: per step about max(host, device) instead of their sum).
   `--quick` uses small_cnn here (seconds to compile), otherwise the cpu preset's model.

It prints a markdown report: per-worker rates, the scaling, the train step's rate, whether one
worker keeps up, and the projection for a 16-core host (per-worker rate x 16, assuming linear
scaling, which step 3 checks only up to this machine's cores).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nanlab.machine import cpu_model


def synthetic_photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like RGB image: a colour gradient, a few filled shapes, mild per-pixel noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-0.3, 0.3, size=(2, 3))
    pixels = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    noisy = np.asarray(image, np.float32) + rng.normal(0, 6, size=(height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_folder(root: Path, fmt: str, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(count):
        class_dir = root / ("a" if i % 2 == 0 else "b")
        class_dir.mkdir(parents=True, exist_ok=True)
        image = synthetic_photo(rng, *size)
        if fmt == "jpeg":
            image.save(class_dir / f"{i:05d}.jpg", quality=90)
        else:
            image.save(class_dir / f"{i:05d}.png")
    return root


def per_worker_rate(source, rounds: int) -> float:
    """Images/s decoding every image of `source` in this process, one thread (best round)."""
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(len(source)):
            source.image(i)
        best = max(best, len(source) / (time.perf_counter() - start))
    return best


def pipeline_rate(spec: Path, image_size: int, batch: int, workers: int, num_batches: int) -> float:
    """Images/s of training batches from the Grain pipeline after its first batch arrived."""
    from nanlab import streaming

    pipeline = streaming.open_stream(str(spec), image_size, seed=0, batch_size=batch, val_fraction=0.1,
                                     workers=workers)
    with pipeline.batches(0) as batches:
        next(batches)  # worker start-up and the first batch are not throughput
        start = time.perf_counter()
        for _ in range(num_batches):
            next(batches)
        return num_batches * batch / (time.perf_counter() - start)


def train_step_rate(steps: int) -> tuple[float, float, dict]:
    """(images/s, compile seconds, settings) of the cpu preset's train step on uint8 batches."""
    import jax
    import jax.numpy as jnp

    from nanlab import losses, optim
    from nanlab import step as step_lib
    from nanlab.config import TrainConfig
    from nanlab.models.inception_v3 import InceptionV3
    from nanlab.streaming import normalize_on_device

    config = TrainConfig()
    model = InceptionV3(num_classes=1, width_multiplier=config.width_multiplier, dtype=jnp.dtype(config.dtype))
    schedule = optim.make_schedule(config.schedule, config.lr, config.steps, config.warmup_steps)
    tx = optim.make_tx(config.clip, config.optimizer, schedule, config.weight_decay, config.skip_nonfinite)
    train_step = step_lib.make_train_step(model, getattr(losses, config.loss), tx, schedule=schedule)
    stats = {"mode": "standardize", "mean": [120.0] * 3, "std": [60.0] * 3}

    def step(state, batch):
        x, y = batch
        return train_step(state, (normalize_on_device(x, "standardize", stats), y))

    shape = (config.batch_size, config.image_size, config.image_size, 3)
    state = jax.jit(lambda x: step_lib.create_train_state(model, tx, x, config.seed))(jnp.zeros(shape, jnp.float32))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, size=shape, dtype=np.uint8))
    y = jnp.asarray((rng.random((config.batch_size, 1)) < 0.5).astype(np.float32))
    jitted = jax.jit(step, donate_argnums=(0,))
    start = time.perf_counter()
    state, out = jitted(state, (x, y))
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, out = jitted(state, (x, y))
        jax.block_until_ready(out)
        times.append(time.perf_counter() - start)
    settings = {"batch": config.batch_size, "image_size": config.image_size, "width": config.width_multiplier,
                "optimizer": config.optimizer, "median_step_ms": 1e3 * statistics.median(times)}
    return config.batch_size / statistics.median(times), compile_s, settings


def feed_vs_step(spec: Path, model: str, batch: int, steps: int, workers: int) -> dict[str, float]:
    """Host batch time vs device step time of the train CLI's feed and loop step, in one process,
    and the loop's time per step with prefetch depth 0 and 2 (milliseconds, medians / means)."""
    import jax
    import jax.numpy as jnp

    from nanlab import config as config_lib
    from nanlab import train
    from nanlab.prefetch import Prefetcher

    config = config_lib.make_config({"data": str(spec), "model": model, "batch_size": batch, "steps": steps + 1,
                                     "data_workers": workers, "stats_every": 0, "progress": False,
                                     "plots": False}, backend="cpu")
    pipeline = train._open_stream(config)
    parts = train._build_parts(config, pipeline)
    fns = train._step_fns(config, parts)
    state = parts.placer.state(parts.init(parts.sample_x))
    ok = parts.placer.state(jnp.bool_(True))
    out: dict[str, float] = {}
    with pipeline.batches(0) as stream:
        next(stream)  # worker start-up is not batch time
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            next(stream)
            times.append(time.perf_counter() - start)
    out["host_batch_ms"] = 1e3 * statistics.median(times)
    batch0 = parts.feed.batch_of(0)
    state, stats, ok = fns.loop_step(state, batch0, ok)  # compiles
    jax.block_until_ready(stats)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, stats, ok = fns.loop_step(state, batch0, ok)
        jax.block_until_ready(stats)
        times.append(time.perf_counter() - start)
    out["device_step_ms"] = 1e3 * statistics.median(times)
    for depth in (0, 2):
        with pipeline.batches(0) as stream, \
                Prefetcher((next(stream) for _ in range(steps + 1)), parts.feed.place, depth) as batches:
            state, stats, ok = fns.loop_step(state, next(batches), ok)  # worker start-up excluded
            jax.block_until_ready(stats)
            start = time.perf_counter()
            for _ in range(steps):
                state, stats, ok = fns.loop_step(state, next(batches), ok)
            jax.block_until_ready(stats)
            out[f"loop_step_ms_prefetch_{depth}"] = 1e3 * (time.perf_counter() - start) / steps
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="images per format (default 96)")
    parser.add_argument("--source-size", default="500x375", help="WxH of the stored images (default 500x375)")
    parser.add_argument("--sizes", default="299,75", help="decoded sizes (default 299,75)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the per-worker pass (best counts)")
    parser.add_argument("--max-workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, default=12, help="batches timed per scaling run (batch 16)")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--no-train-step", action="store_true", help="skip the model (no compilation)")
    parser.add_argument("--feed-workers", type=int, default=0,
                        help="decode processes in the feed section (default 0: decoded in this process)")
    parser.add_argument("--feed-only", action="store_true", help="run only the feed section (5.)")
    parser.add_argument("--quick", action="store_true",
                        help="32 images, 1 round, 4 batches, 5 steps; small_cnn in the feed section")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.rounds, args.batches, args.train_steps = 32, 1, 4, 5
    width, height = (int(v) for v in args.source_size.split("x"))
    sizes = [int(s) for s in args.sizes.split(",")]

    from nanlab import streaming
    from nanlab.streaming import ArrayRecordSource, FolderSource

    print(f"# bench_data: `{' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}`\n")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}; "
          f"{args.images} synthetic {width}x{height} photos per format\n")
    work = Path(tempfile.mkdtemp(prefix="nanlab-bench-data-"))
    try:
        folders, records = {}, {}
        for fmt in ("jpeg",) if args.feed_only else ("jpeg", "png"):
            folders[fmt] = write_folder(work / fmt, fmt, args.images, (width, height))
            records[fmt] = work / f"{fmt}.array_record"
            streaming.convert_folder(folders[fmt], records[fmt])
            mean_kib = sum(p.stat().st_size for p in folders[fmt].rglob("*.*")) / args.images / 1024
            print(f"- {fmt}: {mean_kib:.0f} KiB per file")
        if not args.no_train_step:
            model = "small_cnn" if args.quick else "inception_v3"
            steps = 8 if args.quick else args.train_steps
            feed = feed_vs_step(folders["jpeg"], model, 16, steps, args.feed_workers)
            print(f"\n## Feeding the device: {model}, JPEG folder at 75, batch 16, {args.feed_workers} decode "
                  f"worker(s), {steps} steps\n")
            print("| host batch (ms) | device step (ms) | loop step, no prefetch (ms) | loop step, prefetch 2 (ms) |")
            print("| ---: | ---: | ---: | ---: |")
            print(f"| {feed['host_batch_ms']:.1f} | {feed['device_step_ms']:.1f} | "
                  f"{feed['loop_step_ms_prefetch_0']:.1f} | {feed['loop_step_ms_prefetch_2']:.1f} |")
        if args.feed_only:
            return 0
        print("\n## Per worker: decode + resize, one process, one thread (images/s)\n")
        print("| format | size | folder | ArrayRecord |")
        print("| --- | ---: | ---: | ---: |")
        rates = {}
        for fmt in ("jpeg", "png"):
            for size in sizes:
                folder_rate = per_worker_rate(FolderSource.open(folders[fmt], size), args.rounds)
                record_rate = per_worker_rate(ArrayRecordSource.open(records[fmt], size), args.rounds)
                rates[fmt, size] = folder_rate
                print(f"| {fmt} | {size} | {folder_rate:.0f} | {record_rate:.0f} |")
        print("\n## Scaling: Grain pipeline, batch 16, images/s after the first batch\n")
        worker_counts = list(range(1, max(1, args.max_workers) + 1))
        print("| source | size | " + " | ".join(f"{w} worker{'s' if w > 1 else ''}" for w in worker_counts) + " |")
        print("| --- | ---: |" + " ---: |" * len(worker_counts))
        for fmt in ("jpeg", "png"):
            for size in sizes:
                figures = [pipeline_rate(records[fmt], size, 16, w, args.batches) for w in worker_counts]
                print(f"| {fmt} ArrayRecord | {size} | " + " | ".join(f"{f:.0f}" for f in figures) + " |")
        if not args.no_train_step:
            rate, compile_s, settings = train_step_rate(args.train_steps)
            print("\n## The consumer: the cpu preset's train step\n")
            print(f"InceptionV3 width {settings['width']}, {settings['image_size']}x{settings['image_size']}, batch "
                  f"{settings['batch']}, {settings['optimizer']}, uint8 in, normalized in the step: median step "
                  f"{settings['median_step_ms']:.1f} ms = **{rate:.0f} images/s** (compiled in {compile_s:.0f} s)\n")
            one_worker = rates["jpeg", settings["image_size"]] if ("jpeg", settings["image_size"]) in rates else None
            if one_worker is not None:
                verdict = "keeps up" if one_worker >= rate else "does NOT keep up"
                print(f"One worker (JPEG at {settings['image_size']}: {one_worker:.0f} images/s) {verdict} with the "
                      f"train step ({rate:.0f} images/s): {one_worker / rate:.1f}x.\n")
        print("\n## 16-core projection (per-worker rate x 16; assumes linear scaling with processes)\n")
        for (fmt, size), value in sorted(rates.items()):
            print(f"- {fmt} at {size}: {value:.0f} x 16 = {16 * value:.0f} images/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
