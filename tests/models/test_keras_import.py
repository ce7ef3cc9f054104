"""Tests of nanlab.models.keras_import against Keras 3 (JAX backend) on random weights."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import h5py  # noqa: E402
import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Keras's own variables trip numpy 2's copy-keyword deprecation on every conversion.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # Calling the Functional model on a bare array instead of its input structure.
    pytest.mark.filterwarnings("ignore:The structure of `inputs`:UserWarning"),
]

from nanlab.models.inception_v3 import InceptionV3, predict  # noqa: E402
from nanlab.models.keras_import import (  # noqa: E402
    KERAS_FILE_ORDER,
    conv_paths,
    load_keras_inception_v3,
)

NUM_CLASSES = 3


def _randomize_batchnorm(model, rng):
    """Random beta and moving statistics, so the import of every BN variable matters."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            beta, mean, var = (v.numpy() for v in layer.weights)
            layer.set_weights(
                [
                    rng.normal(0.0, 0.2, beta.shape).astype("float32"),
                    rng.normal(0.0, 0.5, mean.shape).astype("float32"),
                    rng.uniform(0.5, 2.0, var.shape).astype("float32"),
                ]
            )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A random Keras InceptionV3 (3 classes, logits), saved both ways.

    Built on an input tensor of unknown height and width, so the one model runs at 75x75 and
    at 299x299 (keras.applications then keeps its top with any input size).
    """
    keras.backend.clear_session()  # layer auto-names start again at conv2d, conv2d_1, ...
    keras.utils.set_random_seed(0)
    model = keras.applications.InceptionV3(
        weights=None,
        classes=NUM_CLASSES,
        input_tensor=keras.Input((None, None, 3)),
        classifier_activation=None,
    )
    _randomize_batchnorm(model, np.random.default_rng(0))
    folder = tmp_path_factory.mktemp("keras")
    weights_path = str(folder / "inception.weights.h5")
    archive_path = str(folder / "inception.keras")
    model.save_weights(weights_path)
    model.save(archive_path)
    return model, weights_path, archive_path


def _keras_outputs(model, x):
    """Keras's logits, and its sigmoid outputs from the same Dense with activation='sigmoid'."""
    dense = model.get_layer("predictions")
    logits = np.asarray(model(x, training=False))
    dense.activation = keras.activations.sigmoid
    try:
        probs = np.asarray(model(x, training=False))
    finally:
        dense.activation = keras.activations.linear
    return logits, probs


def _images(size, n=2, seed=0):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, (n, size, size, 3)).astype("float32")


def _assert_close_to_scale(actual, expected):
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    assert float(np.max(np.abs(np.asarray(actual) - expected))) <= 1e-4 * scale


def test_file_order_is_a_permutation_of_the_flax_convolutions():
    paths = conv_paths(InceptionV3())
    assert len(paths) == len(KERAS_FILE_ORDER) == 94
    assert sorted(KERAS_FILE_ORDER) == list(range(94))
    assert paths[0] == ("Conv2d_1a_3x3",) and paths[-1] == ("Mixed_7c", "Branch_3_Conv2d_0b_1x1")


def test_file_names_agree_with_the_permutation(saved):
    """Keras 3.15 stores each layer's auto-name, numbered in creation order, as metadata."""
    _, weights_path, _ = saved
    with h5py.File(weights_path) as f:
        for k, created in enumerate(KERAS_FILE_ORDER):
            key = f"conv2d_{k}" if k else "conv2d"
            expected = f"conv2d_{created}" if created else "conv2d"
            assert f[f"layers/{key}/vars"].attrs["name"] == expected, key


