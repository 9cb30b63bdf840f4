"""Checks of a training config that fail fast, before any compilation, with the fix named."""

from __future__ import annotations

import difflib
import math

import jax
import ml_collections

from xception_jax.data import shards
from xception_jax.model import ops, registry
from xception_jax.platform import storage
from xception_jax.platform.errors import UsageError

# Config fields that name a file or directory (local or gs://).
PATH_FIELDS = (
    "data_dir",
    "manual_dir",
    "image_folder",
    "init_from_keras",
    "init_from_timm",
    "init_from_workdir",
    "compilation_cache_dir",
)

# Fields that checkpoints.load() adds to a run's config (a loaded config may be trained on).
_DERIVED_FIELDS = ("num_classes", "class_names")


class ConfigError(UsageError):
    """A config that cannot train; the message names each bad field and its fix."""

    @classmethod
    def of(cls, problems: list[str]) -> ConfigError:
        """One line for one problem; a line per problem for several."""
        if len(problems) == 1:
            return cls(f"Invalid config: {problems[0]}")
        return cls("Invalid config:\n  - " + "\n  - ".join(problems))


def _field_names(config, prefix: str = "") -> set[str]:
    names = set()
    for key, value in config.items():
        names.add(prefix + key)
        if isinstance(value, ml_collections.ConfigDict):
            names |= _field_names(value, f"{prefix}{key}.")
    return names


def unknown_fields(config: ml_collections.ConfigDict) -> list[str]:
    """Messages for fields that configs/common.py does not define (typos), with suggestions.

    `config.model.*` is left to the model, which rejects fields it does not have. Empty when
    configs/common.py is not importable (xception_jax used outside this repository).
    """
    try:
        from configs import common
    except ImportError:
        return []
    known = _field_names(common.base_config()) | set(_DERIVED_FIELDS)
    messages = []
    for name in sorted(_field_names(config) - known):
        if name.startswith("model.") or any(name.startswith(f"{k}.") for k in _DERIVED_FIELDS):
            continue
        parent = name.rpartition(".")[0]
        if parent and parent not in known:
            continue  # Reported once, for the unknown parent.
        close = difflib.get_close_matches(name, sorted(known), n=1)
        hint = f" Did you mean config.{close[0]}?" if close else ""
        messages.append(
            f"config.{name} is not a config field.{hint} Every field is listed in "
            "configs/common.py."
        )
    return messages


def dataset_errors(config: ml_collections.ConfigDict) -> list[str]:
    """A message when config.dataset is neither 'image_folder' nor a registered TFDS dataset."""
    from xception_jax.data import names  # TFDS's registry, without TensorFlow

    return names.dataset_name_errors(config.dataset)


def check_num_classes(config: ml_collections.ConfigDict, info) -> None:
    """Raises ConfigError when the dataset has fewer than 2 classes."""
    if info.num_classes < 2:
        raise ConfigError.of(
            [f"Dataset {config.dataset!r} has {info.num_classes} classes; need >= 2."]
        )


