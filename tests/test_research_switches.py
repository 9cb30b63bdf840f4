"""The paper's open questions as model switches: separable_order and channels_per_group.

Closed-form parameter counts of the full model (jax.eval_shape, nothing compiled), the grouped
and regular spatial convs against ``lax`` written out here, the pointwise-first block against
its two convs composed by hand, and the refusals.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from xception_jax.model import ops, registry
from xception_jax.model.layers import DepthwiseConv, SeparableConv

# (C_in, C_out) of the 34 separable convs of the paper's Xception (Figure 5), in order.
XCEPTION_SEPARABLE = (
    [(64, 128), (128, 128), (128, 256), (256, 256), (256, 728), (728, 728)]
    + [(728, 728)] * 24
    + [(728, 728), (728, 1024), (1024, 1536), (1536, 2048)]
)
PAPER_PARAMS = 22_855_952


def _params(model, size=71):
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return registry.count_params(variables["params"])


def _closed_form(order: str, g: int) -> int:
    """22,855,952 with each separable conv's 9*C_in depthwise weights replaced by 9*g*C, C the
    channels its spatial conv filters (C_in depthwise-first, C_out pointwise-first)."""
    total = PAPER_PARAMS
    for c_in, c_out in XCEPTION_SEPARABLE:
        c = c_in if order == "depthwise_first" else c_out
        total += 9 * (c if g == -1 else g) * c - 9 * c_in
    return total


def test_closed_form_examples():
    assert len(XCEPTION_SEPARABLE) == 34
    sum_in = sum(c for c, _ in XCEPTION_SEPARABLE)
    sum_out = sum(c for _, c in XCEPTION_SEPARABLE)
    assert _closed_form("depthwise_first", 1) == PAPER_PARAMS
    assert _closed_form("pointwise_first", 1) == PAPER_PARAMS + 9 * (sum_out - sum_in)
    assert _closed_form("depthwise_first", 8) == PAPER_PARAMS + 9 * 7 * sum_in


@pytest.mark.parametrize("order", ["depthwise_first", "pointwise_first"])
def test_full_model_parameter_counts_match_the_closed_form(order):
    for g in (1, 2, 4, 8, -1):
        model = registry.create_model("xception", separable_order=order, channels_per_group=g)
        assert _params(model) == _closed_form(order, g), (order, g)


def test_default_is_todays_model():
    """channels_per_group=1 and depthwise_first are the default fields: the same module, with
    Keras's depthwise kernel layout (the main job's parameter fingerprint checks the values)."""
    default = registry.create_model("xception_tiny", num_classes=4)
    explicit = registry.create_model(
        "xception_tiny", num_classes=4, channels_per_group=1, separable_order="depthwise_first"
    )
    assert default == explicit
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(lambda x: default.init(jax.random.key(0), x), x)
    assert v["params"]["block2_sepconv1"]["depthwise"]["kernel"].shape == (3, 3, 1, 16)


def _reference_grouped(x, kernel, strides, dilation, padding):
    """lax's grouped convolution, written independently of xception_jax.model.ops."""
    groups = x.shape[-1] // kernel.shape[2]
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(strides, strides),
        padding=padding,
        rhs_dilation=(dilation, dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


# The CPU forms: g <= 8 rolled depthwise taps, a regular conv (g = C) without dilation im2col,
# the rest (g = 16 of 32, a dilated regular conv) one matmul per tap.
@pytest.mark.parametrize(
    "g,c,strides,dilation,padding",
    [
        (2, 16, 1, 1, "SAME"),
        (4, 16, 2, 1, "SAME"),
        (2, 16, 1, 2, ((2, 2), (2, 2))),
        (8, 16, 2, 1, "VALID"),
        (16, 32, 2, 1, "SAME"),
        (16, 16, 1, 1, "SAME"),
        (16, 16, 1, 2, "SAME"),
    ],
)
def test_grouped_spatial_conv_equals_lax_feature_group_count(g, c, strides, dilation, padding):
    kx, kk, kc = jax.random.split(jax.random.key(g + strides), 3)
    x = jax.random.normal(kx, (2, 9, 10, c))
    kernel = jax.random.normal(kk, (3, 3, g, c))

    @jax.jit
    def all_forms(x, kernel):
        ref = lambda x, k: _reference_grouped(x, k, strides, dilation, padding)
        forms = [ref] + [
            lambda x, k, impl=impl: ops.grouped_conv(
                x, k, strides=strides, dilation=dilation, padding=padding, impl=impl
            )
            for impl in ("taps", "taps_vjp", "lax")
        ]
        out = []
        for fn in forms:
            y = fn(x, kernel)
            ct = jax.random.normal(kc, y.shape)
            grads = jax.grad(lambda x, k, fn=fn, ct=ct: jnp.sum(fn(x, k) * ct), (0, 1))(x, kernel)
            out.append((y, *grads))
        return out

    (ref, *ref_grads), *others = all_forms(x, kernel)
    for y, *grads in others:
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(grads, ref_grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["taps_vjp", "lax"])
def test_minus_one_is_a_dense_3x3_conv(impl):
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 12))
    layer = DepthwiseConv(channels_per_group=-1, strides=2, impl=impl)
    v = layer.init(jax.random.key(1), x)
    kernel = v["params"]["kernel"]
    assert kernel.shape == (3, 3, 12, 12)

    def dense(x, k):
        return lax.conv_general_dilated(
            x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    @jax.jit
    def both(x, kernel):
        fns = (lambda x, k: layer.apply({"params": {"kernel": k}}, x), dense)
        return [
            (
                fn(x, kernel),
                *jax.grad(lambda x, k, fn=fn: jnp.sum(fn(x, k) ** 2), (0, 1))(x, kernel),
            )
            for fn in fns
        ]

    got, want = both(x, kernel)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("g", [1, 2])
def test_pointwise_first_block_is_a_1x1_then_a_spatial_conv(g):
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 6))
    layer = SeparableConv(
        8,
        strides=2,
        separable_order="pointwise_first",
        channels_per_group=g,
        intermediate_activation="relu",
        depthwise_impl="taps_vjp",
    )
    p = jax.eval_shape(layer.init, jax.random.key(1), x)["params"]
    assert p["pointwise"]["kernel"].shape == (6, 8)  # 1x1 to the output width first
    assert p["depthwise"]["kernel"].shape == (3, 3, g, 8)  # on the output channels
    kp, kd = jax.random.split(jax.random.key(2))
    p = {
        "pointwise": {"kernel": jax.random.normal(kp, (6, 8))},
        "depthwise": {"kernel": jax.random.normal(kd, (3, 3, g, 8))},
    }

    def composed(x, p):
        y = jnp.einsum("bhwi,io->bhwo", x, p["pointwise"]["kernel"])
        y = jnp.maximum(y, 0.0)
        return _reference_grouped(y, p["depthwise"]["kernel"], 2, 1, "SAME")

    @jax.jit
    def both(x, p):
        fns = (lambda x, p: layer.apply({"params": p}, x), composed)
        return [(fn(x, p), jax.grad(lambda p, fn=fn: jnp.sum(fn(x, p) ** 2))(p)) for fn in fns]

    (y, grads), (y_ref, grads_ref) = both(x, p)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_pointwise_first_aligned_norm_sits_between_the_halves():
    model = registry.create_model(
        "xception41", width_multiplier=0.25, middle_blocks=1, separable_order="pointwise_first"
    )
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    sep = v["params"]["block2_sepconv1"]
    assert set(sep) == {"pointwise", "pointwise_bn", "depthwise"}
    assert sep["pointwise_bn"]["scale"].shape == sep["pointwise"]["kernel"].shape[1:]


