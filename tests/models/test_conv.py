"""Every convolution formulation equals XLA's, in values and in both gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanlab.models import conv as conv_lib
from nanlab.models.conv import Conv, conv

FORMULATIONS = ("fast", "matmul", "im2col", "taps", "swap")

# (kernel_size, strides, padding, (height, width)): every shape class of InceptionV3, on small
# odd and even maps, plus the 1x1 and 3x3 maps where "fast" drops taps that only see padding
# (Mixed_7 and Mixed_6 at a 75x75 input).
SHAPE_CASES = [
    ((1, 1), (1, 1), "SAME", (5, 6)),
    ((1, 1), (1, 1), "VALID", (5, 6)),
    ((1, 1), (2, 2), "SAME", (5, 6)),
    ((3, 3), (1, 1), "SAME", (7, 6)),
    ((3, 3), (1, 1), "VALID", (7, 6)),
    ((3, 3), (2, 2), "VALID", (9, 8)),
    ((3, 3), (2, 2), "SAME", (8, 7)),
    ((1, 3), (1, 1), "SAME", (4, 5)),
    ((3, 1), (1, 1), "SAME", (4, 5)),
    ((1, 7), (1, 1), "SAME", (5, 9)),
    ((7, 1), (1, 1), "SAME", (9, 5)),
    ((5, 5), (1, 1), "SAME", (7, 7)),
    ((3, 3), (1, 1), "SAME", (1, 1)),
    ((1, 3), (1, 1), "SAME", (1, 1)),
    ((3, 1), (1, 1), "SAME", (1, 1)),
    ((7, 1), (1, 1), "SAME", (3, 3)),
    ((1, 7), (1, 1), "SAME", (3, 3)),
]


def _case_id(case):
    (kh, kw), (sh, _), padding, (h, w) = case
    return f"{kh}x{kw}-s{sh}-{padding}-{h}x{w}"


def _operands(kernel_size, strides, padding, hw, batch=2, cin=3, cout=4, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, *hw, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(*kernel_size, cin, cout)), jnp.float32)
    y = conv(x, kernel, strides, padding, impl="xla")
    cotangent = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    return x, kernel, cotangent


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _value_and_grads(impl, x, kernel, cotangent, strides, padding):
    y, vjp = jax.vjp(lambda a, k: conv(a, k, strides, padding, impl), x, kernel)
    dx, dk = vjp(cotangent)
    return y, dx, dk


def _assert_close(actual, expected, name):
    scale = float(jnp.max(jnp.abs(expected))) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


@pytest.mark.parametrize("case", SHAPE_CASES, ids=_case_id)
def test_every_formulation_equals_xla_in_value_and_gradients(case):
    kernel_size, strides, padding, hw = case
    x, kernel, cotangent = _operands(kernel_size, strides, padding, hw)
    expected = _value_and_grads("xla", x, kernel, cotangent, strides, padding)
    # "matmul" only changes 1x1s (it is XLA's convolution elsewhere).
    impls = FORMULATIONS if kernel_size == (1, 1) else tuple(i for i in FORMULATIONS if i != "matmul")
    for impl in impls:
        actual = _value_and_grads(impl, x, kernel, cotangent, strides, padding)
        for name, a, e in zip(("value", "dx", "dkernel"), actual, expected):
            assert a.shape == e.shape, (impl, name)
            _assert_close(a, e, f"{impl} {name}")


JIT_VMAP_CASES = [("fast", SHAPE_CASES[i]) for i in (4, 5, 10, 12)] + [
    (impl, SHAPE_CASES[5]) for impl in ("taps", "swap", "im2col")
]


@pytest.mark.parametrize(
    "impl, case", JIT_VMAP_CASES, ids=[f"{i}-{_case_id(c)}" for i, c in JIT_VMAP_CASES]
)
def test_formulations_equal_xla_under_jit_grad_and_vmap(impl, case):
    kernel_size, strides, padding, hw = case
    x, kernel, _ = _operands(kernel_size, strides, padding, hw, batch=3)

    def loss(impl_, a, k):
        return jnp.sum(jnp.sin(conv(a, k, strides, padding, impl_)))

    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    for a, e in zip(grad(impl, x, kernel), grad("xla", x, kernel)):
        _assert_close(a, e, f"jit(grad) {impl}")
    # vmap over a leading axis of single images: per-example gradients.
    per_example = jax.vmap(lambda impl_, a, k: grad(impl_, a[None], k), in_axes=(None, 0, None))
    for a, e in zip(per_example(impl, x, kernel), per_example("xla", x, kernel)):
        _assert_close(a, e, f"vmap(jit(grad)) {impl}")


def test_a_wrong_kernel_gradient_is_caught():
    """The comparison can fail: taps read in (j, i) order instead of (i, j) differ from XLA's."""
    kernel_size, strides, padding, hw = (1, 3), (1, 1), "SAME", (4, 5)
    x, kernel, cotangent = _operands(kernel_size, strides, padding, hw)
    pads = conv_lib.explicit_padding(hw, kernel_size, strides, padding)
    expected = conv_lib.kernel_grad_xla(x, cotangent, kernel_size, strides, pads)
    wrong = conv_lib.kernel_grad_taps(x, cotangent, kernel_size, strides, pads)[:, ::-1]
    with pytest.raises(AssertionError):
        _assert_close(wrong, expected, "reversed taps")


