"""The state a training run carries from step to step (and checkpoints), and its creation."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from xception_jax.platform import sharding


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and checkpoints)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # Polyak average of params; None when config.ema_decay == 0.
    skipped_updates: jax.Array  # Steps whose update was dropped for a non-finite loss.


def init_state(model, tx, config: ml_collections.ConfigDict) -> TrainState:
    """A fresh TrainState (pure: a function of config.seed only)."""
    x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = model.init(jax.random.key(config.seed), x, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        ema_params=params if config.ema_decay > 0 else None,
        skipped_updates=jnp.zeros((), jnp.int32),
    )


def abstract_train_state(model, tx, config: ml_collections.ConfigDict, mesh):
    """Shapes, dtypes and shardings (replicated on `mesh`) of a TrainState; computes nothing."""
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(functools.partial(init_state, model, tx, config)),
    )
