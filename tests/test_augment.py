"""Augmentation (config.augment, config.model.drop_path_rate): parity with timm, the switches,
the checks of bad values. Determinism with every augmentation on (resume, process counts,
replay) is checked by the runs of tests/test_faults.py and tests/test_multihost.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from xception_jax.training import config_checks, mixup


def _timm_aa():
    """timm.data.auto_augment, importable next to the registry's torchvision (FINDINGS)."""
    from conftest import torch_timm

    torch_timm()
    from timm.data import auto_augment

    return auto_augment


@pytest.fixture(scope="module")
def photos():
    """Two real photographs (scikit-learn's sample images), 150 x 200 crops."""
    from sklearn.datasets import load_sample_images

    return [im[50:200, 100:300].copy() for im in load_sample_images().images]


# Per op: (largest difference allowed on any pixel, fraction of pixels within 1 level).
EXACT = (0, 1.0)
# Blends and PIL's SMOOTH filter: float32 arithmetic in another order, truncated.
ONE_LEVEL = (1, 1.0)
# Bilinear resampling: equal but for rounding inside, within 1 level; the pixels whose
# sample falls within one pixel of the edge blend with the grey fill differently (PIL clamps
# the neighbours, TensorFlow interpolates with the fill): at most 1.5% of a 150 x 200 image.
GEOMETRIC = (255, 0.985)
TOLERANCE = {
    "AutoContrast": EXACT,
    "Equalize": EXACT,
    "Invert": EXACT,
    "Posterize": EXACT,
    "PosterizeOriginal": EXACT,
    "Solarize": EXACT,
    "SolarizeAdd": EXACT,
    "Color": ONE_LEVEL,
    "Contrast": ONE_LEVEL,
    "Brightness": ONE_LEVEL,
    "Sharpness": ONE_LEVEL,
    "Rotate": GEOMETRIC,
    "ShearX": GEOMETRIC,
    "ShearY": GEOMETRIC,
    "TranslateXRel": GEOMETRIC,
    "TranslateYRel": GEOMETRIC,
}
SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def test_op_set_and_policy_are_timms():
    from xception_jax.data import augment

    aa = _timm_aa()
    assert list(augment.RAND_OPS) == aa._RAND_TRANSFORMS
    assert set(TOLERANCE) == set(augment.OPS)
    ops = aa.auto_augment_policy_original({})
    assert [[(o.name, o.prob, o.magnitude) for o in sub] for sub in ops] == [
        list(sub) for sub in augment.IMAGENET_POLICY
    ]


@pytest.mark.parametrize("name", sorted(TOLERANCE))
def test_op_matches_timms_pil_implementation(name, photos):
    import tensorflow as tf
    from PIL import Image

    from xception_jax.data import augment

    aa = _timm_aa()
    hparams = dict(translate_pct=augment.TRANSLATE_PCT, img_mean=(augment.FILL,) * 3)
    max_diff, within_one = TOLERANCE[name]
    for magnitude in (3.0, 9.0, 10.0):
        for sign in (1.0, -1.0) if name in SIGNED else (1.0,):
            args = aa.LEVEL_TO_ARG[name](magnitude, hparams) if aa.LEVEL_TO_ARG[name] else ()
            if name in SIGNED:  # timm negates at random: fix the sign.
                args = (abs(args[0]) * sign,)
            for photo in photos:
                expected = np.asarray(
                    aa.NAME_TO_OP[name](
                        Image.fromarray(photo),
                        *args,
                        fillcolor=(augment.FILL,) * 3,
                        resample=Image.BILINEAR,
                    )
                )
                got = augment.apply_op(tf.constant(photo), name, magnitude, sign).numpy()
                assert got.dtype == np.uint8 and got.shape == photo.shape
                diff = np.abs(got.astype(int) - expected.astype(int))
                where = f"{name} m={magnitude} sign={sign}"
                assert diff.max() <= max_diff, where
                assert (diff <= 1).mean() >= within_one, (where, (diff <= 1).mean())
                # Every op at these magnitudes changes a photo (a no-op would pass above only
                # if timm's op were one too).
                assert not np.array_equal(got, photo) or np.array_equal(expected, photo), where


def test_random_erasing_fills_one_box_with_noise(photos):
    import tensorflow as tf

    from xception_jax.data import augment

    image = tf.constant(photos[0])
    areas = []
    for i in range(20):
        out = augment.random_erasing(image, tf.constant([0, i], tf.int64), probability=1.0)
        changed = np.any(out.numpy() != photos[0], axis=-1)
        ys, xs = np.nonzero(changed)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        areas.append(box / changed.size)
        # Noise: most of the box changed (a few pixels may draw their own value).
        assert changed.sum() >= 0.9 * box
    assert min(areas) >= 0.015 and max(areas) <= 1 / 3 + 0.02
    kept = augment.random_erasing(image, tf.constant([0, 0], tf.int64), probability=0.0)
    np.testing.assert_array_equal(kept.numpy(), photos[0])


