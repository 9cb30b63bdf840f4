"""Schedules against the paper's formulas, the EMA update, and the weight-decay mask."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from xception_jax.training import optim


def _config(name: str):
    return importlib.import_module(f"configs.{name}").get_config()


def test_imagenet_schedule_is_the_papers_staircase():
    config = _config("imagenet")
    num_train = 1_281_167
    schedule = optim.create_learning_rate_schedule(config, num_train)
    steps_per_epoch = num_train / config.batch_size
    lr0 = optim.base_learning_rate(config)
    for step in [0, 1, 1000, int(2 * steps_per_epoch) - 1, int(2 * steps_per_epoch) + 1, 50_000]:
        # 0.045 decayed by 0.94 every 2 epochs, staircase.
        expected = lr0 * 0.94 ** np.floor(step / round(2 * steps_per_epoch))
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)


def test_jft_schedule_decays_every_3m_samples():
    config = _config("jft_recipe")
    schedule = optim.create_learning_rate_schedule(config, 10_000_000)
    steps_per_decay = 3_000_000 / config.batch_size
    for step in [0, int(steps_per_decay) - 1, int(steps_per_decay) + 1, int(7.5 * steps_per_decay)]:
        expected = 0.001 * 0.9 ** np.floor(step / round(steps_per_decay))
        np.testing.assert_allclose(schedule(step), expected, rtol=1e-6)


def test_warmup_then_cosine():
    config = _config("modern")
    config.num_train_steps = 1000
    config.schedule.warmup_epochs = 1.0
    config.batch_size = 100
    schedule = optim.create_learning_rate_schedule(config, num_train_examples=10_000)
    lr = optim.base_learning_rate(config)
    warmup = 100
    np.testing.assert_allclose(schedule(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(schedule(50), lr * 0.5, rtol=1e-6)
    for t in [0, 300, 899]:
        expected = lr * 0.5 * (1 + np.cos(np.pi * t / (1000 - warmup)))
        np.testing.assert_allclose(schedule(warmup + t), expected, rtol=1e-5, atol=1e-8)


def test_learning_rate_scales_with_global_batch():
    config = _config("modern")
    config.schedule.reference_batch_size = 256
    config.schedule.base_learning_rate = 0.1
    config.batch_size = 1024
    assert optim.base_learning_rate(config) == pytest.approx(0.4)


def test_ema_update_is_textbook():
    ema = {"w": jnp.array([1.0, 2.0])}
    params = {"w": jnp.array([3.0, -2.0])}
    out = optim.ema_update(ema, params, decay=0.9)
    np.testing.assert_allclose(out["w"], 0.9 * np.array([1.0, 2.0]) + 0.1 * np.array([3.0, -2.0]))


PARAMS = {
    "stem_conv1": {"kernel": jnp.ones((3, 3, 3, 4))},
    "stem_bn1": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
    "block2": {"sepconv1": {"depthwise": {"kernel": jnp.ones((3, 3, 1, 4))}}},
    # channels_per_group=2: a grouped spatial conv under the depthwise conv's name.
    "block3": {"sepconv1": {"depthwise": {"kernel": jnp.ones((3, 3, 2, 4))}}},
    "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.ones(2)},
}
GROUPED = "block3/sepconv1/depthwise/kernel"


@pytest.mark.parametrize(
    "mode, decayed",
    [
        ("kernels", {"stem_conv1/kernel", "block2/sepconv1/depthwise/kernel", GROUPED,
                     "head/kernel"}),
        ("kernels_except_depthwise", {"stem_conv1/kernel", GROUPED, "head/kernel"}),
        ("all", {"stem_conv1/kernel", "block2/sepconv1/depthwise/kernel", GROUPED, "head/kernel",
                 "stem_bn1/scale", "stem_bn1/bias", "head/bias"}),
    ],
)  # fmt: skip
def test_weight_decay_mask(mode, decayed):
    mask = optim.weight_decay_mask(PARAMS, mode)
    flat = {
        "/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)
    }
    assert {k for k, v in flat.items() if v} == decayed
    # And the optimizer really leaves the others alone: zero gradients, only decay moves.
    config = _config("modern")
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.0
    config.optimizer.weight_decay = 0.5
    config.optimizer.weight_decay_mask = mode
    config.schedule.name = "constant"
    config.schedule.warmup_epochs = 0.0
    config.schedule.base_learning_rate = 1.0
    config.schedule.reference_batch_size = 0
    tx, _ = optim.create_optimizer(config, 1000)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, tx.init(PARAMS), PARAMS)
    new = optax.apply_updates(PARAMS, updates)
    for path, value in jax.tree_util.tree_leaves_with_path(new):
        name = "/".join(k.key for k in path)
        np.testing.assert_allclose(value, 0.5 if name in decayed else 1.0)


def test_unknown_optimizer_is_a_clear_error():
    config = _config("modern")
    config.optimizer.name = "adagrad"
    with pytest.raises(ValueError, match="optimizer.name='adagrad'"):
        optim.create_optimizer(config, 1000)
