"""Tests of nanlab.models.inception_v3: Keras's parameter counts, shapes, knobs, statistics."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanlab.models.inception_v3 import (
    BLOCK_NAMES,
    ConvBN,
    InceptionV3,
    abstract_variables,
    activation_stats,
    init_variables,
    module_grad_norms,
    predict,
    scaled_channels,
)

TINY = 0.125  # width multiplier of the fast variants
# For the tiny models only: XLA's CPU optimization passes triple the compile time of a
# training step (36 s -> 12 s CPU) and save nothing at this size. Semantics are unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _jit(fn):
    return jax.jit(fn, compiler_options=FAST_COMPILE)


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _abstract_variables(model, size=299):
    """Variables' shapes without computing anything (eval_shape)."""
    return abstract_variables(model, (size, size, 3))


def _images(batch=4, size=75, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


LABELS = jnp.array([[0.0], [1.0], [1.0], [0.0]])


def _init(model, seed=0):
    """Variables of a small model: init_variables compiles in seconds (model.init: a minute)."""
    return _jit(lambda key: init_variables(model, key))(jax.random.key(seed))


def _make_train_pass(model):
    """jitted (params, batch_stats, x, labels) -> (loss, grads, new batch_stats, stats)."""

    @_jit
    def train_pass(params, batch_stats, x, labels):
        def loss_fn(params):
            logits, mutated = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats", "stats"],
            )
            loss = optax.sigmoid_binary_cross_entropy(logits, labels).mean()
            return loss, mutated

        (loss, mutated), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return loss, grads, mutated["batch_stats"], activation_stats(mutated["stats"])

    return train_pass


@pytest.fixture(scope="module")
def relu_run():
    """The tiny relu model, its variables and one training pass on a fixed batch."""
    model = InceptionV3(width_multiplier=TINY)
    variables = _init(model)
    x = _images()
    train_pass = _make_train_pass(model)
    outputs = train_pass(variables["params"], variables["batch_stats"], x, LABELS)
    return model, variables, x, train_pass, outputs


@pytest.mark.parametrize(
    "num_classes, total, trainable",
    [(1000, 23_851_784, 23_817_352), (1, 21_804_833, 21_770_401)],
)
def test_parameter_counts_equal_keras(num_classes, total, trainable):
    variables = _abstract_variables(InceptionV3(num_classes=num_classes))
    assert _count(variables["params"]) == trainable
    assert _count(variables["params"]) + _count(variables["batch_stats"]) == total


@pytest.mark.parametrize("num_classes", [1, 1000])
def test_aux_classifier_adds_documented_parameter_count(num_classes):
    plain = _abstract_variables(InceptionV3(num_classes=num_classes))
    aux = _abstract_variables(InceptionV3(num_classes=num_classes, aux_logits=True))
    extra = _count(aux["params"]) - _count(plain["params"])
    assert extra == 2_556_800 + 769 * num_classes
    assert _count(aux["batch_stats"]) - _count(plain["batch_stats"]) == 1_792


def test_params_are_named_blocks_and_batchnorm_has_no_scale():
    variables = _abstract_variables(InceptionV3(aux_logits=True))
    assert set(variables["params"]) == set(BLOCK_NAMES)
    mixed = variables["params"]["Mixed_5b"]["Branch_1_Conv2d_0b_5x5"]
    assert mixed["Conv"]["kernel"].shape == (5, 5, 48, 64)
    assert set(mixed["BatchNorm"]) == {"bias"}  # Keras's scale=False: beta only
    assert set(variables["batch_stats"]["Mixed_5b"]["Branch_1_Conv2d_0b_5x5"]["BatchNorm"]) == {
        "mean",
        "var",
    }


@pytest.mark.parametrize("size", [75, 299])
@pytest.mark.parametrize("num_classes", [1, 7])
def test_output_shape_and_dtype(size, num_classes):
    model = InceptionV3(num_classes=num_classes)
    x = jax.ShapeDtypeStruct((3, size, size, 3), jnp.float32)
    variables = _abstract_variables(model, size)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (3, num_classes) and out.dtype == jnp.float32


def test_non_square_input_and_features_without_top():
    model = InceptionV3(include_top=False)
    x = jax.ShapeDtypeStruct((2, 80, 120, 3), jnp.float32)
    variables = _abstract_variables(model, 80)
    assert "Logits" not in variables["params"]
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (2, 2048) and out.dtype == jnp.float32


