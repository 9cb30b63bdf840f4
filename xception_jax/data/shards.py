"""Fixed logical shards of the training data: which process reads which, what each step takes.

A split is cut into `config.data_shards` logical shards (TFDS even sub-splits; every
data_shards-th file of an image folder). Each shard is read as its own stream in an order fixed
by (seed, shard, epoch), and every step takes `batch_size / data_shards` consecutive examples
from each shard, in shard order. Process p of P reads the shards p * S/P ... (p+1) * S/P - 1, so
the processes' parts, concatenated in process order, are the same global batch for every P that
divides S. Nothing here imports TensorFlow: config checks and the TPU compiler use it too.
"""

import dataclasses
import math

# Config fields that decide which examples each step sees and how they are augmented: a resume
# that changes one of them no longer continues the run's data order.
# config.augment's fields and the values that turn each off (configs/common.py's defaults).
AUGMENT_OFF = {
    "randaugment_layers": 0,
    "randaugment_magnitude": 9.0,
    "randaugment_magnitude_std": 0.0,
    "autoaugment": "",
    "random_erasing": 0.0,
    "mixup_alpha": 0.0,
    "cutmix_alpha": 0.0,
    "mixup_prob": 1.0,
    "mixup_switch_prob": 0.5,
}
ORDER_FIELDS = (
    "dataset",
    "train_split",
    "seed",
    "data_shards",
    "batch_size",
    "shuffle_buffer",
    "image_size",
    "crop_area_range",
    "crop_aspect_range",
    "random_flip",
)


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """The logical shards one process reads, and the examples a step takes from each."""

    num_shards: int  # config.data_shards
    per_step: int  # examples each step takes from each shard: batch_size / num_shards
    first: int  # this process's first shard
    count: int  # shards per process: num_shards / process_count

    @property
    def local_batch(self) -> int:
        """This process's part of a global batch."""
        return self.per_step * self.count


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggested_batch(batch_size: int, unit: int) -> int:
    """The positive multiple of `unit` nearest to `batch_size` (rounding down; at least `unit`)."""
    return max(1, batch_size // unit) * unit


def errors(batch_size: int, num_shards, process_count: int, batch_unit: int = 1) -> list[str]:
    """Messages for a batch size, shard count and process count that do not fit together.

    `batch_unit`: what else the batch size must be a multiple of (the caller's devices x
    microbatches), so that the batch size suggested satisfies every check at once.
    """
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards < 1:
        return [
            f"config.data_shards={num_shards!r} must be a positive integer: the number of logical "
            "shards the training data is cut into (configs/common.py)."
        ]
    messages = []
    if num_shards % process_count:
        messages.append(
            f"config.data_shards={num_shards} is not a multiple of the {process_count} processes: "
            f"each process reads data_shards / processes whole shards. Run on a process count "
            f"that divides {num_shards} ({_divisors(num_shards)}), or start a new run with "
            f"data_shards={math.lcm(num_shards, process_count)} (the data order depends on "
            "data_shards, so a run keeps the value it started with)."
        )
    if batch_size > 0 and batch_size % num_shards:
        fits = [d for d in _divisors(batch_size) if d % process_count == 0 and d <= num_shards]
        alternative = f" or data_shards={max(fits)}" if fits else ""
        messages.append(
            f"config.batch_size={batch_size} is not a multiple of config.data_shards={num_shards}: "
            "every step takes the same number of examples from each shard. Use batch_size="
            f"{suggested_batch(batch_size, math.lcm(num_shards, batch_unit))}{alternative}."
        )
    return messages


def layout(batch_size: int, num_shards: int, process_index: int, process_count: int):
    """This process's ShardLayout; ValueError naming the fix when the numbers do not fit."""
    problems = errors(batch_size, num_shards, process_count)
    if problems:
        raise ValueError(" ".join(problems))
    count = num_shards // process_count
    return ShardLayout(num_shards, batch_size // num_shards, process_index * count, count)


def augment_field(config, name: str, default):
    """config.augment.<name>, or `default` where the config has no augment block (older runs)."""
    block = config.get("augment") if hasattr(config, "get") else None
    return default if block is None else block.get(name, default)


def order_changes(stored: dict, config) -> list[str]:
    """What differs, in ORDER_FIELDS, between a checkpoint's stored config and `config`.

    A stored config without data_shards was written before the data order stopped depending on
    the process count: every batch after the resume differs from what that run would have seen.
    """
    if "data_shards" not in stored:
        return ["the checkpoint predates config.data_shards: its data order followed the hosts"]
    changes = []
    for field in ORDER_FIELDS:
        old, new = stored.get(field), config.get(field)
        if isinstance(new, tuple):
            new = list(new)
        if old != new:
            changes.append(f"config.{field}: {old!r} -> {new!r}")
    # config.augment changes what each step trains on too; a checkpoint written before it
    # existed trained with every augmentation off (AUGMENT_OFF).
    stored_augment, augment = stored.get("augment") or {}, config.get("augment") or {}
    for field, off in AUGMENT_OFF.items():
        old, new = stored_augment.get(field, off), augment.get(field, off)
        if old != new:
            changes.append(f"config.augment.{field}: {old!r} -> {new!r}")
    return changes