def validate(
    config: ml_collections.ConfigDict, info, workdir: str, num_devices: int | None = None
) -> None:
    """Raises ConfigError naming every bad field and its fix; returns None when all is well.

    `info` is the dataset's DatasetInfo, or None to check the config before reading the
    dataset. `num_devices` is the size of the mesh the batch is split over (default: every
    device). Nothing here compiles or writes anything.
    """
    errors = unknown_fields(config)
    unsupported = path_errors(config, workdir)
    if unsupported:  # Nothing below may touch a path that no part of a run can use.
        raise ConfigError.of(errors + unsupported)
    if storage.exists(workdir) and not storage.isdir(workdir):
        errors.append(f"--workdir {workdir} is a file; give a directory (it is created if absent).")
    try:
        model = registry.create_model(
            config.model.name, **{k: v for k, v in config.model.items() if k != "name"}
        )
    except (ValueError, TypeError) as e:  # Unknown model name or model field.
        errors.append(f"config.model: {e}")
    else:
        for op in ops.IMPLS:  # A bad name would otherwise only fail while compiling.
            try:
                ops.resolve_impl(op, getattr(model, f"{op}_impl"))
            except ValueError as e:
                errors.append(f"config.model.{op}_impl: {e}")
        if config.image_size < model.min_input_size:
            errors.append(
                f"config.image_size={config.image_size} is below the {model.min_input_size}px "
                f"minimum of model {config.model.name!r}; use image_size >= "
                f"{model.min_input_size}."
            )
    errors += batch_errors(config, num_devices or jax.device_count(), jax.process_count())
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
    errors += pretrained_errors(config)
    folder = config.get("image_folder")
    if config.dataset == "image_folder" and not (folder and storage.isdir(folder)):
        errors.append(
            f"config.dataset='image_folder' needs config.image_folder to name a directory laid "
            f"out as <root>/<split>/<class name>/<image>; got {folder!r}, which "
            + ("is not set." if not folder else "is not a directory.")
        )
    errors += augment_errors(config)
    errors += dataset_errors(config)
    if info is not None and info.num_classes < 2:
        errors.append(f"Dataset {config.dataset!r} has {info.num_classes} classes; need >= 2.")
    if errors:
        raise ConfigError.of(errors)


def path_errors(config: ml_collections.ConfigDict, workdir: str | None = None) -> list[str]:
    """Messages for the workdir and path fields whose scheme is neither local nor gs://."""
    named = [("--workdir", workdir)] + [(f"config.{f}", config.get(f)) for f in PATH_FIELDS]
    return storage.unsupported(named)


def pretrained_errors(config: ml_collections.ConfigDict) -> list[str]:
    """Fine-tuning fields: one source that exists, and no frozen backbone without one."""
    from xception_jax.training import pretrained
    from xception_jax.weights import timm_weights

    given = {f: config.get(f) for f in pretrained.SOURCE_FIELDS if config.get(f)}
    errors = []
    if len(given) > 1:
        errors.append(
            f"Set only one of {', '.join('config.' + f for f in pretrained.SOURCE_FIELDS)} "
            f"(set: {', '.join(given)})."
        )
    for field, path in given.items():
        if not storage.exists(path):
            errors.append(f"config.{field}={path!r} does not exist.")
    for field, source in (("init_from_keras", "Keras"), ("init_from_timm", "timm")):
        if given.get(field):
            try:
                registry.check_pretrainable(dict(config.model), source)
            except ValueError as e:
                errors.append(f"config.{field}: {e}")
    if given.get("init_from_timm") and config.model.name not in timm_weights.VARIANTS:
        errors.append(
            f"config.init_from_timm needs config.model.name to be the file's timm variant, one "
            f"of {list(timm_weights.VARIANTS)}; got {config.model.name!r}."
        )
    if config.get("freeze_backbone_steps", 0) > 0 and not given:
        errors.append(
            f"config.freeze_backbone_steps={config.freeze_backbone_steps} would freeze a randomly "
            "initialised backbone: set config.init_from_keras, config.init_from_timm or "
            "config.init_from_workdir, or freeze_backbone_steps=0 to train from scratch."
        )
    return errors


def batch_errors(config: ml_collections.ConfigDict, devices: int, processes: int = 1) -> list[str]:
    """Batch sizes that the devices (and, for training, the microbatches and the data's logical
    shards) divide evenly, and logical shards that the processes divide evenly.

    Each batch size suggested satisfies every one of these checks at once.
    """
    units = {"batch_size": train_batch_unit(config, devices), "eval_batch_size": devices}
    errors = shards.errors(
        config.batch_size, config.get("data_shards", 1), processes, units["batch_size"]
    )
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        if value <= 0 or value % devices:
            errors.append(
                f"config.{field}={value} must be a positive multiple of the {devices} devices "
                f"({processes} processes); use e.g. {shards.suggested_batch(value, units[field])}."
            )
    return errors + grad_accum_errors(config, devices, processes)