@pytest.mark.parametrize("shape", [(1, 74, 299, 3), (1, 299, 74, 3), (299, 299, 3)])
def test_too_small_or_non_nhwc_input_is_refused(shape):
    model = InceptionV3()
    with pytest.raises(ValueError, match="input shape"):
        model.init(jax.random.key(0), jnp.zeros(shape), train=False)


@pytest.mark.parametrize(
    "knobs, pattern",
    [
        ({"hidden_activation": "gelu"}, "hidden_activation"),
        ({"width_multiplier": 0.0}, "width_multiplier"),
        ({"num_classes": 0}, "num_classes"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
    ],
)
def test_bad_knobs_are_refused_by_name(knobs, pattern):
    with pytest.raises(ValueError, match=pattern):
        _abstract_variables(InceptionV3(**knobs), 75)


def test_width_multiplier_rule():
    assert scaled_channels(192, 1.0) == 192
    assert scaled_channels(192, 0.5) == 96
    assert scaled_channels(32, 0.1) == 8  # floor of 8 channels
    variables = _abstract_variables(InceptionV3(width_multiplier=0.5), 75)
    assert variables["params"]["Conv2d_4a_3x3"]["Conv"]["kernel"].shape == (3, 3, 40, 96)


def test_init_variables_is_deterministic_in_the_key_and_matches_init_layout():
    model = InceptionV3(width_multiplier=TINY)
    init = _jit(lambda key: init_variables(model, key))
    a, b, c = init(jax.random.key(0)), init(jax.random.key(0)), init(jax.random.key(5))
    assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, a, b)))
    kernel_a = a["params"]["Mixed_6b"]["Branch_0_Conv2d_0a_1x1"]["Conv"]["kernel"]
    kernel_c = c["params"]["Mixed_6b"]["Branch_0_Conv2d_0a_1x1"]["Conv"]["kernel"]
    assert not np.array_equal(kernel_a, kernel_c)
    # Same tree, shapes and dtypes as model.init (eval_shape of it).
    expected = abstract_variables(model)
    shapes = jax.tree_util.tree_map(lambda v: (v.shape, v.dtype), a)
    assert shapes == jax.tree_util.tree_map(lambda v: (v.shape, v.dtype), expected)


def test_init_variables_draws_glorot_uniform_kernels():
    variables = _init(InceptionV3(width_multiplier=TINY))
    kernel = np.asarray(variables["params"]["Mixed_7c"]["Branch_2_Conv2d_0b_3x3"]["Conv"]["kernel"])
    bound = np.sqrt(6.0 / (9 * kernel.shape[2] + 9 * kernel.shape[3]))
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.99 * bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3.0), rtol=0.05)
    bn = variables["batch_stats"]["Mixed_7c"]["Branch_2_Conv2d_0b_3x3"]["BatchNorm"]
    assert np.all(bn["mean"] == 0) and np.all(bn["var"] == 1)
    assert np.all(variables["params"]["Logits"]["Dense"]["bias"] == 0)


def test_flax_init_is_deterministic_in_the_key_and_sows_no_stats():
    # model.init of the whole network compiles for a minute on CPU; one ConvBN block shows
    # the mechanism (each parameter's rng is derived from the explicit key and its path).
    block = ConvBN(features=16, kernel_size=(3, 3))
    x = jnp.ones((1, 9, 9, 3))
    init = _jit(lambda key: block.init(key, x, train=False))
    a, b, c = init(jax.random.key(0)), init(jax.random.key(0)), init(jax.random.key(1))
    np.testing.assert_array_equal(a["params"]["Conv"]["kernel"], b["params"]["Conv"]["kernel"])
    assert not np.array_equal(a["params"]["Conv"]["kernel"], c["params"]["Conv"]["kernel"])
    assert set(abstract_variables(InceptionV3())) == {"params", "batch_stats"}