@pytest.mark.parametrize("size", [75, 299])
def test_import_matches_keras_logits_and_sigmoid(saved, size):
    model_keras, _, archive_path = saved
    variables, config = load_keras_inception_v3(archive_path)
    assert config == {"num_classes": NUM_CLASSES, "include_top": True}
    flax_model = InceptionV3(**config)
    x = _images(size, n=2 if size == 75 else 1, seed=size)
    expected_logits, expected_probs = _keras_outputs(model_keras, x)

    @jax.jit
    def logits_and_probs(variables, x):
        return flax_model.apply(variables, x, train=False), predict(flax_model, variables, x)

    logits, probs = logits_and_probs(variables, x)
    _assert_close_to_scale(logits, expected_logits)
    _assert_close_to_scale(probs, expected_probs)


def test_weights_h5_and_keras_archive_import_the_same(saved):
    _, weights_path, archive_path = saved
    from_h5, config_h5 = load_keras_inception_v3(weights_path)
    from_archive, config_archive = load_keras_inception_v3(archive_path)
    assert config_h5 == config_archive
    same = jax.tree_util.tree_map(np.array_equal, from_h5, from_archive)
    assert all(jax.tree_util.tree_leaves(same))


def test_import_without_top_gives_the_features_of_the_dense_head(saved):
    model_keras, weights_path, _ = saved
    variables, config = load_keras_inception_v3(weights_path, include_top=False)
    assert config == {"num_classes": NUM_CLASSES, "include_top": False}  # the file's classes
    assert "Logits" not in variables["params"]
    features = InceptionV3(**config).apply(variables, _images(75), train=False)
    kernel, bias = model_keras.get_layer("predictions").get_weights()
    expected_logits = np.asarray(model_keras(_images(75), training=False))
    _assert_close_to_scale(np.asarray(features) @ kernel + bias, expected_logits)


def _edited_copy(src, dst, edit):
    with h5py.File(src) as f_src, h5py.File(dst, "w") as f_dst:
        for key in f_src:
            f_src.copy(f_src[key], f_dst, name=key)
        edit(f_dst)
    return dst


def test_file_without_top_imports_as_features(saved, tmp_path):
    _, weights_path, _ = saved

    def drop_dense(f):
        del f["layers/dense"]

    path = _edited_copy(weights_path, tmp_path / "notop.weights.h5", drop_dense)
    variables, config = load_keras_inception_v3(path)
    assert config == {"num_classes": 1, "include_top": False}
    assert "Logits" not in variables["params"]
    with pytest.raises(ValueError, match="include_top=True but the file has no 'dense'"):
        load_keras_inception_v3(path, include_top=True)


def _replace(f, key, value):
    del f[key]
    f[key] = value


@pytest.mark.parametrize(
    "edit, named",
    [
        (lambda f: f.__delitem__("layers/conv2d_17"), "missing layers: conv2d_17"),
        (lambda f: f.__delitem__("layers/batch_normalization"), "missing layers: batch_normalization"),
        (lambda f: f.create_dataset("layers/conv2d_94/vars/0", data=np.zeros((1, 1, 2, 2))), "unexpected layers: conv2d_94"),
        (lambda f: f.create_dataset("layers/dense_1/vars/0", data=np.zeros((2, 2))), "unexpected layers: dense_1"),
        (lambda f: _replace(f, "layers/conv2d_5/vars/0", np.zeros((3, 3, 48, 64), "float32")), "layer conv2d_5: shape \\(3, 3, 48, 64\\)"),
        (lambda f: f.create_dataset("layers/batch_normalization_3/vars/3", data=np.zeros(80)), "layer batch_normalization_3: 4 variables"),
        (lambda f: _replace(f, "layers/dense/vars/1", np.zeros(5, "float32")), "layer dense: expected kernel"),
    ],
)
def test_mismatched_file_is_refused_naming_the_layer(saved, tmp_path, edit, named):
    _, weights_path, _ = saved
    path = _edited_copy(weights_path, tmp_path / "bad.weights.h5", edit)
    with pytest.raises(ValueError, match=named):
        load_keras_inception_v3(path)


def test_not_a_weights_file_is_refused(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="neither a .keras archive nor an HDF5"):
        load_keras_inception_v3(text)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_keras_inception_v3(tmp_path / "absent.keras")
