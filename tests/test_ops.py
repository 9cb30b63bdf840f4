"""Every optimised path equals its reference: depthwise 'taps_vjp' (hand-written backward) vs
``lax.conv_general_dilated``, in values and gradients; bfloat16; remat in the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xception_jax import models, ops


def _outputs_and_grads(x, kernel, ct, impls, **conv_kw):
    """(output, d/dx, d/dkernel) of sum(out * ct) for each impl, all in one jitted program."""

    @jax.jit
    def run(x, kernel, ct):
        results = []
        for impl in impls:

            def loss(x, k, impl=impl):
                return jnp.sum(ops.depthwise_conv(x, k, impl=impl, **conv_kw) * ct)

            out = ops.depthwise_conv(x, kernel, impl=impl, **conv_kw)
            results.append((out, *jax.grad(loss, argnums=(0, 1))(x, kernel)))
        return results

    return run(x, kernel, ct)


# (input shape, kernel size, strides, dilation, padding). Batches 1-3 take the kernel
# gradient's row-chunk path (with zero-padded chunks for odd heights), 17 and 32 its batch-block
# path (17 is prime: no blocking); stride 3 and lopsided explicit padding check the crop
# arithmetic of the input gradient.
CASES = [
    ((2, 9, 10, 6), 3, 1, 1, "SAME"),
    ((2, 9, 10, 6), 3, 2, 2, "SAME"),
    ((2, 9, 10, 6), 3, 1, 2, "VALID"),
    ((2, 9, 10, 6), 3, 2, 1, "VALID"),
    ((1, 11, 7, 5), 3, 2, 2, ((1, 1), (2, 2))),
    ((3, 10, 11, 5), 5, 2, 1, "SAME"),
    ((1, 8, 8, 3), 3, 3, 1, ((3, 0), (0, 4))),
    ((17, 7, 5, 4), 3, 1, 1, "SAME"),
    ((32, 6, 6, 4), 3, 2, 1, "SAME"),
]


@pytest.mark.parametrize("shape,k,strides,dilation,padding", CASES)
def test_taps_vjp_equals_lax_values_and_gradients(shape, k, strides, dilation, padding):
    kx, kk, kc = jax.random.split(jax.random.key(sum(shape) + k + strides), 3)
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (k, k, 1, shape[-1]))
    conv_kw = dict(strides=strides, dilation=dilation, padding=padding)
    out_shape = jax.eval_shape(lambda: ops.depthwise_conv(x, kernel, impl="lax", **conv_kw)).shape
    ct = jax.random.normal(kc, out_shape)
    ref, fast = _outputs_and_grads(x, kernel, ct, ("lax", "taps_vjp"), **conv_kw)
    for name, r, f in zip(("output", "d/dx", "d/dkernel"), ref, fast, strict=True):
        assert f.shape == r.shape and f.dtype == r.dtype, name
        np.testing.assert_allclose(f, r, rtol=1e-5, atol=2e-5 if name != "d/dkernel" else 1e-4)


def test_taps_vjp_bfloat16_matches_float32_reference():
    kx, kk, kc = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (4, 12, 12, 8))
    kernel = jax.random.normal(kk, (3, 3, 1, 8))
    ct = jax.random.normal(kc, (4, 6, 6, 8))
    kw = dict(strides=2, dilation=1, padding="SAME")
    (ref,) = _outputs_and_grads(x, kernel, ct, ("lax",), **kw)
    (low,) = _outputs_and_grads(
        x.astype(jnp.bfloat16),
        kernel.astype(jnp.bfloat16),
        ct.astype(jnp.bfloat16),
        ("taps_vjp",),
        **kw,
    )
    for r, lo in zip(ref, low, strict=True):
        assert lo.dtype == jnp.bfloat16
        # bf16 inputs carry ~3 significant digits; the f32 accumulation keeps the sums close.
        scale = float(jnp.max(jnp.abs(r)))
        np.testing.assert_allclose(lo.astype(jnp.float32), r, rtol=0.05, atol=0.02 * scale)


def test_taps_vjp_is_a_known_impl():
    assert "taps_vjp" in ops.DEPTHWISE_IMPLS
    assert ops.resolve_depthwise_impl("taps_vjp") == "taps_vjp"
    assert ops.default_depthwise_impl("cpu") in ops.DEPTHWISE_IMPLS


def _train_grads(model, variables, x, labels):
    def loss_fn(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        onehot = jax.nn.one_hot(labels, logits.shape[-1])
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), upd

    return jax.jit(jax.grad(loss_fn, has_aux=True))(variables["params"])


def test_model_gradients_same_for_taps_vjp_and_remat():
    """A whole tiny Xception: taps_vjp and remat give the reference (taps) gradients."""
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    labels = jnp.array([1, 3])
    small = dict(num_classes=5, middle_blocks=1, width_multiplier=0.125)
    ref_model = models.create_model("xception_tiny", depthwise_impl="taps", **small)
    variables = jax.jit(ref_model.init)(jax.random.key(1), x)
    ref_grads, ref_stats = _train_grads(ref_model, variables, x, labels)
    # Both optimisations in one model (one compile less): each is exact on its own, so any
    # difference would show here.
    model = models.create_model("xception_tiny", depthwise_impl="taps_vjp", remat=True, **small)
    grads, stats = _train_grads(model, variables, x, labels)
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    leaves = jax.tree.leaves((grads, stats))
    for g, r in zip(leaves, jax.tree.leaves((ref_grads, ref_stats)), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