def test_no_batchnorm_leaves_no_batch_stats_and_gives_convs_a_bias():
    model = InceptionV3(width_multiplier=TINY, use_batchnorm=False)
    variables = _init(model)
    assert set(variables) == {"params"}
    assert set(variables["params"]["Conv2d_1a_3x3"]) == {"Conv"}
    assert variables["params"]["Conv2d_1a_3x3"]["Conv"]["bias"].shape == (8,)
    logits = _jit(lambda v, x: model.apply(v, x, train=True))(variables, _images(2))
    assert logits.shape == (2, 1) and bool(jnp.all(jnp.isfinite(logits)))


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def test_bf16_compute_keeps_float32_params_and_float32_logits():
    model = InceptionV3(width_multiplier=TINY, dtype=jnp.bfloat16)
    variables = _init(model)
    x = _images(2)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(abstract_variables(model))}
    assert dtypes == {jnp.dtype(jnp.float32)}
    logits, updates = _jit(
        lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
    )(variables, x)
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    stats_dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(updates)}
    assert stats_dtypes == {jnp.dtype(jnp.float32)}
    # The convolutions really run in bf16: the jaxpr holds bf16 convolutions only.
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    conv_dtypes = {
        eqn.outvars[0].aval.dtype
        for eqn in _all_eqns(jaxpr)
        if eqn.primitive.name == "conv_general_dilated"
    }
    assert conv_dtypes == {jnp.dtype(jnp.bfloat16)}


def test_sigmoid_hidden_activations_shrink_early_gradients_relative_to_relu(relu_run):
    _, _, x, _, (_, relu_grads, _, _) = relu_run
    model = InceptionV3(width_multiplier=TINY, hidden_activation="sigmoid")
    variables = _init(model)
    _, sigmoid_grads, _, _ = _make_train_pass(model)(
        variables["params"], variables["batch_stats"], x, LABELS
    )
    ratios = {}
    for name, grads in (("relu", relu_grads), ("sigmoid", sigmoid_grads)):
        norms = module_grad_norms(grads)
        # Early-layer gradient relative to the head's: the vanishing-gradient signature.
        ratios[name] = float(norms["Conv2d_1a_3x3"] / norms["Logits"])
    assert ratios["sigmoid"] < 1e-2 * ratios["relu"]


def test_width_multiplied_variant_trains_one_sgd_step(relu_run):
    _, variables, x, train_pass, (loss, grads, new_stats, _) = relu_run
    params = variables["params"]
    # The step's size is set by the gradient's norm. BatchNorm makes the loss scale-invariant in each
    # conv kernel, so the gradient grows like 1/|kernel| and is ~1.4e4 at this width; the loss is
    # also sharply curved there. A fixed lr of 0.5 moved the stem kernels by ~1e3 and its outcome was
    # chance (loss 1.23 -> 0.24 on jax 0.10.2, -> 1.74 on 0.12). A step of length 1e-5 stays in the
    # range where the gradient predicts the change (1.23 -> 1.15 on both), yet moves every leaf.
    lr = 1e-5 / float(optax.tree.norm(grads))
    tx = optax.sgd(lr)
    new_params = _jit(lambda p, g: optax.apply_updates(p, tx.update(g, tx.init(p))[0]))(params, grads)
    assert bool(jnp.isfinite(loss))
    changed = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new_params))
    ]
    assert all(changed)
    new_loss, *_ = train_pass(new_params, new_stats, x, LABELS)
    assert float(new_loss) < float(loss)  # the step went downhill on its own batch


