"""Planted-bug corpus for nanlab.trace.localize: each test plants one fault and checks where it was born.

Every case asserts the origin's module, phase, primitive and cause (and more where the case is about
more: the iteration of a scan, the forward primitive behind a backward event, the dtype of an overflow).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanlab.trace import CAUSES, Report, classify, localize, summarize


# ----------------------------------------------------------------------------------- small models

class CenterNorm(nn.Module):
    """A hand-written normalization layer: (x - mean) / std, without an epsilon (the planted bug)."""

    @nn.compact
    def __call__(self, x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) / x.std(-1, keepdims=True)


class NormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = CenterNorm(name="norm")(x)
        return nn.Dense(1, name="head")(x)


class MLP(nn.Module):
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, dtype=self.dtype, name="hidden")(x)
        x = nn.relu(x)
        return nn.Dense(1, dtype=self.dtype, name="head")(x)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="hidden")(x)
        x = nn.BatchNorm(use_running_average=False, epsilon=0.0, name="bn")(x)
        return nn.Dense(1, name="head")(x)


def mse_step(model, params, x, y, **variables):
    """A train-step-like function: loss and gradient w.r.t. params, then one SGD update."""

    def loss_fn(p):
        out = model.apply({"params": p, **variables}, x, mutable=list(variables) or False)
        out = out[0] if variables else out
        return jnp.mean((out.astype(jnp.float32) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    new_params = jax.tree.map(lambda w, g: w - 0.1 * g, params, grads)
    return loss, new_params


def assert_origin(report: Report, *, primitive, module, phase, cause):
    assert report.found, str(report)
    o = report.origin
    assert o is not None, str(report)
    assert (o.primitive, o.module, o.phase, o.cause) == (primitive, module, phase, cause), str(report)
    assert report.cause == cause
    assert o.root


# ---------------------------------------------------------------------------------- the corpus

def test_log_of_zero_in_a_loss():
    """Textbook BCE on a saturated sigmoid: log(1 - p) = log(0) = -inf, then 0 * -inf = NaN."""
    model = MLP()
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    params["head"]["bias"] = jnp.full((1,), 40.0)  # sigmoid(>=40) rounds to exactly 1 in float32

    def step(p, x, y):
        def loss_fn(p):
            prob = jax.nn.sigmoid(model.apply({"params": p}, x))
            return -jnp.mean(y * jnp.log(prob) + (1 - y) * jnp.log(1 - prob))
        return jax.value_and_grad(loss_fn)(p)

    report = localize(step, params, x, jnp.ones((2, 1)))
    assert_origin(report, primitive="log", module="", phase="forward", cause="log-of-zero")
    assert report.origin.inputs[0]["zeros"] == 2 and report.origin.outputs[0]["neginf"] == 2
    assert report.first_nan.primitive == "mul" and report.first_nan.cause == "zero-times-inf"
    assert report.first_nan.index > report.origin.index
    assert "test_trace.py" in report.origin.source


def test_zero_over_zero_in_a_custom_normalization_layer():
    model = NormNet()
    x = jnp.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])  # the second row is constant: std 0, x - mean 0
    params = model.init(jax.random.key(0), x)["params"]
    report = localize(lambda p, x, y: mse_step(model, p, x, y), params, x, jnp.zeros((2, 1)))
    assert_origin(report, primitive="div", module="NormNet/norm", phase="forward", cause="division-by-zero")
    assert report.origin.kind == "nan"
    assert report.first_nan is report.origin


def test_exp_overflow_then_inf_minus_inf():
    def naive_centered_exp(x):
        e = jnp.exp(x)  # overflows to inf for x > 88.7 in float32
        return jnp.sum(e - jnp.max(e))

    report = localize(naive_centered_exp, jnp.array([1.0, 100.0]))
    assert_origin(report, primitive="exp", module="", phase="forward", cause="overflow")
    assert report.origin.kind == "inf"
    assert (report.first_nan.primitive, report.first_nan.cause) == ("sub", "inf-minus-inf")


def test_sqrt_of_a_negative():
    report = localize(jax.value_and_grad(lambda x: jnp.sum(jnp.sqrt(x - 1.0))), jnp.array([2.0, 0.5]))
    assert_origin(report, primitive="sqrt", module="", phase="forward", cause="sqrt-of-negative")
    assert report.origin.kind == "nan"


def test_sqrt_at_zero_is_nan_only_in_the_backward_pass():
    def loss(x):
        return jnp.sum(jnp.sqrt(x))  # finite at 0; the derivative 0.5/sqrt(0) is inf

    x = jnp.array([0.0, 4.0])
    loss_value, grads = jax.value_and_grad(loss)(x)
    assert np.isfinite(loss_value) and not np.isfinite(grads).all()
    report = localize(jax.value_and_grad(loss), x)
    assert_origin(report, primitive="div", module="", phase="backward", cause="sqrt-at-zero")
    assert report.origin.forward_primitive == "sqrt"
    assert "the gradient of sqrt" in str(report)


def test_single_where_trap_is_caught_in_the_backward_pass():
    def loss(x):
        return jnp.sum(jnp.where(x > 0, jnp.log(x), 0.0))  # the untaken log(0) still poisons the gradient

    x = jnp.array([0.0, 2.0])
    loss_value, grads = jax.value_and_grad(loss)(x)
    assert np.isfinite(loss_value) and np.isnan(grads).any()
    report = localize(jax.value_and_grad(loss), x)
    assert_origin(report, primitive="div", module="", phase="backward", cause="log-of-zero")
    assert report.origin.forward_primitive == "log"
    assert report.origin.kind == "nan"
    # The masked -inf of the forward log is reported as an event too: jax_debug_nans never sees it.
    forward_logs = [e for e in report.events if e.primitive == "log" and e.phase == "forward"]
    assert forward_logs and forward_logs[0].kind == "inf"


def test_nan_in_the_batch_names_the_argument():
    model = MLP()
    x = jnp.ones((2, 3)).at[1, 2].set(jnp.nan)
    params = model.init(jax.random.key(0), jnp.ones((2, 3)))["params"]
    batch = {"x": x, "y": jnp.zeros((2, 1))}
    report = localize(lambda p, b: mse_step(model, p, b["x"], b["y"]), params, batch)
    assert report.found and report.cause == "nan-input"
    assert report.bad_inputs == ["[1]['x']"]
    assert report.origin is None
    assert report.first_nan.primitive == "dot_general" and report.first_nan.module == "MLP/hidden"
    assert not report.first_nan.root


def test_blown_up_params_overflow_a_dense_layer():
    model = MLP()
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    params["hidden"]["kernel"] = jnp.full((3, 4), 2e38)  # finite, but 3 * 2e38 is past float32's max
    report = localize(lambda p, x, y: mse_step(model, p, x, y), params, x, jnp.zeros((2, 1)))
    assert_origin(report, primitive="dot_general", module="MLP/hidden", phase="forward", cause="overflow")
    assert report.bad_inputs == []


def test_nan_created_inside_a_scan_names_the_iteration():
    def loss(x):
        def body(c, _):
            return c - 1.0, jnp.log(c)  # c = 2.5, 1.5, 0.5, -0.5: log of a negative at iteration 3
        _, ys = jax.lax.scan(body, x, None, length=5)
        return jnp.sum(ys)

    report = localize(jax.value_and_grad(loss), 2.5)
    assert_origin(report, primitive="log", module="", phase="forward", cause="log-of-negative")
    assert report.origin.iterations == [{"loop": "scan", "index": 3}]
    assert "scan iteration 3" in str(report)


def test_custom_vjp_backward_rule_dividing_by_zero():
    @jax.custom_vjp
    def scale(x):
        return 2.0 * x

    def scale_fwd(x):
        return 2.0 * x, x

    def scale_bwd(x, g):
        return (g / (x - x),)  # the planted bug: a zero denominator in the user's backward rule

    scale.defvjp(scale_fwd, scale_bwd)

    class Scaled(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(1, name="head")(scale(x))

    model = Scaled()
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]

    def step(p, x):  # the gradient w.r.t. x goes through the custom rule
        return jax.value_and_grad(lambda x: jnp.sum(model.apply({"params": p}, x)))(x)

    loss_value, _ = jax.jit(step)(params, x)
    assert np.isfinite(loss_value)
    report = localize(step, params, x)
    assert_origin(report, primitive="div", module="Scaled", phase="backward", cause="division-by-zero")
    assert report.origin.forward_primitive.startswith("custom_vjp rule")
    assert report.origin.forward_primitive.endswith("scale_fwd")


def test_float16_overflow():
    model = MLP(dtype=jnp.float16)
    x = jnp.full((2, 3), 300.0)
    params = model.init(jax.random.key(0), x)["params"]
    params["hidden"]["kernel"] = jnp.full((3, 4), 100.0)  # 3 * 300 * 100 = 90000 > float16 max 65504
    report = localize(lambda p, x, y: mse_step(model, p, x, y), params, x, jnp.zeros((2, 1)))
    assert_origin(report, primitive="dot_general", module="MLP/hidden", phase="forward", cause="overflow")
    assert report.origin.outputs[0]["dtype"] == "float16"


def test_batchnorm_with_zero_epsilon_on_a_constant_batch():
    model = BNNet()
    x = jnp.ones((4, 3))  # every example equal: the batch variance is exactly 0
    variables = model.init(jax.random.key(0), x)
    report = localize(
        lambda p, s, x, y: mse_step(model, p, x, y, batch_stats=s),
        variables["params"], variables["batch_stats"], x, jnp.zeros((4, 1)))
    assert_origin(report, primitive="rsqrt", module="BNNet/bn", phase="forward", cause="division-by-zero")
    assert report.origin.inputs[0]["zeros"] == 4
    assert (report.first_nan.primitive, report.first_nan.cause) == ("mul", "zero-times-inf")


# ------------------------------------------------------------------------- descending into structure

def test_descends_into_jit_checkpoint_and_the_taken_cond_branch():
    @jax.jit
    def inner(x):
        return jax.checkpoint(lambda y: jnp.log(y))(x)

    def f(x):
        # Branch 1 (the taken one) hides the log inside jit and checkpoint; branch 0 would be finite.
        return jax.lax.cond(x[0] > 0, lambda v: inner(v), lambda v: v * 2.0, x)

    report = localize(jax.value_and_grad(lambda x: jnp.sum(f(x))), jnp.array([1.0, 0.0]))
    assert_origin(report, primitive="log", module="", phase="forward", cause="log-of-zero")
    finite = localize(jax.value_and_grad(lambda x: jnp.sum(f(x))), jnp.array([-1.0, 0.0]))
    assert not finite.found, str(finite)


def test_while_loop_names_the_iteration():
    def f(x):
        return jax.lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, c[1] * 1e15), (0, x))[1]

    report = localize(f, jnp.float32(1.0))  # 1e15 ** 3 overflows float32 at iteration 2
    assert_origin(report, primitive="mul", module="", phase="forward", cause="overflow")
    assert report.origin.iterations == [{"loop": "while", "index": 2}]


def test_optimizer_update_overflow_is_the_update_phase():
    def step(w):
        g = jax.grad(lambda w: jnp.sum(w * w))(w)
        return w - 1e38 * g  # a learning rate so large the update overflows

    report = localize(step, jnp.array([1.0, 2.0]))
    assert report.origin.phase == "update" and report.origin.cause == "overflow"


def test_compiled_segments_and_pure_eager_agree():
    model = NormNet()
    x = jnp.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    params = model.init(jax.random.key(0), x)["params"]
    fn = lambda p, x, y: mse_step(model, p, x, y)  # noqa: E731
    fast = localize(fn, params, x, jnp.zeros((2, 1)), segment_size=4)
    eager = localize(fn, params, x, jnp.zeros((2, 1)), segment_size=0)
    assert fast.to_dict()["origin"] == eager.to_dict()["origin"]
    assert (fast.num_events, fast.num_equations) == (eager.num_events, eager.num_equations)
    assert [e.index for e in fast.events] == [e.index for e in eager.events]


# ------------------------------------------------------------------------------ no false alarms

def test_finite_train_step_raises_no_alarm():
    model = BNNet()
    x = jax.random.normal(jax.random.key(1), (4, 3))
    variables = model.init(jax.random.key(0), x)
    report = localize(
        lambda p, s, x, y: mse_step(model, p, x, y, batch_stats=s),
        variables["params"], variables["batch_stats"], x, jnp.zeros((4, 1)))
    assert not report.found and report.cause == "none" and report.origin is None
    assert report.events == [] and report.num_events == 0 and report.num_equations > 50
    assert "no NaN or Inf" in str(report)


def test_stable_functions_at_their_edges_raise_no_alarm():
    def stable(x):
        safe = jnp.where(x > 0, x, 1.0)  # the double where: the log never sees 0
        return jnp.sum(jnp.where(x > 0, jnp.log(safe), 0.0)) + jnp.sum(jax.nn.log_sigmoid(1e4 * x))

    report = localize(jax.value_and_grad(stable), jnp.array([0.0, 1.0, -1.0]))
    assert not report.found, str(report)


# ------------------------------------------------------------------------------------ allow-list

class MaskedAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        scores = x @ x.T
        causal = jnp.tril(jnp.ones(scores.shape, bool))
        scores = jnp.where(causal, scores, -jnp.inf)  # intentional -inf: masked positions
        return jax.nn.softmax(scores) @ x


class AttnNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1, name="head")(MaskedAttention(name="attention")(x))


@pytest.mark.parametrize("allow", ["*/attention", lambda e: e.module.endswith("attention")])
def test_allow_list_suppresses_an_intentional_inf_mask(allow):
    model = AttnNet()
    x = jax.random.normal(jax.random.key(0), (3, 2))
    params = model.init(jax.random.key(1), x)["params"]
    fn = lambda p, x, y: mse_step(model, p, x, y)  # noqa: E731
    flagged = localize(fn, params, x, jnp.zeros((3, 1)))
    assert flagged.found and flagged.origin.module == "AttnNet/attention"
    assert flagged.cause == "non-finite-constant"
    allowed = localize(fn, params, x, jnp.zeros((3, 1)), allow=allow)
    assert not allowed.found, str(allowed)


def test_allow_list_does_not_hide_other_faults():
    model = AttnNet()
    x = jax.random.normal(jax.random.key(0), (3, 2))
    params = model.init(jax.random.key(1), x)["params"]
    params["head"]["kernel"] = jnp.full((2, 1), 3e38)
    report = localize(lambda p, x, y: mse_step(model, p, x, y), params, x, jnp.zeros((3, 1)),
                      allow="*/attention")
    assert report.found and report.origin.module == "AttnNet/head"


def test_bad_allow_and_fn_raise_type_errors():
    with pytest.raises(TypeError, match="allow"):
        localize(jnp.sin, 1.0, allow=3)
    with pytest.raises(TypeError, match="fn"):
        localize("not a function", 1.0)


# ------------------------------------------------------------------------------ report format

def test_to_dict_is_strict_json_with_the_documented_keys():
    report = localize(jax.value_and_grad(lambda x: jnp.sum(jnp.where(x > 0, jnp.log(x), 0.0))),
                      jnp.array([0.0, 1.0]))
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert set(d) == {"found", "cause", "origin", "first_nan", "bad_inputs", "events", "num_events",
                      "num_equations", "seconds", "replay", "replays", "advice"}
    assert set(d["origin"]) == {"index", "primitive", "module", "phase", "source", "kind", "cause", "root",
                                "iterations", "forward_primitive", "forward_source", "inputs", "outputs"}
    assert set(d["origin"]["inputs"][0]) == {"shape", "dtype", "min", "max", "nan", "posinf", "neginf",
                                             "zeros"}
    assert d["cause"] in CAUSES


def test_summarize_counts_special_values():
    s = summarize(np.array([0.0, -np.inf, np.inf, np.nan, 2.0, -3.0], np.float32))
    assert s == {"shape": [6], "dtype": "float32", "min": -3.0, "max": 2.0, "nan": 1, "posinf": 1,
                 "neginf": 1, "zeros": 1}
    assert summarize(jnp.array([jnp.inf], jnp.bfloat16))["posinf"] == 1


def test_classify_rules():
    z = summarize(np.zeros(2, np.float32))
    neg = summarize(np.array([-1.0, 1.0], np.float32))
    inf = summarize(np.array([np.inf, 1.0], np.float32))
    nan_out = summarize(np.array([np.nan, 1.0], np.float32))
    inf_out = summarize(np.array([np.inf, 1.0], np.float32))
    assert classify("log", [z], inf_out, root=True) == "log-of-zero"
    assert classify("log", [neg], nan_out, root=True) == "log-of-negative"
    assert classify("div", [z, z], nan_out, root=True) == "division-by-zero"
    assert classify("div", [neg, neg], inf_out, root=True) == "overflow"
    assert classify("mul", [z, inf], nan_out, root=False) == "zero-times-inf"
    assert classify("sub", [inf, inf], nan_out, root=False) == "inf-minus-inf"
    assert classify("pow", [neg, neg], nan_out, root=True) == "invalid-power"
    assert classify("acos", [neg], nan_out, root=True) == "domain-error"
    assert classify("div", [neg, z], inf_out, root=True, forward_primitive="sqrt") == "sqrt-at-zero"
    assert classify("add", [inf, neg], inf_out, root=False) == "propagated"
    # Seen in the high-lr InceptionV3 run: huge finite activations (with some zeros) times an
    # rsqrt's derivative overflow in the backward pass; that is an overflow, not a sqrt at zero.
    huge = summarize(np.array([5e35, 0.0], np.float32))
    big = summarize(np.array([2048.0, 0.0], np.float32))
    assert classify("mul", [big, huge], inf_out, root=True, forward_primitive="rsqrt") == "overflow"
    # Seen in the clipping lab (value:0.01 at lr 1e4): the BatchNorm backward's sum of such products
    # overflows; zeros among the operands (ReLU) do not make it a sqrt at zero.
    assert classify("reduce_sum", [huge], inf_out, root=True, forward_primitive="rsqrt") == "overflow"
    nan_out = summarize(np.array([np.nan], np.float32))
    assert classify("dot_general", [big, huge], nan_out, root=True) == "overflow"
    # A division by zero under sqrt's derivative is still named after the sqrt.
    assert classify("div", [big, summarize(np.array([0.0], np.float32))], inf_out, root=True,
                    forward_primitive="sqrt") == "sqrt-at-zero"


# ------------------------------------------------------------------------ full-size InceptionV3

@pytest.mark.slow
def test_localizes_a_planted_overflow_in_the_full_inception_v3_train_step_in_under_two_minutes():
    import time

    import optax

    from nanlab.models.inception_v3 import InceptionV3, init_variables
    from nanlab.step import TrainState, make_train_step

    model = InceptionV3(num_classes=1)
    tx = optax.sgd(0.01)
    x = jax.random.normal(jax.random.key(0), (8, 299, 299, 3))
    y = jnp.ones((8, 1))
    variables = init_variables(model, jax.random.key(0), (299, 299, 3))  # model.init compiles for minutes
    params = variables["params"]
    conv = params["Mixed_6a"]["Branch_1_Conv2d_0b_3x3"]["Conv"]
    # Finite weights whose convolution overflows float32: 3e38 times the ReLU's >= 0 inputs, summed.
    conv["kernel"] = jnp.full_like(conv["kernel"], 3e38)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"],
                       opt_state=tx.init(params), rng=jax.random.key(1))
    step = make_train_step(model, optax.sigmoid_binary_cross_entropy, tx)
    start = time.perf_counter()
    report = localize(step, state, (x, y))
    elapsed = time.perf_counter() - start
    assert report.found and report.origin is not None, str(report)
    assert report.origin.module.startswith("InceptionV3/Mixed_6a/Branch_1_Conv2d_0b_3x3"), str(report)
    assert (report.origin.phase, report.origin.cause) == ("forward", "overflow"), str(report)
    assert report.bad_inputs == []
    assert elapsed < 120, f"localize took {elapsed:.0f} s\n{report}"


def test_auto_mode_counts_repeated_layers_once():
    from nanlab.trace import _signature_counts

    def deep(x):
        for _ in range(20):  # twenty identical layers: one distinct signature each for tanh and mul
            x = jnp.tanh(x) * 1.5
        return x

    leaves, unique = _signature_counts(jax.make_jaxpr(deep)(jnp.ones(3)).jaxpr)
    assert (leaves, unique) == (40, 2)
    report = localize(deep, jnp.ones(3))  # auto picks eager here; still no false alarm
    assert not report.found and report.num_equations == 40
