"""The tf.data pipelines: per-process uint8 batches of training steps and of evaluation.

`train_iterator(config, start_step)` yields this process's part of each step's global batch in
the data order of `data/order.py` (so a resume, on any supported process count, continues
exactly); `global_batch(config, step)` reads one step's global batch in one process (a replay);
`eval_iterator(config)` is one padded, masked pass over this process's part of the eval split.
Images leave as uint8; `data/feeding.py` puts the batches on the devices.
"""

import functools
import math
from collections.abc import Iterator

import jax
import numpy as np
import tensorflow as tf

from xception_jax.data import augment, order, preprocessing, sources


def _processes(process_index, process_count):
    """Fills in jax.process_index()/process_count() where not overridden; validates them."""
    count = jax.process_count() if process_count is None else int(process_count)
    index = jax.process_index() if process_index is None else int(process_index)
    if not 0 <= index < count:
        raise ValueError(f"process_index={index} is not in [0, process_count={count}).")
    return index, count


def _local_batch_size(global_batch, process_count, name):
    """Per-process batch size; the global size must divide evenly among processes."""
    if global_batch % process_count:
        raise ValueError(
            f"config.{name}={global_batch} is not divisible by the number of processes "
            f"({process_count}); choose a multiple of {process_count}."
        )
    return global_batch // process_count


def _options(ds):
    """Deterministic order, autotuned parallelism."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    return ds.with_options(options)


def _numpy_batches(ds, records_ds, split, batch_size):
    """Iterates ds as numpy; names the file when an image cannot be decoded.

    On a decoding error in batch k, the records of that batch (positions k*B..k*B+B-1 of
    `records_ds`, still cheap and undecoded) are decoded one by one to find the culprit.
    """
    count = 0
    iterator = ds.as_numpy_iterator()
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as err:
            bad = _find_undecodable(records_ds.skip(count * batch_size).take(batch_size), split)
            if bad is None:
                raise
            raise ValueError(
                f"cannot decode image {bad}: {err.message.splitlines()[0]} "
                "Remove or replace this file (or re-encode it as JPEG/PNG)."
            ) from err
        count += 1
        yield batch


def _find_undecodable(records_ds, split):
    """Description of the first record of records_ds whose image fails to decode, or None."""
    for record in records_ds:
        encoded = split.load(record)["image"]
        try:
            preprocessing.preprocess_eval(encoded, image_size=8, crop_fraction=1.0)
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
            return split.describe(
                {k: v.numpy() for k, v in record.items()} if isinstance(record, dict) else record
            )
    return None


def train_iterator(
    config, start_step=0, stop_step=None, *, process_index=None, process_count=None
) -> Iterator[dict]:
    """Per-process training batches {'image': uint8 [B_local,S,S,3], 'label': int32} of steps
    [start_step, stop_step) (endless when stop_step is None).

    B_local = config.batch_size // process_count: this process's part of the global batch, which
    is a function of (config.seed, the step, the dataset) alone (module docstring). Starting at
    `start_step` yields exactly the batches an uninterrupted iterator yields from that step,
    whatever process count that one ran with. process_index / process_count default to
    jax.process_index() / jax.process_count(); tests override them to simulate several hosts.
    """
    process_index, process_count = _processes(process_index, process_count)
    records, split, layout = order.train_records(config, start_step, process_index, process_count)
    seed = int(sources.config_field(config, "seed", 0))
    crop = functools.partial(
        preprocessing.preprocess_train,
        image_size=int(config.image_size),
        area_range=tuple(sources.config_field(config, "crop_area_range", (0.08, 1.0))),
        aspect_range=tuple(sources.config_field(config, "crop_aspect_range", (3 / 4, 4 / 3))),
        random_flip=bool(sources.config_field(config, "random_flip", True)),
    )

    extra = augment.augment_fn(config)  # RandAugment / AutoAugment / erasing; None: all off

    def process(element):
        example = split.load(element["record"])
        example_seed = order.example_seed(
            seed, element["shard"], element["position"], layout.num_shards
        )
        image = crop(example["image"], example_seed)
        if extra is not None:
            # A seed of its own, derived from the example's: the crop's draws stay as they were.
            image = extra(image, tf.random.experimental.stateless_fold_in(example_seed, 24))
        return {"image": image, "label": example["label"]}

    ds = records.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(layout.local_batch, drop_remainder=True)
    if stop_step is not None:
        ds = ds.take(max(int(stop_step) - int(start_step), 0))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    undecoded = records.map(lambda element: element["record"])
    return _numpy_batches(_options(ds), undecoded, split, layout.local_batch)


def global_batch(config, step) -> tuple[np.ndarray, np.ndarray]:
    """The global training batch of step `step`: (images uint8 [B,S,S,3], labels int32 [B]).

    Exactly what a run of `config` trains on at that step, on any number of processes (in the
    order of the global array), read in this one process: replays a step of a pod run in a
    notebook. It reads what the step's shards read on resume (up to one epoch of encoded
    records over all shards, read in parallel; docs/data.md "Replaying a step").
    """
    batch = next(train_iterator(config, step, step + 1, process_index=0, process_count=1))
    return batch["image"], batch["label"]


def _eval_part(config, process_index, process_count):
    """(this process's eval records, the split, eval batch per process, batches per pass).

    The eval split is cut into one part per process: the order of evaluation does not matter.
    """
    local_batch = _local_batch_size(int(config.eval_batch_size), process_count, "eval_batch_size")
    split = sources.get_split(config, sources.resolve_eval_split(config), process_count)
    num_batches = math.ceil(max(split.sizes) / local_batch)
    return split.records(process_index, None), split, local_batch, num_batches


def num_eval_batches(config, *, process_count=None):
    """Number of batches of one eval pass (the same on every process)."""
    _, process_count = _processes(0, process_count)
    return _eval_part(config, 0, process_count)[3]


def eval_iterator(config, *, process_index=None, process_count=None) -> Iterator[dict]:
    """One pass over this process's part of the eval split, in a fixed order.

    Yields {'image': uint8 [B_local,S,S,3], 'label': int32, 'mask': bool}; B_local =
    config.eval_batch_size // process_count. The last batches are padded (zero images, label 0,
    mask False) so that every process yields ceil(largest part / B_local) batches and the masked
    examples count each example of the split exactly once.
    """
    process_index, process_count = _processes(process_index, process_count)
    records, split, local_batch, num_batches = _eval_part(config, process_index, process_count)
    image_size = int(config.image_size)
    crop_fraction = float(
        sources.config_field(config, "eval_crop_fraction", preprocessing.DEFAULT_EVAL_CROP_FRACTION)
    )
    num_padding = num_batches * local_batch - split.sizes[process_index]

    def process(record):
        example = split.load(record)
        image = preprocessing.preprocess_eval(
            example["image"], image_size=image_size, crop_fraction=crop_fraction
        )
        return {"image": image, "label": example["label"], "mask": tf.constant(True)}

    ds = records.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([image_size, image_size, 3], tf.uint8),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(False),
        }
    ).repeat(num_padding)
    ds = ds.concatenate(padding).batch(local_batch, drop_remainder=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return _numpy_batches(_options(ds), records, split, local_batch)
