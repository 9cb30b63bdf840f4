"""Gradient accumulation (config.grad_accum_steps): the update, the plain step, config. (Its
resume after a kill: tests/test_faults.py.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_faults import assert_bitwise_equal
from test_train import small_config

from xception_jax.model import ops, registry, xception
from xception_jax.training import config_checks, optim, steps, train_state

BATCH, SIZE, CLASSES = 8, 32, 10


def tiny_setup(**overrides):
    """(model, tx, config, state, batch): the main job's model and optimizer, EMA on, a random
    batch of uint8 images."""
    config = small_config(None, image_size=SIZE, batch_size=BATCH, ema_decay=0.9, **overrides)
    model = registry.create_model_from_config(config, CLASSES)
    tx, _ = optim.create_optimizer(config, num_train_examples=1000)
    state = jax.jit(functools.partial(train_state.init_state, model, tx, config))()
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, CLASSES, (BATCH,), dtype=np.int32)),
    }
    return model, tx, config, state, batch


def jitted_step(step_fn, model, tx, config):
    return jax.jit(
        functools.partial(step_fn, model=model, tx=tx, config=config),
        compiler_options=ops.compiler_options(),
    )


def test_accumulated_update_is_the_mean_of_the_microbatch_gradients():
    k = 2
    model, tx, config, state, batch = tiny_setup(grad_accum_steps=k)
    assert model.dropout_rate == 0  # (no dropout: the rng does not enter the comparison)
    new_state, metrics = jitted_step(steps.train_step, model, tx, config)(state, batch)

    # Written out here: microbatch j is examples j, j + k, ...; each takes the plain loss with
    # its own BatchNorm statistics, and the running averages go through the microbatches in order.
    def micro_loss(params, batch_stats, images, labels):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images.astype(jnp.float32) / 127.5 - 1.0,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, (logits, new_vars["batch_stats"])

    grad_fn = jax.jit(jax.value_and_grad(micro_loss, has_aux=True))
    batch_stats, grads, losses, correct = state.batch_stats, [], [], 0
    for j in range(k):
        images, labels = batch["image"][j::k], batch["label"][j::k]
        (loss, (logits, batch_stats)), g = grad_fn(state.params, batch_stats, images, labels)
        grads.append(g)
        losses.append(loss)
        correct += int(jnp.sum(jnp.argmax(logits, -1) == labels))
    mean_grads = jax.tree.map(lambda *g: sum(g) / k, *grads)
    updates, opt_state = tx.update(mean_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, params)

    close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-6)
    jax.tree.map(lambda a, b: close(np.asarray(a), np.asarray(b)), new_state.params, params)
    jax.tree.map(lambda a, b: close(np.asarray(a), np.asarray(b)), new_state.opt_state, opt_state)
    jax.tree.map(lambda a, b: close(np.asarray(a), np.asarray(b)), new_state.ema_params, ema)
    jax.tree.map(
        lambda a, b: close(np.asarray(a), np.asarray(b)), new_state.batch_stats, batch_stats
    )
    close(float(metrics["loss"]), float(np.mean(losses)))
    assert float(metrics["accuracy"]) == correct / BATCH
    assert int(new_state.step) == 1 and bool(metrics["finite"])
    # Not the plain step: one batch's statistics would give other gradients.
    plain_config = small_config(None, image_size=SIZE, batch_size=BATCH, ema_decay=0.9)
    plain, _ = jitted_step(steps.train_step, model, tx, plain_config)(state, batch)
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), plain.params, params)
    assert max(jax.tree.leaves(diff)) > 1e-4


def todays_train_step(state, batch, *, model, tx, config):
    """steps.train_step as it was before gradient accumulation (commit 98929fb), verbatim."""
    images = xception.preprocess(batch["image"], model.dtype)
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)

    def loss_fn(params):
        def forward(train: bool):
            variables = {"params": params, "batch_stats": state.batch_stats}
            if not train:
                variables["params"] = jax.tree.map(
                    lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p,
                    params,
                    optim.backbone_mask(params),
                )
                return model.apply(variables, images, train=False), state.batch_stats
            logits, new_vars = model.apply(
                variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
            )
            return logits, new_vars["batch_stats"]

        if config.get("freeze_backbone_steps", 0) > 0:
            frozen = state.step < config.freeze_backbone_steps
            logits, batch_stats = jax.lax.cond(
                frozen, lambda: forward(False), lambda: forward(True)
            )
        else:
            logits, batch_stats = forward(True)
        loss = steps.cross_entropy(
            logits, batch["label"], model.num_classes, config.label_smoothing
        )
        return loss.mean(), (logits, batch_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = (
        optim.ema_update(state.ema_params, params, config.ema_decay)
        if state.ema_params is not None
        else None
    )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    if config.skip_nonfinite_updates:
        kept = state.replace(step=state.step + 1, skipped_updates=state.skipped_updates + 1)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "finite": finite,
    }
    return new_state, metrics


def test_one_microbatch_is_bitwise_the_plain_step():
    model, tx, config, state, batch = tiny_setup(grad_accum_steps=1)
    config.model.dropout_rate = 0.3  # the step's rng in play as well
    model = registry.create_model_from_config(config, CLASSES)
    got = jitted_step(steps.train_step, model, tx, config)(state, batch)
    want = jitted_step(todays_train_step, model, tx, config)(state, batch)
    assert_bitwise_equal(got, want)


def test_batch_that_microbatches_and_devices_do_not_divide_is_refused_with_the_fix(tmp_path):
    config = small_config(None, batch_size=24, grad_accum_steps=4, data_shards=8)
    with pytest.raises(config_checks.ConfigError) as e:
        config_checks.validate(config, None, str(tmp_path), num_devices=4)
    text = str(e.value)
    assert "config.batch_size=24" in text and "grad_accum_steps=4" in text
    assert "multiple of grad_accum_steps x devices = 16" in text
    assert "batch_size=16" in text and "grad_accum_steps=3" in text
    config = small_config(None, batch_size=24, grad_accum_steps=0, data_shards=8)
    with pytest.raises(config_checks.ConfigError, match="must be an integer >= 1"):
        config_checks.validate(config, None, str(tmp_path), num_devices=4)
    config_checks.validate(
        small_config(None, batch_size=24, grad_accum_steps=3, data_shards=8),
        None,
        str(tmp_path),
        num_devices=4,
    )
