"""Keras 3 `keras.applications.InceptionV3` weights -> Flax variables of nanlab's InceptionV3.

Reads a Keras 3 `.keras` archive (a zip holding `model.weights.h5`) or a `.weights.h5`
file (`model.save_weights`) with h5py only; Keras itself is not needed.

How Keras 3 lays the file out (keras/src/saving/saving_lib.py): a Functional model stores
its layers under `layers/<key>/vars/<i>`, where <key> is the snake-cased class name made
unique in the order of `model.layers` (`conv2d`, `conv2d_1`, ..., `batch_normalization`,
..., `dense`), not the layer's own name. `model.layers` of a Functional model is its
topological order by depth (keras/src/ops/function.py), which for InceptionV3's branches
differs from the order in which `inception_v3.py` creates the layers. `KERAS_FILE_ORDER`
records that permutation: the Conv2D stored as `conv2d_<k>` is the
`KERAS_FILE_ORDER[k]`-th convolution created, and the same holds for
`batch_normalization_<k>` (every BatchNorm directly follows its convolution). Keras's own
loader depends on the same order, so it is as stable as the files themselves; the import
test proves it against Keras on random weights.

Variables per layer: Conv2D `vars/0` = kernel (kh, kw, cin, cout), the same layout as
flax; BatchNormalization with scale=False `vars/0..2` = beta, moving_mean, moving_variance
-> params `bias`, batch_stats `mean`, `var`; Dense `vars/0..1` = kernel, bias.

Without top (a file of `InceptionV3(include_top=False)`, or `include_top=False` asked for a
file with a top): the variables are for `InceptionV3(include_top=False)`, which returns the
globally averaged 2048 features, as Keras's `pooling="avg"` does.
"""

from __future__ import annotations

import functools
import io
import os
import re
import zipfile
from typing import Any

import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np

from nanlab.models.inception_v3 import ConvBN, InceptionV3

__all__ = ["KERAS_FILE_ORDER", "load_keras_inception_v3"]

# KERAS_FILE_ORDER[k]: creation index (order in keras' inception_v3.py, which is also the
# order nanlab's InceptionV3 builds its ConvBN modules) of the layer stored as conv2d_<k> /
# batch_normalization_<k>. Read off Keras 3.15 files, whose groups carry the layers'
# auto-generated names (conv2d_<creation index>) as metadata.
KERAS_FILE_ORDER: tuple[int, ...] = (
    0, 1, 2, 3, 4, 8, 6, 9, 5, 7, 10, 11, 15, 13, 16, 12, 14, 17, 18, 22, 20, 23, 19, 21,
    24, 25, 27, 28, 26, 29, 34, 35, 31, 36, 32, 37, 30, 33, 38, 39, 44, 45, 41, 46, 42, 47,
    40, 43, 48, 49, 54, 55, 51, 56, 52, 57, 50, 53, 58, 59, 64, 65, 61, 66, 62, 67, 60, 63,
    68, 69, 72, 73, 70, 74, 71, 75, 80, 77, 81, 78, 79, 82, 83, 76, 84, 89, 86, 90, 87, 88,
    91, 92, 85, 93,
)
NUM_CONVS = len(KERAS_FILE_ORDER)
_KEY = re.compile(r"(conv2d|batch_normalization|dense)(?:_(\d+))?")


def conv_paths(model: InceptionV3) -> list[tuple[str, ...]]:
    """Module paths of the model's ConvBN layers, in the order they are built.

    Args:
      model: an InceptionV3 (its knobs other than aux_logits do not change the order).

    Returns:
      e.g. [('Conv2d_1a_3x3',), ..., ('Mixed_5b', 'Branch_0_Conv2d_0a_1x1'), ...].
    """
    paths: list[tuple[str, ...]] = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, ConvBN) and context.method_name == "__call__":
            path = tuple(context.module.scope.path)
            if path not in paths:
                paths.append(path)
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return paths


@functools.lru_cache(maxsize=8)
def _layout(num_classes: int, include_top: bool) -> tuple[Any, list[tuple[str, ...]]]:
    """The abstract variables and ConvBN paths of the matching model (traced once, cached)."""
    model = InceptionV3(num_classes=num_classes, include_top=include_top)
    abstract = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32),
    )
    return abstract, conv_paths(model)