def train_batch_unit(config: ml_collections.ConfigDict, devices: int) -> int:
    """What a training batch size must be a multiple of: devices x grad_accum_steps and
    data_shards (each taken as 1 when invalid: reported by its own check)."""
    k = config.get("grad_accum_steps", 1)
    k = k if isinstance(k, int) and not isinstance(k, bool) and k >= 1 else 1
    n = config.get("data_shards", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    return math.lcm(devices * k, n)


def grad_accum_errors(config: ml_collections.ConfigDict, devices: int, processes: int) -> list[str]:
    """config.grad_accum_steps: a positive integer whose microbatches split evenly over devices."""
    k = config.get("grad_accum_steps", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        return [f"config.grad_accum_steps={k!r} must be an integer >= 1 (1: no accumulation)."]
    batch = config.batch_size
    if k == 1 or batch <= 0 or batch % devices or batch % (k * devices) == 0:
        return []  # (A batch that the devices alone do not divide is reported above.)
    fits = [d for d in range(1, k + 1) if batch % (d * devices) == 0]
    return [
        f"config.batch_size={batch} does not split into grad_accum_steps={k} microbatches of "
        f"equal shares of the {devices} devices ({processes} processes): batch_size must be a "
        f"multiple of grad_accum_steps x devices = {k * devices}. Use batch_size="
        f"{shards.suggested_batch(batch, train_batch_unit(config, devices))}, or "
        f"grad_accum_steps={max(fits)}."
    ]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def augment_errors(config: ml_collections.ConfigDict) -> list[str]:
    """config.augment and config.model.drop_path_rate: each value in its range, one policy."""
    from xception_jax.data import augment

    errors = []
    block = config.get("augment") or {}

    def get(name, default):
        return block.get(name, default)

    layers = get("randaugment_layers", 0)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 0:
        errors.append(
            f"config.augment.randaugment_layers={layers!r} must be an integer >= 0 (0: off; "
            "timm's recipes use 2)."
        )
    ranges = {
        # field: (default, low, high, what the values mean)
        "randaugment_magnitude": (9.0, 0.0, 10.0, "RandAugment's 0..10 scale"),
        "random_erasing": (0.0, 0.0, 1.0, "a probability; 0: off"),
        "mixup_prob": (1.0, 0.0, 1.0, "a probability"),
        "mixup_switch_prob": (0.5, 0.0, 1.0, "a probability"),
    }
    for name, (default, low, high, meaning) in ranges.items():
        value = get(name, default)
        if not _number(value) or not low <= value <= high:
            errors.append(
                f"config.augment.{name}={value!r} must be in [{low:g}, {high:g}] ({meaning})."
            )
    for name in ("randaugment_magnitude_std", "mixup_alpha", "cutmix_alpha"):
        value = get(name, 0.0)
        if not _number(value) or not value >= 0:  # (also refuses NaN)
            errors.append(f"config.augment.{name}={value!r} must be >= 0 (0: off).")
    policy = get("autoaugment", "")
    if policy not in augment.POLICIES:
        errors.append(
            f"config.augment.autoaugment={policy!r} is not a policy: use one of "
            f"{list(augment.POLICIES)} ('' is off)."
        )
    elif policy and isinstance(layers, int) and layers > 0:
        errors.append(
            f"config.augment.autoaugment={policy!r} and randaugment_layers={layers} are both "
            "on: choose one (set randaugment_layers=0 or autoaugment='')."
        )
    rate = config.model.get("drop_path_rate", 0.0)
    if not _number(rate) or not 0 <= rate < 1:
        errors.append(f"config.model.drop_path_rate={rate!r} must be in [0, 1) (0: off).")
    elif rate > 0 and not config.model.get("residual", True):
        errors.append(
            f"config.model.drop_path_rate={rate} needs config.model.residual=True: stochastic "
            "depth drops a block's residual branch, and residual=False has none. Set "
            "drop_path_rate=0 (allowed values with residual=False: 0 only)."
        )
    return errors
