"""Orbax checkpoint wiring for training, and `load()` for notebooks.

A checkpoint holds three items, so that a notebook can restore the model without the
optimizer state (orbax cannot restore a subset of one item):
  model: {'params', 'batch_stats', 'ema_params'}
  train: {'opt_state', 'step', 'skipped_updates'} (older checkpoints lack the counter)
  meta:  JSON: layout version, number of classes, class names and the resolved config.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from xception_jax.platform import errors, storage

LAYOUT_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"


class CheckpointError(errors.InputError, RuntimeError):
    """A checkpoint that cannot be used with this code or this model."""


def checkpoint_dir(workdir: str) -> str:
    """Where a workdir (local or gs://) keeps its checkpoints: an absolute path or a URL."""
    return storage.join(storage.abspath(workdir), CHECKPOINT_DIR)


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
    # Handlers named up front (not only item names) so that item_metadata() can describe a
    # checkpoint's arrays before anything is restored (see check_fits).
    handlers = {
        "model": ocp.StandardCheckpointHandler(),
        "train": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers=handlers)


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
            train=ocp.args.StandardSave(_train_item(state)),
            meta=ocp.args.JsonSave(meta),
        ),
        force=force,
    )


def _model_item(state) -> dict:
    item = {"params": state.params, "batch_stats": state.batch_stats}
    if state.ema_params is not None:
        item["ema_params"] = state.ema_params
    return item


def _train_item(state) -> dict:
    return {
        "opt_state": state.opt_state,
        "step": state.step,
        "skipped_updates": state.skipped_updates,
    }


