"""Pure convolution functions behind Xception's separable convolutions.

The depthwise convolution has two implementations with one kernel layout, ``(kh, kw, 1, C)``
(HWIO with one input channel per group, the layout of ``nn.Conv(feature_group_count=C)``):

- ``'taps'``: the sum over the ``kh * kw`` kernel taps of a shifted (strided, dilated) slice of
  the padded input times that tap's per-channel weights. XLA fuses it into one elementwise
  loop; on CPU it trains the whole network several times faster than the grouped convolution.
- ``'lax'``: ``lax.conv_general_dilated(feature_group_count=C)``, which GPU (cuDNN) and TPU
  lower to dedicated depthwise kernels.

The pointwise (1x1) convolution is a matmul over the channel axis, which measured about 4x
faster on CPU than a 1x1 ``conv_general_dilated`` and is the same operation.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

DEPTHWISE_IMPLS = ("taps", "lax")

# Chosen per backend from benchmarks/depthwise.py. CPU (2 cores, jax 0.10.2): 'taps' was 20-37x
# faster forward and 5-8x faster forward+backward on Xception shapes, and a whole train step
# 1.4x (tiny, 32x64x64) to 1.8x (full model, 4x149x149) faster. GPU/TPU: 'lax' lowers to
# cuDNN's / the TPU's depthwise kernels with one pass over the input instead of k*k strided
# reads; not measured here, so it is the safe choice until benchmarks/depthwise.py says otherwise.
DEFAULT_DEPTHWISE_IMPL = {"cpu": "taps", "gpu": "lax", "cuda": "lax", "rocm": "lax", "tpu": "lax"}

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


def _depthwise_taps(x, kernel, strides, dilation, pads):
    """Sum of ``kh*kw`` strided, dilated slices of the padded input times per-channel weights."""
    kh, kw, _, c = kernel.shape
    out_dtype = jnp.result_type(x.dtype, kernel.dtype)
    # Accumulate in at least float32: XLA fuses the whole sum into one loop, so this costs no
    # extra memory traffic and keeps bf16 compute as accurate as a conv's f32 accumulator.
    acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    w = kernel.reshape(kh, kw, c)
    acc = None
    for (i, j), tap in _window_taps(xp, kh, kw, strides, dilation, "depthwise kernel"):
        term = tap.astype(acc_dtype) * w[i, j].astype(acc_dtype)
        acc = term if acc is None else acc + term
    return acc.astype(out_dtype)


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
    return lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