def test_auto_is_tuned_on_cpu_and_xla_elsewhere(monkeypatch):
    # "tuned" is "fast" wherever no tuning table is active (tests/models/test_conv_tuning.py).
    assert jax.default_backend() == "cpu"
    assert conv_lib.resolve_impl("auto") == "tuned"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv_lib.resolve_impl("auto") == "xla"


def _primitives(fn, *args):
    return {str(eqn.primitive) for eqn in jax.make_jaxpr(fn)(*args).eqns}


def test_auto_runs_the_fast_formulations_on_cpu():
    x, kernel, _ = _operands((1, 1), (1, 1), "SAME", (5, 5))
    # 1x1: a channel matmul, no convolution at all.
    assert "conv_general_dilated" not in _primitives(lambda a, k: conv(a, k, impl="auto"), x, kernel)
    assert "dot_general" in _primitives(lambda a, k: conv(a, k, impl="auto"), x, kernel)
    assert "conv_general_dilated" in _primitives(lambda a, k: conv(a, k, impl="xla"), x, kernel)
    # 3x3: XLA's forward with the custom kernel gradient.
    x, kernel, _ = _operands((3, 3), (1, 1), "SAME", (5, 5))
    assert "custom_vjp_call" in {
        p.split("[")[0] for p in _primitives(lambda a, k: conv(a, k, impl="auto"), x, kernel)
    }


def test_fast_trims_taps_that_only_see_padding():
    x, kernel, _ = _operands((3, 3), (1, 1), "SAME", (1, 1))
    # On a 1x1 map only the centre tap sees data: the 3x3 becomes a channel matmul.
    assert "conv_general_dilated" not in _primitives(lambda a, k: conv(a, k, impl="fast"), x, kernel)
    trimmed, pads = conv_lib.trim_dead_taps(x.shape, kernel, (1, 1), ((1, 1), (1, 1)))
    assert trimmed.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0))
    # On a 3x3 map a 7x1 keeps its 5 middle taps, with padding 2 on each side.
    x, kernel, _ = _operands((7, 1), (1, 1), "SAME", (3, 3))
    trimmed, pads = conv_lib.trim_dead_taps(x.shape, kernel, (1, 1), ((3, 3), (0, 0)))
    assert trimmed.shape[:2] == (5, 1) and pads == ((2, 2), (0, 0))
    # Nothing to trim on a large map.
    x, kernel, _ = _operands((3, 3), (2, 2), "VALID", (9, 8))
    assert conv_lib.trim_dead_taps(x.shape, kernel, (2, 2), ((0, 0), (0, 0)))[0] is kernel


def test_fast_runs_stride_1_valid_as_same_then_crops():
    # 3x3 VALID on 7x6: SAME pads (1, 1), crop one pixel each side back to 5x4.
    assert conv_lib.centred_pads_and_crop((2, 7, 6, 3), (3, 3, 3, 4), ((0, 0), (0, 0))) == (
        ((1, 1), (1, 1)),
        (1, 1),
        (5, 4),
    )
    # Already SAME: nothing to do.
    assert conv_lib.centred_pads_and_crop((2, 7, 6, 3), (3, 3, 3, 4), ((1, 1), (1, 1))) is None
    x, kernel, _ = _operands((3, 3), (1, 1), "VALID", (7, 6))
    jaxpr = str(jax.make_jaxpr(lambda a, k: conv(a, k, padding="VALID", impl="fast"))(x, kernel))
    assert "((1, 1), (1, 1))" in jaxpr


def test_fast_kernel_gradient_choice_per_shape_class():
    x_shape = (8, 35, 35, 48)
    assert conv_lib.choose_kernel_grad(x_shape, (5, 5, 48, 64), (1, 1)) == "xla"
    for kernel_size in [(3, 3), (1, 7), (7, 1), (1, 3), (3, 1)]:
        assert conv_lib.choose_kernel_grad(x_shape, (*kernel_size, 48, 64), (1, 1)) == "taps"
    assert conv_lib.choose_kernel_grad(x_shape, (3, 3, 48, 64), (2, 2)) == "taps"


