"""Every optimised path equals its reference, in values and gradients: depthwise 'taps_vjp'
(hand-written backward) vs ``lax.conv_general_dilated``, the stem conv's 'im2col' vs the dense
``conv_general_dilated``, the max-pool's 'taps_vjp' vs ``reduce_window`` (ties included),
BatchNorm's hand-written training backward vs autodiff; bfloat16; remat and all of them
together in the model."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from xception_jax.model import ops, registry


def _outputs_and_grads(x, kernel, ct, impls, **conv_kw):
    """(output, d/dx, d/dkernel) of sum(out * ct) for each impl, all in one jitted program."""

    @functools.partial(jax.jit, compiler_options=ops.compiler_options())
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


def test_impl_registry_defaults_and_errors():
    for op, impls in ops.IMPLS.items():
        assert ops.default_impl(op, "cpu") in impls
        assert ops.default_impl(op, "tpu") == "lax"
        assert ops.resolve_impl(op, "lax") == "lax"
    assert ops.default_impl("pool", "cpu") == "taps_vjp"
    assert ops.default_impl("conv", "cpu") == "im2col"
    with pytest.raises(ValueError, match=r"Unknown conv impl 'taps'.*'im2col'"):
        ops.resolve_impl("conv", "taps")


def _loss_grads(fn, x, *params, ct):
    """Output and gradients (w.r.t. x and every param) of sum(fn(x, *params) * ct), jitted."""

    def loss(*args):
        return jnp.sum(fn(*args) * ct)

    argnums = tuple(range(1 + len(params)))
    # Compiled as train.py compiles its step (ops.compiler_options: the backward's barriers kept).
    run = jax.jit(
        lambda *a: (fn(*a), *jax.grad(loss, argnums=argnums)(*a)),
        compiler_options=ops.compiler_options(),
    )
    return run(x, *params)


# (input shape, out channels, strides, padding): the stem's two convs (stride 2 / 1, VALID), the
# aligned stem's explicit padding, SAME with odd sizes, stride 3, a 1-example batch.
CONV_CASES = [
    ((2, 15, 15, 3), 8, 2, "VALID"),
    ((2, 7, 7, 8), 16, 1, "VALID"),
    ((2, 9, 10, 5), 7, 1, ((1, 1), (1, 1))),
    ((3, 9, 10, 5), 7, 2, "SAME"),
    ((1, 11, 8, 4), 6, 3, ((2, 0), (0, 1))),
]


@pytest.mark.parametrize("shape,features,strides,padding", CONV_CASES)
def test_conv_im2col_equals_lax_values_and_gradients(shape, features, strides, padding):
    kx, kk, kc = jax.random.split(jax.random.key(sum(shape) + strides), 3)
    x = jax.random.normal(kx, shape)
    kernel = jax.random.normal(kk, (3, 3, shape[-1], features))
    kw = dict(strides=strides, padding=padding)
    out_shape = jax.eval_shape(lambda: ops.conv2d(x, kernel, impl="lax", **kw)).shape
    ct = jax.random.normal(kc, out_shape)
    ref, fast = (
        _loss_grads(lambda x, k, impl=impl: ops.conv2d(x, k, impl=impl, **kw), x, kernel, ct=ct)
        for impl in ("lax", "im2col")
    )
    for name, r, f in zip(("output", "d/dx", "d/dkernel"), ref, fast, strict=True):
        assert f.shape == r.shape and f.dtype == r.dtype, name
        np.testing.assert_allclose(f, r, rtol=1e-5, atol=1e-4, err_msg=name)


# (input shape, window, strides, padding): Xception's 3x3/2 SAME pool on even and odd sizes,
# VALID, stride 1 (overlapping windows in both directions), a 2x2 window, explicit padding.
POOL_CASES = [
    ((2, 9, 9, 4), 3, 2, "SAME"),
    ((2, 10, 7, 3), 3, 2, "SAME"),
    ((1, 9, 8, 2), 3, 2, "VALID"),
    ((2, 6, 7, 3), 3, 1, "SAME"),
    ((2, 8, 8, 3), 2, 2, "VALID"),
    ((1, 7, 7, 2), 3, 2, ((1, 0), (2, 1))),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("shape,window,strides,padding", POOL_CASES)
def test_max_pool_taps_vjp_equals_lax_values_and_gradients(shape, window, strides, padding, ties):
    kx, kc = jax.random.split(jax.random.key(sum(shape) + window + strides))
    x = jax.random.normal(kx, shape)
    if ties:  # few distinct values: most windows hold their maximum more than once
        x = jnp.round(x)
    kw = dict(strides=strides, padding=padding)
    out_shape = jax.eval_shape(lambda: ops.max_pool(x, window, impl="lax", **kw)).shape
    ct = jax.random.normal(kc, out_shape)
    ref, fast = (
        _loss_grads(lambda x, impl=impl: ops.max_pool(x, window, impl=impl, **kw), x, ct=ct)
        for impl in ("lax", "taps_vjp")
    )
    for name, r, f in zip(("output", "d/dx"), ref, fast, strict=True):
        assert f.shape == r.shape and f.dtype == r.dtype, name
        # Both route each cotangent to the same input element (a wrong tie-break would be off by
        # a whole cotangent); only the order of summing up to 4 overlapping windows differs.
        np.testing.assert_allclose(f, r, rtol=1e-6, atol=1e-6, err_msg=name)


def test_conv_and_pool_bfloat16_match_float32_reference():
    kx, kk, kc, kp = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(kx, (2, 9, 9, 4))
    kernel = jax.random.normal(kk, (3, 3, 4, 8))
    conv_ct = jax.random.normal(kc, (2, 5, 5, 8))
    pool_ct = jax.random.normal(kp, (2, 5, 5, 4))
    bf16 = lambda *a: [v.astype(jnp.bfloat16) for v in a]  # noqa: E731
    pairs = [
        (
            _loss_grads(
                lambda x, k: ops.conv2d(x, k, strides=2, impl="lax"), x, kernel, ct=conv_ct
            ),
            _loss_grads(
                lambda x, k: ops.conv2d(x, k, strides=2, impl="im2col"),
                *bf16(x, kernel),
                ct=conv_ct.astype(jnp.bfloat16),
            ),
        ),
        (
            _loss_grads(lambda x: ops.max_pool(x, impl="lax"), x, ct=pool_ct),
            _loss_grads(
                lambda x: ops.max_pool(x, impl="taps_vjp"),
                *bf16(x),
                ct=pool_ct.astype(jnp.bfloat16),
            ),
        ),
    ]
    for ref, low in pairs:
        for r, lo in zip(ref, low, strict=True):
            assert lo.dtype == jnp.bfloat16
            scale = float(jnp.max(jnp.abs(r)))
            np.testing.assert_allclose(lo.astype(jnp.float32), r, rtol=0.05, atol=0.03 * scale)


def _train_grads(model, variables, x, labels, compiler_options=None):
    def loss_fn(params):
        logits, upd = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        onehot = jax.nn.one_hot(labels, logits.shape[-1])
        return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), upd

    grad_fn = jax.jit(jax.grad(loss_fn, has_aux=True), compiler_options=compiler_options)
    return grad_fn(variables["params"])


def test_model_gradients_same_for_fast_impls_and_remat():
    """A whole tiny Xception: the fast ops and both remats give the reference (lax) gradients.

    In float64: this tiny model (batch 2, 1x1 final feature maps) is so ill-conditioned that
    float32 roundoff of two equally valid summation orders grows to ~1e-4 relative in the
    gradients (the 'lax' depthwise conv against 'taps' shows it too); in float64 any real
    difference stands out by orders of magnitude.
    """
    with jax.enable_x64(True):
        x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), jnp.float64, minval=-1, maxval=1)
        labels = jnp.array([1, 3])
        small = dict(
            num_classes=5,
            middle_blocks=1,
            width_multiplier=0.125,
            dtype=jnp.float64,
            param_dtype=jnp.float64,
        )
        ref_impls = dict(depthwise_impl="taps", conv_impl="lax", pool_impl="lax")
        ref_model = registry.create_model("xception_tiny", **ref_impls, **small)
        variables = jax.jit(ref_model.init)(jax.random.key(1), x)
        ref_grads, ref_stats = _train_grads(ref_model, variables, x, labels)
        # All optimisations in one model (one compile less): each is exact on its own, so any
        # difference would show here. Compiled as train.py compiles (barriers kept, so remat
        # really recomputes).
        fast = dict(depthwise_impl="taps_vjp", conv_impl="im2col", pool_impl="taps_vjp")
        model = registry.create_model(
            "xception_tiny", remat=True, remat_blocks=True, **fast, **small
        )
        grads, stats = _train_grads(model, variables, x, labels, ops.compiler_options("cpu"))
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    leaves = jax.tree.leaves((grads, stats))
    for g, r in zip(leaves, jax.tree.leaves((ref_grads, ref_stats)), strict=True):
        assert g.dtype == r.dtype == jnp.float64
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12)


def _batch_norm_reference(x, scale, bias, epsilon):
    """The forward of ``ops.batch_norm_train`` left to JAX's automatic differentiation."""
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x - mean), axis=(0, 1, 2))
    return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias, mean, var


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 1, 1, 4)])
def test_batch_norm_train_vjp_equals_autodiff(shape):
    """The hand-written backward, with cotangents on y, mean and var, equals autodiff (float64)."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(0), 6)
        x = 3.0 * jax.random.normal(keys[0], shape, jnp.float64) + 2.0
        scale = jax.random.normal(keys[1], shape[-1:], jnp.float64)
        bias = jax.random.normal(keys[2], shape[-1:], jnp.float64)
        cts = (
            jax.random.normal(keys[3], shape, jnp.float64),
            jax.random.normal(keys[4], shape[-1:], jnp.float64),
            jax.random.normal(keys[5], shape[-1:], jnp.float64),
        )
        outs, vjp = jax.vjp(lambda *a: ops.batch_norm_train(*a, epsilon=1e-3), x, scale, bias)
        ref_outs, ref_vjp = jax.vjp(
            lambda *a: _batch_norm_reference(*a, epsilon=1e-3), x, scale, bias
        )
        for got, want in zip((*outs, *vjp(cts)), (*ref_outs, *ref_vjp(cts)), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_batch_norm_train_rejects_mismatched_parameters():
    x = jnp.ones((2, 3, 3, 4))
    with pytest.raises(ValueError, match=r"scale \(5,\).*channels of x"):
        ops.batch_norm_train(x, jnp.ones(5), jnp.zeros(4), epsilon=1e-3)


def test_relu_equals_jax_relu_in_both_modes():
    """ops.relu: jax.nn.relu's values, gradient (0 at 0) and forward-mode derivative."""
    x = jnp.array([[-2.0, -0.0, 0.0, 1e-30, 3.0, jnp.nan]])
    t = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])

    def both(fn):
        y, vjp = jax.vjp(fn, x)
        return y, vjp(t)[0], jax.jvp(fn, (x,), (t,))[1]

    run = jax.jit(both, static_argnums=0, compiler_options=ops.compiler_options())
    for got, want in zip(run(ops.relu), run(jax.nn.relu), strict=True):
        np.testing.assert_array_equal(got, want)


