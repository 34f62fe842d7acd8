"""Strided convolutions and their transposes, written for the backend that runs them.

The β-VAE paper's conv VAE (and every disentanglement study after it) is four 4×4 stride-2
convolutions down and four transposed convolutions up. XLA's GPU/TPU convolutions are fast
in every direction, so there these functions are ``lax.conv_general_dilated`` and
``lax.conv_transpose``. XLA:CPU is fast on the *forward* convolution of either kind (when
the transposed one is written by phases, below) but falls back to a generic kernel for the
input-dilated convolution that autodiff emits for a strided convolution's input gradient,
and for the weight gradient of a convolution with few output channels. Measured on one core
(batch 64, the 64×64 model; ``benchmarks/bench_vs_pytorch.py --layers``):

  encoder 32×32×32→32, input gradient: 29.8 ms (autodiff) → 6.9 ms (by phases, below);
  decoder 32×32×32→1, weight gradient: 17.4 ms (autodiff) → 1.8 ms (one matmul of the
  cotangent's strided slices, :func:`strided_conv_kernel_grad_taps`);
  decoder 32×32×32→1, input gradient: 5.6 ms → 0.9 ms (the adjoint strided convolution);
  the two 32×32×32→32 weight gradients as one matmul each: training step 120.7 → 109.0 ms;
  decoder 32×32×32→1, forward: 7.7 ms (four phases, each a matrix-vector product) → 3.0 ms
  (one convolution over the phases' shared window, :func:`_by_one_conv`);
  encoder 64×64×1→32, weight gradient: 3.7 ms → 1.8 ms (the same); with the previous line,
  the training step 3 % faster (paired, 40 alternating steps of both programs).

So on the CPU each layer is a ``jax.custom_vjp`` whose backward pass is made of the fast
forward kinds: the input gradient of a strided convolution is the transposed convolution of
the cotangent with the flipped, in/out-swapped kernel (evaluated by phases), and the input
gradient of a transposed convolution is the strided convolution of the cotangent with that
kernel. Same function, same float32 math: every path is tested equal to
``lax.conv_general_dilated`` / ``lax.conv_transpose`` in values and gradients.

Layout NHWC, kernels HWIO (the transposed convolution's kernel is *not* flipped, as in
``lax.conv_transpose`` and flax's ``ConvTranspose``). The CPU path covers padding "SAME"
with spatial sizes divisible by the stride and kernels a multiple of the stride (what the
conv models use); anything else takes XLA's native ops.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
IMPLS = ("auto", "native", "cpu")
# A transposed convolution with fewer output channels than this runs as one convolution
# (_by_one_conv) and takes its weight gradient from strided slices (strided_conv_kernel_grad_taps);
# with more, by phases and XLA's or the matmul gradient. Measured at 1 and 3 channels (the
# images') and 32; the bound is the one measured for the space-to-depth sums the slices replaced
# (1 channel 2.7 vs 17.4 ms, 32: 45.9 vs 11.9).
SMALL_OUT_CHANNELS = 8


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def resolve_impl(impl: str = "auto") -> str:
    """'native' (XLA's convolutions) or 'cpu' (the custom-VJP formulation); 'auto' picks 'cpu'
    on the CPU backend and 'native' elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; choose from {IMPLS}")
    if impl == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "native"
    return impl


def _cpu_path_applies(spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                      padding: str) -> bool:
    return padding == "SAME" and all(n % s == 0 and k % s == 0 for n, k, s in zip(spatial, kernel, strides))


def flip_swap(kernel: jax.Array) -> jax.Array:
    """The kernel [kh, kw, I, O] flipped in space with I and O swapped: [kh, kw, O, I]."""
    return jnp.swapaxes(kernel[::-1, ::-1], 2, 3)


# ----------------------------------------------------------------------------------------
# Native ops.


def conv_native(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: str) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, tuple(strides), padding, dimension_numbers=DIMENSION_NUMBERS)


def conv_transpose_native(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: str) -> jax.Array:
    return lax.conv_transpose(x, kernel, tuple(strides), padding, dimension_numbers=DIMENSION_NUMBERS)


# ----------------------------------------------------------------------------------------
# Transposed convolution by phases (forward of the CPU path, and the strided conv's input gradient).


def transpose_padding(k: int, s: int, padding: str) -> tuple[int, int]:
    """(low, high) padding of the dilated input that ``lax.conv_transpose`` uses."""
    if padding == "SAME":
        pad_len = k + s - 2
        low = k - 1 if s > k - 1 else math.ceil(pad_len / 2)
    elif padding == "VALID":
        pad_len = k + s - 2 + max(k - s, 0)
        low = k - 1
    else:
        raise ValueError(f"padding {padding!r} is not supported; use 'SAME' or 'VALID'")
    return low, pad_len - low