@pytest.mark.parametrize("impl", ["xla", "fast", "auto"])
def test_module_keeps_the_keras_kernel_layout_and_equals_xla(impl):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 9, 3)), jnp.float32)
    module = Conv(5, (3, 3), strides=(2, 2), padding="VALID", use_bias=True, impl=impl)
    variables = module.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].shape == (3, 3, 3, 5)
    assert variables["params"]["bias"].shape == (5,)
    reference = Conv(5, (3, 3), strides=(2, 2), padding="VALID", use_bias=True, impl="xla")
    _assert_close(jax.jit(module.apply)(variables, x), jax.jit(reference.apply)(variables, x), impl)


@pytest.mark.parametrize("kernel_size", [(1, 1), (3, 3), (1, 7)])
def test_bfloat16_computes_in_bf16_and_returns_float32_kernel_gradients(kernel_size):
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, 8, 4)), jnp.float32)
    grads = {}
    for impl, dtype in [("fast", jnp.bfloat16), ("xla", jnp.float32)]:
        module = Conv(6, kernel_size, dtype=dtype, impl=impl)
        variables = module.init(jax.random.key(0), x)

        def loss(params, module=module):
            y = module.apply({"params": params}, x)
            assert y.dtype == module.dtype
            return jnp.sum(y.astype(jnp.float32) ** 2)

        grads[impl] = jax.jit(jax.grad(loss))(variables["params"])["kernel"]
    assert grads["fast"].dtype == jnp.float32
    # bf16 keeps 8 significant bits: agreement to a few bf16 epsilons of the gradient's scale.
    scale = float(jnp.max(jnp.abs(grads["xla"])))
    np.testing.assert_allclose(grads["fast"], grads["xla"], atol=0.05 * scale)


def test_bad_arguments_name_the_value():
    x, kernel, _ = _operands((3, 3), (1, 1), "SAME", (5, 5))
    with pytest.raises(ValueError, match="'same'"):
        conv(x, kernel, padding="same")
    with pytest.raises(ValueError, match="'cudnn'"):
        conv(x, kernel, impl="cudnn")


# ------------------------------------------------------------------------ the convolution library


def _fusion_kinds(compiled_text: str) -> set[str]:
    """The library fusions (YNNPACK's "ynn_fusion", XNNPACK's "xnn_fusion") in a compiled program."""
    return {name for name in ("ynn_fusion", "xnn_fusion") if f"%{name}" in compiled_text}


@pytest.mark.parametrize("case", [SHAPE_CASES[i] for i in (0, 3, 5, 9, 11)], ids=_case_id)
def test_every_formulation_under_eigen_equals_xla_under_the_default(case):
    """The library changes who computes, not what: every formulation compiled for Eigen equals
    XLA's convolution compiled with XLA's default library, in value and both gradients. Enough
    channels (32 -> 24) that YNNPACK takes the default's convolutions (it leaves those with <= 16)."""
    kernel_size, strides, padding, hw = case
    x, kernel, cotangent = _operands(kernel_size, strides, padding, hw, cin=32, cout=24)

    def value_and_grads(impl, options):
        run = jax.jit(lambda a, k, g: (lambda y, vjp: (y, *vjp(g)))(
            *jax.vjp(lambda a_, k_: conv(a_, k_, strides, padding, impl), a, k)), compiler_options=options)
        return run(x, kernel, cotangent)

    expected = value_and_grads("xla", conv_lib.compiler_options("default"))
    for impl in ("xla",) + FORMULATIONS:
        actual = value_and_grads(impl, conv_lib.compiler_options("eigen"))
        for name, a, e in zip(("value", "dx", "dkernel"), actual, expected):
            _assert_close(a, e, f"{impl} under eigen: {name}")


def test_the_eigen_options_reach_the_compiler():
    """Compiled with the "eigen" options, a convolution is no library fusion; the same program with
    XLA's defaults is one wherever this JAX hands convolutions to YNNPACK (0.10 onwards)."""
    x = jnp.ones((2, 9, 9, 32))
    kernel = jnp.ones((3, 3, 32, 48))
    fn = lambda a, k: conv(a, k, impl="xla")  # noqa: E731
    eigen = jax.jit(fn, compiler_options=conv_lib.compiler_options("eigen")).lower(x, kernel).compile().as_text()
    default = jax.jit(fn).lower(x, kernel).compile().as_text()
    assert _fusion_kinds(eigen) == set()
    assert "convolution(" in eigen
    if jax.__version_info__ >= (0, 10, 0):
        assert _fusion_kinds(default) == {"ynn_fusion"}


def test_compiler_options_per_library_and_backend(monkeypatch):
    assert conv_lib.compiler_options("default") is None
    assert conv_lib.compiler_options("eigen") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    conv_lib.compiler_options("eigen")["xla_cpu_experimental_ynn_fusion_type"] = "changed"  # a copy
    assert conv_lib.compiler_options("eigen") == {"xla_cpu_experimental_ynn_fusion_type": ""}
    with pytest.raises(ValueError, match="'mkl'"):
        conv_lib.compiler_options("mkl")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert conv_lib.compiler_options("eigen") is None  # CPU libraries: nothing to say to a GPU compiler
