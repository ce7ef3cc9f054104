"""2-D convolution with Keras-compatible kernels, whose formulation is chosen per backend.

Contract (kept stable for the model): `Conv(features, kernel_size, strides, padding, use_bias,
dtype, param_dtype, kernel_init, impl)`; input NHWC; parameter `kernel` of shape
(kh, kw, in_features, features), exactly Keras's and `flax.linen.Conv`'s layout, so weights
move between them unchanged whatever formulation runs.

Formulations (`impl`), all equal in value and gradient (tests/models/test_conv.py):
- "xla": one `lax.conv_general_dilated`; its gradients are XLA's transposed convolutions.
- "fast": the fastest correct formulation measured on XLA's CPU backend, chosen per shape by
  `choose_formulation` (why each choice: see the comments there).
- "tuned": per shape, the formulation measured fastest on this machine (`nanlab.models.conv_tuning`
  times "xla" and "fast" with each kernel-gradient formulation and activates the table); a shape
  the active table lacks, or no table at all, gets "fast"'s fixed choice.
- "auto": "tuned" when `jax.default_backend() == "cpu"`, else "xla" (cuDNN's convolutions on GPU).
- "matmul", "im2col", "taps", "swap": one formulation forced everywhere it applies (ablations).

Besides the formulation, the kernel library that runs a program's convolutions is XLA's choice on
CPU, set per compiled program (`compiler_options(library)`, see `LIBRARIES`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["Conv", "IMPLS", "LIBRARIES", "compiler_options", "conv", "resolve_impl"]

Initializer = Callable[..., jax.Array]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLS = ("xla", "fast", "tuned", "auto", "matmul", "im2col", "taps", "swap")
KERNEL_GRADS = ("xla", "im2col", "taps", "swap")
PADDINGS = ("SAME", "VALID")
# Who runs the convolutions (and matmuls) of a program that XLA compiles for the CPU:
# - "default": XLA's own choice; since jax 0.10 that is YNNPACK for convolutions and dots.
# - "eigen": YNNPACK off, so XLA's runtime (Eigen) runs them. Measured on an Intel Xeon with AVX-512
#   and AMX (jax 0.10.2, 2 cores; benchmarks/results/bench_model.md): inference of InceptionV3
#   1.27-1.38x faster, and XLA's backward-filter convolution of a 35x35 3x3 64->96 at batch 32
#   3.6x faster (25 against 89 ms), while the "fast" train step ran 0.6x: which one wins depends
#   on the program and the machine, so it is chosen per program.
LIBRARIES = ("default", "eigen")
_LIBRARY_OPTIONS = {"default": None, "eigen": {"xla_cpu_experimental_ynn_fusion_type": ""}}


def compiler_options(library: str) -> dict[str, str] | None:
    """`jax.jit(..., compiler_options=...)` that make XLA run the program's convolutions with `library`.

    Args:
      library: one of `LIBRARIES`.

    Returns:
      The XLA options, or None (XLA's defaults) for "default" and on backends other than the CPU
      (the options name CPU-only libraries).
    """
    if library not in LIBRARIES:
        raise ValueError(f"library must be one of {LIBRARIES}, got {library!r}")
    if jax.default_backend() != "cpu":
        return None
    options = _LIBRARY_OPTIONS[library]
    return None if options is None else dict(options)


def resolve_impl(impl: str) -> str:
    """Turn "auto" into the formulation for the current default backend.

    Args:
      impl: one of `IMPLS`.

    Returns:
      `impl` itself, or for "auto": "tuned" on CPU, "xla" elsewhere (cuDNN is fast on GPU).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "tuned" if jax.default_backend() == "cpu" else "xla"
    return impl


# ------------------------------------------------------------------------------ the tuned choices

# The active tuning table: shape key -> "xla" or "fast:<kernel grad>" ("fast" for a 1x1). Empty
# unless a caller activates one (`nanlab.models.conv_tuning.activate`): the library never reads a
# cache file behind its user's back, and tests see "fast"'s fixed choices.
_TUNED: dict[str, str] = {}
_RECORDERS: list[list[str]] = []  # open `record_conv_keys` blocks; conv() appends the keys it meets


def conv_key(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], strides: tuple[int, int],
             padding: str, dtype: Any) -> str:
    """The tuning table's key of one convolution: input and kernel shapes, strides, padding, dtype."""
    return (f"x{'x'.join(map(str, x_shape))}-k{'x'.join(map(str, kernel_shape))}-s{strides[0]}x{strides[1]}"
            f"-{padding}-{jnp.dtype(dtype).name}")


