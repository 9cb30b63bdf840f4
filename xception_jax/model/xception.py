"""Xception (Chollet, CVPR 2017) and the aligned Xception-41/65/71 of DeepLab, in flax.linen.

``Xception()`` with default fields is the paper's model exactly as Keras builds it
(keras/src/applications/xception.py): valid-padded stem, pre-activation entry/middle blocks with
1x1/2 conv shortcuts (blocks 2, 3, 4, 13), post-activation block 14, BatchNorm epsilon 1e-3 and
momentum 0.99 everywhere, global average pooling and a dense classifier. Parameter names follow
the Keras layer names (``block1_conv1``, ``block2_sepconv1_bn``, ...; shortcuts, unnamed in
Keras, are ``block{2,3,4,13}_shortcut`` and ``..._shortcut_bn``) so that ``keras_weights`` maps
one to one.

Input: float NHWC already scaled to [-1, 1] (``preprocess``). Output: float32 logits, or with
``return_features=True`` a dict of named features.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from xception_jax.model import ops
from xception_jax.model.layers import (
    BatchNorm,
    Conv,
    PointwiseConv,
    SeparableConv,
    check_channels_per_group,
    check_separable_order,
    get_activation,
)

Dtype = Any

POOLINGS = ("avg", "max", None)
POOL_PADDINGS = ("SAME", "symmetric")


def preprocess(images: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """Scale uint8 (or [0, 255] float) images to [-1, 1] as Xception expects: ``x / 127.5 - 1``."""
    x = jnp.asarray(images).astype(jnp.float32) / 127.5 - 1.0
    return x.astype(dtype)


def round_channels(channels: int, width_multiplier: float, divisor: int = 8) -> int:
    """Scale a channel count by ``width_multiplier``, rounded to a multiple of ``divisor``.

    Every width of the paper's model is a multiple of 8, so a multiplier of 1 is exact.
    """
    if width_multiplier == 1.0:
        return channels
    return max(divisor, int(channels * width_multiplier / divisor + 0.5) * divisor)


def check_drop_path(rate: float, residual: bool) -> None:
    """Raises ValueError for a drop path rate outside [0, 1), or any with residual=False."""
    if not 0 <= rate < 1:
        raise ValueError(f"drop_path_rate={rate} must be in [0, 1) (0: off).")
    if rate > 0 and not residual:
        raise ValueError(
            f"drop_path_rate={rate} needs residual=True: stochastic depth drops a block's "
            "residual branch, and residual=False has none to drop. Set drop_path_rate=0."
        )


class _XceptionBase(nn.Module):
    """Fields, input checks, BatchNorm and head shared by both Xception families."""

    num_classes: int = 1000
    residual: bool = True
    intermediate_activation: str | None = None
    dropout_rate: float = 0.0
    width_multiplier: float = 1.0
    middle_blocks: int = 8
    include_top: bool = True
    pooling: str | None = "avg"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Implementations of the depthwise conv, the stem's dense convs and the max-pools
    # (``xception_jax.model.ops``; 'auto' is the backend's fastest measured, all equal in value).
    depthwise_impl: str = "auto"
    conv_impl: str = "auto"
    pool_impl: str = "auto"
    bn_momentum: float = 0.99
    bn_epsilon: float = 1e-3
    min_input_size: int = 71
    # Recompute each separable conv's inner (depthwise) activation in the backward pass instead
    # of storing it (nn.remat; same values and gradients). Measured on CPU (benchmarks/
    # compare.py, full model, the step jitted with ops.compiler_options() as train.py does):
    # peak RSS 2.79 -> 2.41 GB at 299px batch 8, 2.35 -> 2.00 GB at 128px batch 32, for 4-6%
    # slower steps; off by default.
    remat: bool = False
    # Recompute each whole block (entry, middle and exit flow, and the aligned model's blocks)
    # in the backward pass from the block's input, which is all the forward pass keeps of it
    # (nn.remat around the block; same values and gradients; about one more forward pass of
    # compute). The memory per image this saves on TPU is in docs/memory.md.
    remat_blocks: bool = False
    # The paper's open questions (section 2) as switches of every separable conv (stem convs
    # unaffected): the order of its halves, and the channels per independent segment of its
    # spatial conv (1 depthwise, g grouped, -1 regular). The defaults are Keras's model.
    separable_order: str = "depthwise_first"
    channels_per_group: int = 1
    # Stochastic depth (Huang et al. 2016) as timm: in training, each residual block's branch
    # is dropped for a whole example with probability rate_i (the survivors scaled by
    # 1 / (1 - rate_i)), rate_i growing linearly with depth from 0 at the first block of the
    # body to drop_path_rate at the last; needs rngs={'dropout': key}. Off in evaluation.
    drop_path_rate: float = 0.0

    def _block_drop_rate(self, index: int, num_blocks: int) -> float:
        """timm's linear rule: drop_path_rate * index / (num_blocks - 1)."""
        return self.drop_path_rate * index / max(num_blocks - 1, 1)

    def _drop_path(self, y: jax.Array, rate: float, train: bool) -> jax.Array:
        """y with whole examples zeroed with probability `rate` (and kept ones scaled)."""
        if not train or rate <= 0:
            return y
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y.shape[0], 1, 1, 1))
        return jnp.where(mask, y / jnp.asarray(keep, y.dtype), jnp.zeros_like(y))

    def _remat_block(self, fn, x, *args):
        """``fn(self, x, *args)`` (a block), recomputed in the backward pass if remat_blocks.

        ``args`` are static (names, channel tuples, flags): hashable Python values.
        """
        if self.remat_blocks:
            # static_argnums counts the module: (module, x, *args).
            fn = nn.remat(fn, static_argnums=tuple(range(2, 2 + len(args))))
        return fn(self, x, *args)

    def _check(self, x: jax.Array) -> None:
        get_activation(self.intermediate_activation)  # fails early on a bad name
        check_separable_order(self.separable_order)
        check_channels_per_group(self.channels_per_group)
        check_drop_path(self.drop_path_rate, self.residual)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}.")
        if self.include_top and self.pooling is None:
            raise ValueError("include_top=True needs pooling 'avg' (Keras) or 'max', not None.")
        if x.ndim != 4:
            raise ValueError(f"Xception wants NHWC images [B, H, W, 3]; got shape {x.shape}.")
        if x.shape[-1] != 3:
            raise ValueError(
                f"Xception wants 3 input channels (RGB, channels last); got {x.shape[-1]} "
                f"(input shape {x.shape}). Convert grayscale to RGB or transpose NCHW to NHWC."
            )
        if min(x.shape[1], x.shape[2]) < self.min_input_size:
            raise ValueError(
                f"Input {x.shape[1]}x{x.shape[2]} is smaller than this model's minimum "
                f"{self.min_input_size}x{self.min_input_size}; resize the images up or use a "
                f"variant with a smaller min_input_size (e.g. 'xception_tiny')."
            )
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"Xception wants float input scaled to [-1, 1]; got {x.dtype}. "
                "Apply xception_jax.preprocess(images) first."
            )

    def _ch(self, channels: int) -> int:
        return round_channels(channels, self.width_multiplier)

    def _bn(self, name: str, train: bool) -> BatchNorm:
        return BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _conv(self, features: int, strides: int, padding, name: str) -> Conv:
        return Conv(
            self._ch(features),
            strides=strides,
            padding=padding,
            impl=self.conv_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _sep(self, features: int, name: str, **kw) -> SeparableConv:
        kw.setdefault("intermediate_activation", self.intermediate_activation)
        # static_argnums counts self: (self, x, train) -> `train` is static.
        cls = nn.remat(SeparableConv, static_argnums=(2,)) if self.remat else SeparableConv
        return cls(
            self._ch(features),
            depthwise_impl=self.depthwise_impl,
            separable_order=self.separable_order,
            channels_per_group=self.channels_per_group,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
            **kw,
        )

    def _shortcut(self, x: jax.Array, features: int, strides: int, name: str, train: bool):
        y = PointwiseConv(
            self._ch(features),
            strides=strides,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=f"{name}_shortcut",
        )(x)
        return self._bn(f"{name}_shortcut_bn", train)(y)

    def _head(self, x: jax.Array, train: bool, features: dict) -> jax.Array:
        features["exit"] = x
        if self.pooling is None:
            return x
        pool = jnp.mean if self.pooling == "avg" else jnp.max
        # The head runs in float32: pooled features are tiny, and logits must be f32 for a
        # stable softmax/cross-entropy even under bf16 compute.
        x = pool(x.astype(jnp.float32), axis=(1, 2))
        features["pre_logits"] = x
        if not self.include_top:
            return x
        if self.dropout_rate > 0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name="dropout")(x)
        x = nn.Dense(
            self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype, name="predictions"
        )(x)
        features["logits"] = x
        return x


