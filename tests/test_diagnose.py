"""Each verdict of nanlab.diagnose from a constructed Report, batch and history."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanlab.diagnose import (
    FIXES,
    HIGH_UPDATE_RATIO,
    INCEPTION_BLOCK_ORDER,
    Verdict,
    diagnose,
    diagnose_history,
)
from nanlab.trace import Event, Report, localize, summarize


def make_event(*, primitive="log", module="", phase="forward", cause="log-of-zero", dtype=np.float32):
    out = summarize(np.array([-np.inf, 1.0], dtype))
    return Event(index=3, primitive=primitive, module=module, phase=phase, source="loss.py:7 (loss)",
                 kind="inf", cause=cause, root=True, iterations=[], inputs=[out], outputs=[out])


def make_report(origin=None, bad_inputs=()):
    found = origin is not None or bool(bad_inputs)
    cause = origin.cause if origin else ("nan-input" if bad_inputs else "none")
    return Report(found=found, cause=cause, origin=origin, first_nan=None, bad_inputs=list(bad_inputs),
                  events=[origin] if origin else [], num_events=int(found), num_equations=10, seconds=0.1)


def clean_batch(scale=1.0):
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 8, 8, 3)).astype(np.float32) * scale, np.ones((4, 1), np.float32)


def healthy_history(n=12):
    return [{"step": i, "loss": 0.7 - 0.01 * i, "grad_norm": 1.0, "param_norm": 50.0, "update_ratio": 1e-3}
            for i in range(n)]


def test_bad_data_from_a_nonfinite_batch():
    x, y = clean_batch()
    x[1, 2, 3, 0] = np.nan
    v = diagnose(make_report(bad_inputs=["[1][0]"]), batch=(x, y))
    assert v.cause == "bad-data" and "1 NaN/Inf" in v.evidence[0]


def test_bad_data_without_a_batch_uses_bad_inputs():
    v = diagnose(make_report(bad_inputs=["[1]['x']"]))
    assert v.cause == "bad-data" and "[1]['x']" in v.evidence[0]


def test_unscaled_inputs_from_raw_pixels():
    x, y = clean_batch()
    raw = (np.abs(x) * 80).clip(0, 255)
    report = make_report(make_event(primitive="conv_general_dilated", module="InceptionV3/Conv2d_1a_3x3",
                                    cause="overflow"))
    assert diagnose(report, batch=(raw, y)).cause == "unscaled-inputs"
    assert diagnose(report, batch=(x, y)).cause != "unscaled-inputs"  # the same report, normalized data


def test_unstable_loss_from_log_of_zero_outside_the_model():
    v = diagnose(make_report(make_event()), batch=clean_batch(), history=healthy_history())
    assert v.cause == "unstable-loss"
    assert "logits form" in v.fix and any("saturated sigmoid" in e for e in v.evidence)


def test_log_inside_a_module_is_not_the_loss():
    v = diagnose(make_report(make_event(module="Net/norm")), batch=clean_batch(), history=healthy_history())
    assert v.cause == "unknown"


def test_low_precision_overflow():
    event = make_event(primitive="dot_general", module="MLP/hidden", cause="overflow", dtype=np.float16)
    assert diagnose(make_report(event), batch=clean_batch()).cause == "low-precision-overflow"
    event32 = make_event(primitive="dot_general", module="MLP/hidden", cause="overflow")
    assert diagnose(make_report(event32), batch=clean_batch()).cause != "low-precision-overflow"


def test_learning_rate_too_high_from_the_update_ratio():
    history = healthy_history()
    history[-1]["update_ratio"] = 5 * HIGH_UPDATE_RATIO
    event = make_event(primitive="dot_general", module="MLP/hidden", cause="overflow")
    v = diagnose(make_report(event), batch=clean_batch(), history=history)
    assert v.cause == "learning-rate-too-high" and "update/param ratio" in v.evidence[0]
    assert v.evidence[-1].startswith("trace: overflow")


def test_learning_rate_too_high_from_an_overflowing_update():
    event = make_event(primitive="sub", module="", phase="update", cause="overflow")
    assert diagnose(make_report(event)).cause == "learning-rate-too-high"


STATE_PATHS = ["[0].params['Conv2']['Conv_0']['kernel']", "[0].opt_state[0].mu['Conv1']['kernel']"]


def test_nonfinite_state_before_any_update():
    # The weights are non-finite on entry to the run's first step: no update can have written them.
    for kwargs in ({"history": []}, {"step": 0}, {"step": 0, "history": healthy_history()[:0]}):
        v = diagnose(make_report(bad_inputs=STATE_PATHS), batch=clean_batch(), **kwargs)
        assert v.cause == "nonfinite-state", kwargs
        assert "the parameters and the optimizer state" in v.evidence[0] and "['Conv_0']" in v.evidence[0]
        assert "before any update" in v.evidence[0]
        assert "initialization" in v.fix and "checkpoint" in v.fix
    only_params = diagnose(make_report(bad_inputs=STATE_PATHS[:1]), batch=clean_batch(), step=0)
    assert only_params.evidence[0].startswith("the parameters held NaN/Inf")


def test_nonfinite_state_after_a_huge_update_is_learning_rate_too_high():
    history = healthy_history()
    history[-1]["update_ratio"] = 5 * HIGH_UPDATE_RATIO
    v = diagnose(make_report(bad_inputs=STATE_PATHS), batch=clean_batch(), history=history)
    assert v.cause == "learning-rate-too-high"
    assert "previous update overflowed" in v.evidence[0] and "update/param ratio" in v.evidence[1]


def test_nonfinite_params_after_unlogged_updates_are_learning_rate_too_high():
    # Step 3 with no logged row yet (--log-every 5): updates ran, and one of them wrote the NaN.
    params = make_report(bad_inputs=STATE_PATHS[:1])
    v = diagnose(params, batch=clean_batch(), history=[], step=3)
    assert v.cause == "learning-rate-too-high" and "previous update overflowed" in v.evidence[0]
    # Healthy logged rows, step unknown: the weights were written by updates all the same.
    assert diagnose(params, batch=clean_batch(), history=healthy_history()).cause == "learning-rate-too-high"


def test_nonfinite_optimizer_state_after_updates_is_nonfinite_state():
    # Adam's moments planted with an Inf: step 0's update writes it into the weights, step 1 fails
    # with both non-finite. No learning rate enters the moments: they held it from the start.
    v = diagnose(make_report(bad_inputs=STATE_PATHS), batch=clean_batch(), history=[], step=1)
    assert v.cause == "nonfinite-state" and "no learning rate" in v.evidence[1]
    # A huge gradient in the history does explain them.
    history = healthy_history()
    history[-1]["grad_norm"] = 1e20
    assert diagnose(make_report(bad_inputs=STATE_PATHS), batch=clean_batch(), history=history,
                    step=12).cause == "learning-rate-too-high"


@pytest.mark.parametrize("module, cause", [("MLP/hidden", "zero-times-inf"), ("Net/norm", "sqrt-at-zero"),
                                           ("", "non-finite-constant"), ("", "inf-minus-inf")])
def test_unstable_gradient_from_a_backward_root_that_is_not_an_overflow(module, cause):
    event = make_event(primitive="mul", module=module, phase="backward", cause=cause)
    v = diagnose(make_report(event), batch=clean_batch(), history=healthy_history())
    assert v.cause == "unstable-gradient"
    assert v.evidence[0].startswith(f"trace: {cause} at mul (backward)") and "double where" in v.fix
    # The same cause in the forward pass is not a gradient's.
    forward = make_event(primitive="mul", module=module, phase="forward", cause=cause)
    assert diagnose(make_report(forward), batch=clean_batch()).cause != "unstable-gradient"


def test_loss_side_log_of_zero_in_the_gradient_stays_unstable_loss():
    event = make_event(primitive="div", module="", phase="backward", cause="log-of-zero")
    assert diagnose(make_report(event), batch=clean_batch(), history=healthy_history()).cause == "unstable-loss"
    # Inside a module the same derivative is the model's, not the loss's.
    event = make_event(primitive="div", module="Net/head", phase="backward", cause="log-of-zero")
    assert diagnose(make_report(event), batch=clean_batch()).cause == "unstable-gradient"


def test_backward_overflow_is_not_an_unstable_gradient():
    event = make_event(primitive="dot_general", module="MLP/hidden", phase="backward", cause="overflow")
    assert diagnose(make_report(event), batch=clean_batch(), history=healthy_history()).cause == "exploding-gradients"


def test_end_to_end_sqrt_gradient_at_zero_is_an_unstable_gradient():
    def distance_loss(x):
        return jnp.sqrt(jnp.sum(x ** 2))  # finite at 0, its gradient is not

    report = localize(jax.value_and_grad(distance_loss), jnp.zeros(3))
    v = diagnose(report, batch=clean_batch(), history=healthy_history())
    assert report.origin.phase == "backward" and v.cause == "unstable-gradient", (str(report), str(v))


def test_exploding_gradients_from_grad_norm_growth():
    history = healthy_history()
    for i, row in enumerate(history):
        row["grad_norm"] = 2.0 ** i  # x2 per step: 512x over the window
    event = make_event(primitive="dot_general", module="MLP/hidden", cause="overflow")
    v = diagnose(make_report(event), batch=clean_batch(), history=history)
    assert v.cause == "exploding-gradients" and "grew" in v.evidence[0]


def test_exploding_gradients_from_a_backward_overflow():
    event = make_event(primitive="mul", module="MLP/hidden", phase="backward", cause="overflow")
    assert diagnose(make_report(event), history=healthy_history()).cause == "exploding-gradients"


def test_vanishing_gradients_from_module_norms_collapsing_toward_the_input():
    history = healthy_history()
    # Keys in sorted order, as a pytree gives them; depth order comes from the block list.
    norms = {name: 10.0 ** (-(len(INCEPTION_BLOCK_ORDER) - 1 - i) / 2) for i, name in
             enumerate(INCEPTION_BLOCK_ORDER)}
    history[-1]["module_grad_norms"] = dict(sorted(norms.items()))
    v = diagnose_history(history)
    assert v.cause == "vanishing-gradients"
    assert "Conv2d_1a_3x3" in v.evidence[0] and "Logits" in v.evidence[0]
    assert diagnose(make_report(), history=history).cause == "vanishing-gradients"
    # The same norms in a healthy spread (within 10x) are not vanishing.
    history[-1]["module_grad_norms"] = {name: 1.0 + i for i, name in enumerate(INCEPTION_BLOCK_ORDER)}
    assert diagnose_history(history).cause == "none"


def test_healthy_history_and_clean_report_give_none():
    v = diagnose(make_report(), batch=clean_batch(), history=healthy_history())
    assert v.cause == "none" and v.fix == FIXES["none"]
    assert diagnose_history([]).cause == "none"


def test_nonfinite_history_rows_are_ignored():
    history = healthy_history() + [{"step": 12, "loss": float("nan"), "grad_norm": float("nan"),
                                    "param_norm": float("nan"), "update_ratio": float("nan")}]
    assert diagnose_history(history).cause == "none"


def test_rule_order_bad_data_before_unscaled_inputs():
    x, y = clean_batch(scale=200.0)
    x[0, 0, 0, 0] = np.inf
    assert diagnose(make_report(make_event()), batch=(x, y)).cause == "bad-data"


def test_verdict_to_dict_is_json_and_str_is_readable():
    v = diagnose(make_report(make_event()), batch=clean_batch())
    d = json.loads(json.dumps(v.to_dict(), allow_nan=False))
    assert set(d) == {"cause", "evidence", "fix"} and d["cause"] in FIXES
    assert str(v).startswith("verdict: unstable-loss")
    assert isinstance(v, Verdict)


def test_wrong_argument_types_raise():
    with pytest.raises(TypeError, match="report"):
        diagnose({"found": True})
    with pytest.raises(TypeError, match="history"):
        diagnose_history(5)


def test_end_to_end_with_a_real_report_of_a_naive_loss():
    def naive_bce(logits, labels):
        p = jax.nn.sigmoid(logits)
        return -jnp.mean(labels * jnp.log(p) + (1 - labels) * jnp.log(1 - p))

    logits, labels = jnp.array([[40.0], [-1.0]]), jnp.array([[0.0], [1.0]])
    report = localize(jax.value_and_grad(naive_bce), logits, labels)
    v = diagnose(report, batch=clean_batch(), history=healthy_history())
    assert v.cause == "unstable-loss", (str(report), str(v))


def test_bad_data_verdict_names_the_input_in_words():
    x = np.zeros((8, 4, 4, 3), np.float32)
    y = np.zeros((8, 1), np.float32)
    x[5, 1, 2, 0] = np.nan
    v = diagnose(None, batch=(x, y))
    assert v.cause == "bad-data" and v.evidence[0].endswith("the first in batch images, example 5")
    x[5, 1, 2, 0] = 0.0
    y[3, 0] = np.inf
    assert diagnose(None, batch=(x, y)).evidence[0].endswith("the first in batch labels, example 3")
