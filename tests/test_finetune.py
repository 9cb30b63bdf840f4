"""Fine-tuning: pretrained loading, head replacement, and a freeze that freezes exactly."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import write_random_keras_h5

from configs import finetune
from xception_jax.training import checkpoints, loop, optim, pretrained
from xception_jax.weights import keras_weights


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory):
    """A randomly initialised Keras Xception (5 classes) saved as a legacy .h5 weight file."""
    return write_random_keras_h5(tmp_path_factory.mktemp("keras") / "xception.h5", classes=5)


def test_freeze_for_steps_gives_zero_updates_and_keeps_the_optimizer_state():
    params = {
        "block1_conv1": {"kernel": jnp.ones((3, 3))},
        "predictions": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)},
    }
    inner = optax.chain(
        optax.add_decayed_weights(0.1),  # Would move frozen weights and their momentum.
        optax.sgd(optax.linear_schedule(1.0, 0.0, 10), momentum=0.9),
    )
    tx = optim.freeze_for_steps(inner, optim.backbone_mask, num_steps=2)
    state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    for step in range(3):
        updates, state = tx.update(grads, state, params)
        trace = state.inner_state[1][0].trace
        if step < 2:
            assert not np.any(np.asarray(updates["block1_conv1"]["kernel"]))
            assert not np.any(np.asarray(trace["block1_conv1"]["kernel"]))
        else:
            assert np.all(np.asarray(updates["block1_conv1"]["kernel"]) != 0)
        assert np.all(np.asarray(updates["predictions"]["kernel"]) != 0)
        params = optax.apply_updates(params, updates)
    # Schedules follow the global step, frozen or not.
    assert int(state.inner_state[1][1].count) == 3


def test_merge_names_what_does_not_fit():
    fresh = {
        "params": {"a": {"kernel": np.zeros((2, 3))}, "predictions": {"bias": np.zeros(4)}},
        "batch_stats": {},
    }
    ok = pretrained.merge(fresh, {"params": {"a": {"kernel": np.ones((2, 3))}}})
    assert ok["params"]["a"]["kernel"].sum() == 6 and ok["params"]["predictions"]["bias"].sum() == 0
    with pytest.raises(ValueError, match=r"params/a/kernel: model \(2, 3\), src \(3, 3\)"):
        pretrained.merge(fresh, {"params": {"a": {"kernel": np.ones((3, 3))}}}, "src")
    with pytest.raises(ValueError, match="params/b/kernel of src has no place"):
        pretrained.merge(
            fresh, {"params": {"a": {"kernel": np.ones((2, 3))}, "b": {"kernel": 1}}}, "src"
        )


def _same(a, b):
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_finetune_from_keras_changes_only_what_the_freeze_allows(keras_file, tmp_path):
    from conftest import label_color, solid_jpeg

    root = tmp_path / "colors"
    for split, count in (("train", 4), ("test", 1)):
        for label in range(3):
            os.makedirs(root / split / f"c{label}")
            for i in range(count):
                # Shades that differ within a class: a batch of one class still has variance,
                # so BatchNorm's statistics and scales get gradients whichever pair it holds.
                (root / split / f"c{label}" / f"{i}.jpg").write_bytes(
                    solid_jpeg(label_color(label) + 4 * i)
                )
    config = finetune.get_config()
    config.init_from_keras = keras_file
    config.image_folder = str(root)
    config.image_size = 71
    config.batch_size = 2
    config.data_shards = 2
    config.eval_batch_size = 4
    config.freeze_backbone_steps = 1
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 1
    config.max_checkpoints_to_keep = 5
    config.schedule.base_learning_rate = 0.05
    config.ema_decay = 0.5  # The EMA starts at the pretrained params (own buffers: donated).
    workdir = str(tmp_path / "run")
    loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

    keras = keras_weights.load(keras_file, include_top=False)
    frozen, free = (checkpoints.load(workdir, step=s)[1] for s in (1, 2))
    backbone = lambda v: {k: x for k, x in v.items() if k != "predictions"}
    # Frozen step: parameters and BatchNorm statistics exactly the file's.
    assert _same(backbone(frozen["params"]), keras["params"])
    assert _same(frozen["batch_stats"], keras["batch_stats"])
    # ... and so is their Polyak average (0.5 a + 0.5 a = a exactly).
    frozen_ema = checkpoints.load(workdir, step=1, ema=True)[1]
    assert _same(backbone(frozen_ema["params"]), keras["params"])
    head = frozen["params"]["predictions"]["kernel"]
    assert head.shape == (2048, 3)  # The file's 5-class head was replaced.
    assert not np.array_equal(head, free["params"]["predictions"]["kernel"])
    # After the freeze: the backbone trains and its statistics move.
    changed = jax.tree.map(
        lambda a, b: not np.array_equal(a, b), backbone(free["params"]), keras["params"]
    )
    assert np.mean(jax.tree.leaves(changed)) > 0.9
    assert not _same(free["batch_stats"], keras["batch_stats"])