# --------------------------------------------------------------------------------------------
# mixup / CutMix against an independent numpy version
# --------------------------------------------------------------------------------------------


def _numpy_mix(images, labels, num_classes, smoothing, lam, use_cutmix, box):
    """timm's Mixup._mix_batch and mixup_target, in numpy, for a given lambda and box."""
    x = images.astype(np.float64).copy()
    off = smoothing / num_classes
    y = np.full((len(labels), num_classes), off)
    y[np.arange(len(labels)), labels] = 1.0 - smoothing + off
    if use_cutmix:
        yl, yh, xl, xh = box
        x[:, yl:yh, xl:xh] = images[::-1][:, yl:yh, xl:xh]
        lam = 1.0 - (yh - yl) * (xh - xl) / (images.shape[1] * images.shape[2])
    else:
        x = x * lam + images[::-1] * (1.0 - lam)
    return x, y * lam + y[::-1] * (1.0 - lam), lam


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_mixup_and_cutmix_equal_a_numpy_version(use_cutmix):
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (6, 20, 24, 3)).astype(np.float32)
    labels = rng.integers(0, 5, 6)
    lam = 0.7
    # timm's rand_bbox at lambda 0.7, centre (18, 3): sides int(20 * sqrt(0.3)) = 10 and
    # int(24 * sqrt(0.3)) = 13, clipped at the image's bottom and left edges.
    box = tuple(int(v) for v in mixup.cutmix_box(jnp.float32(lam), 20, 24, 18, 3))
    assert box == (13, 20, 0, 9)
    targets = mixup.soft_targets(jnp.asarray(labels), 5, 0.1)
    got_x, got_y, got_lam = mixup.mix(
        jnp.asarray(images), targets, jnp.float32(lam), jnp.asarray(use_cutmix), box
    )
    want_x, want_y, want_lam = _numpy_mix(images, labels, 5, 0.1, lam, use_cutmix, box)
    np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_y), want_y, rtol=0, atol=1e-6)
    # CutMix's lambda is the pasted box's true area: 1 - 7 * 9 / 480, not 0.7.
    assert float(got_lam) == pytest.approx(want_lam, abs=1e-7)
    if use_cutmix:
        assert want_lam == pytest.approx(1 - 63 / 480)
    np.testing.assert_allclose(np.asarray(got_y).sum(-1), 1.0, atol=1e-6)


def _augment(**fields):
    config = common.base_config()
    config.augment.update(fields)
    config.seed = 3
    return config


def test_mixing_is_drawn_from_the_step_rng_and_can_be_switched_off():
    images = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (8, 16, 16, 3)), jnp.float32)
    labels = jnp.arange(8) % 4

    def mixed(config, step):
        rng = jax.random.fold_in(jax.random.key(config.seed), step)
        return jax.jit(lambda rng: mixup.mix_batch(images, labels, rng, config, 4))(rng)

    for fields in ({"mixup_alpha": 0.8}, {"cutmix_alpha": 1.0}):
        config = _augment(**fields)
        assert mixup.is_on(config)
        x0, y0 = mixed(config, 0)
        assert not np.array_equal(x0, images)  # the switch does something
        x0_again, y0_again = mixed(config, 0)
        np.testing.assert_array_equal(x0, x0_again)  # a function of (seed, step)
        assert not np.array_equal(mixed(config, 1)[0], x0)
    # mixup_prob 0: never mixed (targets are the smoothed one-hot labels).
    config = _augment(mixup_alpha=0.8, cutmix_alpha=1.0, mixup_prob=0.0)
    config.label_smoothing = 0.1
    x, y = mixed(config, 0)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_allclose(y, mixup.soft_targets(labels, 4, 0.1))
    assert not mixup.is_on(_augment())


# --------------------------------------------------------------------------------------------
# The switches of the input pipeline, and their default
# --------------------------------------------------------------------------------------------


def _first_batch(config):
    from xception_jax.data import pipeline

    return next(pipeline.train_iterator(config, 0, 1))