def _open_weights(path: str | os.PathLike) -> h5py.File:
    """Opens the weights HDF5 of a `.keras` archive or a `.weights.h5` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Keras weights file {path!r} does not exist")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "model.weights.h5" not in archive.namelist():
                raise ValueError(f"{path!r} is a zip but holds no model.weights.h5 (not a .keras file)")
            data = archive.read("model.weights.h5")
        return h5py.File(io.BytesIO(data), "r")
    if not h5py.is_hdf5(path):
        raise ValueError(f"{path!r} is neither a .keras archive nor an HDF5 weights file")
    return h5py.File(path, "r")


def _read_layers(weights: h5py.File, path: str) -> dict[str, list[np.ndarray]]:
    """{layer key: [vars/0, vars/1, ...]} for every layer of the file that holds variables."""
    if "layers" not in weights:
        raise ValueError(
            f"{path!r} has no 'layers' group: not a Keras 3 weights file of a Functional model "
            "(legacy Keras 2 .h5 files are not supported)"
        )
    layers = {}
    for key, group in weights["layers"].items():
        variables = group.get("vars")
        if variables is None or len(variables) == 0:
            continue
        layers[key] = [np.asarray(variables[str(i)]) for i in range(len(variables))]
    return layers


def _key_index(key: str) -> tuple[str, int] | None:
    match = _KEY.fullmatch(key)
    if match is None:
        return None
    return match.group(1), int(match.group(2) or 0)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(tree, dict) or name not in tree:
            return None
        tree = tree[name]
    return tree


def load_keras_inception_v3(
    path: str | os.PathLike, *, include_top: bool | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads Keras InceptionV3 weights into variables of nanlab's InceptionV3.

    Args:
      path: a Keras 3 `.keras` archive or `.weights.h5` file of
        `keras.applications.InceptionV3` (any `classes`, with or without top).
      include_top: None takes the file's choice; False drops a file's dense head (the model
        then returns pooled features); True requires the file to have one.

    Returns:
      (variables, config): variables {'params', 'batch_stats'} of float32 arrays for
      `InceptionV3(**config)`, config = {'num_classes': K, 'include_top': bool}, K the
      width of the file's dense head (1 when the file has none).

    Raises:
      FileNotFoundError: no such file.
      ValueError: not a Keras weights file, or one that does not match InceptionV3: the
        message names the missing, unexpected and mis-shaped layers.
    """
    with _open_weights(path) as weights:
        layers = _read_layers(weights, os.fspath(path))

    problems: list[str] = []
    by_kind: dict[str, dict[int, str]] = {"conv2d": {}, "batch_normalization": {}, "dense": {}}
    unexpected = []
    for key in sorted(layers):
        parsed = _key_index(key)
        if parsed is None or (parsed[0] == "dense" and parsed[1] != 0) or parsed[1] >= NUM_CONVS:
            unexpected.append(key)
        else:
            by_kind[parsed[0]][parsed[1]] = key
    if unexpected:
        problems.append("unexpected layers: " + ", ".join(unexpected))
    missing = [
        f"{kind}_{i}" if i else kind
        for kind in ("conv2d", "batch_normalization")
        for i in range(NUM_CONVS)
        if i not in by_kind[kind]
    ]
    if missing:
        problems.append("missing layers: " + ", ".join(missing))

    file_has_top = 0 in by_kind["dense"]
    if include_top is None:
        include_top = file_has_top
    if include_top and not file_has_top:
        problems.append("include_top=True but the file has no 'dense' (predictions) layer")
    num_classes = 1
    if file_has_top:
        dense = layers["dense"]
        if len(dense) != 2 or dense[0].ndim != 2 or dense[1].shape != dense[0].shape[1:]:
            problems.append(f"layer dense: expected kernel (2048, K) and bias (K,), got {[v.shape for v in dense]}")
        else:
            num_classes = int(dense[0].shape[1])
    if problems:
        raise ValueError(f"{os.fspath(path)!r} does not match keras.applications.InceptionV3: " + "; ".join(problems))

    abstract, paths = _layout(num_classes, bool(include_top))
    params: dict[str, Any] = {}
    batch_stats: dict[str, Any] = {}

    def put(tree, expected_tree, target, value, key):
        expected = _get(expected_tree, target)
        if expected is None or tuple(expected.shape) != value.shape:
            shape = None if expected is None else tuple(expected.shape)
            problems.append(f"layer {key}: shape {value.shape} where {'/'.join(target)} needs {shape}")
        else:
            _set(tree, target, jnp.asarray(value, jnp.float32))

    for k, created in enumerate(KERAS_FILE_ORDER):
        module = paths[created]
        conv_key, bn_key = by_kind["conv2d"][k], by_kind["batch_normalization"][k]
        conv, bn = layers[conv_key], layers[bn_key]
        if len(conv) != 1:
            problems.append(f"layer {conv_key}: {len(conv)} variables, expected 1 (kernel, no bias)")
        else:
            put(params, abstract["params"], module + ("Conv", "kernel"), conv[0], conv_key)
        if len(bn) != 3:
            problems.append(
                f"layer {bn_key}: {len(bn)} variables, expected 3 (beta, moving mean, moving "
                "variance of BatchNormalization(scale=False))"
            )
        else:
            put(params, abstract["params"], module + ("BatchNorm", "bias"), bn[0], bn_key)
            put(batch_stats, abstract["batch_stats"], module + ("BatchNorm", "mean"), bn[1], bn_key)
            put(batch_stats, abstract["batch_stats"], module + ("BatchNorm", "var"), bn[2], bn_key)
    if include_top:
        put(params, abstract["params"], ("Logits", "Dense", "kernel"), layers["dense"][0], "dense")
        put(params, abstract["params"], ("Logits", "Dense", "bias"), layers["dense"][1], "dense")
    if problems:
        raise ValueError(f"{os.fspath(path)!r} does not match keras.applications.InceptionV3: " + "; ".join(problems))
    return {"params": params, "batch_stats": batch_stats}, {
        "num_classes": num_classes,
        "include_top": bool(include_top),
    }
