"""Xception architecture: exact counts and shapes (eval_shape, no compile), knobs, variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xception_jax.model.registry import VARIANTS, count_params, create_model
from xception_jax.model.xception import Xception, preprocess, round_channels


def _abstract(model, size=299, **kw):
    """(variables, features) as ShapeDtypeStructs: traces the model without compiling it."""
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, return_features=True, **kw), variables, x)
    return variables, feats


def test_paper_counts_and_shapes():
    variables, feats = _abstract(Xception())
    assert count_params(variables["params"]) == 22_855_952  # paper, Table 3
    assert count_params(variables["batch_stats"]) == 54_528
    spatial = {k: v.shape[1] for k, v in feats.items() if v.ndim == 4}
    assert spatial == {
        "stem": 147,
        "block2": 74,
        "block3": 37,
        "block4": 19,
        "middle": 19,
        "exit": 10,
    }
    assert feats["exit"].shape[-1] == 2048
    assert feats["pre_logits"].shape == (1, 2048)
    assert feats["logits"].shape == (1, 1000) and feats["logits"].dtype == jnp.float32


def test_non_residual_count():
    variables, _ = _abstract(Xception(residual=False))
    assert count_params(variables["params"]) == 21_878_880
    assert not any("shortcut" in name for name in variables["params"])


def test_param_tree_uses_keras_names():
    variables, _ = _abstract(Xception(), size=71)
    names = set(variables["params"])
    assert {"block1_conv1", "block2_shortcut", "block13_shortcut_bn", "block14_sepconv2"} <= names
    assert "predictions" in names and len(names) == 2 * 2 + 34 * 2 + 4 * 2 + 1


@pytest.mark.parametrize(
    "name,count,timm_millions",
    [
        ("xception41", 26_969_560, 26.97),
        ("xception65", 39_916_312, 39.92),
        ("xception71", 42_338_736, 42.34),
    ],
)
def test_aligned_counts_match_timm(name, count, timm_millions):
    variables, feats = _abstract(create_model(name), size=299)
    n = count_params(variables["params"])  # BN running statistics excluded, as timm counts
    assert n == count
    assert round(n / 1e6, 2) == timm_millions
    assert feats["exit"].shape[1:3] == (10, 10)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_aligned_output_stride(output_stride):
    model = create_model("xception41", width_multiplier=0.25, output_stride=output_stride)
    _, feats = _abstract(model, size=64)
    assert feats["exit"].shape[1] == 64 // output_stride


def test_create_model_errors():
    with pytest.raises(ValueError, match="xception_tiny"):
        create_model("xception_huge")
    with pytest.raises(ValueError, match="depth_multiplier"):
        create_model("xception", depth_multiplier=2)
    assert isinstance(create_model("xception", num_classes=10), Xception)
    assert set(VARIANTS) >= {"xception", "xception_tiny", "xception41", "xception65", "xception71"}


def test_input_errors():
    model = Xception()
    with pytest.raises(ValueError, match="smaller than"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 70, 71, 3))))
    with pytest.raises(ValueError, match="3 input channels"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 71, 71, 1))))
    with pytest.raises(ValueError, match="preprocess"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 71, 71, 3), jnp.uint8)))
    tiny = create_model("xception_tiny")
    _, feats = _abstract(tiny, size=32)  # the tiny variant accepts 32x32
    assert feats["exit"].shape[1:3] == (1, 1)


def test_preprocess_and_round_channels():
    x = preprocess(jnp.array([0, 127.5, 255], jnp.float32))
    np.testing.assert_allclose(x, [-1.0, 0.0, 1.0])
    assert preprocess(jnp.zeros(2, jnp.uint8), jnp.bfloat16).dtype == jnp.bfloat16
    assert [round_channels(c, 0.25) for c in (32, 64, 728, 2048)] == [8, 16, 184, 512]
    assert round_channels(728, 1.0) == 728


def _cheap_variables(model, x, seed=0):
    """Variables of ``model`` filled by numpy from eval_shape: skips the init compile (~6-12 s)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if name in ("bias", "mean"):
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.shape[-2] != 1 else leaf.shape[0] ** 2
        return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_in), leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
    """A small tiny variant (1 middle block) and its variables at 32x32, 10 classes."""
    model = create_model("xception_tiny", middle_blocks=1, num_classes=10)
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
    return model, _cheap_variables(model, x), x


def test_dropout_applies_in_training_only(tiny):
    model, variables, x = tiny
    drop = model.clone(dropout_rate=0.5)

    @jax.jit
    def run(key):
        train = lambda m, k: m.apply(
            variables, x, train=True, rngs={"dropout": k}, mutable=["batch_stats"]
        )[0]
        return (
            train(drop, key),
            train(drop, jax.random.fold_in(key, 1)),
            train(model, key),
            drop.apply(variables, x, train=False),
            model.apply(variables, x, train=False),
        )

    a, b, no_drop, eval_drop, eval_plain = run(jax.random.key(3))
    assert not np.allclose(a, b)  # different dropout masks
    assert not np.allclose(a, no_drop)
    np.testing.assert_array_equal(eval_drop, eval_plain)


@pytest.mark.parametrize(
    "overrides",
    [
        {"residual": False},
        {"intermediate_activation": "elu"},
        # None (the default) runs in the other tests; relu also covers bf16 compute and max pool.
        {"intermediate_activation": "relu", "pooling": "max", "dtype": jnp.bfloat16},
    ],
)
def test_variants_build_and_run(tiny, overrides):
    # Forward passes only (a gradient compile costs ~15 s per variant on CPU; the depthwise
    # gradients are checked in test_layers, whole train steps in the training tests). The
    # variables of the default tiny model fit every variant (residual=False ignores shortcuts).
    model, variables, x = tiny
    model = model.clone(**overrides)

    @jax.jit
    def run(v, x):
        logits, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
        return logits, upd, model.apply(v, x, train=False)

    logits, upd, eval_logits = run(variables, x)
    for out in (logits, eval_logits):
        assert out.shape == (4, 10) and out.dtype == jnp.float32
        assert np.isfinite(np.asarray(out)).all()
    stats, new = variables["batch_stats"], upd["batch_stats"]
    updated = {k for k in stats if not np.allclose(new[k]["mean"], stats[k]["mean"])}
    skip_shortcuts = overrides.get("residual") is False  # shortcut BNs are then unused
    assert updated == {k for k in stats if not (skip_shortcuts and "shortcut" in k)}


def test_features_and_no_top(tiny):
    model, variables, x = tiny
    feats = jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x)
    assert set(feats) == {
        "stem",
        "block2",
        "block3",
        "block4",
        "middle",
        "exit",
        "pre_logits",
        "logits",
    }
    headless = model.clone(include_top=False, pooling=None)
    v = {
        "params": {k: p for k, p in variables["params"].items() if k != "predictions"},
        "batch_stats": variables["batch_stats"],
    }
    out = jax.jit(lambda v, x: headless.apply(v, x))(v, x)
    np.testing.assert_allclose(out, feats["exit"], rtol=1e-5, atol=1e-5)