def test_compiler_options_keep_the_barriers_and_the_values():
    """On CPU, ops.compiler_options() keeps the optimisation barriers that stop XLA from
    keeping activations for the backward pass (benchmarks/compare.py measures the memory), and
    changes no value. A JAX upgrade that renames the skipped pass would make the options a
    no-op: the first assertion catches that."""
    assert ops.compiler_options("gpu") == {} and ops.compiler_options("tpu") == {}

    def block(x, scale, bias, kernel, weights):
        y = ops.relu(x)
        y = ops.pointwise_conv(ops.depthwise_conv(y, kernel, impl="taps_vjp"), weights)
        y = ops.batch_norm_train(y, scale, bias, epsilon=1e-3)[0]
        return jnp.sum(ops.max_pool(y, 3, strides=2, impl="taps_vjp") ** 2)

    keys = jax.random.split(jax.random.key(0), 5)
    c = 8
    args = (
        jax.random.normal(keys[0], (4, 12, 12, c)),
        1.0 + jax.random.normal(keys[1], (c,)),
        jax.random.normal(keys[2], (c,)),
        jax.random.normal(keys[3], (3, 3, 1, c)),
        jax.random.normal(keys[4], (c, c)),
    )
    results = {}
    for options in (None, ops.compiler_options("cpu")):
        grad_fn = jax.jit(jax.grad(block, argnums=tuple(range(5))), compiler_options=options)
        compiled = grad_fn.lower(*args).compile()
        assert ("opt-barrier" in compiled.as_text()) == bool(options)
        results[bool(options)] = compiled(*args)
    for kept, plain in zip(results[True], results[False], strict=True):
        np.testing.assert_allclose(kept, plain, rtol=1e-5, atol=1e-5)