@pytest.mark.parametrize(
    "name,fields",
    [
        (
            "xception_tiny",
            {"channels_per_group": 4, "separable_order": "pointwise_first", "remat": True},
        ),
        (
            "xception41",
            {
                "channels_per_group": -1,
                "remat_blocks": True,
                "dtype": "bfloat16",
                "output_stride": 16,
                "width_multiplier": 0.125,
            },
        ),
    ],
)
def test_switches_trace_through_every_model_option(name, fields):
    """Gradients trace through the grouped / regular / pointwise-first convs with remat and bf16
    (jax.eval_shape: traced, not compiled; the sweeps train them from the command line)."""
    model = registry.create_model(name, num_classes=3, middle_blocks=0, **fields)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(1), x), x)

    def grads(v, x):
        def loss(params):
            out, _ = model.apply(
                {"params": params, "batch_stats": v["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.mean(out.astype(jnp.float32) ** 2)

        return jax.grad(loss)(v["params"])

    g = jax.eval_shape(grads, v, x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), g) == jax.tree.map(
        lambda a: (a.shape, a.dtype), v["params"]
    )


def test_choices_and_refusals():
    tiny = registry.create_model("xception_tiny")
    assert registry.channels_per_group_choices(tiny) == [1, 2, 4, 8, -1]
    with pytest.raises(ValueError, match=r"use one of \[1, 2, 4, 8, -1\]"):
        registry.create_model("xception", channels_per_group=3)
    with pytest.raises(ValueError, match="'depthwise_first'.*'pointwise_first'"):
        registry.create_model("xception_tiny", separable_order="pointwise_last")
    with pytest.raises(ValueError, match="-1 \\(a regular 3x3 conv\\)"):
        registry.create_model("xception_tiny", channels_per_group=0)


def test_keras_and_timm_import_refuse_the_switches():
    from xception_jax.weights import keras_weights, timm_weights

    # Refused before the file is read: the message names the fix.
    with pytest.raises(ValueError, match="channels_per_group=1 .*or train from scratch"):
        keras_weights.load_model("/nonexistent/xception.h5", channels_per_group=2)
    with pytest.raises(ValueError, match="timm weights .* separable_order='pointwise_first'"):
        timm_weights.load_model(
            "/nonexistent/x.safetensors", "xception41", separable_order="pointwise_first"
        )
