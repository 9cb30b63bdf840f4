"""Pure functions behind Xception's layers: convolutions, max-pool and BatchNorm.

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

The grouped 3x3 conv of ``channels_per_group`` g > 1 (``grouped_conv``, kernel ``(kh, kw, g, C)``)
has ``'lax'`` (``feature_group_count=C // g``) and, on CPU, where XLA's grouped convolution
trains tens of times slower, the sum of g depthwise taps sums of the input rolled within its
groups (g <= 8: the same functions as the depthwise conv, which is their g = 1 case, with the
same hand-written backward), the stem's ``conv2d`` for a regular conv (g = C), or one batched
matmul per kernel tap.

The pointwise (1x1) convolution is a 2-D matmul ``[B*H*W, Cin] x [Cin, Cout]``, which measured
about 4x faster on CPU than a 1x1 ``conv_general_dilated`` and is the same operation.

BatchNorm's training-mode forward and backward (``batch_norm_train``) are written out too: the
backward is two per-channel sums and one fused elementwise pass, where the automatic transpose
of the same forward materialised several full-size intermediates.

The stem's dense 3x3 convolutions (``conv2d``) and the entry/exit max-pools (``max_pool``) have
a reference form (``'lax'``: ``conv_general_dilated`` / ``reduce_window``) and a CPU form with a
hand-written backward: ``'im2col'`` (patches times the flattened kernel, one matmul per
direction) and ``'taps_vjp'`` (the first maximal tap of each window kept as an int8 index, its
cotangent placed back by one fused loop). ``DEFAULT_IMPLS`` picks per platform and op, for the
platform being compiled for (``default_impl(op, platform)``, ``compiler_options(platform)``).

``relu`` is ``jax.nn.relu`` with its derivative mask taken from the output. The backward
passes keep only what they read, behind optimisation barriers, which XLA CPU honours when the
step is jitted with ``compiler_options()`` (as train.py does): the train step's memory.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = {
    "depthwise": ("taps", "taps_vjp", "lax"),
    "conv": ("im2col", "lax"),
    "pool": ("taps_vjp", "lax"),
}
DEPTHWISE_IMPLS = IMPLS["depthwise"]

# Chosen per backend from benchmarks/ops.py and benchmarks/compare.py. CPU (2 cores, jax
# 0.10.2): depthwise 'taps' was 20-37x faster than 'lax' forward and 5-8x forward+backward on
# Xception shapes; 'taps_vjp' (same forward, hand-written backward) is another 1.4-2.7x on the
# layer's forward+backward, and on the full 299px train step it cut compile time ~4x and peak
# memory ~40%. The stem conv's 'im2col' and the max-pool's 'taps_vjp' replace XLA CPU's
# convolution kernel gradient (~9 GFLOP/s) and its select-and-scatter / variadic reduce-window
# max-pool gradient (benchmarks/ops.py gives the figures). GPU/TPU: 'lax' lowers to cuDNN's /
# the TPU's own kernels; not measured here, so it is the safe choice there.
_CPU_IMPLS = {"depthwise": "taps_vjp", "conv": "im2col", "pool": "taps_vjp"}
_ACCELERATOR_IMPLS = {"depthwise": "lax", "conv": "lax", "pool": "lax"}
DEFAULT_IMPLS = {
    "cpu": _CPU_IMPLS,
    "gpu": _ACCELERATOR_IMPLS,
    "cuda": _ACCELERATOR_IMPLS,
    "rocm": _ACCELERATOR_IMPLS,
    "tpu": _ACCELERATOR_IMPLS,
}

Padding = str | Sequence[tuple[int, int]]


# XLA CPU expands every optimization_barrier away before its common-subexpression and fusion
# passes, so the barriers below (and nn.remat's) could not stop it from merging the backward's
# recomputations with the forward's values or from fusing cheap producers (BatchNorm, ReLU)
# into the backward's loops, which kept whole activations alive until the backward pass.
# Skipping that one pass keeps them: same values, and the 299px batch 8 train step's working
# memory measured 2.75 -> 1.65 GB (128px batch 32: 2.01 -> 1.16 GB) at the same speed.
_CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def platform_of(platform: str | None = None) -> str:
    """The platform to choose for: ``platform`` when given, else JAX's default backend.

    Ahead-of-time compilation (xception_jax.aot) targets another platform than the host's, so
    every platform-dependent choice takes the target's name rather than reading the host's.
    """
    return platform or jax.default_backend()


def compiler_options(platform: str | None = None) -> dict[str, str]:
    """XLA options for jitting a train step for ``platform`` (default: JAX's), for jax.jit.

    The CPU option must not reach a TPU compile: XLA TPU fails on it ("HLO opt-barrier is not
    implemented on TPU").
    """
    return dict(_CPU_COMPILER_OPTIONS) if platform_of(platform) == "cpu" else {}


def default_impl(op: str, platform: str | None = None) -> str:
    """The default implementation of ``op`` ('depthwise', 'conv', 'pool') on ``platform``."""
    return DEFAULT_IMPLS.get(platform_of(platform), _ACCELERATOR_IMPLS)[op]


def resolve_impl(op: str, impl: str, platform: str | None = None) -> str:
    """Map ``'auto'`` to ``platform``'s default for ``op`` and validate an explicit name."""
    if impl == "auto":
        return default_impl(op, platform)
    if impl not in IMPLS[op]:
        raise ValueError(f"Unknown {op} impl {impl!r}; use 'auto' or one of {list(IMPLS[op])}.")
    return impl


def resolve_impls(fields: dict, platform: str | None = None) -> dict:
    """``fields`` with each ``<op>_impl`` present resolved for ``platform`` ('auto' -> its default).

    Models are built with resolved names (registry.create_model_from_config) so that the ops they
    trace are the target platform's even when the host is another one.
    """
    out = dict(fields)
    for op in IMPLS:
        key = f"{op}_impl"
        if key in out:
            out[key] = resolve_impl(op, out[key], platform)
    return out


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


def _spatial_pads(shape, ksize, strides, dilation, padding: Padding):
    """((top, bottom), (left, right)) of NHWC ``shape`` for 'SAME' / 'VALID' / explicit pairs."""
    if isinstance(padding, str):
        return tuple(
            _explicit_padding(shape[1 + a], ksize[a], strides[a], dilation[a], padding)
            for a in range(2)
        )
    return tuple(_explicit_padding(0, 0, 1, 1, p) for p in padding)


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
      impl: 'taps', 'taps_vjp', 'lax' or 'auto' (the backend's default, ``DEFAULT_IMPLS``).

    Returns:
      ``[B, H', W', C]`` in the result dtype of ``x`` and ``kernel``.
    """
    impl = resolve_impl("depthwise", impl)
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
    pads = _spatial_pads(x.shape, (kh, kw), (sh, sw), (dh, dw), padding)
    if impl == "lax":
        return _conv_lax(x, kernel, (sh, sw), (dh, dw), pads, groups=c)
    taps = _taps_conv_vjp if impl == "taps_vjp" else _taps_conv
    return taps(x, kernel, (sh, sw), (dh, dw), pads)


def _conv_lax(x, kernel, strides, dilation, pads, groups: int):
    """XLA's own NHWC conv of `groups` feature groups (C: depthwise, C // g: grouped)."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=pads,
        rhs_dilation=dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


def grouped_conv(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """Grouped 2-D convolution of NHWC ``x`` with kernel ``(kh, kw, g, C)``: ``C // g`` groups.

    Each group maps ``g`` consecutive input channels to the same ``g`` output channels (the
    kernel layout of ``lax.conv_general_dilated(feature_group_count=C // g)``). ``g == 1`` is
    the depthwise conv (``depthwise_conv`` with the same ``impl``); ``g == C`` a dense conv.

    Args:
      x: input, ``[B, H, W, C]``.
      kernel: ``[kh, kw, g, C]`` with ``g`` dividing ``C``.
      strides, dilation, padding: as ``depthwise_conv``.
      impl: 'taps', 'taps_vjp', 'lax' or 'auto'. The CPU forms for ``g > 1``:
        ``g <= ROLLED_MAX_GROUP``: the grouped conv as ``g`` depthwise convs of the input rolled
        within its groups, summed in one fused loop (the depthwise conv's own functions: 'taps_vjp'
        with the hand-written backward, 'taps' with JAX's); ``g == C`` without dilation: the
        stem's ``conv2d`` ('im2col'); otherwise one batched matmul per kernel tap.

    Returns:
      ``[B, H', W', C]`` in the result dtype of ``x`` and ``kernel``.
    """
    impl = resolve_impl("depthwise", impl)
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(
            f"grouped_conv wants x [B,H,W,C] and kernel [kh,kw,g,C]; got {x.shape} and "
            f"{kernel.shape}."
        )
    kh, kw, g, c = kernel.shape
    if c != x.shape[-1] or c % g:
        raise ValueError(
            f"Grouped kernel {kernel.shape} does not fit input channels {x.shape[-1]}: expected "
            f"(kh, kw, g, {x.shape[-1]}) with g dividing {x.shape[-1]}."
        )
    if g == 1:
        return depthwise_conv(
            x, kernel, strides=strides, dilation=dilation, padding=padding, impl=impl
        )
    sh, sw = _pair(strides, "strides")
    dh, dw = _pair(dilation, "dilation")
    pads = _spatial_pads(x.shape, (kh, kw), (sh, sw), (dh, dw), padding)
    if impl == "lax":
        return _conv_lax(x, kernel, (sh, sw), (dh, dw), pads, groups=c // g)
    if g <= ROLLED_MAX_GROUP:
        taps = _taps_conv_vjp if impl == "taps_vjp" else _taps_conv
        return taps(x, kernel, (sh, sw), (dh, dw), pads)
    if g == c and (dh, dw) == (1, 1):
        return _conv_im2col(x, kernel, (sh, sw), pads)
    return _grouped_matmul_taps(x, kernel, (sh, sw), (dh, dw), pads)


# The rolled form costs g fused depthwise passes, the per-tap matmuls about the same at any g.
# Forward + backward of a (16, 16, 16, 128) input, 2 cores, under compiler_options(): rolled
# 8.8 / 13.7 / 31.7 / 153 ms against the matmuls' 46 / 45 / 37 / 40 ms at g = 2 / 4 / 8 / 16.
# Every registered variant takes g <= 8 (or -1).
ROLLED_MAX_GROUP = 8


# A grouped conv with g channels per group is a sum of g depthwise convs. Output channel
# c = G*g + o (group G) reads input channel G*g + i through kernel[.., i, c]; grouping the
# terms by the shift s = (i - o) mod g, each shift is a depthwise conv of the input rolled by
# s within its groups (``_roll_in_groups``) with the per-channel kernel[.., (o + s) % g, c].
# All g * kh * kw terms are elementwise, so XLA fuses them into one loop like the depthwise
# taps, at g times their work (the grouped conv's FLOPs are g times the depthwise conv's).
def _roll_in_groups(x, g: int, s: int):
    """``x`` with channel ``G*g + o`` replaced by channel ``G*g + (o + s) % g``."""
    if s % g == 0:
        return x
    y = jnp.roll(x.reshape(*x.shape[:-1], x.shape[-1] // g, g), -s, axis=-1)
    return y.reshape(x.shape)


def _shift_kernels(kernel):
    """Grouped kernel ``[kh, kw, g, C]`` -> g per-shift depthwise kernels ``[g, kh, kw, C]``.

    Shift s's kernel for output channel c is ``kernel[.., (c % g + s) % g, c]``.
    """
    kh, kw, g, c = kernel.shape
    idx = (jnp.arange(c)[None, :] % g + jnp.arange(g)[:, None]) % g
    idx = jnp.broadcast_to(idx, (kh, kw, g, c))
    return jnp.moveaxis(jnp.take_along_axis(kernel, idx, axis=2), 2, 0)


def _taps_conv(x, kernel, strides, dilation, pads):
    """Depthwise (g = 1) or grouped conv, kernel ``(kh, kw, g, C)``, as taps sums: for each of
    the g shifts, ``kh*kw`` strided, dilated slices of the padded input (rolled by the shift
    within its groups) times per-channel weights."""
    g = kernel.shape[2]
    out_dtype = jnp.result_type(x.dtype, kernel.dtype)
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ws = _shift_kernels(kernel)
    terms = [
        _taps_sum(_roll_in_groups(xp, g, s), ws[s], strides, dilation, acc_dtype) for s in range(g)
    ]
    return sum(terms[1:], terms[0]).astype(out_dtype)


# 'taps_vjp': the same forward as 'taps' with a hand-written backward. JAX's automatic transpose
# of 'taps' turns each of the k*k slices into a pad of the cotangent to the full input size
# and sums k*k full-size arrays (k*k passes over the input per layer, measured 20-25x the
# forward). Written out, the backward is two single-pass ops per shift:
# - input gradient: the transposed convolution, i.e. a stride-1 depthwise correlation of the
#   cotangent (zero-interleaved by the stride, padded so that the crop of the input padding is
#   folded in) with the spatially flipped kernel: one fused loop of k*k taps, like the forward.
#   Shift s's is rolled back by s; as the roll commutes with a per-channel op, it is rolled
#   into the padded cotangent and the kernel instead, and all g shifts are one fused loop;
# - kernel gradient: for each tap a per-channel reduction over (batch, height, width) of
#   slice_ij(padded, rolled x) * cotangent: k*k sibling reductions that XLA fuses into one
#   pass, put back into the grouped layout.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _taps_conv_vjp(x, kernel, strides, dilation, pads):
    return _taps_conv(x, kernel, strides, dilation, pads)


def _taps_conv_vjp_fwd(x, kernel, strides, dilation, pads):
    # Residuals are x and the kernel (not the padded x: re-padding is cheaper than storing it).
    # The barrier keeps x itself as the residual: otherwise XLA fuses x's producer (BatchNorm,
    # ReLU, a residual add) into the kernel gradient's loops and keeps that producer's inputs
    # alive until the backward pass instead.
    y = _taps_conv(x, kernel, strides, dilation, pads)
    return y, (lax.optimization_barrier(x), kernel)


def _taps_conv_vjp_bwd(strides, dilation, pads, res, g):
    x, kernel = res
    # Tied to g, the re-padding of x cannot be scheduled before the backward pass reaches it.
    x, g = lax.optimization_barrier((x, g))
    kh, kw, gs, c = kernel.shape
    acc_dtype = jnp.promote_types(jnp.result_type(x.dtype, kernel.dtype), jnp.float32)
    ws = _shift_kernels(kernel)
    gp = _transpose_pad(g, x.shape, (kh, kw), strides, dilation, pads)
    dx_terms = [
        _taps_sum(
            _roll_in_groups(gp, gs, -s),
            _roll_in_groups(ws[s], gs, -s)[::-1, ::-1],
            (1, 1),
            dilation,
            acc_dtype,
        )
        for s in range(gs)
    ]
    dx = sum(dx_terms[1:], dx_terms[0]).astype(x.dtype)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    dws = jnp.stack(
        [
            _depthwise_kernel_grad(
                _roll_in_groups(xp, gs, s), g, (kh, kw), strides, dilation, acc_dtype
            )
            for s in range(gs)
        ]
    )  # [g (shift), kh*kw, C]
    # Kernel entry (tap, i, c) is shift s = (i - c % g) % g's entry (tap, c).
    idx = (jnp.arange(gs)[:, None] - jnp.arange(c)[None, :] % gs) % gs
    idx = jnp.broadcast_to(idx[:, None, :], (gs, kh * kw, c))
    dk = jnp.take_along_axis(dws, idx, axis=0)  # [g (input channel i), kh*kw, C]
    return dx, jnp.moveaxis(dk, 0, 1).reshape(kernel.shape).astype(kernel.dtype)


_taps_conv_vjp.defvjp(_taps_conv_vjp_fwd, _taps_conv_vjp_bwd)


def _grouped_matmul_taps(x, kernel, strides, dilation, pads):
    """Sum over the kernel taps of a strided, dilated slice times that tap's per-group matrix."""
    kh, kw, g, c = kernel.shape
    groups = c // g
    out_dtype = jnp.result_type(x, kernel)
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    # Output channel o belongs to group o // g: (g_in, C) -> (groups, g_in, g_out).
    w = kernel.reshape(kh, kw, g, groups, g).transpose(0, 1, 3, 2, 4)
    total = None
    for (i, j), tap in _window_taps(xp, kh, kw, strides, dilation, "grouped conv"):
        t = tap.reshape(*tap.shape[:3], groups, g)
        # One batched matmul per tap, accumulated in float32 under bf16 compute like a conv.
        y = jnp.einsum("bhwki,kio->bhwko", t, w[i, j], preferred_element_type=jnp.float32)
        total = y if total is None else total + y
    return total.reshape(*total.shape[:3], c).astype(out_dtype)


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


def _transpose_pad(g, x_shape, ksize, strides, dilation, pads):
    """The cotangent ``g`` padded so that a stride-1 taps sum with the flipped kernel is dx.

    Forward: y[o] = sum_i xp[o*s + i*d] w[i] (per spatial axis), xp = x padded by (lo, hi). So
    dx[r] = sum_i gd[r + lo - i*d] w[i], gd = g with s-1 zeros between elements; padding gd by
    ((k-1)*d - lo, H + lo - (oh-1)*s - 1) (negative = crop) makes it the stride-1 correlation
    sum_i' gdp[r + i'*d] w[k-1-i'] over exactly the H input rows.
    """
    (kh, kw), (sh, sw), (dh, dw) = ksize, strides, dilation
    oh, ow = g.shape[1], g.shape[2]
    h, wd = x_shape[1], x_shape[2]
    (plo_h, _), (plo_w, _) = pads
    return lax.pad(
        g,
        jnp.zeros((), g.dtype),
        (
            (0, 0, 0),
            ((kh - 1) * dh - plo_h, h + plo_h - (oh - 1) * sh - 1, sh - 1),
            ((kw - 1) * dw - plo_w, wd + plo_w - (ow - 1) * sw - 1, sw - 1),
            (0, 0, 0),
        ),
    )


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


def _place_taps(terms, in_hw, pads, strides):
    """Sum of per-tap windows put back where the taps read them: the adjoint of the tap slices.

    ``terms[(i, j)]`` ([B, H', W', C]) holds, for each output position, what flows back to the
    input element that tap (i, j) of its window read (kernel offsets, stride ``strides``, input
    padded by ``pads``). Each term is zero-interleaved by the stride and shifted by the tap
    offset with one ``lax.pad`` (negative padding crops the input padding); XLA fuses the
    k*k pads and their sum into one loop over the ``[B, H, W, C]`` result.
    """
    (h, w), (sh, sw) = in_hw, strides
    (plo_h, _), (plo_w, _) = pads
    total = None
    for (i, j), term in terms.items():
        oh, ow = term.shape[1], term.shape[2]
        lo_h, lo_w = i - plo_h, j - plo_w
        placed = lax.pad(
            term,
            jnp.zeros((), term.dtype),
            (
                (0, 0, 0),
                (lo_h, h - lo_h - (oh - 1) * sh - 1, sh - 1),
                (lo_w, w - lo_w - (ow - 1) * sw - 1, sw - 1),
                (0, 0, 0),
            ),
        )
        total = placed if total is None else total + placed
    return total


def conv2d(
    x: jax.Array,
    kernel: jax.Array,
    *,
    strides: int | Sequence[int] = 1,
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """Dense 2-D convolution, no bias, of NHWC ``x`` with an HWIO ``kernel`` (the stem's 3x3 convs).

    Args:
      x: input, ``[B, H, W, Cin]``.
      kernel: ``[kh, kw, Cin, Cout]`` (``nn.Conv``'s layout).
      strides: int or (sh, sw).
      padding: 'SAME' (TF semantics), 'VALID', or ((top, bottom), (left, right)).
      impl: 'im2col', 'lax' or 'auto' (the backend's default, ``DEFAULT_IMPLS``).

    Returns:
      ``[B, H', W', Cout]`` in the result dtype of ``x`` and ``kernel``.
    """
    impl = resolve_impl("conv", impl)
    if x.ndim != 4 or kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(
            f"conv2d wants x [B,H,W,Cin] and kernel [kh,kw,Cin,Cout]; got {x.shape} and "
            f"{kernel.shape}."
        )
    strides = _pair(strides, "strides")
    pads = _spatial_pads(x.shape, kernel.shape[:2], strides, (1, 1), padding)
    if impl == "lax":
        return lax.conv_general_dilated(
            x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return _conv_im2col(x, kernel, strides, pads)


def _im2col(xp, ksize, strides):
    """``[B*H'*W', kh*kw*Cin]`` patches of padded ``xp``, (i, j, c) minor: an HWIO kernel's rows.

    A ``concatenate`` of the taps. XLA fuses the producer of ``xp`` (the stem's BatchNorm and
    ReLU) into whatever builds the patches; of the forms tried (zero-padded column blocks
    summed, dynamic-update-slices, concatenate), only concatenate stayed fast at both
    benchmark sizes with that fusion (stem forward + backward, 299px/8 and 128px/32).
    """
    taps = [tap for _, tap in _window_taps(xp, *ksize, strides, (1, 1), "convolution")]
    return jnp.concatenate(taps, axis=-1).reshape(-1, len(taps) * xp.shape[-1])


# 'im2col': the convolution as one matmul of the patches with the flattened kernel, and a
# hand-written backward that keeps x (not the 9x larger patches) and rebuilds them: kernel
# gradient = patches^T g (one matmul instead of XLA CPU's convolution-shaped weight gradient,
# which ran at ~9 GFLOP/s), input gradient = the patch gradient g W^T put back by
# ``_place_taps`` (XLA drops it for the first conv, whose input is the image).
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_im2col(x, kernel, strides, pads):
    return _conv_im2col_fwd(x, kernel, strides, pads)[0]


def _conv_im2col_fwd(x, kernel, strides, pads):
    kh, kw, cin, cout = kernel.shape
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    oh = (xp.shape[1] - kh) // strides[0] + 1
    ow = (xp.shape[2] - kw) // strides[1] + 1
    y = lax.dot(_im2col(xp, (kh, kw), strides), kernel.reshape(kh * kw * cin, cout))
    return y.reshape(x.shape[0], oh, ow, cout), (x, kernel)


def _conv_im2col_bwd(strides, pads, res, g):
    x, kernel = res
    kh, kw, cin, cout = kernel.shape
    # Rebuild the patches from x here, after the barrier: without it XLA merges them with the
    # forward's identical patches and keeps those (9x the bytes of x) alive until now.
    x, g = lax.optimization_barrier((x, g))
    g2 = g.reshape(-1, cout)
    cols = _im2col(jnp.pad(x, ((0, 0), *pads, (0, 0))), (kh, kw), strides)
    dk = lax.dot_general(cols, g2, (((0,), (0,)), ((), ())))
    dcols = lax.dot(g2, kernel.reshape(kh * kw * cin, cout).T).reshape(*g.shape[:3], kh * kw * cin)
    terms = {
        (i, j): dcols[..., (i * kw + j) * cin : (i * kw + j + 1) * cin]
        for i in range(kh)
        for j in range(kw)
    }
    dx = _place_taps(terms, x.shape[1:3], pads, strides)
    return dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


def max_pool(
    x: jax.Array,
    window: int | Sequence[int] = 3,
    *,
    strides: int | Sequence[int] = 2,
    padding: Padding = "SAME",
    impl: str = "auto",
) -> jax.Array:
    """Max-pool of NHWC float ``x`` (padding counts as -inf, as ``nn.max_pool``).

    Args:
      x: input, ``[B, H, W, C]``, floating point.
      window: int or (kh, kw).
      strides: int or (sh, sw).
      padding: 'SAME' (TF semantics), 'VALID', or ((top, bottom), (left, right)).
      impl: 'taps_vjp', 'lax' or 'auto' (the backend's default, ``DEFAULT_IMPLS``).

    Gradients go to the first maximal element of each window in row-major window order, as
    XLA's select-and-scatter does: both implementations send each cotangent to the same element,
    ties included.
    """
    impl = resolve_impl("pool", impl)
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"max_pool wants float NHWC x; got {x.dtype} {x.shape}.")
    window, strides = _pair(window, "window"), _pair(strides, "strides")
    pads = _spatial_pads(x.shape, window, strides, (1, 1), padding)
    if impl == "lax":
        return _max_pool_lax(x, window, strides, pads)
    return _max_pool_taps_vjp(x, window, strides, pads, x.shape[1:3])


def _max_pool_lax(x, window, strides, pads):
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
    )


# 'taps_vjp': the forward of the differentiated pool is a fused max over the k*k taps that also
# records which tap won (int8, a quarter of the output's bytes, instead of storing the input),
# and the backward places each cotangent on its winner with ``_place_taps``. XLA CPU's own
# gradient (a variadic reduce-window over the input with four int32 iotas, then a scatter)
# took 4-6x longer on Xception's pools (benchmarks/ops.py).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool_taps_vjp(x, window, strides, pads, in_hw):
    # Undifferentiated (inference), the max over the taps alone (XLA drops the unused winner):
    # one fused loop, as fast as XLA CPU's reduce_window or up to 1.6x faster on Xception's
    # pools (benchmarks/ops.py).
    return _max_pool_taps(x, window, strides, pads)[0]


def _max_pool_taps_vjp_fwd(x, window, strides, pads, in_hw):
    y, winner = _max_pool_taps(x, window, strides, pads)
    # The barrier makes the int8 winners the residual: otherwise XLA fuses their (cheap)
    # computation into the backward's loop, which then keeps the padded input alive instead
    # (4x the bytes at float32, up to ~90 MB per pool at 299px batch 8).
    return y, lax.optimization_barrier(winner)


def _max_pool_taps(x, window, strides, pads):
    """(max over the window taps, index of the first maximal tap) of NHWC ``x``."""
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    index_dtype = jnp.int8 if window[0] * window[1] <= 127 else jnp.int32
    y = winner = None
    for t, (_, tap) in enumerate(_window_taps(xp, *window, strides, (1, 1), "max pool")):
        if y is None:
            y, winner = tap, jnp.zeros(tap.shape, index_dtype)
        else:
            # Strictly greater: an equal later tap does not take over (first maximum wins).
            winner = jnp.where(tap > y, jnp.asarray(t, index_dtype), winner)
            y = jnp.maximum(y, tap)
    return y, winner


def _max_pool_taps_vjp_bwd(window, strides, pads, in_hw, winner, g):
    kh, kw = window
    zero = jnp.zeros((), g.dtype)
    terms = {(i, j): jnp.where(winner == i * kw + j, g, zero) for i in range(kh) for j in range(kw)}
    return (_place_taps(terms, in_hw, pads, strides),)


_max_pool_taps_vjp.defvjp(_max_pool_taps_vjp_fwd, _max_pool_taps_vjp_bwd)


@jax.custom_jvp
def relu(x: jax.Array) -> jax.Array:
    """``max(x, 0)``, the same values and gradients as ``jax.nn.relu`` (zero gradient at 0).

    Its derivative mask is read from the output behind an optimisation barrier, so the
    backward pass keeps a 1-byte mask (or the output, which the next layer keeps anyway) and
    XLA cannot recompute the mask from the input, which would keep the input's producers
    (BatchNorm's input, a residual sum) alive until the backward pass.
    """
    return jnp.maximum(x, jnp.zeros((), x.dtype))


@relu.defjvp
def _relu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    y = relu(x)
    mask = lax.optimization_barrier(y) > 0
    return y, jnp.where(mask, t, jnp.zeros((), t.dtype))


def batch_norm_train(
    x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float, dtype=None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """BatchNorm of ``x`` over every axis but the last, with the batch's own statistics.

    The same values as ``flax.linen.BatchNorm(use_fast_variance=False)`` in training mode:
    statistics in at least float32, two-pass (biased) variance,
    ``y = (x - mean) * (rsqrt(var + epsilon) * scale) + bias``.

    Args:
      x: ``[..., C]``.
      scale, bias: ``[C]``.
      epsilon: added to the variance.
      dtype: of ``y`` (default: ``x``'s, ``scale``'s and ``bias``'s result type).

    Returns:
      ``(y, mean, var)``; ``mean`` and ``var`` (``[C]``, float32 or wider) are what the running
      averages take. All three are differentiable.
    """
    if scale.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise ValueError(
            f"BatchNorm scale {scale.shape} and bias {bias.shape} must both be "
            f"({x.shape[-1]},), the channels of x {x.shape}."
        )
    out_dtype = jnp.dtype(dtype or jnp.result_type(x, scale, bias))
    return _batch_norm_train(x, scale, bias, float(epsilon), out_dtype)


# The automatic transpose of BatchNorm's forward (through the mean and the variance) ran as
# three materialised full-size elementwise passes and four reductions per layer on XLA CPU.
# Written out: with xc = x - mean and a = scale * rstd,
#   dx = a * g + b * xc + c,  b = (2 g_var - a rstd^2 sum(g xc)) / n,  c = (g_mean - a sum(g)) / n,
# i.e. two per-channel sums over (g, x) and one elementwise pass.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon, out_dtype):
    return _batch_norm_train_fwd(x, scale, bias, epsilon, out_dtype)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, out_dtype):
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = jnp.mean(xf, axes)
    xc = xf - mean
    var = jnp.mean(jnp.square(xc), axes)
    rstd = lax.rsqrt(var + epsilon)
    y = xc * (rstd * scale) + bias
    # The backward reads x only as x - mean, which the variance has materialised anyway: keep
    # that (in x's dtype) and not x. The barrier stops XLA from fusing `x - mean` back into the
    # backward's loops, which would keep x alive as well (a second full-size residual).
    xc_res = lax.optimization_barrier(xc.astype(x.dtype))
    return (y.astype(out_dtype), mean, var), (xc_res, rstd, scale, bias)


def _batch_norm_train_bwd(epsilon, out_dtype, res, cts):
    xc_res, rstd, scale, bias = res
    g, g_mean, g_var = cts
    axes = tuple(range(xc_res.ndim - 1))
    n = xc_res.size // xc_res.shape[-1]
    gf = g.astype(rstd.dtype)
    xc = xc_res.astype(rstd.dtype)
    sum_g = jnp.sum(gf, axes)
    sum_gxc = jnp.sum(gf * xc, axes)
    a = scale * rstd
    b = (2 * g_var - a * rstd * rstd * sum_gxc) / n
    c = (g_mean - a * sum_g) / n
    dx = a * gf + b * xc + c
    return dx.astype(xc_res.dtype), (sum_gxc * rstd).astype(scale.dtype), sum_g.astype(bias.dtype)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)