def test_each_pipeline_switch_changes_the_batches_and_off_changes_nothing(
    digits_data_dir, data_config
):
    def config(**augment_fields):
        c = data_config(
            data_dir=digits_data_dir, image_size=24, batch_size=8, data_shards=1, shuffle_buffer=1
        )
        if augment_fields is not None:
            c.augment = common.base_config().augment
            c.augment.update(augment_fields)
        return c

    # No augment block at all (the config of a run from before config.augment) and the block
    # with its defaults: bitwise the same batches.
    plain = data_config(
        data_dir=digits_data_dir, image_size=24, batch_size=8, data_shards=1, shuffle_buffer=1
    )
    before = _first_batch(plain)
    off = _first_batch(config())
    np.testing.assert_array_equal(off["image"], before["image"])
    np.testing.assert_array_equal(off["label"], before["label"])
    for fields in (
        {"randaugment_layers": 2, "randaugment_magnitude_std": 0.5},
        {"autoaugment": "imagenet"},
        {"random_erasing": 1.0},
    ):
        on = _first_batch(config(**fields))
        np.testing.assert_array_equal(on["label"], before["label"])  # same examples
        changed = np.any(on["image"] != before["image"], axis=(1, 2, 3))
        assert changed.mean() >= 0.25, (fields, changed)
        # Deterministic: the same batch again.
        np.testing.assert_array_equal(_first_batch(config(**fields))["image"], on["image"])


def test_drop_path_drops_residual_branches_in_training_only():
    from xception_jax.model import registry

    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)), jnp.float32)
    small = dict(num_classes=3, middle_blocks=1, width_multiplier=0.125)
    base = registry.create_model("xception_tiny", **small)
    dropped = registry.create_model("xception_tiny", drop_path_rate=0.5, **small)
    variables = jax.jit(base.init)(jax.random.key(0), x)
    rngs = {"dropout": jax.random.key(1)}

    @jax.jit
    def outputs(variables, x):
        """One compilation: (dropped eval, base eval, dropped train, base train)."""

        def train(model):
            return model.apply(variables, x, train=True, rngs=rngs, mutable=["batch_stats"])[0]

        return dropped.apply(variables, x), base.apply(variables, x), train(dropped), train(base)

    dropped_eval, base_eval, dropped_train, base_train = outputs(variables, x)
    np.testing.assert_array_equal(dropped_eval, base_eval)
    assert not np.allclose(dropped_train, base_train)
    assert dropped._block_drop_rate(0, 6) == 0 and dropped._block_drop_rate(5, 6) == 0.5
    with pytest.raises(ValueError, match="drop_path_rate=0.5 needs residual=True"):
        registry.create_model("xception_tiny", drop_path_rate=0.5, residual=False).init(
            jax.random.key(0), x
        )


# --------------------------------------------------------------------------------------------
# Bad values: refused before anything compiles, naming the field and the allowed values
# --------------------------------------------------------------------------------------------

BAD = {
    "augment.mixup_alpha": (-0.2, "config.augment.mixup_alpha=-0.2 must be >= 0"),
    "augment.cutmix_alpha": (-1.0, "config.augment.cutmix_alpha=-1.0 must be >= 0"),
    "augment.randaugment_magnitude": (
        11.0,
        "config.augment.randaugment_magnitude=11.0 must be in [0, 10]",
    ),
    "augment.randaugment_layers": (-1, "config.augment.randaugment_layers=-1 must be an integer"),
    "augment.autoaugment": (
        "cifar10",
        "config.augment.autoaugment='cifar10' is not a policy: use one of ['', 'imagenet']",
    ),
    "augment.random_erasing": (1.5, "config.augment.random_erasing=1.5 must be in [0, 1]"),
    "augment.mixup_prob": (-0.1, "config.augment.mixup_prob=-0.1 must be in [0, 1]"),
    "augment.mixup_switch_prob": (2.0, "config.augment.mixup_switch_prob=2.0 must be in [0, 1]"),
    "model.drop_path_rate": (1.0, "config.model.drop_path_rate=1.0 must be in [0, 1)"),
    "model.residual": (
        False,
        "config.model.drop_path_rate=0.1 needs config.model.residual=True",
    ),
}


@pytest.mark.parametrize("field", sorted(BAD))
def test_bad_augment_values_are_refused_naming_field_and_allowed_values(field):
    from configs import modern_ra

    config = modern_ra.get_config()  # every augmentation on, drop path 0.1
    assert config_checks.augment_errors(config) == []
    value, text = BAD[field]
    parent, _, name = field.partition(".")
    config[parent][name] = value
    errors = config_checks.augment_errors(config)
    assert len(errors) == 1 and errors[0].startswith(text), errors


def test_both_policies_are_refused_and_validate_checks_augment(tmp_path):
    config = _augment(randaugment_layers=2, autoaugment="imagenet")
    config.num_train_steps = 1
    with pytest.raises(config_checks.ConfigError, match="are both on: choose one"):
        config_checks.validate(config, None, str(tmp_path / "run"), num_devices=1)
    assert not (tmp_path / "run").exists()
