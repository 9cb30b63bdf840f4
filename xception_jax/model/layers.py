"""Flax (linen) depthwise, pointwise and separable convolutions, no bias, depth multiplier 1.

Parameter names and layouts (what ``keras_weights`` maps onto):
- ``DepthwiseConv``: ``kernel`` ``(kh, kw, 1, C)``; with ``channels_per_group=g``,
  ``(kh, kw, g, C)`` (``C // g`` groups, as ``nn.Conv(feature_group_count=C // g)``).
- ``PointwiseConv``: ``kernel`` ``(Cin, Cout)``.
- ``Conv``: ``kernel`` ``(kh, kw, Cin, Cout)``, as ``nn.Conv``.
- ``SeparableConv``: submodules ``depthwise`` and ``pointwise`` (and ``depthwise_bn`` when
  ``depthwise_norm`` is set, for the aligned Xceptions; ``pointwise_bn`` in the pointwise-first
  order). The spatial half keeps the name ``depthwise`` whatever its channels per group, so
  checkpoints, weight-decay masks and backbone freezing see one layout.

``dtype`` is the compute dtype, ``param_dtype`` the storage dtype: ``dtype=jnp.bfloat16`` with
``param_dtype=jnp.float32`` keeps f32 master weights and computes in bf16.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from xception_jax.model import ops
from xception_jax.platform.errors import UsageError

Dtype = Any

SEPARABLE_ORDERS = ("depthwise_first", "pointwise_first")

ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array] | None] = {
    None: None,
    "none": None,
    "relu": ops.relu,
    "elu": nn.elu,
}


def get_activation(name: str | None) -> Callable[[jax.Array], jax.Array] | None:
    """Return the activation function for ``None`` / 'none' / 'relu' / 'elu' (None: identity)."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {name!r}; use one of None, 'relu', 'elu' (the paper's ablation)."
        )
    return ACTIVATIONS[name]


def check_separable_order(order: str) -> None:
    """Raise UsageError naming the choices when ``order`` is not a separable conv order."""
    if order not in SEPARABLE_ORDERS:
        raise UsageError(
            f"Unknown separable_order {order!r}; use 'depthwise_first' (Keras/TF, the default) "
            "or 'pointwise_first' (the paper's 'extreme' Inception module: 1x1, then 3x3)."
        )


def check_channels_per_group(g: int) -> None:
    """Raise UsageError unless ``g`` is a positive group size or -1 (a regular conv)."""
    if isinstance(g, bool) or not isinstance(g, int) or not (g >= 1 or g == -1):
        raise UsageError(
            f"channels_per_group={g!r} must be a positive integer (1: depthwise, the default) "
            "or -1 (a regular 3x3 conv)."
        )


