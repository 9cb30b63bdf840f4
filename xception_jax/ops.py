"""Pure convolution functions behind Xception's separable convolutions.

The depthwise convolution has three implementations with one kernel layout, ``(kh, kw, 1, C)``
(HWIO with one input channel per group, the layout of ``nn.Conv(feature_group_count=C)``):

- ``'taps'``: the sum over the ``kh * kw`` kernel taps of a shifted (strided, dilated) slice of
  the padded input times that tap's per-channel weights. XLA fuses it into one elementwise
  loop; on CPU it trains the whole network several times faster than the grouped convolution.
- ``'taps_vjp'``: the same forward with a hand-written backward (``jax.custom_vjp``): the input
  gradient is a depthwise correlation of the cotangent with the flipped kernel (as taps), the
  kernel gradient a per-channel reduction per tap. The CPU default. Reverse mode only (no
  ``jax.jvp`` / forward-mode through it, as for any ``custom_vjp``).
- ``'lax'``: ``lax.conv_general_dilated(feature_group_count=C)``, which GPU (cuDNN) and TPU
  lower to dedicated depthwise kernels.

The pointwise (1x1) convolution is a 2-D matmul ``[B*H*W, Cin] x [Cin, Cout]``, which measured
about 4x faster on CPU than a 1x1 ``conv_general_dilated`` and is the same operation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("taps", "taps_vjp", "lax")

# Chosen per backend from benchmarks/depthwise.py and benchmarks/compare.py. CPU (2 cores, jax
# 0.10.2): 'taps' was 20-37x faster than 'lax' forward and 5-8x forward+backward on Xception
# shapes; 'taps_vjp' (same forward, hand-written backward) is another 1.4-2.7x on the layer's
# forward+backward, and on the full 299px train step it cut compile time ~4x and peak memory
# ~40% (benchmarks/compare.py). GPU/TPU: 'lax' lowers to cuDNN's / the TPU's depthwise kernels
# with one pass over the input instead of k*k strided reads; not measured here, so it is the
# safe choice until benchmarks/depthwise.py says otherwise.
DEFAULT_DEPTHWISE_IMPL = {
    "cpu": "taps_vjp",
    "gpu": "lax",
    "cuda": "lax",
    "rocm": "lax",
    "tpu": "lax",
}

Padding = str | Sequence[tuple[int, int]]


def default_depthwise_impl(backend: str | None = None) -> str:
    """Return the default depthwise implementation for ``backend`` (default: JAX's default)."""
    backend = backend or jax.default_backend()
    return DEFAULT_DEPTHWISE_IMPL.get(backend, "lax")


def resolve_depthwise_impl(impl: str) -> str:
    """Map ``'auto'`` to the backend default and validate an explicit implementation name."""
    if impl == "auto":
        return default_depthwise_impl()
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(
            f"Unknown depthwise impl {impl!r}; use 'auto' or one of {list(DEPTHWISE_IMPLS)}."
        )
    return impl


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}.")
    return (int(v[0]), int(v[1]))