class Xception(_XceptionBase):
    """The paper's Xception as Keras builds it; fields add the paper's ablations and small variants.

    Attributes:
      num_classes: classifier outputs (with ``include_top``).
      residual: False removes every shortcut add and the shortcut convs (paper, Figure 9).
      intermediate_activation: None (paper), 'relu' or 'elu' between depthwise and pointwise
        (paper, Figure 10).
      dropout_rate: dropout before the classifier in training (0.5 in the paper's ImageNet run);
        needs ``rngs={'dropout': key}``.
      width_multiplier: scales every width (rounded to multiples of 8).
      middle_blocks: number of middle-flow blocks (8 in the paper).
      include_top: add the dense classifier.
      pooling: 'avg', 'max', or None (only without top: returns the 4-D exit features).
      dtype / param_dtype: compute / parameter dtypes (bf16 compute with f32 params works).
      depthwise_impl: 'auto', 'taps', 'taps_vjp' or 'lax' (``xception_jax.model.ops``).
      conv_impl: the stem convs', 'auto', 'im2col' or 'lax'.
      pool_impl: the max-pools', 'auto', 'taps_vjp' or 'lax'.
      bn_momentum, bn_epsilon: BatchNorm (Keras: 0.99, 1e-3).
      min_input_size: smallest accepted height/width (Keras: 71).
      remat: recompute separable convs' inner activations in the backward pass (less memory).
      remat_blocks: recompute every block from its input in the backward pass (least memory).
      separable_order: 'depthwise_first' (Keras, default) or 'pointwise_first' (1x1 to the
        output width, then the spatial conv on the output channels; the paper's question (c)).
      channels_per_group: channels per segment of every separable conv's spatial conv: 1
        depthwise (default), g grouped (g must divide every such conv's channels,
        ``registry.channels_per_group_choices``), -1 a regular 3x3 conv (question (d)).
      drop_path_rate: stochastic depth of the residual blocks, linear in depth (timm's rule);
        needs ``residual=True`` and, in training, ``rngs={'dropout': key}``.
      pool_padding: the max-pools' padding, 'SAME' (TensorFlow's, as Keras: (0, 1) on an even
        size) or 'symmetric' (1 on every side, as PyTorch and timm's ``legacy_xception``).
    """

    pool_padding: str = "SAME"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Run on float NHWC ``x`` in [-1, 1]; ``train`` uses batch statistics and dropout."""
        self._check(x)
        feats: dict[str, jax.Array] = {}
        x = x.astype(self.dtype)
        relu = ops.relu

        # Stem (block 1): two valid-padded 3x3 convs.
        for i, (ch, s) in enumerate(((32, 2), (64, 1)), start=1):
            x = self._conv(ch, s, "VALID", f"block1_conv{i}")(x)
            x = relu(self._bn(f"block1_conv{i}_bn", train)(x))
        feats["stem"] = x

        # Entry flow: blocks 2-4. Block 2's first sepconv has no ReLU in front (input is
        # already activated); the shortcut reads the block input before the ReLU.
        for block, ch in ((2, 128), (3, 256), (4, 728)):
            x = self._remat_block(
                type(self)._downsample_block, x, block, (ch, ch), block != 2, train
            )
            feats[f"block{block}"] = x

        # Middle flow: identity-shortcut blocks of 3 x (ReLU, sep 728, BN).
        for block in range(5, 5 + self.middle_blocks):
            x = self._remat_block(type(self)._middle_block, x, block, train)
        feats["middle"] = x

        # Exit flow: one downsampling block, then block 14 (post-activation, no shortcut).
        exit1 = 5 + self.middle_blocks
        x = self._remat_block(type(self)._downsample_block, x, exit1, (728, 1024), True, train)
        x = self._remat_block(type(self)._exit_block, x, exit1 + 1, train)

        out = self._head(x, train, feats)
        return feats if return_features else out

    def _pool_pads(self):
        """The max-pools' padding argument for ``ops.max_pool``."""
        if self.pool_padding not in POOL_PADDINGS:
            raise ValueError(
                f"pool_padding must be one of {POOL_PADDINGS}, got {self.pool_padding!r}."
            )
        # The two differ only where TF's 'SAME' pads unevenly: an even size (74 at 299 px).
        return "SAME" if self.pool_padding == "SAME" else ((1, 1), (1, 1))

    def _middle_block(self, x, block: int, train: bool):
        """3 x (ReLU, sep 728, BN) + identity shortcut."""
        y = x
        for j in range(1, 4):
            y = self._sep(728, f"block{block}_sepconv{j}")(ops.relu(y), train)
            y = self._bn(f"block{block}_sepconv{j}_bn", train)(y)
        if not self.residual:
            return y
        return x + self._drop_path(y, self._paper_block_rate(block), train)

    def _paper_block_rate(self, block: int) -> float:
        """Drop path rate of block `block` (2 .. 6 + middle_blocks, the body's blocks)."""
        return self._block_drop_rate(block - 2, self.middle_blocks + 5)

    def _exit_block(self, x, block: int, train: bool):
        """sep 1536, BN, ReLU, sep 2048, BN, ReLU (post-activation, no shortcut)."""
        for j, ch in ((1, 1536), (2, 2048)):
            x = self._sep(ch, f"block{block}_sepconv{j}")(x, train)
            x = ops.relu(self._bn(f"block{block}_sepconv{j}_bn", train)(x))
        return x

    def _downsample_block(self, x, block: int, chs: Sequence[int], pre_relu: bool, train: bool):
        """(ReLU), sep, BN, ReLU, sep, BN, maxpool 3x3/2 SAME; + shortcut conv 1x1/2 + BN."""
        shortcut = x
        y = ops.relu(x) if pre_relu else x
        for j, ch in enumerate(chs, start=1):
            if j > 1:
                y = ops.relu(y)
            y = self._sep(ch, f"block{block}_sepconv{j}")(y, train)
            y = self._bn(f"block{block}_sepconv{j}_bn", train)(y)
        y = ops.max_pool(y, 3, strides=2, padding=self._pool_pads(), impl=self.pool_impl)
        if not self.residual:
            return y
        y = self._drop_path(y, self._paper_block_rate(block), train)
        return y + self._shortcut(shortcut, chs[-1], 2, f"block{block}", train)