class DepthwiseConv(nn.Module):
    """Depthwise conv, depth multiplier 1, no bias: one ``kernel_size`` filter per channel.

    ``channels_per_group`` g > 1 makes it a grouped conv of ``C // g`` independent segments of g
    channels (the paper's spectrum between depthwise and regular convs); -1 a regular conv (one
    segment of all C channels). 1, the default, is the depthwise conv.
    """

    kernel_size: int = 3
    channels_per_group: int = 1
    strides: int = 1
    dilation: int = 1
    padding: str | tuple[tuple[int, int], tuple[int, int]] = "SAME"
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # He init on the true fan-in of a depthwise filter (k*k); Keras uses glorot_uniform, the
    # paper states none. Imported Keras weights replace it anyway.
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply to NHWC ``x``."""
        c = x.shape[-1]
        k = self.kernel_size
        g = self.channels_per_group
        if g != 1:
            check_channels_per_group(g)
            g = c if g == -1 else g
            if c % g:
                raise ValueError(
                    f"channels_per_group={g} does not divide this conv's {c} channels; "
                    "registry.channels_per_group_choices(model) lists the values a model takes."
                )
            # The variance scaling reads the true fan-in, k * k * g, from the kernel's shape.
            kernel = self.param("kernel", self.kernel_init, (k, k, g, c), self.param_dtype)
            x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
            return ops.grouped_conv(
                x,
                kernel,
                strides=self.strides,
                dilation=self.dilation,
                padding=self.padding,
                impl=self.impl,
            )
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, c), self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return ops.depthwise_conv(
            x,
            kernel,
            strides=self.strides,
            dilation=self.dilation,
            padding=self.padding,
            impl=self.impl,
        )


class PointwiseConv(nn.Module):
    """1x1 conv, no bias, computed as a matmul over channels; ``strides`` subsample first."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # He init on fan-out, as torchvision/timm initialise convs.
    kernel_init: Callable = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply to NHWC ``x``."""
        kernel = self.param(
            "kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return ops.pointwise_conv(x, kernel, strides=self.strides)


class Conv(nn.Module):
    """Dense conv, no bias (the stem's 3x3 convs); ``nn.Conv``'s parameter name and layout."""

    features: int
    kernel_size: int = 3
    strides: int = 1
    padding: str | tuple[tuple[int, int], tuple[int, int]] = "SAME"
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # nn.Conv's default (LeCun normal), which the stem used before it had its own module.
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply to NHWC ``x``."""
        k = self.kernel_size
        shape = (k, k, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        return ops.conv2d(x, kernel, strides=self.strides, padding=self.padding, impl=self.impl)


class BatchNorm(nn.Module):
    """``nn.BatchNorm`` over all axes but the last, with a hand-written training backward.

    The variables, their names and the values are ``nn.BatchNorm(use_fast_variance=False)``'s:
    params ``scale`` and ``bias``, batch_stats ``mean`` and ``var`` (float32), two-pass
    variance (as Keras/TF: ``E[x^2] - E[x]^2`` cancels catastrophically when ``|mean| >> std``,
    and its result then depends on the reduction order), and running averages updated as
    ``momentum * running + (1 - momentum) * batch``, except while initialising. Training mode
    runs ``ops.batch_norm_train``.
    """

    use_running_average: bool = False
    momentum: float = 0.99
    epsilon: float = 1e-3
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise ``[..., C]`` ``x`` with the batch's (training) or the running statistics."""
        features = (x.shape[-1],)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, features, jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, features, jnp.float32)
        scale = self.param("scale", nn.initializers.ones, features, self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, features, self.param_dtype)
        dtype = self.dtype or jnp.result_type(x, scale, bias)
        if self.use_running_average:
            y = (x - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
            return y.astype(dtype)
        y, mean, var = ops.batch_norm_train(x, scale, bias, epsilon=self.epsilon, dtype=dtype)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y


class SeparableConv(nn.Module):
    """Depthwise ``kernel_size`` conv then pointwise 1x1 conv, no bias, depth multiplier 1.

    ``separable_order='pointwise_first'`` swaps the halves: the 1x1 conv to ``features``
    channels, then the spatial conv on those output channels (the paper's "extreme" Inception
    module); the stride and dilation stay on the spatial conv, and the between-halves BatchNorm
    (``depthwise_norm``, then named ``pointwise_bn``) and activation stay between the halves.

    Attributes:
      features: output channels of the pointwise half.
      kernel_size, strides, dilation, padding: of the depthwise half (strides apply there, as
        in Keras and DeepLab); padding 'SAME', 'VALID' or explicit ((top, bottom), (left, right)).
      intermediate_activation: None (the paper's choice), 'relu' or 'elu' between the halves.
      depthwise_norm: insert BatchNorm after the depthwise half (aligned Xception); it comes
        before ``intermediate_activation``.
      depthwise_impl: 'auto', 'taps', 'taps_vjp' or 'lax' (see ``ops``).
      separable_order: 'depthwise_first' (Keras/TF, default) or 'pointwise_first'.
      channels_per_group: of the spatial conv: 1 depthwise (default), g grouped, -1 regular.
      bn_momentum, bn_epsilon: of that BatchNorm (Keras convention: running = m * running + ...).
    """

    features: int
    kernel_size: int = 3
    strides: int = 1
    dilation: int = 1
    padding: str | tuple[tuple[int, int], tuple[int, int]] = "SAME"
    intermediate_activation: str | None = None
    depthwise_norm: bool = False
    depthwise_impl: str = "auto"
    separable_order: str = "depthwise_first"
    channels_per_group: int = 1
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply to NHWC ``x``; ``train`` only matters with ``depthwise_norm``."""
        check_separable_order(self.separable_order)
        act = get_activation(self.intermediate_activation)
        spatial = DepthwiseConv(
            kernel_size=self.kernel_size,
            strides=self.strides,
            dilation=self.dilation,
            padding=self.padding,
            channels_per_group=self.channels_per_group,
            impl=self.depthwise_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="depthwise",
        )
        pointwise = PointwiseConv(
            self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="pointwise"
        )
        first, second = (spatial, pointwise)
        if self.separable_order == "pointwise_first":
            first, second = (pointwise, spatial)
        x = first(x)
        if self.depthwise_norm:
            x = BatchNorm(
                use_running_average=not train,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"{first.name}_bn",
            )(x)
        if act is not None:
            x = act(x)
        return second(x)