def _explicit_padding(
    size: int, k: int, stride: int, dilation: int, padding: str | tuple[int, int]
) -> tuple[int, int]:
    """TF/XLA 'SAME' / 'VALID' padding of one spatial axis as (low, high)."""
    if not isinstance(padding, str):
        return (int(padding[0]), int(padding[1]))
    if padding == "VALID":
        return (0, 0)
    if padding == "SAME":
        out = -(-size // stride)
        total = max((out - 1) * stride + (k - 1) * dilation + 1 - size, 0)
        return (total // 2, total - total // 2)
    raise ValueError(f"padding must be 'SAME', 'VALID' or explicit pairs, got {padding!r}.")


def depthwise_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """Depthwise 2-D convolution (depth multiplier 1) of NHWC ``x``, kernel ``(kh, kw, 1, C)``.

    Args:
      x: input, ``[B, H, W, C]``.
      kernel: per-channel filters, ``[kh, kw, 1, C]``.
      strides: int or (sh, sw).
      dilation: int or (dh, dw) (atrous rate).
      padding: 'SAME' (TF semantics), 'VALID', or ((top, bottom), (left, right)).
      impl: 'taps', 'lax' or 'auto' (the backend's default, ``DEFAULT_DEPTHWISE_IMPL``).

    Returns:
      ``[B, H', W', C]`` in the result dtype of ``x`` and ``kernel``.
    """
    impl = resolve_depthwise_impl(impl)
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            "depthwise_conv wants x [B,H,W,C] and kernel [kh,kw,1,C]; "
            f"got {x.shape} and {kernel.shape}."
        )
    kh, kw, one, c = kernel.shape
    if one != 1 or c != x.shape[-1]:
        raise ValueError(
            f"Depthwise kernel {kernel.shape} does not fit input channels {x.shape[-1]}: "
            f"expected (kh, kw, 1, {x.shape[-1]})."
        )
    sh, sw = _pair(strides, "strides")
    dh, dw = _pair(dilation, "dilation")
    if isinstance(padding, str):
        pads = (
            _explicit_padding(x.shape[1], kh, sh, dh, padding),
            _explicit_padding(x.shape[2], kw, sw, dw, padding),
        )
    else:
        pads = tuple(_explicit_padding(0, 0, 1, 1, p) for p in padding)
    if impl == "lax":
        return lax.conv_general_dilated(
            x,
            kernel,
            window_strides=(sh, sw),
            padding=pads,
            rhs_dilation=(dh, dw),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=c,
        )
    if impl == "taps_vjp":
        return _depthwise_taps_vjp(x, kernel, (sh, sw), (dh, dw), pads)
    return _depthwise_taps(x, kernel, (sh, sw), (dh, dw), pads)


def _window_taps(xp, kh, kw, strides, dilation, what: str):
    """The ``kh*kw`` strided, dilated slices of padded ``xp`` that a sliding window reads."""
    (sh, sw), (dh, dw) = strides, dilation
    hp, wp, c = xp.shape[1], xp.shape[2], xp.shape[3]
    oh = (hp - (kh - 1) * dh - 1) // sh + 1
    ow = (wp - (kw - 1) * dw - 1) // sw + 1
    if oh <= 0 or ow <= 0:
        raise ValueError(
            f"Padded input {xp.shape} is too small for a {kh}x{kw} {what} with dilation {dilation}."
        )
    for i in range(kh):
        for j in range(kw):
            yield (
                (i, j),
                lax.slice(
                    xp,
                    (0, i * dh, j * dw, 0),
                    (xp.shape[0], i * dh + (oh - 1) * sh + 1, j * dw + (ow - 1) * sw + 1, c),
                    (1, sh, sw, 1),
                ),
            )


def _taps_sum(xp, w, strides, dilation, out_dtype):
    """``sum_ij slice_ij(xp) * w[i, j]`` over the taps of an already padded ``xp``, w (kh,kw,C)."""
    kh, kw, _ = w.shape
    # Accumulate in at least float32: XLA fuses the whole sum into one loop, so this costs no
    # extra memory traffic and keeps bf16 compute as accurate as a conv's f32 accumulator.
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    acc = None
    for (i, j), tap in _window_taps(xp, kh, kw, strides, dilation, "depthwise kernel"):
        term = tap.astype(acc_dtype) * w[i, j].astype(acc_dtype)
        acc = term if acc is None else acc + term
    return acc.astype(out_dtype)


def _depthwise_taps(x, kernel, strides, dilation, pads):
    """Sum of ``kh*kw`` strided, dilated slices of the padded input times per-channel weights."""
    kh, kw, _, c = kernel.shape
    out_dtype = jnp.result_type(x.dtype, kernel.dtype)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    return _taps_sum(xp, kernel.reshape(kh, kw, c), strides, dilation, out_dtype)


# 'taps_vjp': the same forward as 'taps' with a hand-written backward. JAX's automatic transpose
# of 'taps' turns each of the k*k slices into a pad of the cotangent to the full input size
# and sums k*k full-size arrays (k*k passes over the input per layer, measured 20-25x the
# forward). Written out, the backward is two single-pass ops:
# - input gradient: the transposed convolution, i.e. a stride-1 depthwise correlation of the
#   cotangent (zero-interleaved by the stride, padded so that the crop of the input padding is
#   folded in) with the spatially flipped kernel: one fused loop of k*k taps, like the forward;
# - kernel gradient: for each tap a per-channel reduction over (batch, height, width) of
#   slice_ij(padded x) * cotangent: k*k sibling reductions that XLA fuses into one pass.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_taps_vjp(x, kernel, strides, dilation, pads):
    return _depthwise_taps(x, kernel, strides, dilation, pads)


def _depthwise_taps_vjp_fwd(x, kernel, strides, dilation, pads):
    # Residuals are x and the kernel (not the padded x: re-padding is cheaper than storing it).
    return _depthwise_taps(x, kernel, strides, dilation, pads), (x, kernel)


def _depthwise_taps_vjp_bwd(strides, dilation, pads, res, g):
    x, kernel = res
    kh, kw, _, c = kernel.shape
    (sh, sw), (dh, dw) = strides, dilation
    w = kernel.reshape(kh, kw, c)
    acc_dtype = jnp.promote_types(jnp.result_type(x.dtype, kernel.dtype), jnp.float32)

    # Input gradient. Forward: y[o] = sum_i xp[o*s + i*d] w[i] (per spatial axis), xp = x padded
    # by (lo, hi). So dx[r] = sum_i gd[r + lo - i*d] w[i], gd = g with s-1 zeros between
    # elements; padding gd by ((k-1)*d - lo, H + lo - (oh-1)*s - 1) (negative = crop) makes it
    # the stride-1 correlation sum_i' gdp[r + i'*d] w[k-1-i'] over exactly the H input rows.
    oh, ow = g.shape[1], g.shape[2]
    h, wd = x.shape[1], x.shape[2]
    (plo_h, _), (plo_w, _) = pads
    gp = lax.pad(
        g,
        jnp.zeros((), g.dtype),
        (
            (0, 0, 0),
            ((kh - 1) * dh - plo_h, h + plo_h - (oh - 1) * sh - 1, sh - 1),
            ((kw - 1) * dw - plo_w, wd + plo_w - (ow - 1) * sw - 1, sw - 1),
            (0, 0, 0),
        ),
    )
    dx = _taps_sum(gp, w[::-1, ::-1], (1, 1), dilation, x.dtype)

    # Kernel gradient: per tap, a per-channel sum over (B, H', W') of tap * g, in float32.
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    dk = _depthwise_kernel_grad(xp, g, (kh, kw), strides, dilation, acc_dtype)
    return dx, dk.reshape(kh, kw, 1, c).astype(kernel.dtype)


# How many slices of the batch/rows the kernel gradient sums elementwise before its reduction.
KERNEL_GRAD_TERMS = 8


def _depthwise_kernel_grad(xp, g, ksize, strides, dilation, acc_dtype, terms=KERNEL_GRAD_TERMS):
    """``[kh*kw, C]``: for each tap, ``sum_{b,h,w} slice_tap(xp) * g`` per channel.

    XLA's CPU reductions over the leading (non-minor) axes of a sliced product are slow (about
    0.3 G multiply-adds/s: each of the k*k reductions re-materialises its slice), while a fused
    elementwise loop over several slices is fast. So each tap's product is first summed
    elementwise over ``terms`` slices of the batch (or, for small batches, of the output rows,
    zero-padded to equal chunks), which XLA fuses into one loop per tap, and one reduction of
    the stacked ``[kh*kw, ...]`` partial sums finishes. Measured on Xception's shapes (1 core):
    4-10x faster than ``jnp.sum(tap * g, axis=(0, 1, 2))`` per tap.
    """
    kh, kw = ksize
    b, oh, _, _ = g.shape
    sh = strides[0]
    if b >= terms:  # blocks of the batch
        nb = max(d for d in range(1, terms + 1) if b % d == 0)
        bs, per_b = b // nb, 1
    else:  # each example, split into row chunks
        nb, bs, per_b = b, 1, min(-(-terms // b), oh)
    rows = -(-oh // per_b)
    ohp = rows * per_b
    if ohp > oh:  # zero rows of g contribute nothing; give x the rows their taps would read
        g = jnp.pad(g, ((0, 0), (0, ohp - oh), (0, 0), (0, 0)))
        need = (kh - 1) * dilation[0] + (ohp - 1) * sh + 1
        xp = jnp.pad(xp, ((0, 0), (0, max(0, need - xp.shape[1])), (0, 0), (0, 0)))
    g = g.astype(acc_dtype)
    partial_sums = []
    for _, tap in _window_taps(xp, kh, kw, strides, dilation, "depthwise kernel"):
        acc = None
        for k in range(nb):
            for q in range(per_b):
                blk = (slice(k * bs, (k + 1) * bs), slice(q * rows, (q + 1) * rows))
                term = tap[blk].astype(acc_dtype) * g[blk]
                acc = term if acc is None else acc + term
        partial_sums.append(acc)
    return jnp.sum(jnp.stack(partial_sums), axis=(1, 2, 3))


_depthwise_taps_vjp.defvjp(_depthwise_taps_vjp_fwd, _depthwise_taps_vjp_bwd)


def pointwise_conv(x: jax.Array, kernel: jax.Array, *, strides: int | Sequence[int] = 1):
    """1x1 convolution of NHWC ``x`` with a ``(Cin, Cout)`` kernel, as a matmul over channels.

    A stride ``s`` 1x1 convolution with SAME padding reads exactly ``x[:, ::s, ::s]`` (no padding
    is ever needed), so strides are a slice before the matmul.
    """
    sh, sw = _pair(strides, "strides")
    if kernel.ndim != 2 or kernel.shape[0] != x.shape[-1]:
        raise ValueError(
            f"Pointwise kernel {kernel.shape} does not fit input channels {x.shape[-1]}: "
            f"expected ({x.shape[-1]}, Cout)."
        )
    if (sh, sw) != (1, 1):
        x = x[:, ::sh, ::sw, :]
    # As a 2-D [B*H*W, Cin] x [Cin, Cout] matmul (a free reshape of contiguous NHWC): with the
    # 4-D dot_general XLA's CPU backend copied the whole cotangent into another layout for the
    # kernel gradient; the 2-D form feeds both gradients to the matmul directly (measured on
    # 8x147x147x128 -> 128, forward + backward, 1 core: 542 -> 299 ms).
    y = lax.dot(x.reshape(-1, x.shape[-1]), kernel)
    return y.reshape(*x.shape[:-1], kernel.shape[1])