def conv_transpose_by_phases(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int],
                             padding: str = "SAME") -> jax.Array:
    """``lax.conv_transpose(x, kernel, strides, padding)`` (NHWC, HWIO, no kernel flip), computed
    as s² stride-1 convolutions over the undilated input, one per output phase, interleaved.

    XLA:CPU never builds the input-dilated convolution, for which it falls back to a generic
    kernel ~30× slower than this on a 64×64 decoder layer.

    For an output position o = s·m + r along an axis, only the taps t ≡ (pad_low − r) mod s of
    the kernel meet a non-zero of the dilated input, at input index m + (r + t − pad_low)/s; so
    phase r is a correlation of x with the kernel's taps t₀, t₀ + s, … .
    """
    return _by_phases(x, kernel, _pair(strides), padding)


def _phases(n: int, k: int, s: int, padding: str) -> tuple[int, list[tuple[int, int, int]]]:
    """Along one axis of a transposed convolution (input size n, kernel k, stride s): the output
    size per phase and, for each output phase r, (first tap t₀, pad low, pad high) of the
    stride-1 correlation of the input with taps t₀, t₀ + s, … that computes it."""
    low, high = transpose_padding(k, s, padding)
    out = low + (n - 1) * s + 1 + high - k + 1
    if out % s:
        raise ValueError(f"conv_transpose: output size {out} is not a multiple of the stride {s}")
    phases = []
    for r in range(s):
        t0 = (low - r) % s
        taps = len(range(t0, k, s))
        start = (r + t0 - low) // s          # input index of tap t0 at m = 0
        m = out // s
        phases.append((t0, -start, m + taps - 1 - n + start))  # (first tap, pad low, pad high)
    return out // s, phases


def _interleave(rows: list[list[jax.Array]]) -> jax.Array:
    """Phase outputs rows[r][q] [B, M, N, O] → the output [B, s·M, s·N, O] (row s·m + r, column s·n + q)."""
    y = jnp.stack([jnp.stack(cols, axis=3) for cols in rows], axis=2)   # [B, M, sh, N, sw, O]
    b, m, sh, n, sw, o = y.shape
    return y.reshape(b, m * sh, n * sw, o)


def _window(n: int, k: int, s: int, padding: str) -> tuple[int, list[tuple[int, int, int]], int, int, int]:
    """Along one axis, the window that holds every phase's taps: (output size per phase, the
    phases as :func:`_phases` gives them, pad low L, window size U, pad high). Phase r's taps
    sit at window offsets L − lo_r, L − lo_r + 1, … ."""
    m, phases = _phases(n, k, s, padding)
    low = max(lo for _, lo, _ in phases)
    size = max(low - lo + len(range(t0, k, s)) for t0, lo, _ in phases)
    return m, phases, low, size, m - n - low + size - 1


def _by_one_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: str) -> jax.Array:
    """:func:`conv_transpose_by_phases` as one stride-1 convolution with s²·O output channels
    (phase (r, q) of channel o is channel (r, q, o)), its kernel the phases' taps placed in a
    shared window (zeros elsewhere), then depth-to-space. More multiply-adds than the phases
    ((3/2)² for a 4×4 kernel at stride 2) but far fewer for XLA:CPU to run at O = 1, where each
    phase's convolution is a matrix-vector product: 7.7 → 3.0 ms for the 64×64 decoder's last
    layer on one core (batch 64)."""
    b, h, w, c = x.shape
    (kh, kw, _, o), (sh, sw) = kernel.shape, strides
    mh, ph, low_h, uh, high_h = _window(h, kh, sh, padding)
    mw, pw, low_w, uw, high_w = _window(w, kw, sw, padding)
    window = jnp.zeros((uh, uw, c, sh, sw, o), kernel.dtype)
    for r, (t0h, lo_h, _) in enumerate(ph):
        for q, (t0w, lo_w, _) in enumerate(pw):
            taps = kernel[t0h::sh, t0w::sw]
            window = window.at[low_h - lo_h:low_h - lo_h + taps.shape[0],
                               low_w - lo_w:low_w - lo_w + taps.shape[1], :, r, q].set(taps)
    y = lax.conv_general_dilated(x, window.reshape(uh, uw, c, sh * sw * o), (1, 1),
                                 [(low_h, high_h), (low_w, high_w)], dimension_numbers=DIMENSION_NUMBERS)
    return y.reshape(b, mh, mw, sh, sw, o).transpose(0, 1, 3, 2, 4, 5).reshape(b, mh * sh, mw * sw, o)


