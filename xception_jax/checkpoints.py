"""Orbax checkpoint wiring for training, and `load()` for notebooks.

A checkpoint holds three items, so that a notebook can restore the model without the
optimizer state (orbax cannot restore a subset of one item):
  model: {'params', 'batch_stats', 'ema_params'}
  train: {'opt_state', 'step'}
  meta:  JSON: layout version, number of classes, class names and the resolved config.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

LAYOUT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used with this code or this model."""


def checkpoint_dir(workdir: str) -> str:
    """Where a workdir keeps its checkpoints."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def create_manager(
    workdir: str, max_to_keep: int | None = 3, read_only: bool = False
) -> ocp.CheckpointManager:
    """A CheckpointManager with async saves over `workdir/checkpoints`.

    Every process creates one and takes part in each save (orbax coordinates the hosts).
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=not read_only,
        create=not read_only,
        read_only=read_only,
    )
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=("model", "train", "meta")
    )


def meta_for(config: ml_collections.ConfigDict, num_classes: int, class_names) -> dict:
    """The JSON metadata written beside each checkpoint."""
    return {
        "layout_version": LAYOUT_VERSION,
        "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names is not None else None,
        "config": json.loads(config.to_json_best_effort()),
    }


def save(manager: ocp.CheckpointManager, state, meta: dict, force: bool = False) -> bool:
    """Starts an async save of `state` (a TrainState) at its step; returns whether it saved."""
    step = int(jax.device_get(state.step))
    return manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(_model_item(state)),
            train=ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step}),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )


def _model_item(state) -> dict:
    item = {"params": state.params, "batch_stats": state.batch_stats}
    if state.ema_params is not None:
        item["ema_params"] = state.ema_params
    return item


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The metadata item of checkpoint `step`, with its layout version checked."""
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    version = meta.get("layout_version")
    if version != LAYOUT_VERSION:
        raise CheckpointError(
            f"Checkpoint {step} in {manager.directory} has layout version {version}, this code "
            f"reads version {LAYOUT_VERSION}. Use the xception_jax version that wrote it, or "
            "start a new workdir."
        )
    return meta


def restore_state(manager: ocp.CheckpointManager, step: int, state):
    """Restores checkpoint `step` into the structure, shapes and shardings of `state`."""
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(_model_item(state))),
            train=ocp.args.StandardRestore(
                _abstract({"opt_state": state.opt_state, "step": state.step})
            ),
        ),
    )
    model, train = restored["model"], restored["train"]
    return state.replace(
        params=model["params"],
        batch_stats=model["batch_stats"],
        ema_params=model.get("ema_params"),
        opt_state=train["opt_state"],
        step=train["step"],
    )


def restore_latest(manager: ocp.CheckpointManager, state):
    """Restores the newest usable checkpoint into `state`, or returns None when there is none.

    A newest checkpoint that fails to read (truncated, corrupt) is skipped with a warning naming
    it and the previous one is tried; nothing is deleted.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
        read_meta(manager, step)
        try:
            return restore_state(manager, step, state)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds.
            if i + 1 == len(steps):
                raise CheckpointError(
                    f"No checkpoint in {manager.directory} could be restored; the oldest, "
                    f"step {step}, failed with: {e}"
                ) from e
            logging.warning(
                "Checkpoint %s is unreadable (%s: %s); skipping it and trying step %d.",
                os.path.join(str(manager.directory), str(step)),
                type(e).__name__,
                e,
                steps[i + 1],
            )
    return None


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config as `workdir/config.json` (process 0 only)."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def load(workdir: str, step: int | None = None, ema: bool = False):
    """Loads a trained model for inspection, evaluation, prediction or fine-tuning.

    Works on whatever devices the caller has (a CPU notebook included), whichever device or
    process count wrote the checkpoint: arrays land on the first local device.

    Args:
      workdir: a training workdir (holding `checkpoints/`).
      step: checkpoint step; the newest when None.
      ema: return the Polyak-averaged parameters as `params` (when the run kept them).

    Returns:
      (model, variables, config): the flax module, {'params', 'batch_stats'} for
      `model.apply(variables, x, train=False)`, and the run's config (with `num_classes` and
      `class_names` filled in).
    """
    from xception_jax import train  # Imports this module: keep the import local.

    manager = create_manager(workdir, max_to_keep=None, read_only=True)
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(
            f"No checkpoint in {checkpoint_dir(workdir)}: train with "
            f"`python train.py --config ... --workdir {workdir}` first."
        )
    step = max(steps) if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"No checkpoint {step} in {checkpoint_dir(workdir)}; have {steps}.")
    meta = read_meta(manager, step)
    config = ml_collections.ConfigDict(meta["config"])
    config.num_classes = meta["num_classes"]
    config.class_names = meta["class_names"]
    model = train.create_model_from_config(config, meta["num_classes"])
    device = jax.local_devices()[0]
    abstract = train.abstract_variables(model, config.image_size)
    item_meta = manager.item_metadata(step)["model"]
    target = {k: abstract[k] for k in ("params", "batch_stats")}
    if "ema_params" in item_meta:
        target["ema_params"] = abstract["params"]
    sharding = jax.sharding.SingleDeviceSharding(device)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target))
    )["model"]
    manager.close()
    if ema and "ema_params" not in restored:
        raise ValueError(f"{workdir} was trained without EMA (config.ema_decay == 0).")
    params = restored["ema_params"] if ema else restored["params"]
    return model, {"params": params, "batch_stats": restored["batch_stats"]}, config