class XceptionAligned(_XceptionBase):
    """Aligned Xception of DeepLab (v3+), as timm's ``xception41/65/71`` and DeepLab's TF code.

    Differences from the paper's model: SAME (symmetric) padded stem; every downsampling is a
    stride-2 separable conv (no max-pool); every block has three separable convs; BatchNorm
    after each depthwise conv; ``output_stride`` 8/16/32 replaces later strides by dilation.
    Like DeepLab's reference code, the pre-activation blocks put no ReLU between the depthwise
    BN and the pointwise conv (``intermediate_activation='relu'`` adds it, as the DeepLabv3+
    paper's text describes); the last exit block is post-activation with ReLU after both BNs.

    Extra attributes:
      entry_blocks: (channels, stride) of each entry-flow block.
      output_stride: 8, 16 or 32 (input size / final feature map size).
    """

    entry_blocks: tuple[tuple[int, int], ...] = ((128, 2), (256, 2), (728, 2))
    output_stride: int = 32
    min_input_size: int = 32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False, return_features: bool = False):
        """Run on float NHWC ``x`` in [-1, 1]; ``train`` uses batch statistics and dropout."""
        self._check(x)
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}.")
        feats: dict[str, jax.Array] = {}
        x = x.astype(self.dtype)

        for i, (ch, s) in enumerate(((32, 2), (64, 1)), start=1):
            x = self._conv(ch, s, ((1, 1), (1, 1)), f"block1_conv{i}")(x)
            x = ops.relu(self._bn(f"block1_conv{i}_bn", train)(x))
        feats["stem"] = x

        # (name, out channels x3, stride, start_with_relu, skip); strides become dilation
        # once the output stride is reached, exactly as timm / DeepLab's stack_blocks_dense.
        e, m = len(self.entry_blocks), self.middle_blocks
        plan = [
            (f"block{2 + i}", (c, c, c), s, True, True)
            for i, (c, s) in enumerate(self.entry_blocks)
        ]
        plan += [(f"block{2 + e + i}", (728,) * 3, 1, True, True) for i in range(m)]
        plan += [(f"block{2 + e + m}", (728, 1024, 1024), 2, True, True)]
        plan += [(f"block{3 + e + m}", (1536, 1536, 2048), 1, False, False)]
        stride, dilation = 2, 1
        for idx, (name, chs, s, start_relu, skip) in enumerate(plan):
            block_dilation = dilation
            if s > 1:
                if stride * s > self.output_stride:
                    dilation *= s
                    s = 1
                else:
                    stride *= s
            rate = self._block_drop_rate(idx, len(plan))
            x = self._remat_block(
                type(self)._block, x, name, chs, s, block_dilation, start_relu, skip, rate, train
            )
            if idx < e:
                feats[name] = x
            elif idx == e + m - 1:
                feats["middle"] = x
        if m == 0:
            feats["middle"] = feats[f"block{1 + e}"]

        out = self._head(x, train, feats)
        return feats if return_features else out

    def _block(self, x, name, chs, stride, dilation, start_relu, skip, drop_rate, train):
        """Three separable convs (stride on the third) with BN after depthwise and pointwise."""
        shortcut = x
        pad = ((dilation, dilation), (dilation, dilation))  # symmetric (k-1)*d/2 for k=3
        for j, ch in enumerate(chs, start=1):
            if start_relu:
                x = ops.relu(x)
            x = self._sep(
                ch,
                f"{name}_sepconv{j}",
                strides=stride if j == 3 else 1,
                dilation=dilation,
                padding=pad,
                depthwise_norm=True,
                **({} if start_relu else {"intermediate_activation": "relu"}),
            )(x, train)
            x = self._bn(f"{name}_sepconv{j}_bn", train)(x)
            if not start_relu:
                x = ops.relu(x)
        if not (skip and self.residual):
            return x
        if self._ch(chs[-1]) != shortcut.shape[-1] or stride != 1:
            shortcut = self._shortcut(shortcut, chs[-1], stride, name, train)
        return self._drop_path(x, drop_rate, train) + shortcut