def _abstract(tree):
    """Shape, dtype and sharding of each leaf (of arrays or of ShapeDtypeStructs)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )


def _leaf_shapes(tree) -> dict:
    """{'a/b/c': (shape, dtype)} of a tree of arrays, ShapeDtypeStructs or orbax metadata."""
    return {
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): (
            tuple(leaf.shape),
            str(leaf.dtype),
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def check_fits(manager: ocp.CheckpointManager, step: int, state) -> None:
    """Raises CheckpointError naming the first leaves where checkpoint `step` and `state` differ.

    Compares the checkpoint's array metadata (names, shapes, dtypes) with the target before
    restoring, so that another model, width, class count or optimizer gives an error that
    says what differs instead of a failure deep inside orbax or tensorstore.
    """
    metadata = manager.item_metadata(step)
    stored = {
        f"{item}/{name}": v
        for item in ("model", "train")
        for name, v in _leaf_shapes(metadata[item]).items()
    }
    train_item = _train_item(state)
    if not any(k.startswith("train/skipped_updates") for k in stored):
        train_item.pop("skipped_updates")  # Written before the counter was checkpointed.
    wanted = {
        f"{item}/{name}": v
        for item, tree in (("model", _model_item(state)), ("train", train_item))
        for name, v in _leaf_shapes(tree).items()
    }

    def order(name):  # Parameters first: they say the most about what differs.
        return (not name.startswith("model/params/"), name)

    problems = [
        f"{k}: {stored[k][0]} {stored[k][1]} in the checkpoint, {wanted[k][0]} {wanted[k][1]} "
        "in this run"
        for k in sorted(stored.keys() & wanted.keys(), key=order)
        if stored[k] != wanted[k]
    ]
    problems += [
        f"{k}: in this run, not in the checkpoint"
        for k in sorted(wanted.keys() - stored.keys(), key=order)
    ]
    problems += [
        f"{k}: in the checkpoint, not in this run"
        for k in sorted(stored.keys() - wanted.keys(), key=order)
    ]
    if problems:
        shown = "\n  - ".join(problems[:8])
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise CheckpointError(
            f"Checkpoint {step} in {manager.directory} was written by another model or optimizer "
            f"({len(problems)} mismatching arrays):\n  - {shown}{more}\nResume with the config "
            "that wrote it (its config.json is in the workdir) or train into a new --workdir."
        )


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
    """Restores checkpoint `step` into the structure, shapes and shardings of `state`.

    `state` may be concrete or abstract (ShapeDtypeStructs carrying shardings): restoring into
    an abstract state spares the initialisation's compilation on resume.
    """
    stored_train = manager.item_metadata(step)["train"]
    train_item = _train_item(state)
    if "skipped_updates" not in stored_train:
        train_item.pop("skipped_updates")
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_abstract(_model_item(state))),
            train=ocp.args.StandardRestore(_abstract(train_item)),
        ),
    )
    model, train = restored["model"], restored["train"]
    skipped = train.get("skipped_updates")
    if skipped is None:
        skipped = jax.device_put(np.zeros((), np.int32), state.step.sharding)
    return state.replace(
        params=model["params"],
        batch_stats=model["batch_stats"],
        ema_params=model.get("ema_params"),
        opt_state=train["opt_state"],
        step=train["step"],
        skipped_updates=skipped,
    )


UNREADABLE_DIR = "unreadable_checkpoints"


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Moves unreadable checkpoints out of orbax's directory (kept for inspection, not deleted).

    Left in place, the resumed run's save of the same step would collide with them. On gs://
    the move copies every file before deleting any (storage.move_tree).
    """
    if not steps:
        return
    if jax.process_index() == 0:
        directory = str(manager.directory)
        root = storage.join(storage.dirname(directory), UNREADABLE_DIR)
        storage.makedirs(root)
        for step in steps:
            target = storage.join(root, str(step))
            while storage.exists(target):
                target += "_"
            storage.move_tree(storage.join(directory, str(step)), target)
            logging.warning("Moved unreadable checkpoint %d to %s.", step, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("xception_jax_set_aside_unreadable_checkpoints")
    manager.reload()


def restore_latest(manager: ocp.CheckpointManager, state):
    """Restores the newest usable checkpoint into `state`, or returns None when there is none.

    A checkpoint that fails to read (truncated, corrupt, partly deleted) is skipped with a
    warning naming it, the previous one is tried, and the skipped ones are moved to
    `workdir/unreadable_checkpoints/` (nothing is deleted). A readable checkpoint of a newer
    layout or of another model raises CheckpointError: an older one would not fit either.
    """
    steps = sorted(manager.all_steps(), reverse=True)
    skipped = []
    for step in steps:
        path = storage.join(str(manager.directory), str(step))
        try:
            meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore/json raise many kinds.
            _warn_unreadable(path, e, skipped, steps)
            skipped.append(step)
            continue
        if meta["meta"].get("layout_version") != LAYOUT_VERSION:
            read_meta(manager, step)  # Raises the layout error.
        check_fits(manager, step, state)
        try:
            restored = restore_state(manager, step, state)
        except Exception as e:  # noqa: BLE001
            _warn_unreadable(path, e, skipped, steps)
            skipped.append(step)
            continue
        _set_aside(manager, skipped)
        return restored
    if skipped:
        raise CheckpointError(
            f"No checkpoint in {manager.directory} could be restored (tried steps {skipped}; "
            "see the warnings above). Move them away to start from scratch."
        )
    return None


def _warn_unreadable(path: str, error: Exception, skipped: list, steps: list) -> None:
    rest = [s for s in steps if s not in skipped][1:]
    logging.warning(
        "Checkpoint %s is unreadable (%s: %s); skipping it%s.",
        path,
        type(error).__name__,
        str(error)[:500],
        f" and trying step {rest[0]}" if rest else "",
    )


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes the resolved config as `workdir/config.json` (process 0 only)."""
    if jax.process_index() == 0:
        storage.write_atomic(
            storage.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2, sort_keys=True)
        )


def load(workdir: str, step: int | None = None, ema: bool = False):
    """Loads a trained model for inspection, evaluation, prediction or fine-tuning.

    Works on whatever devices the caller has (a CPU notebook included), whichever device or
    process count wrote the checkpoint: arrays land on the first local device.

    Args:
      workdir: a training workdir (holding `checkpoints/`), local or gs://.
      step: checkpoint step; the newest when None.
      ema: return the Polyak-averaged parameters as `params` (when the run kept them).

    Returns:
      (model, variables, config): the flax module, {'params', 'batch_stats'} for
      `model.apply(variables, x, train=False)`, and the run's config (with `num_classes` and
      `class_names` filled in).
    """
    from xception_jax.model import registry  # Imports this module: keep the import local.

    storage.check_supported(workdir, "workdir")
    if not storage.isdir(checkpoint_dir(workdir)):  # Before orbax, which logs a dozen lines.
        problem = (
            "does not exist"
            if not storage.exists(workdir)
            else f"has no {CHECKPOINT_DIR}/ folder: not a training workdir"
        )
        raise FileNotFoundError(
            f"workdir {workdir!r} {problem}; give the --workdir of a training run (python "
            "train.py --config ... --workdir DIR)."
        )
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
    model = registry.create_model_from_config(config, meta["num_classes"])
    device = jax.local_devices()[0]
    abstract = registry.abstract_variables(model, config.image_size)
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
        raise errors.UsageError(f"{workdir} was trained without EMA (config.ema_decay == 0).")
    params = restored["ema_params"] if ema else restored["params"]
    return model, {"params": params, "batch_stats": restored["batch_stats"]}, config
