"""Optimizer and learning-rate schedule from the config, built from optax parts."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import traverse_util

SCHEDULES = ("constant", "exponential", "cosine")
OPTIMIZERS = ("sgd", "rmsprop", "adamw")
WEIGHT_DECAY_MASKS = ("kernels", "kernels_except_depthwise", "all")


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """Optimizer steps in one pass over the training split (the last partial batch carries over)."""
    return max(1, num_train_examples // config.batch_size)


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """`config.num_train_steps`, or `config.num_epochs` worth of steps when it is -1."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(math.ceil(config.num_epochs * num_train_examples / config.batch_size))


def _to_steps(config, num_train_examples: int, *, epochs: float = 0.0, examples: int = 0) -> int:
    """Converts a duration given in epochs or in examples into optimizer steps."""
    if examples > 0:
        return max(1, int(round(examples / config.batch_size)))
    return max(1, int(round(epochs * num_train_examples / config.batch_size)))


def base_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The peak learning rate, scaled linearly with the global batch when the config asks."""
    sched = config.schedule
    lr = float(sched.base_learning_rate)
    if sched.get("reference_batch_size", 0) > 0:
        lr *= config.batch_size / sched.reference_batch_size
    return lr


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, num_train_examples: int
) -> optax.Schedule:
    """Warmup (linear from 0) followed by a constant, exponential or cosine schedule."""
    sched = config.schedule
    lr = base_learning_rate(config)
    num_steps = total_steps(config, num_train_examples)
    warmup = _to_steps(config, num_train_examples, epochs=sched.warmup_epochs) * (
        sched.warmup_epochs > 0
    )
    if sched.name == "constant":
        main = optax.constant_schedule(lr)
    elif sched.name == "exponential":
        main = optax.exponential_decay(
            init_value=lr,
            transition_steps=_to_steps(
                config,
                num_train_examples,
                epochs=sched.decay_every_epochs,
                examples=sched.decay_every_examples,
            ),
            decay_rate=sched.decay_rate,
            staircase=sched.staircase,
        )
    elif sched.name == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps=max(1, num_steps - warmup))
    else:
        raise ValueError(
            f"config.schedule.name={sched.name!r} is not a known schedule; use one of {SCHEDULES}."
        )
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def weight_decay_mask(params, mode: str):
    """Pytree of bools: which parameters weight decay touches.

    'kernels': every conv/dense kernel, not BatchNorm scale/bias nor biases (the usual choice);
    'kernels_except_depthwise': also spares depthwise kernels, which have 9 weights per channel
    and are known to be hurt by decay (MobileNet, EfficientNet recipes); 'all': every parameter.
    A grouped or regular spatial conv (``channels_per_group`` != 1) keeps the parameter name
    ``depthwise`` but not its 9 weights per channel: its kernel is decayed like any other.
    """
    if mode not in WEIGHT_DECAY_MASKS:
        raise ValueError(
            f"config.optimizer.weight_decay_mask={mode!r} is unknown; use one of "
            f"{WEIGHT_DECAY_MASKS}."
        )
    flat = traverse_util.flatten_dict(params)

    def decays(path, leaf) -> bool:
        if mode == "all":
            return True
        if path[-1] != "kernel":
            return False
        # A depthwise kernel is (kh, kw, 1, C): one input channel per filter.
        depthwise = any("depthwise" in p for p in path) and leaf.shape[-2] == 1
        return not (mode == "kernels_except_depthwise" and depthwise)

    return traverse_util.unflatten_dict({path: decays(path, leaf) for path, leaf in flat.items()})


def create_optimizer(
    config: ml_collections.ConfigDict, num_train_examples: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (optax transformation, learning-rate schedule) as the config describes."""
    opt = config.optimizer
    schedule = create_learning_rate_schedule(config, num_train_examples)
    mask = lambda params: weight_decay_mask(params, opt.weight_decay_mask)
    parts = []
    if opt.get("grad_clip_norm", 0.0) > 0:
        parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
    if opt.name == "adamw":
        # Decoupled decay (Loshchilov & Hutter), scaled by the learning rate as in optax.
        parts.append(
            optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=mask)
        )
    else:
        # Coupled L2 as in the paper and Keras: the decay term joins the gradient, so momentum
        # and RMS scaling see it.
        if opt.weight_decay > 0:
            parts.append(optax.add_decayed_weights(opt.weight_decay, mask))
        if opt.name == "sgd":
            parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
        elif opt.name == "rmsprop":
            parts.append(
                optax.rmsprop(
                    schedule, decay=opt.rmsprop_decay, eps=opt.eps, momentum=opt.momentum or None
                )
            )
        else:
            raise ValueError(
                f"config.optimizer.name={opt.name!r} is unknown; use one of {OPTIMIZERS}."
            )
    tx = optax.chain(*parts)
    if config.get("freeze_backbone_steps", 0) > 0:
        # Fine-tuning: only the classifier trains for the first steps (training/pretrained.py).
        tx = freeze_for_steps(tx, backbone_mask, config.freeze_backbone_steps)
    return tx, schedule