def test_batchnorm_momentum_is_keras_099(relu_run):
    _, variables, x, _, (_, _, new_stats, _) = relu_run
    # Starting from mean 0, one update gives (1 - 0.99) * batch mean of Conv2d_1a's output.
    kernel = variables["params"]["Conv2d_1a_3x3"]["Conv"]["kernel"]
    conv = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    expected = 0.01 * conv.mean(axis=(0, 1, 2))
    got = new_stats["Conv2d_1a_3x3"]["BatchNorm"]["mean"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_stats_and_grad_norms_come_out_of_the_jitted_step(relu_run):
    _, _, _, _, (_, grads, _, stats) = relu_run
    blocks = [b for b in BLOCK_NAMES if b != "AuxLogits"]
    assert set(stats) == set(blocks)  # (a dict out of jit comes back with sorted keys)
    assert list(activation_stats(stats)) == blocks  # the helper orders them as the network
    assert all(int(s["nonfinite"]) == 0 for s in stats.values())
    assert all(0 < float(s["max_abs"]) < np.inf for s in stats.values())
    norms = module_grad_norms(grads)
    assert list(norms) == blocks
    expected = float(optax.tree.norm(grads["Mixed_6a"]))
    np.testing.assert_allclose(float(norms["Mixed_6a"]), expected, rtol=1e-5)
    assert all(float(n) > 0 for n in norms.values())


def test_stats_count_nonfinite_values_and_report_the_finite_maximum(relu_run):
    model, variables, x, _, _ = relu_run
    apply_with_stats = _jit(lambda v, x: model.apply(v, x, train=False, mutable=["stats"]))
    _, clean = apply_with_stats(variables, x)
    _, mutated = apply_with_stats(variables, x.at[0, 10, 10, 0].set(jnp.nan))
    clean, stats = activation_stats(clean), activation_stats(mutated)
    assert int(clean["Conv2d_1a_3x3"]["nonfinite"]) == 0
    # One NaN pixel: NaN outputs wherever a 3x3/2 window covers it, in every channel.
    assert int(stats["Conv2d_1a_3x3"]["nonfinite"]) >= 8
    assert 0 < float(stats["Conv2d_1a_3x3"]["max_abs"]) < np.inf
    assert int(stats["Logits"]["nonfinite"]) == 1  # only image 0's logit
    # A huge input is seen as a huge finite maximum.
    _, mutated = apply_with_stats(variables, x.at[0, 10, 10, 0].set(1e30))
    assert float(activation_stats(mutated)["Conv2d_1a_3x3"]["max_abs"]) > 1e20


def test_stats_cost_nothing_unless_asked(relu_run):
    model, variables, x, _, _ = relu_run
    # Without a mutable 'stats' nothing is sown: the jaxpr holds no is_finite at all.
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert not any(e.primitive.name == "is_finite" for e in _all_eqns(jaxpr))
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False, mutable=["stats"]))(variables, x)
    assert any(e.primitive.name == "is_finite" for e in _all_eqns(jaxpr))


def test_dropout_acts_in_training_only():
    model = InceptionV3(width_multiplier=TINY, dropout_rate=0.5, num_classes=8)
    variables = _init(model)
    x = _images(2)

    @_jit
    def run(variables, x, key):
        train, _ = model.apply(
            variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
        )
        return train, model.apply(variables, x, train=False)

    train_a, eval_a = run(variables, x, jax.random.key(1))
    train_b, eval_b = run(variables, x, jax.random.key(2))
    assert not np.allclose(train_a, train_b)
    np.testing.assert_array_equal(eval_a, eval_b)


def test_aux_logits_returned_in_training_only():
    model = InceptionV3(width_multiplier=TINY, aux_logits=True, num_classes=3)
    variables = _init(model)
    x = _images(2)

    @_jit
    def run(variables, x):
        (logits, aux), _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, aux, model.apply(variables, x, train=False)

    logits, aux, eval_logits = run(variables, x)
    assert logits.shape == aux.shape == eval_logits.shape == (2, 3)
    assert not np.allclose(logits, aux)


def test_name_stack_names_blocks(relu_run):
    model, variables, x, _, _ = relu_run
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, x)
    stacks = {str(eqn.source_info.name_stack) for eqn in _all_eqns(jaxpr)}
    assert any(s.startswith("InceptionV3/Mixed_5b/Branch_1_Conv2d_0b_5x5/") for s in stacks)
    assert any(s.startswith("InceptionV3/Logits/") for s in stacks)


def test_predict_is_sigmoid_of_logits(relu_run):
    model, variables, x, _, _ = relu_run
    probs, logits = _jit(
        lambda v, x: (predict(model, v, x), model.apply(v, x, train=False))
    )(variables, x)
    np.testing.assert_allclose(probs, jax.nn.sigmoid(logits), rtol=1e-6)
    assert probs.shape == (4, 1) and bool(jnp.all((probs > 0) & (probs < 1)))


@pytest.mark.slow
def test_full_size_model_trains_one_step_at_299():
    """The real model (width 1, 299x299) once: finite loss, stats for every block, all grads."""
    model = InceptionV3(num_classes=1)
    variables = _init(model)
    x = _images(batch=2, size=299)
    loss, grads, _, stats = _make_train_pass(model)(
        variables["params"], variables["batch_stats"], x, LABELS[:2]
    )
    assert bool(jnp.isfinite(loss))
    assert all(int(s["nonfinite"]) == 0 for s in stats.values())
    norms = module_grad_norms(grads)
    assert all(0 < float(n) < np.inf for n in norms.values())
