"""The pure, jitted steps: loss, train step (with gradient accumulation) and eval step.

`train_step(state, batch) -> (state, metrics)` and `eval_step(params, batch_stats, batch) ->
sums` are pure functions of their arguments (the step's rng is `fold_in(seed, step)`);
`jit_steps` is the one place that sets how they compile. The loop that drives them is
`training/loop.py`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from xception_jax.model import ops, xception
from xception_jax.platform import sharding
from xception_jax.training import mixup, optim
from xception_jax.training.train_state import TrainState


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy with optional label smoothing.

    `labels` are int class ids [B], or soft targets [B, num_classes] (mixup/CutMix, which fold
    the label smoothing in already: `label_smoothing` is then not applied again).
    """
    if labels.ndim == 2:
        return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels)
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def loss_fn(params, batch_stats, images, labels, rng, step, *, model, config):
    """Mean cross-entropy of one (micro)batch and (logits, updated batch_stats), for grad."""

    def forward(train: bool):
        variables = {"params": params, "batch_stats": batch_stats}
        if not train:  # Frozen backbone (training/pretrained.py): inference mode, statistics kept,
            # no backward pass through it (its updates are zero anyway).
            variables["params"] = jax.tree.map(
                lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p,
                params,
                optim.backbone_mask(params),
            )
            return model.apply(variables, images, train=False), batch_stats
        logits, new_vars = model.apply(
            variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        return logits, new_vars["batch_stats"]

    if config.get("freeze_backbone_steps", 0) > 0:
        frozen = step < config.freeze_backbone_steps
        logits, batch_stats = jax.lax.cond(frozen, lambda: forward(False), lambda: forward(True))
    else:
        logits, batch_stats = forward(True)
    loss = cross_entropy(logits, labels, model.num_classes, config.label_smoothing)
    return loss.mean(), (logits, batch_stats)


def _model_input(images, dtype):
    """uint8 images scaled to [-1, 1]; images already scaled (float, mixed) cast to dtype."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images.astype(dtype)
    return xception.preprocess(images, dtype)


def microbatches(x: jax.Array, k: int) -> jax.Array:
    """``[B, ...]`` -> ``[k, B/k, ...]``; microbatch j holds examples j, j + k, j + 2k, ...

    Strided, not contiguous: the batch is sharded on its leading axis, and each device's
    contiguous share then splits evenly over the k microbatches (a contiguous split would put
    each microbatch on B/k's worth of devices and leave the others idle).
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def accumulated_grads(state: TrainState, batch, rng, *, model, config):
    """(loss, accuracy, batch_stats, grads) of a batch as config.grad_accum_steps microbatches.

    One ``lax.scan`` over the microbatches: only one microbatch's activations are alive at a
    time. Each microbatch is normalised with its own BatchNorm statistics and updates the
    running averages in turn; its dropout rng is the step's folded with its index. The
    gradient is the mean of the microbatches' gradients (each the gradient of that
    microbatch's mean loss), which for equal microbatches is the gradient of the batch's mean
    loss; loss and accuracy are those of the whole batch.
    """
    k = config.grad_accum_steps
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, model=model, config=config), has_aux=True
    )

    def body(carry, micro):
        batch_stats, grad_sum, loss_sum, correct = carry
        images = _model_input(micro["image"], model.dtype)
        rng_i = jax.random.fold_in(rng, micro["index"])
        (loss, (logits, batch_stats)), grads = grad_fn(
            state.params,
            batch_stats,
            images,
            micro.get("target", micro["label"]),
            rng_i,
            state.step,
        )
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        correct = correct + jnp.sum(jnp.argmax(logits, -1) == micro["label"])
        return (batch_stats, grad_sum, loss_sum + loss, correct), None

    micro = {
        "image": microbatches(batch["image"], k),
        "label": microbatches(batch["label"], k),
        "index": jnp.arange(k),
    }
    if "target" in batch:
        micro["target"] = microbatches(batch["target"], k)
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (state.batch_stats, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (batch_stats, grad_sum, loss_sum, correct), _ = jax.lax.scan(body, init, micro)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return loss_sum / k, correct / batch["label"].shape[0], batch_stats, grads


def train_step(state: TrainState, batch, *, model, tx, config) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch: forward, backward, update, EMA. Pure.

    With config.grad_accum_steps = k > 1 the batch is k microbatches (``accumulated_grads``)
    and the update is made once from their mean gradient; k = 1 is the plain step.
    """
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    if mixup.is_on(config):
        # The whole global batch is mixed (each example with its mirror in the batch) before
        # any split into microbatches; the images are then float, already scaled.
        images, targets = mixup.mix_batch(
            xception.preprocess(batch["image"]), batch["label"], rng, config, model.num_classes
        )
        batch = {**batch, "image": images, "target": targets}
    if config.get("grad_accum_steps", 1) > 1:
        loss, accuracy, batch_stats, grads = accumulated_grads(
            state, batch, rng, model=model, config=config
        )
    else:
        images = _model_input(batch["image"], model.dtype)
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(
            functools.partial(loss_fn, model=model, config=config), has_aux=True
        )(
            state.params,
            state.batch_stats,
            images,
            batch.get("target", batch["label"]),
            rng,
            state.step,
        )
        accuracy = None
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
        # Keep the old state (but advance the step) so one bad batch cannot poison the run.
        kept = state.replace(step=state.step + 1, skipped_updates=state.skipped_updates + 1)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    if accuracy is None:
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics = {"loss": loss, "accuracy": accuracy, "finite": finite}
    return new_state, metrics


def eval_step(params, batch_stats, batch, *, model) -> dict:
    """Sums of loss and correct predictions over the unmasked examples of a global batch."""
    images = xception.preprocess(batch["image"], model.dtype)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    loss = cross_entropy(logits, labels, model.num_classes)
    top5 = jax.lax.top_k(logits, min(5, model.num_classes))[1]
    return {
        "loss": jnp.sum(loss * mask),
        "accuracy": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "top5_accuracy": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def jit_steps(model, tx, config: ml_collections.ConfigDict, mesh, donate: bool = True):
    """The jitted train and eval steps of `config` on `mesh`, as train_and_evaluate runs them.

    The one place that sets how the steps compile (output shardings, donation of the train
    state, compiler options for the mesh's platform), shared by train_and_evaluate, by
    xception_jax.aot, which compiles them for a TPU slice, and by replays (restore_for_replay,
    which keeps the state it is given: donate=False). Build `model` for the same platform
    (create_model_from_config(..., platform=sharding.mesh_platform(mesh))).
    """
    replicated = sharding.replicated(mesh)
    p_train_step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, config=config),
        out_shardings=(replicated, replicated),
        donate_argnums=0 if donate else (),
        compiler_options=ops.compiler_options(sharding.mesh_platform(mesh)),
    )
    p_eval_step = jax.jit(functools.partial(eval_step, model=model), out_shardings=replicated)
    return p_train_step, p_eval_step


def abstract_batch(batch_size: int, image_size: int, mesh, eval_mask: bool = False) -> dict:
    """Shapes, dtypes and shardings of a global batch as data.feeding delivers it."""
    sharded = sharding.batch_sharded(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct(
            (batch_size, image_size, image_size, 3), jnp.uint8, sharding=sharded
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharded),
    }
    if eval_mask:
        batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=sharded)
    return batch
