"""`LocalizeOnNaN`: a Keras 3 callback (JAX backend) that says where and why the loss went non-finite.

```python
import os
os.environ["KERAS_BACKEND"] = "jax"   # before keras is imported
from nanlab.keras import LocalizeOnNaN

model.fit(x, y, callbacks=[LocalizeOnNaN(workdir="runs/keras")])
```

What `keras.callbacks.TerminateOnNaN` does (stop at the first non-finite batch), plus where and why:
the callback runs Keras's own stateless train step (`model.train_step(state, data)`: forward,
loss, gradients, optimizer, metrics) under nanlab's guard (`nanlab.guard`): one fused finite flag
over the new weights, optimizer variables, metrics and logs, and a gate that keeps the weights
from before the batch when the batch is non-finite. Keras's JAX trainer donates the state to each
step, so references to the old weights would be deleted arrays; the gate keeps them instead, in
place, with no copy. At the end of the batch whose flag is down, the callback replays that batch
through `model.train_step` with those weights via `nanlab.trace.reproduce` (the report names the
Keras layer), runs `nanlab.diagnose`, prints both, writes report.json into ``workdir`` and stops
training. Keras then writes the state back into the model: the model keeps the finite weights
from before the failing batch (TerminateOnNaN leaves the NaN ones).

Keras is imported only by this module; `import nanlab` never imports it. The model must be
compiled for the JAX backend with ``steps_per_execution=1`` (the callback names one batch).
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import keras
import numpy as np

from nanlab.guard import HISTORY_ROWS, Carry, NonFiniteError, _guarded_body, replay_failure

__all__ = ["LocalizeOnNaN"]


class LocalizeOnNaN(keras.callbacks.Callback):
    """Stop `fit` at the first non-finite batch, with a report of where and why.

    Args:
      workdir: write report.json there (None: not written).
      allow: passed to `nanlab.trace.localize` (intentional -inf masks).
      raise_error: raise the `nanlab.guard.NonFiniteError` instead of stopping gracefully.
      verbose: print the report and the verdict.

    Attributes (after a failure):
      error: the `NonFiniteError` (``.report``, ``.verdict``, ``.step``, ``.inputs``); None before.
      report, verdict: its report and verdict.
    """

    def __init__(self, workdir: str | Path | None = None, allow: Any = None, raise_error: bool = False,
                 verbose: bool = True):
        super().__init__()
        self.workdir, self.allow, self.raise_error, self.verbose = workdir, allow, raise_error, verbose
        self.error: NonFiniteError | None = None
        self._rows: collections.deque[dict[str, Any]] = collections.deque(maxlen=HISTORY_ROWS)

    @property
    def report(self):
        return None if self.error is None else self.error.report

    @property
    def verdict(self):
        return None if self.error is None else self.error.verdict

    # ------------------------------------------------------------------------------ fit's hooks

    def on_train_begin(self, logs=None):
        model = self.model
        if keras.backend.backend() != "jax":
            raise RuntimeError(f"LocalizeOnNaN needs the JAX backend (KERAS_BACKEND=jax), not "
                               f"{keras.backend.backend()!r}")
        if getattr(model, "steps_per_execution", 1) != 1:
            raise ValueError("LocalizeOnNaN needs steps_per_execution=1 to name the failing batch, got "
                             f"{model.steps_per_execution}")
        import jax

        self._step = keras_train_step(model)
        self._layout: dict[str, bool] = {}
        # Donated like Keras's own train step: a finite batch updates the weights in place.
        self._jitted = jax.jit(_guarded_body(self._step, None, None, self._layout), donate_argnums=1)
        self._carry = Carry(0, -1, 0, 1).array()
        self._batches = 0
        self._data = self._state = None
        self._original_train_function = model.train_function
        model.train_function = self._train_function

    def on_train_batch_end(self, batch, logs=None):
        calls, failed_at = (int(v) for v in np.asarray(self._carry)[:2])
        if failed_at < 0:
            row = {"step": calls - 1, **{k: float(v) for k, v in (logs or {}).items()
                                         if isinstance(v, (int, float))}}
            self._rows.append(row)
            return
        inputs = (self._state, self._data)  # held: the state from before the failing batch
        self.error = replay_failure(self._step, inputs, step=failed_at, allow=self.allow,
                                    history=list(self._rows), workdir=self.workdir, verbose=self.verbose,
                                    what="batch", extra={"epoch_batch": int(batch)})
        self.model.stop_training = True
        if self.raise_error:
            raise self.error

    def on_train_end(self, logs=None):
        if getattr(self, "_original_train_function", None) is not None:
            self.model.train_function = self._original_train_function
            self._original_train_function = None

    # ------------------------------------------------------------------------------- the step

    def _train_function(self, state, iterator):
        """Keras's ``train_function(state, iterator) -> (logs, state)``, one guarded batch."""
        data = next(iterator)
        self._data = data  # the batch, kept for a replay (Keras does not donate it)
        (new_state, logs), self._carry = self._jitted(self._carry, state, data)
        self._batches += 1
        self._state = new_state
        return logs, new_state


def keras_train_step(model: keras.Model):
    """Keras's stateless train step as a guardable ``step(state, data) -> (state, logs)``.

    ``state`` is the trainer's (trainable, non-trainable, optimizer, metrics) variable values;
    the step is the model's own `train_step` (forward, loss, gradients, optimizer, metrics).
    """

    def train_step(state, data):
        logs, new_state = model.train_step(tuple(state), data)
        return tuple(new_state), logs

    train_step.__name__ = f"{model.name}.train_step"
    return train_step

