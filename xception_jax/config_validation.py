"""Checks of a training config that fail fast, before any compilation, with the fix named."""

from __future__ import annotations

import os

import jax
import ml_collections

from xception_jax import models


def validate(
    config: ml_collections.ConfigDict, info, workdir: str, num_devices: int | None = None
) -> None:
    """Raises ValueError naming the bad field and the fix; returns None when all is well.

    `num_devices` is the size of the mesh the batch is split over (default: every device).
    """
    errors = []
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        errors.append(f"--workdir {workdir} is a file; give a directory (it is created if absent).")
    try:
        model = models.create_model(
            config.model.name, **{k: v for k, v in config.model.items() if k != "name"}
        )
    except (ValueError, TypeError) as e:  # Unknown model name or model field.
        errors.append(f"config.model: {e}")
    else:
        if config.image_size < model.min_input_size:
            errors.append(
                f"config.image_size={config.image_size} is below the {model.min_input_size}px "
                f"minimum of model {config.model.name!r}; use image_size >= "
                f"{model.min_input_size}."
            )
    devices, processes = num_devices or jax.device_count(), jax.process_count()
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if value <= 0 or value % devices:
            errors.append(
                f"config.{field}={value} must be a positive multiple of the {devices} devices "
                f"({processes} processes); use e.g. {max(1, value // devices) * devices}."
            )
    if config.schedule.base_learning_rate <= 0:
        errors.append(
            f"config.schedule.base_learning_rate={config.schedule.base_learning_rate} must be > 0."
        )
    if config.num_train_steps <= 0 and config.num_epochs <= 0:
        errors.append("Set config.num_train_steps > 0, or num_train_steps=-1 and num_epochs > 0.")
    for field in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps"):
        if config[field] <= 0:
            errors.append(f"config.{field}={config[field]} must be a positive number of steps.")
    if not 0 <= config.ema_decay < 1:
        errors.append(f"config.ema_decay={config.ema_decay} must be in [0, 1) (0 turns EMA off).")
    if info.num_classes < 2:
        errors.append(f"Dataset {config.dataset!r} has {info.num_classes} classes; need >= 2.")
    if errors:
        raise ValueError("Invalid config:\n  - " + "\n  - ".join(errors))