HEAD_MODULES = ("predictions",)  # The classifier: what a fine-tune replaces and trains first.


def backbone_mask(params):
    """Pytree of bools: True for every parameter outside the classifier (HEAD_MODULES)."""
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict({p: p[0] not in HEAD_MODULES for p in flat})


class FreezeState(NamedTuple):
    """State of `freeze_for_steps`: steps seen, and the wrapped optimizer's state."""

    count: jax.Array
    inner_state: optax.OptState


def _keep_frozen(new_state, old_state, freeze):
    """`new_state` with the entries of frozen parameters taken from `old_state`.

    Every subtree of an optimizer state shaped like the parameters (momentum, second moments,
    ...) is masked with `freeze`; everything else (step counts, hence schedules) moves on.
    """
    treedef = jax.tree.structure(freeze)
    like_params = lambda x: jax.tree.structure(x) == treedef

    def pick(new, old):
        if like_params(new):
            return jax.tree.map(lambda n, o, f: jnp.where(f, o, n), new, old, freeze)
        return new

    return jax.tree.map(pick, new_state, old_state, is_leaf=like_params)


def freeze_for_steps(
    inner: optax.GradientTransformation, mask, num_steps: int
) -> optax.GradientTransformation:
    """Wraps `inner` so that the parameters where `mask` is True stay fixed for `num_steps`.

    While frozen, those parameters get exactly zero updates (so they stay bitwise equal), their
    gradients are zeroed before `inner` sees them (gradient clipping then measures only the
    trainable part), and their entries of `inner`'s state are kept as they were (momentum and
    the like do not drift, e.g. through weight decay); step counts advance for everyone, so
    learning-rate schedules follow the global step. Afterwards `inner` runs unchanged.
    `mask`: pytree of bools like the parameters, or a function of the gradients giving one.
    """

    def init_fn(params):
        return FreezeState(jnp.zeros([], jnp.int32), inner.init(params))

    def update_fn(updates, state, params=None):
        frozen_now = state.count < num_steps
        freeze = jax.tree.map(
            lambda m: jnp.logical_and(frozen_now, m), mask(updates) if callable(mask) else mask
        )
        zero = lambda x, f: jnp.where(f, jnp.zeros_like(x), x)
        grads = jax.tree.map(zero, updates, freeze)
        new_updates, inner_state = inner.update(grads, state.inner_state, params)
        new_updates = jax.tree.map(zero, new_updates, freeze)
        inner_state = _keep_frozen(inner_state, state.inner_state, freeze)
        return new_updates, FreezeState(optax.safe_increment(state.count), inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def ema_update(ema_params, params, decay: float):
    """Polyak averaging: ema <- decay * ema + (1 - decay) * params."""
    return optax.incremental_update(params, ema_params, step_size=1.0 - decay)
