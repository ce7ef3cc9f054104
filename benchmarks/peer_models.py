"""The peers of bench_model.py: InceptionV3 training and inference in PyTorch and in Keras 3 on TensorFlow.

Run by `benchmarks/bench_model.py`, one process per peer (their thread pools must not compete with
JAX's or each other's); by hand:

    python benchmarks/peer_models.py torch --image-size 299 --batch 8 --steps 7
    python benchmarks/peer_models.py keras-tf --image-size 75 --batch 32 --steps 7

The same network and task as nanlab's contestant: InceptionV3 without its auxiliary head, one
logit, sigmoid binary cross-entropy from logits, Adam at 1e-3, random normal images and 0/1 labels.
Prints one JSON line: the peer's name and version, compile (first-step) seconds, and the median
seconds of `--steps` train and inference calls after one warm-up call each. Exits 3 when the peer's
framework is not installed (bench_model says it skipped it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

MISSING = 3


def _batch(image_size: int, batch: int, channels_last: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=(batch, 1)).astype(np.float32)
    return (x if channels_last else np.ascontiguousarray(x.transpose(0, 3, 1, 2))), y


def _timed(fn, steps: int) -> list[float]:
    fn()  # warm-up
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def run_torch(image_size: int, batch: int, steps: int) -> dict:
    import torch
    import torchvision

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True, num_classes=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    x_np, y_np = _batch(image_size, batch, channels_last=False)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        float(loss)

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(x).numpy()

    start = time.perf_counter()
    train()
    compile_s = time.perf_counter() - start
    return {"peer": f"pytorch {torch.__version__.split('+')[0]}", "compile_s": compile_s,
            "train_s": _timed(train, steps), "infer_s": _timed(infer, steps)}


def run_keras_tf(image_size: int, batch: int, steps: int) -> dict:
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    model = keras.applications.InceptionV3(weights=None, classes=1, classifier_activation=None,
                                           input_shape=(image_size, image_size, 3))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.BinaryCrossentropy(from_logits=True))
    x, y = _batch(image_size, batch, channels_last=True)
    start = time.perf_counter()
    model.train_on_batch(x, y)  # traces and compiles, then runs one step
    compile_s = time.perf_counter() - start
    return {"peer": f"keras {keras.__version__} on tensorflow {tf.__version__}", "compile_s": compile_s,
            "train_s": _timed(lambda: model.train_on_batch(x, y), steps),
            "infer_s": _timed(lambda: model.predict_on_batch(x), steps)}


PEERS = {"torch": run_torch, "keras-tf": run_keras_tf}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=7)
    args = parser.parse_args(argv)
    try:
        result = PEERS[args.peer](args.image_size, args.batch, args.steps)
    except ImportError as error:
        print(json.dumps({"peer": args.peer, "missing": str(error)}))
        return MISSING
    result.update({
        "train_median_s": statistics.median(result["train_s"]),
        "infer_median_s": statistics.median(result["infer_s"]),
    })
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