@functools.partial(jax.jit, static_argnums=(2, 3))  # one program per shape, called outside a trace too
def _by_phases(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: str) -> jax.Array:
    (h, w), (kh, kw) = x.shape[1:3], kernel.shape[:2]
    if kernel.shape[-1] < SMALL_OUT_CHANNELS:
        return _by_one_conv(x, kernel, strides, padding)
    (_, ph), (_, pw) = _phases(h, kh, strides[0], padding), _phases(w, kw, strides[1], padding)
    return _interleave([[lax.conv_general_dilated(x, kernel[t0h::strides[0], t0w::strides[1]], (1, 1),
                                                  [(lo_h, hi_h), (lo_w, hi_w)], dimension_numbers=DIMENSION_NUMBERS)
                         for t0w, lo_w, hi_w in pw] for t0h, lo_h, hi_h in ph])


# ----------------------------------------------------------------------------------------
# Weight gradients.


def _same_pads(k: int, s: int) -> tuple[int, int]:
    """(low, high) padding of a 'SAME' strided convolution along an axis divisible by s."""
    return (k - s) // 2, k - s - (k - s) // 2


def _pad_same(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int]) -> jax.Array:
    """x [B, H, W, C] zero-padded as the 'SAME' strided convolution pads it."""
    (kh, kw), (sh, sw) = kernel_size, strides
    return jnp.pad(x, ((0, 0), _same_pads(kh, sh), _same_pads(kw, sw), (0, 0)))


def strided_conv_kernel_grad_taps(x: jax.Array, g: jax.Array, kernel_size: Sequence[int],
                                  strides: Sequence[int]) -> jax.Array:
    """∂⟨g, conv(x, W)⟩/∂W for the 'SAME' strided convolution, [kh, kw, C, O], as one matmul
    of the taps' strided slices of x, stacked tap- and channel-major [(kh, kw, C), (B, H', W')],
    with g [(B, H', W'), O]: no transpose of g. For x with few channels (the image side of the
    64×64 model), where the slices are cheap. Measured on one core at batch 64, 64×64×C→32:
    at C = 1 1.8 ms against XLA's 3.7 and the space-to-depth sums' 3.9 (which this replaced);
    at C = 3 7.5 ms against 6.8 and 8.7, so a strided convolution with 3 input channels keeps
    XLA's, and a transposed one with 3 output channels uses this."""
    (kh, kw), (sh, sw) = kernel_size, strides
    c = x.shape[3]
    ho, wo, o = g.shape[1:]
    xp = _pad_same(x, kernel_size, strides)
    cols = jnp.stack([jnp.moveaxis(xp[:, i:i + sh * ho:sh, j:j + sw * wo:sw], 3, 0)
                      for i in range(kh) for j in range(kw)])                  # [kh·kw, C, B, H', W']
    m = jnp.dot(cols.reshape(kh * kw * c, -1), g.reshape(-1, o), preferred_element_type=x.dtype)
    return m.reshape(kh, kw, c, o)


def matmul_kernel_grad_pays(x_shape: Sequence[int], out_channels: int) -> bool:
    """Whether :func:`strided_conv_kernel_grad_matmul` beats XLA's own weight gradient for a
    strided convolution of x [B, H, W, C] to ``out_channels``: wide layers at 32×32 and up.

    Measured in the 64×64 model's training step on one core (batch 64): enc_conv1 and
    dec_deconv2 by matmul, 120.7 → 109.0 ms a step; extending it to the 16×16 or 8×8 layers
    (122 / 119 ms) or to the 1-channel ones (165 ms) is slower."""
    return min(x_shape[1:3]) >= 32 and x_shape[3] >= 16 and out_channels >= 16


def strided_conv_kernel_grad_matmul(x: jax.Array, g: jax.Array, kernel_size: Sequence[int],
                                    strides: Sequence[int]) -> jax.Array:
    """∂⟨g, conv(x, W)⟩/∂W for the 'SAME' strided convolution, [kh, kw, C, O], as one matmul.

    x padded and split into s×s phases (space-to-depth) is a matrix X [P, s·s·C] over the P
    positions of the phase grid; kernel tap (a·s + r, d·s + q) meets phase (r, q) at the grid
    position shifted by (a, d). Shifting the (smaller) cotangent instead — zero-padded to the
    phase grid [B, gh, gw] and flattened, a shift is an offset of a·gw + d — gives G [(a, d, O), P], and
    the product G·X [(a, d, O), (r, q, C)] holds every tap. Reads x once; used where
    :func:`matmul_kernel_grad_pays`.
    """
    (kh, kw), (sh, sw) = kernel_size, strides
    b, h, w, c = x.shape
    ho, wo, o = g.shape[1:]
    mh, mw = kh // sh, kw // sw
    gh, gw = ho + mh - 1, wo + mw - 1                   # the phase grid
    xp = _pad_same(x, kernel_size, strides)
    xs = xp.reshape(b, gh, sh, gw, sw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * gh * gw, sh * sw * c)
    p = b * gh * gw
    gt = jnp.pad(jnp.moveaxis(g, 3, 0), ((0, 0), (0, 0), (0, mh - 1), (0, mw - 1))).reshape(o, p)
    shifted = jnp.concatenate([jnp.pad(gt, ((0, 0), (a * gw + d, 0)))[:, :p]
                               for a in range(mh) for d in range(mw)])          # [(a, d, O), P]
    m = jnp.dot(shifted, xs, preferred_element_type=x.dtype)                   # [(a, d, O), (r, q, C)]
    return m.reshape(mh, mw, o, sh, sw, c).transpose(0, 3, 1, 4, 5, 2).reshape(kh, kw, c, o)