def _tuned_choice(key: str) -> str | None:
    for keys in _RECORDERS:
        keys.append(key)
    return _TUNED.get(key)


Pads = tuple[tuple[int, int], tuple[int, int]]


def explicit_padding(
    spatial_shape: tuple[int, int],
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: str,
) -> Pads:
    """The (low, high) zero padding per spatial axis that "SAME"/"VALID" stand for (as XLA's)."""
    pads = lax.padtype_to_pads(spatial_shape, kernel_size, strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore[return-value]


def output_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
    """Output length of a convolution along one axis."""
    return (size + pad[0] + pad[1] - k) // stride + 1


def live_taps(size: int, k: int, stride: int, pad: tuple[int, int]) -> tuple[int, int]:
    """First and last kernel tap (along one axis) that ever multiplies a real input pixel.

    Output o reads input o*stride + i - pad_lo through tap i: a tap whose reads are all below 0
    or all above size-1 multiplies only padding zeros, contributes nothing and gets no gradient.
    """
    last_out = output_size(size, k, stride, pad) - 1
    first = max(0, pad[0] - last_out * stride)
    last = min(k - 1, pad[0] + size - 1)
    return first, last


def conv_xla(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    """The reference: XLA's convolution (NHWC input, HWIO kernel, explicit or named padding)."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=pads, dimension_numbers=_DIMENSION_NUMBERS
    )


def conv_1x1_matmul(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """An unpadded 1x1 convolution as a matmul over channels; its gradients are matmuls too.

    Measured here (jax 0.10.2, 2 cores): a 1x1 `lax.conv` trains at ~10 GFLOP/s, the same
    product as a channel `dot_general` at ~91 GFLOP/s.
    """
    sh, sw = strides
    x = x[:, ::sh, ::sw, :]  # a 1x1 window with stride s reads every s-th pixel
    return lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())))


def _tap(x_pad: jax.Array, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]):
    """The input pixels that kernel tap (i, j) multiplies, for every output pixel: (N, Ho, Wo, C)."""
    ho, wo = out_hw
    sh, sw = strides
    return lax.slice(
        x_pad,
        (0, i, j, 0),
        (x_pad.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x_pad.shape[3]),
        (1, sh, sw, 1),
    )


def kernel_grad_im2col(x, g, kernel_size, strides, pads):
    """dL/dkernel as ONE matmul: patches (N*Ho*Wo, kh*kw*Cin)^T @ g (N*Ho*Wo, Cout).

    The patch columns are ordered (i, j, cin), so the result reshapes to (kh, kw, Cin, Cout).
    """
    kh, kw = kernel_size
    n, ho, wo, cout = g.shape
    x_pad = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    patches = jnp.concatenate(
        [_tap(x_pad, i, j, (ho, wo), strides) for i in range(kh) for j in range(kw)], axis=-1
    )
    dk = lax.dot_general(
        patches.reshape(n * ho * wo, -1),
        g.reshape(n * ho * wo, cout),
        (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32,  # accumulate long (N*Ho*Wo) sums in f32 under bf16
    )
    return dk.reshape(kh, kw, x.shape[3], cout)


def kernel_grad_taps(x, g, kernel_size, strides, pads):
    """dL/dkernel as kh*kw matmuls, one per kernel tap: tap(i, j)^T @ g -> kernel[i, j]."""
    kh, kw = kernel_size
    n, ho, wo, cout = g.shape
    x_pad = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    g2 = g.reshape(n * ho * wo, cout)
    taps = [
        lax.dot_general(
            _tap(x_pad, i, j, (ho, wo), strides).reshape(n * ho * wo, -1),
            g2,
            (((0,), (0,)), ((), ())),
            preferred_element_type=jnp.float32,  # accumulate long sums in f32 under bf16
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(taps).reshape(kh, kw, x.shape[3], cout)


def kernel_grad_swap(x, g, kernel_size, strides, pads):
    """dL/dkernel as a FORWARD convolution with the roles swapped.

    dk[i, j, c, o] = sum_{n, h, w} x_pad[n, h*s + i, w*s + j, c] * g[n, h, w, o]: a convolution
    whose "batch" is Cin, whose "input features" are N, whose window is g (Ho x Wo, dilated by
    the stride) and whose output is kh x kw. XLA runs it on its forward-convolution path.
    """
    (pt, pb), (pl, pr) = pads
    kh, kw = kernel_size
    _, ho, wo, _ = g.shape
    sh, sw = strides
    # The padded input may hold rows/columns that no window reaches (VALID with stride): trim them.
    hi_h = pb - (x.shape[1] + pt + pb - ((ho - 1) * sh + kh))
    hi_w = pr - (x.shape[2] + pl + pr - ((wo - 1) * sw + kw))
    dk = lax.conv_general_dilated(
        jnp.transpose(x, (3, 1, 2, 0)),  # (Cin, H, W, N): Cin as batch, N as features
        jnp.transpose(g, (1, 2, 0, 3)),  # (Ho, Wo, N, Cout): g as the kernel
        window_strides=(1, 1),
        padding=((pt, hi_h), (pl, hi_w)),
        rhs_dilation=strides,
        dimension_numbers=_DIMENSION_NUMBERS,
        preferred_element_type=jnp.float32,
    )  # (Cin, kh, kw, Cout)
    return jnp.transpose(dk, (1, 2, 0, 3))


def kernel_grad_xla(x, g, kernel_size, strides, pads):
    """dL/dkernel by XLA's own transpose rule (its backward-filter convolution)."""
    kernel = jnp.zeros((*kernel_size, x.shape[3], g.shape[3]), x.dtype)  # only its shape matters
    _, vjp = jax.vjp(lambda k: conv_xla(x, k, strides, pads), kernel)
    return vjp(g)[0]


_KERNEL_GRAD_FNS = {
    "xla": kernel_grad_xla,
    "im2col": kernel_grad_im2col,
    "taps": kernel_grad_taps,
    "swap": kernel_grad_swap,
}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv_custom_grad(x, kernel, strides, pads, kernel_grad):
    """XLA's forward convolution with a chosen kernel-gradient formulation.

    Args:
      x: (N, H, W, Cin) input.
      kernel: (kh, kw, Cin, Cout).
      strides: (sh, sw).
      pads: ((top, bottom), (left, right)) zero padding.
      kernel_grad: one of `KERNEL_GRADS`: how the backward pass computes dL/dkernel.

    Returns:
      (N, Ho, Wo, Cout), equal to `conv_xla(x, kernel, strides, pads)`.
    """
    return conv_xla(x, kernel, strides, pads)


def _conv_custom_grad_fwd(x, kernel, strides, pads, kernel_grad):
    return conv_xla(x, kernel, strides, pads), (x, kernel)


def _conv_custom_grad_bwd(strides, pads, kernel_grad, residuals, g):
    x, kernel = residuals
    # Input gradient: XLA's transposed convolution, which runs on its fast forward path
    # (measured 35-115 GFLOP/s here); XLA drops it when x needs no gradient (the stem's input).
    _, vjp_x = jax.vjp(lambda x_: conv_xla(x_, kernel, strides, pads), x)
    (dx,) = vjp_x(g)
    dk = _KERNEL_GRAD_FNS[kernel_grad](x, g, kernel.shape[:2], strides, pads)
    return dx, dk.astype(kernel.dtype)


conv_custom_grad.defvjp(_conv_custom_grad_fwd, _conv_custom_grad_bwd)


def choose_kernel_grad(
    x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], strides: tuple[int, int]
) -> str:
    """The kernel-gradient formulation "fast" uses for a (live-tap-trimmed) convolution.

    Args:
      x_shape: (N, H, W, Cin).
      kernel_shape: (kh, kw, Cin, Cout).
      strides: (sh, sw).

    Returns:
      One of `KERNEL_GRADS`.

    Measured on InceptionV3's shapes (benchmarks/bench_model.py --conv-shapes; jax 0.10.2,
    2 shared cores, batch 8 at 299 and batch 32 at 75; GFLOP/s of the kernel gradient):
    - per-tap matmuls ("taps") beat XLA's backward-filter convolution on most shapes: the
      35x35 3x3s 24-50 against 13-29, the 3x3 stride-2 VALID reductions (Mixed_6a/7a) 61-67
      against ~20, the stem's 73x73 80->192 3x3 ~20 against ~3-5, the 7x1s 41-72 against
      17-29, the 1x3/3x1s on 8x8 maps 26-97 against 13-99; the 1x7s are a tie (25-86 against
      20-71). im2col (one big matmul) was close to taps but below it on most shapes, because
      its patch matrix costs one more pass over kh*kw copies of the input.
    - 5x5 (Mixed_5b-d, 35x35, 48->64): XLA's own at 20-31 against 7-13 for taps/im2col (25
      thin matmuls with only 48 rows each), so it stays with XLA.
    """
    kh, kw = kernel_shape[:2]
    if kh * kw >= 25:
        return "xla"
    return "taps"


def trim_dead_taps(
    x_shape: tuple[int, ...], kernel: jax.Array, strides: tuple[int, int], pads: Pads
) -> tuple[jax.Array, Pads]:
    """Drop the kernel rows/columns that only ever multiply padding (same output, less work).

    Matters on small maps: at 75x75 input Mixed_7 runs its 3x3, 1x3 and 3x1 convolutions on
    1x1 maps, where only the centre tap sees data; XLA's convolution ran them at 2-10 GFLOP/s
    (nominal) there, against ~50-100 as the 1x1 matmul they reduce to.

    Returns:
      (kernel[first_i:last_i+1, first_j:last_j+1], the padding that keeps the output the same).
    """
    new_pads = []
    bounds = []
    for axis in (0, 1):
        k, pad = kernel.shape[axis], pads[axis]
        first, last = live_taps(x_shape[1 + axis], k, strides[axis], pad)
        hi = pad[1] - (k - 1 - last)  # the dropped trailing taps needed this much padding
        if hi < 0:  # never for SAME/VALID; keep the axis whole rather than crop the input
            first, last, hi = 0, k - 1, pad[1]
        bounds.append((first, last + 1))
        new_pads.append((pad[0] - first, hi))
    (i0, i1), (j0, j1) = bounds
    if (i0, i1, j0, j1) == (0, kernel.shape[0], 0, kernel.shape[1]):
        return kernel, pads
    return kernel[i0:i1, j0:j1], tuple(new_pads)  # type: ignore[return-value]


def centred_pads_and_crop(
    x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], pads: Pads
) -> tuple[Pads, tuple[int, int], tuple[int, int]] | None:
    """For a stride-1 convolution with less than "SAME" padding: SAME's pads and the crop back.

    XLA's CPU forward convolution ran VALID stride-1 3x3s 2.4-4.4x slower than the same
    convolution with SAME padding (jax 0.10.2, 2 shared cores: 73x73 80->192 at 14 against 33
    GFLOP/s, 149x149 32->32 at 6 against 27), though SAME does 3-6% more work there. So run
    them padded as SAME and crop the output: InceptionV3's stem (Conv2d_2a, Conv2d_4a).

    Returns:
      (SAME pads, (row offset, column offset), (rows, columns) of the output), or None when
      the padding is already at least SAME's.
    """
    same, offsets, sizes = [], [], []
    for axis in (0, 1):
        k, (lo, hi) = kernel_shape[axis], pads[axis]
        same_lo, same_hi = (k - 1) // 2, k - 1 - (k - 1) // 2
        if lo > same_lo or hi > same_hi:
            return None
        same.append((same_lo, same_hi))
        offsets.append(same_lo - lo)
        sizes.append(x_shape[1 + axis] + lo + hi - k + 1)
    if tuple(same) == tuple(pads):
        return None
    return tuple(same), tuple(offsets), tuple(sizes)  # type: ignore[return-value]


def conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: tuple[int, int] = (1, 1),
    padding: str = "SAME",
    impl: str = "auto",
    *,
    kernel_grad: str | None = None,
) -> jax.Array:
    """NHWC x HWIO convolution by the formulation `impl` picks for this shape.

    Args:
      x: (N, H, W, Cin).
      kernel: (kh, kw, Cin, Cout), same dtype as x.
      strides: (sh, sw).
      padding: "SAME" or "VALID".
      impl: one of `IMPLS`.
      kernel_grad: with impl "fast", one of `KERNEL_GRADS` in place of its fixed choice (what
        `conv_tuning` times).

    Returns:
      (N, Ho, Wo, Cout).
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    strides = tuple(int(s) for s in strides)
    impl = resolve_impl(impl)
    if kernel_grad is not None and kernel_grad not in KERNEL_GRADS:
        raise ValueError(f"kernel_grad must be one of {KERNEL_GRADS}, got {kernel_grad!r}")
    if impl == "tuned":
        choice = _tuned_choice(conv_key(x.shape, kernel.shape, strides, padding, x.dtype)) or "fast"
        impl, _, kernel_grad = choice.partition(":")
        kernel_grad = kernel_grad or None
    pads = explicit_padding(x.shape[1:3], kernel.shape[:2], strides, padding)
    if impl == "xla":
        return conv_xla(x, kernel, strides, pads)
    if impl == "fast":
        kernel, pads = trim_dead_taps(x.shape, kernel, strides, pads)
    is_1x1 = kernel.shape[:2] == (1, 1) and pads == ((0, 0), (0, 0))
    if is_1x1 and impl in ("fast", "matmul"):
        return conv_1x1_matmul(x, kernel, strides)
    if impl == "matmul":
        return conv_xla(x, kernel, strides, pads)
    if impl == "fast":
        kernel_grad = kernel_grad or choose_kernel_grad(x.shape, kernel.shape, strides)
    else:
        kernel_grad = impl
    recentred = centred_pads_and_crop(x.shape, kernel.shape, pads) if impl == "fast" else None
    if strides != (1, 1) or recentred is None:
        return conv_custom_grad(x, kernel, strides, pads, kernel_grad)
    same_pads, (top, left), (rows, cols) = recentred
    y = conv_custom_grad(x, kernel, strides, same_pads, kernel_grad)
    return y[:, top : top + rows, left : left + cols, :]


class Conv(nn.Module):
    """NHWC convolution, no dilation, no groups; `impl` picks the formulation (see module doc)."""

    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: str = "SAME"
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.glorot_uniform()
    bias_init: Initializer = nn.initializers.zeros
    impl: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        kernel = self.param(
            "kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype
        )
        dtype = self.dtype or x.dtype
        # Compute in `dtype`; the cast's transpose returns the kernel gradient in param_dtype.
        y = conv(x.astype(dtype), kernel.astype(dtype), self.strides, self.padding, self.impl)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y
