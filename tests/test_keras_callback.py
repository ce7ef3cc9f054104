"""`nanlab.keras.LocalizeOnNaN` on Keras 3 models (JAX backend) whose loss goes NaN at a known batch."""

import json
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nanlab.keras import LocalizeOnNaN  # noqa: E402
from nanlab.losses import naive_sigmoid_binary_cross_entropy  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

BATCH, FAILING_BATCH, NUM_BATCHES = 8, 5, 8


class RiskyLog(keras.layers.Layer):
    """log(x[:, :1] + 2) beside a dense projection: a log of a negative when x[:, 0] < -2."""

    def build(self, input_shape):
        self.proj = keras.layers.Dense(4, name="proj")
        self.proj.build(input_shape)

    def call(self, x):
        return self.proj(x) + keras.ops.log(x[:, :1] + 2.0)


def textbook_bce(y_true, logits):
    # -[y log(sigmoid(z)) + (1 - y) log(1 - sigmoid(z))]: sigmoid rounds to 1 beyond z ~ 17, log(0).
    return keras.ops.mean(naive_sigmoid_binary_cross_entropy(logits, y_true), axis=-1)


def build_model(loss) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    h = RiskyLog(name="risky_log")(inputs)
    h = keras.layers.Dense(8, activation="relu", name="hidden")(h)
    model = keras.Model(inputs, keras.layers.Dense(1, kernel_initializer="ones", name="logits")(h))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
    return model


def data(plant: str):
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, (BATCH * NUM_BATCHES, 4)).astype(np.float32)
    y = (rng.uniform(size=(BATCH * NUM_BATCHES, 1)) > 0.5).astype(np.float32)
    rows = slice(FAILING_BATCH * BATCH, (FAILING_BATCH + 1) * BATCH)
    if plant == "layer":
        x[rows, 0] = -3.0  # log(-1) inside risky_log
    else:
        # Inputs still within a normalized range (|x| < 20), but the logits pass 17, where sigmoid
        # rounds to 1: with label 0 the textbook loss takes log(1 - 1) = log(0).
        x[rows], y[rows] = 19.0, 0.0
    return x, y


class KeepWeights(keras.callbacks.Callback):
    """Host copies of the weights after each batch (the trainer's state, as Keras holds it)."""

    def __init__(self):
        super().__init__()
        self.after = []

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(jax.device_get(list(self.model._jax_state["trainable_variables"])))


@pytest.mark.parametrize("plant", ["layer", "loss"])
def test_localize_on_nan_names_the_layer_or_the_loss(plant, tmp_path, capsys):
    model = build_model(textbook_bce)
    x, y = data(plant)
    keep, callback = KeepWeights(), LocalizeOnNaN(workdir=tmp_path)
    history = model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[keep, callback])

    error = callback.error
    assert error is not None and error.step == FAILING_BATCH
    origin = error.report.origin
    assert origin.primitive == "log" and origin.phase == "forward"
    if plant == "layer":
        assert origin.cause == "log-of-negative"
        assert origin.module == "risky_log"
        assert "RiskyLog.call" in origin.source
    else:
        assert origin.cause == "log-of-zero"
        assert "risky_log" not in origin.module and "logits" not in origin.module.split("/"), origin.module
        assert error.verdict.cause == "unstable-loss", error.verdict
        assert "textbook_bce" in origin.source or "naive_sigmoid" in origin.source
    # Training stopped at the failing batch, and the model keeps the weights from before it.
    assert len(keep.after) == FAILING_BATCH + 1
    weights = [np.asarray(v) for v in model.trainable_variables]
    for kept, now in zip(keep.after[FAILING_BATCH - 1], weights):
        np.testing.assert_array_equal(kept, now)
    assert all(np.isfinite(w).all() for w in weights)
    # The epoch's logs come from the metric variables, which the gate kept from before the batch.
    assert np.isfinite(history.history["loss"][-1])
    payload = json.loads((tmp_path / "report.json").read_text())
    assert payload["step"] == FAILING_BATCH and payload["verdict"]["cause"] == error.verdict.cause
    assert "verdict:" in capsys.readouterr().out


def test_a_finite_run_trains_as_without_the_callback():
    x, y = data("layer")
    x[:, 0] = np.abs(x[:, 0])  # no planted fault
    plain, watched = build_model(textbook_bce), build_model(textbook_bce)
    plain.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0)
    callback = LocalizeOnNaN()
    watched.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    assert callback.error is None
    for a, b in zip(plain.trainable_variables, watched.trainable_variables):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    assert watched.train_function is not callback._train_function  # Keras's own step is back


def test_raise_error_raises_the_nonfinite_error():
    from nanlab.guard import NonFiniteError

    model = build_model(textbook_bce)
    x, y = data("layer")
    with pytest.raises(NonFiniteError) as caught:
        model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
                  callbacks=[LocalizeOnNaN(raise_error=True, verbose=False)])
    assert caught.value.step == FAILING_BATCH


def test_importing_nanlab_does_not_import_keras():
    code = "import sys, nanlab, nanlab.guard, nanlab.trace, nanlab.diagnose; print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "False"
