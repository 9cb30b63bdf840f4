"""Depthwise / pointwise ops, the separable-conv layers and BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from xception_jax.model import ops
from xception_jax.model.layers import BatchNorm, DepthwiseConv, PointwiseConv, SeparableConv


def _inputs(shape=(2, 9, 10, 6), k=3, seed=0):
    kx, kk, kc = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (k, k, 1, shape[-1]))
    return x, kernel, kc


@pytest.mark.parametrize(
    "strides,dilation,padding",
    [
        (1, 1, "SAME"),
        (2, 1, "SAME"),
        (1, 2, "SAME"),
        (2, 1, "VALID"),
        (2, 2, ((1, 1), (2, 2))),
    ],
)
def test_depthwise_impls_agree_values_and_gradients(strides, dilation, padding):
    x, kernel, kc = _inputs()

    @jax.jit  # both impls in one compile: far faster than eager ops on CPU
    def both(x, kernel):
        results = []
        for impl in ("taps", "lax"):
            fn = lambda x, k, impl=impl: ops.depthwise_conv(
                x, k, strides=strides, dilation=dilation, padding=padding, impl=impl
            )
            out = fn(x, kernel)
            ct = jax.random.normal(kc, out.shape)  # same cotangent for both impls
            grads = jax.grad(lambda x, k, fn=fn, ct=ct: jnp.sum(fn(x, k) * ct), argnums=(0, 1))(
                x, kernel
            )
            results.append((out, *grads))
        return results

    (out_t, gx_t, gk_t), (out_l, gx_l, gk_l) = both(x, kernel)
    assert out_t.shape == out_l.shape
    np.testing.assert_allclose(out_t, out_l, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gx_t, gx_l, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gk_t, gk_l, rtol=1e-5, atol=1e-4)


def test_depthwise_same_padding_shapes_match_tf():
    x, kernel, _ = _inputs((1, 19, 20, 4))
    for impl in ops.DEPTHWISE_IMPLS:
        assert ops.depthwise_conv(x, kernel, strides=2, impl=impl).shape == (1, 10, 10, 4)


def test_depthwise_bf16_accumulates_accurately():
    x, kernel, _ = _inputs()
    ref = ops.depthwise_conv(x, kernel, impl="lax")
    out = ops.depthwise_conv(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), impl="taps")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=0.05, atol=0.1)


def test_depthwise_errors_name_the_problem():
    x, kernel, _ = _inputs()
    with pytest.raises(ValueError, match="Unknown depthwise impl"):
        ops.depthwise_conv(x, kernel, impl="fft")
    with pytest.raises(ValueError, match="does not fit input channels"):
        ops.depthwise_conv(x, kernel[..., :3], impl="taps")
    assert ops.resolve_impl("depthwise", "auto") == ops.default_impl("depthwise")
    assert ops.default_impl("depthwise", "cpu") == "taps_vjp"
    assert ops.default_impl("depthwise", "tpu") == "lax"


@pytest.mark.parametrize("strides", [1, 2])
def test_pointwise_equals_1x1_conv(strides):
    x, _, kc = _inputs((2, 7, 8, 6))
    kernel = jax.random.normal(kc, (6, 5))
    ref = lax.conv_general_dilated(
        x,
        kernel[None, None],
        (strides, strides),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    np.testing.assert_allclose(
        ops.pointwise_conv(x, kernel, strides=strides), ref, rtol=1e-5, atol=1e-5
    )


def test_separable_conv_params_and_activation():
    x, _, _ = _inputs((2, 8, 8, 6))
    layer = SeparableConv(10)
    variables = layer.init(jax.random.key(1), x)
    shapes = jax.tree_util.tree_map(jnp.shape, variables["params"])
    assert shapes == {"depthwise": {"kernel": (3, 3, 1, 6)}, "pointwise": {"kernel": (6, 10)}}
    outs = {
        act: SeparableConv(10, intermediate_activation=act).apply(variables, x)
        for act in (None, "relu", "elu")
    }
    assert outs[None].shape == (2, 8, 8, 10)
    assert not np.allclose(outs[None], outs["relu"])
    assert not np.allclose(outs["relu"], outs["elu"])
    with pytest.raises(ValueError, match="Unknown activation"):
        SeparableConv(10, intermediate_activation="gelu").apply(variables, x)


def test_separable_conv_impls_agree_and_depthwise_norm():
    x, _, _ = _inputs((2, 9, 9, 6))
    layer = SeparableConv(4, strides=2, dilation=2, depthwise_impl="taps")
    variables = layer.init(jax.random.key(1), x)
    other = SeparableConv(4, strides=2, dilation=2, depthwise_impl="lax")
    np.testing.assert_allclose(
        layer.apply(variables, x), other.apply(variables, x), rtol=1e-5, atol=1e-5
    )
    bn = SeparableConv(4, depthwise_norm=True)
    v = bn.init(jax.random.key(1), x)
    assert set(v) == {"params", "batch_stats"} and "depthwise_bn" in v["params"]
    _, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    assert not np.allclose(upd["batch_stats"]["depthwise_bn"]["mean"], 0.0)


def test_bf16_compute_with_f32_params():
    x, _, _ = _inputs((2, 8, 8, 6))
    for layer in (
        DepthwiseConv(dtype=jnp.bfloat16),
        PointwiseConv(4, dtype=jnp.bfloat16),
        SeparableConv(4, dtype=jnp.bfloat16),
    ):
        variables = layer.init(jax.random.key(0), x)
        assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
        assert layer.apply(variables, x).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype,grad_atol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_batch_norm_equals_flax_batch_norm(dtype, grad_atol):
    """Same variables, outputs, running statistics and gradients as nn.BatchNorm (two-pass)."""
    x = (3.0 * jax.random.normal(jax.random.key(0), (4, 5, 6, 7)) + 2.0).astype(dtype)
    ours = BatchNorm(momentum=0.9, epsilon=1e-3, dtype=dtype)
    ref = nn.BatchNorm(
        use_running_average=False,
        momentum=0.9,
        epsilon=1e-3,
        use_fast_variance=False,
        dtype=dtype,
    )
    variables = ours.init(jax.random.key(1), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), variables) == jax.tree.map(
        lambda a: (a.shape, a.dtype), ref.init(jax.random.key(1), x)
    )
    # Non-trivial parameters and running statistics (init gives ones and zeros).
    leaves, treedef = jax.tree.flatten(variables)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    noisy = [a + 0.3 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
    variables = jax.tree.unflatten(treedef, noisy)
    weights = jax.random.normal(jax.random.key(3), x.shape)

    def loss(module, variables, x):
        y, updated = module.apply(variables, x, mutable=["batch_stats"])
        return jnp.sum(jnp.tanh(y.astype(jnp.float32)) * weights), (y, updated)

    def run(module):
        return jax.value_and_grad(loss, argnums=(1, 2), has_aux=True)(module, variables, x)

    (_, (y, stats)), grads = run(ours)
    (_, (ref_y, ref_stats)), ref_grads = run(ref)
    assert y.dtype == ref_y.dtype == dtype
    np.testing.assert_allclose(y.astype(jnp.float32), ref_y.astype(jnp.float32), atol=1e-6)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(ref_stats), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(
            got.astype(jnp.float32), want.astype(jnp.float32), rtol=1e-5, atol=grad_atol
        )
    evaluated = ours.clone(use_running_average=True).apply(variables, x)
    ref_evaluated = ref.clone(use_running_average=True).apply(variables, x)
    assert evaluated.dtype == dtype
    np.testing.assert_allclose(
        evaluated.astype(jnp.float32), ref_evaluated.astype(jnp.float32), atol=1e-6
    )
