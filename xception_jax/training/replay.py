"""Replaying a step of a run on one machine: its checkpoint as a full TrainState and its step."""

from __future__ import annotations

import ml_collections

from xception_jax.model import registry
from xception_jax.platform import sharding
from xception_jax.training import checkpoints, optim, steps, train_state


def restore_for_replay(workdir: str, step: int, devices=None, data_dir: str | None = None):
    """Checkpoint `step` of a run as a full TrainState, to replay the run's step `step`.

    Returns (state, p_train_step, mesh, config): the TrainState after `step` steps (params,
    BatchNorm statistics, optimizer state), replicated on a mesh over `devices` (every device
    when None), the run's train step jitted for that mesh (it leaves `state` intact), and the
    run's config (`data_dir` replaces config.data_dir when given, e.g. where a copy of the data
    is). With the step's batch (data.pipeline.global_batch) the train step computes what the
    run computed at that step, up to the order of float additions when the device count
    differs: docs/data.md "Replaying a step".
    """
    from xception_jax.data import sources  # TensorFlow: imported where data is read

    manager = checkpoints.create_manager(workdir, max_to_keep=None, read_only=True)
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"No checkpoint {step} in {manager.directory}; have {manager.all_steps()}. Replay a "
            "step that a checkpoint starts (config.checkpoint_every_steps sets which), or the "
            "nearest one before it and the steps in between."
        )
    config = ml_collections.ConfigDict(checkpoints.read_meta(manager, step)["config"])
    if data_dir is not None:
        config.data_dir = data_dir
    info = sources.get_dataset_info(config)
    mesh = sharding.create_mesh(devices)
    model = registry.create_model_from_config(
        config, info.num_classes, sharding.mesh_platform(mesh)
    )
    tx, _ = optim.create_optimizer(config, info.num_train_examples)
    state = checkpoints.restore_state(
        manager, step, train_state.abstract_train_state(model, tx, config, mesh)
    )
    manager.close()
    p_train_step, _ = steps.jit_steps(model, tx, config, mesh, donate=False)
    return state, p_train_step, mesh, config