# ----------------------------------------------------------------------------------------
# The CPU path: custom VJPs whose backward passes are forward-kind ops.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_cpu(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    return conv_native(x, kernel, strides, "SAME")


def _conv_cpu_fwd(x, kernel, strides):
    return _conv_cpu(x, kernel, strides), (x, kernel)


def _conv_cpu_bwd(strides, res, g):
    x, kernel = res
    dx = conv_transpose_by_phases(g, flip_swap(kernel), strides, "SAME")
    if x.shape[3] == 1:
        dk = strided_conv_kernel_grad_taps(x, g, kernel.shape[:2], strides)
    elif matmul_kernel_grad_pays(x.shape, kernel.shape[-1]):
        dk = strided_conv_kernel_grad_matmul(x, g, kernel.shape[:2], strides)
    else:
        dk = jax.vjp(lambda k: conv_native(x, k, strides, "SAME"), kernel)[1](g)[0]
    return dx, dk


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_transpose_cpu(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    return conv_transpose_by_phases(x, kernel, strides, "SAME")


def _conv_transpose_cpu_fwd(x, kernel, strides):
    return _conv_transpose_cpu(x, kernel, strides), (x, kernel)


def _conv_transpose_cpu_bwd(strides, res, g):
    x, kernel = res
    dx = conv_native(g, flip_swap(kernel), strides, "SAME")
    # ⟨g, convT(x, W)⟩ = ⟨conv(g, flip_swap(W)), x⟩: the strided conv's weight gradient.
    if kernel.shape[-1] < SMALL_OUT_CHANNELS:
        dk = flip_swap(strided_conv_kernel_grad_taps(g, x, kernel.shape[:2], strides))
    elif matmul_kernel_grad_pays(g.shape, kernel.shape[-2]):
        dk = flip_swap(strided_conv_kernel_grad_matmul(g, x, kernel.shape[:2], strides))
    else:
        dk = jax.vjp(lambda k: conv_transpose_by_phases(x, k, strides, "SAME"), kernel)[1](g)[0]
    return dx, dk


_conv_transpose_cpu.defvjp(_conv_transpose_cpu_fwd, _conv_transpose_cpu_bwd)


# ----------------------------------------------------------------------------------------
# Public functions.


def conv(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int], padding: str = "SAME",
         impl: str = "auto") -> jax.Array:
    """``lax.conv_general_dilated(x, kernel, strides, padding)``: x [B, H, W, C], kernel
    [kh, kw, C, O] → [B, H', W', O]; on the CPU path its gradients avoid XLA:CPU's slow kernels."""
    return _conv(x, kernel, _pair(strides), padding, resolve_impl(impl))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: str, impl: str) -> jax.Array:
    if impl == "cpu" and _cpu_path_applies(x.shape[1:3], kernel.shape[:2], strides, padding):
        return _conv_cpu(x, kernel, strides)
    return conv_native(x, kernel, strides, padding)


def conv_transpose(x: jax.Array, kernel: jax.Array, strides: int | Sequence[int], padding: str = "SAME",
                   impl: str = "auto") -> jax.Array:
    """``lax.conv_transpose(x, kernel, strides, padding)`` (no kernel flip): x [B, H, W, C],
    kernel [kh, kw, C, O] → [B, s·H, s·W, O] for 'SAME'. On the CPU by phases (any padding),
    with the custom backward pass where :func:`conv`'s CPU path applies."""
    return _conv_transpose(x, kernel, _pair(strides), padding, resolve_impl(impl))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _conv_transpose(x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: str,
                    impl: str) -> jax.Array:
    if impl != "cpu":
        return conv_transpose_native(x, kernel, strides, padding)
    if _cpu_path_applies(x.shape[1:3], kernel.shape[:2], strides, padding):
        return _conv_transpose_cpu(x, kernel, strides)
    return conv_transpose_by_phases(x, kernel, strides, padding)
