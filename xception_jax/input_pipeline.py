"""Input pipeline: TFDS or an image folder -> tf.data -> per-process uint8 batches -> global arrays.

Sources (`config.dataset`):
- any TFDS image-classification dataset by name ('imagenet2012', 'cifar10', 'oxford_flowers102',
  the embedded default 'sklearn_digits', ...), read from `config.data_dir` and prepared on first
  use (`config.manual_dir` for manual downloads such as ImageNet's two tars);
- 'image_folder': `config.image_folder`/<split>/<class name>/<image file>.

The same global batches on any number of processes. The training split is cut into
`config.data_shards` fixed logical shards (TFDS's even sub-splits, the same as
`tfds.split_for_jax_process` with data_shards processes; every data_shards-th file of an image
folder). Each shard is a stream of epochs of its own: epoch e reads the shard's files in an
order shuffled with seed f(seed, shard, e) and passes the records through a shuffle buffer
seeded likewise, so every epoch consumes each example of the shard exactly once. Step s takes
the next batch_size / data_shards examples of every shard, in shard order: the global batch of
step s is a function of (seed, s, the dataset) alone. Process p of P reads shards p * S/P to
(p+1) * S/P - 1 (xception_jax.data_shards), and the processes' parts concatenated in process
order are that global batch. The augmentation of an example is seeded with (seed, its position
in its shard's stream, the shard) through TF's stateless random ops, never by TF's stateful
generator: it follows the example, not the process.

Exact resume on any supported process count: `train_iterator(config, start_step)` starts each
shard's stream at position start_step * batch_size / data_shards, derived from the step alone. It
skips the records already consumed while they are still encoded (no JPEG decoding), less than
one epoch of the shard, all of a process's shards side by side. `global_batch(config, step)`
reads step `step`'s global batch in one process.

Images leave the pipeline as uint8 (scaling to [-1, 1] happens on the device).
"""

import dataclasses
import functools
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import xception_jax.datasets  # noqa: F401  (registers 'sklearn_digits' with TFDS)
from xception_jax import data_shards, storage

# TF must not reserve accelerator memory: JAX owns the devices. (A no-op with tensorflow-cpu.)
try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # devices already initialised by someone else
    pass

IMAGE_FOLDER = "image_folder"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
DEFAULT_EVAL_CROP_FRACTION = 0.875  # Inception's central crop
_MAX_CROP_ATTEMPTS = 10
_IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about the configured dataset."""

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    class_names: tuple[str, ...]


# --------------------------------------------------------------------------------------------
# Config access
# --------------------------------------------------------------------------------------------


def _get(config, name, default=None):
    """Reads an optional config field (works for ConfigDict, dict and plain objects)."""
    if hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def _splits(config):
    """(train_split, eval_split) from the config, defaults 'train' and 'validation'/'test'."""
    return _get(config, "train_split", "train"), _get(config, "eval_split", "")


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


# --------------------------------------------------------------------------------------------
# TFDS datasets
# --------------------------------------------------------------------------------------------


def prepare_dataset(name, data_dir=None, manual_dir=None, *, num_shards=None):
    """Builds TFDS dataset `name` into `data_dir` if it is not there yet; returns its builder.

    imagenet2012 is prepared from the two tars in `manual_dir` (checked first, with an error that
    says exactly which files to put where). Datasets are written as TFRecord (tf.data cannot read
    ArrayRecord). The embedded default 'sklearn_digits' needs no network. Both directories may
    be local or gs://.
    """
    data_dir = os.fspath(storage.path(data_dir, "config.data_dir")) if data_dir else None
    builder = tfds.builder(name, data_dir=data_dir, file_format="tfrecord")
    if builder.is_prepared():
        return builder
    # TFDS's own default when no manual_dir is given.
    manual = os.fspath(
        storage.path(
            manual_dir or storage.join(builder.data_dir_root, "downloads", "manual"),
            "config.manual_dir",
        )
    )
    if name.split(":")[0].split("/")[0] == "imagenet2012":
        missing = [f for f in _IMAGENET_TARS if not storage.exists(storage.join(manual, f))]
        if missing:
            raise FileNotFoundError(
                "imagenet2012 is not prepared in "
                f"{builder.data_dir} and its manual download is missing: put "
                + " and ".join(storage.join(manual, f) for f in missing)
                + " (the unmodified tars from https://image-net.org/download-images; "
                "ILSVRC2012_img_train.tar holds one tar per synset, e.g. n01440764.tar), "
                "or set config.manual_dir to the directory that holds them. Then run "
                "`python -m xception_jax.prepare_data --dataset imagenet2012 "
                f"--data_dir {data_dir or builder.data_dir_root} --manual_dir {manual}` "
                "(a few hours for the full dataset)."
            )
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=manual, try_download_gcs=False, num_shards=num_shards
        )
    )
    return builder


def _tfds_builder(config):
    """The prepared builder of config.dataset (built on first use)."""
    return prepare_dataset(
        config.dataset, _get(config, "data_dir", None), _get(config, "manual_dir", None)
    )


def _tfds_keys(builder):
    """(image key, label key) of a TFDS image-classification dataset."""
    keys = builder.info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys
    return "image", "label"


def _default_eval_split(split_names):
    """'validation' when the dataset has one, else 'test'."""
    return "validation" if "validation" in split_names else "test"


# --------------------------------------------------------------------------------------------
# Splits: a split cut into logical shards, each a dataset of cheap, undecoded records
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Split:
    """A split cut into `len(sizes)` logical shards, before decoding.

    `records(shard, epoch_seed, parallel_reads=1, read_buffer=8 MiB)` is one pass over shard
    `shard` (an int or an int64 scalar tensor): with a seed the file order is shuffled (None: a
    fixed order); the order is a function of (shard, seed, the dataset) alone. `parallel_reads`
    and `read_buffer` only set how much is read at once. `load(record)` turns a record into
    {'image': encoded bytes, 'label'}; `sizes[k]` counts shard k's records; `describe(record)`
    names a record in error messages.
    """

    sizes: tuple[int, ...]
    records: Callable
    load: Callable
    describe: Callable


def _tfds_split(config, split, num_shards):
    """A TFDS split in `num_shards` even sub-splits (the sub-splits of tfds.even_splits)."""
    builder = _tfds_builder(config)
    image_key, label_key = _tfds_keys(builder)
    parts = [
        builder.info.splits[
            tfds.split_for_jax_process(split, process_index=k, process_count=num_shards)
        ]
        for k in range(num_shards)
    ]
    instructions = [part.file_instructions for part in parts]
    # Shard k's file instructions are rows bounds[k]:bounds[k+1] of one table.
    bounds = tf.constant(np.cumsum([0] + [len(i) for i in instructions]), tf.int64)
    table = [fi for part in instructions for fi in part]
    filenames = tf.constant([os.fspath(fi.filename) for fi in table], tf.string)
    skips = tf.constant([fi.skip for fi in table], tf.int64)
    takes = tf.constant([fi.take for fi in table], tf.int64)
    max_files = max(len(i) for i in instructions)
    cycle = max(1, min(16, max_files))  # a function of the split and num_shards: fixes the order
    features = builder.info.features

    def records(shard, epoch_seed, parallel_reads=1, read_buffer=8 << 20):
        rows = slice(bounds[shard], bounds[shard + 1])
        ds = tf.data.Dataset.from_tensor_slices((filenames[rows], skips[rows], takes[rows]))
        if epoch_seed is not None:
            ds = ds.shuffle(max_files, seed=epoch_seed, reshuffle_each_iteration=False)
        parallel = min(parallel_reads, cycle)
        return ds.interleave(
            lambda f, s, t: tf.data.TFRecordDataset(f, buffer_size=read_buffer).skip(s).take(t),
            cycle_length=cycle,
            block_length=1,
            **({"num_parallel_calls": parallel, "deterministic": True} if parallel > 1 else {}),
        )

    def load(serialized):
        # Parsing the proto is cheap; the image stays encoded (decoded after any skip).
        ex = features.deserialize_example(
            serialized, decoders={image_key: tfds.decode.SkipDecoding()}
        )
        return {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int32)}

    return _Split(
        sizes=tuple(part.num_examples for part in parts),
        records=records,
        load=load,
        describe=lambda record: f"a record of TFDS dataset {config.dataset!r} split {split!r}",
    )


def _folder_root(config):
    """config.image_folder (local or gs://), checked to exist."""
    root = _get(config, "image_folder", "")
    root = os.fspath(storage.path(root, "config.image_folder")) if root else ""
    if not root or not storage.isdir(root):
        raise FileNotFoundError(
            f"config.dataset='image_folder' needs config.image_folder to name a directory laid "
            f"out as <root>/<split>/<class name>/<image>; got {root!r}."
        )
    return root


def _folder_classes(root):
    """Sorted union of the class subdirectories of every split directory under root."""
    splits = storage.subdirs(root)
    return tuple(sorted({c for s in splits for c in storage.subdirs(storage.join(root, s))}))


def _folder_files(root, split, class_names):
    """Sorted (paths, labels) of the images of one split of an image folder."""
    split_dir = storage.join(root, split)
    if not storage.isdir(split_dir):
        present = sorted(storage.subdirs(root))
        raise FileNotFoundError(
            f"image folder split {split!r} not found: expected the directory {split_dir} "
            f"(<root>/<split>/<class name>/<image>); splits present: {present}."
        )
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = storage.join(split_dir, name)
        if not storage.isdir(class_dir):
            continue
        for fname in sorted(storage.listdir(class_dir)):
            if fname.lower().endswith(IMAGE_EXTENSIONS) and not fname.startswith("."):
                paths.append(storage.join(class_dir, fname))
                labels.append(label)
    if not paths:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {split_dir}/<class name>/: an "
            "image folder is laid out as <root>/<split>/<class name>/<image>."
        )
    return paths, labels


def _folder_split(config, split, num_shards):
    """An image-folder split in `num_shards` shards: shard k holds every num_shards-th file from
    the k-th (no TFDS sub-splits needed)."""
    root = _folder_root(config)
    paths, labels = _folder_files(root, split, _folder_classes(root))
    all_paths = tf.constant(paths, tf.string)
    all_labels = tf.constant(labels, tf.int32)
    sizes = tuple(len(paths[k::num_shards]) for k in range(num_shards))

    def records(shard, epoch_seed, parallel_reads=1, read_buffer=None):
        del parallel_reads, read_buffer  # The records are just (path, label).
        ds = tf.data.Dataset.from_tensor_slices(
            {"path": all_paths[shard::num_shards], "label": all_labels[shard::num_shards]}
        )
        if epoch_seed is not None:  # The shuffle and any skip never touch the image files.
            ds = ds.shuffle(max(sizes), seed=epoch_seed, reshuffle_each_iteration=False)
        return ds

    def load(record):
        return {"image": tf.io.read_file(record["path"]), "label": record["label"]}

    return _Split(
        sizes=sizes,
        records=records,
        load=load,
        describe=lambda record: os.fsdecode(record["path"]),
    )


def _split(config, split, num_shards):
    """Split `split` of config.dataset in `num_shards` logical shards."""
    if config.dataset == IMAGE_FOLDER:
        return _folder_split(config, split, num_shards)
    return _tfds_split(config, split, num_shards)


def _resolve_eval_split(config):
    """config.eval_split, or 'validation'/'test' (whichever exists) when empty."""
    _, eval_split = _splits(config)
    if eval_split:
        return eval_split
    if config.dataset == IMAGE_FOLDER:
        root = _folder_root(config)
        return _default_eval_split(storage.subdirs(root))
    return _default_eval_split(_tfds_builder(config).info.splits.keys())


# --------------------------------------------------------------------------------------------
# Preprocessing (graph functions; all randomness is stateless)
# --------------------------------------------------------------------------------------------


def _decode_and_crop(encoded, crop_window_fn):
    """Decodes an image to RGB uint8, keeping only crop_window_fn(shape) = (y, x, h, w).

    JPEGs are decoded straight into the window (tf.image.decode_and_crop_jpeg: only the crop's
    pixels are decompressed); other formats (PNG, BMP, GIF) are decoded whole and then sliced.
    """

    def jpeg():
        window = crop_window_fn(tf.image.extract_jpeg_shape(encoded))
        return tf.image.decode_and_crop_jpeg(encoded, tf.stack(window), channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        y, x, h, w = crop_window_fn(tf.shape(image))
        return image[y : y + h, x : x + w]

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _resize_uint8(image, image_size):
    """Bilinear resize to image_size x image_size, rounded back to uint8."""
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def preprocess_train(
    encoded,
    seed,
    *,
    image_size,
    area_range=(0.08, 1.0),
    aspect_range=(3 / 4, 4 / 3),
    random_flip=True,
):
    """Inception-style training crop of one encoded image -> uint8 [image_size, image_size, 3].

    A window with area in `area_range` (fraction of the image) and aspect ratio in
    `aspect_range` is sampled by tf.image.stateless_sample_distorted_bounding_box (the whole
    image after 10 failed attempts), decoded, flipped left-right with probability 1/2 when
    `random_flip`, and resized. `seed` (int tensor of shape [2]) fixes every random choice.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=crop_seed,
            min_object_covered=0.0,
            aspect_ratio_range=tuple(float(a) for a in aspect_range),
            area_range=tuple(float(a) for a in area_range),
            max_attempts=_MAX_CROP_ATTEMPTS,
            use_image_if_no_bounding_boxes=True,
        )
        return [begin[0], begin[1], size[0], size[1]]

    image = _decode_and_crop(encoded, window)
    if random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return _resize_uint8(image, image_size)


def preprocess_eval(encoded, *, image_size, crop_fraction=DEFAULT_EVAL_CROP_FRACTION):
    """Inception-style evaluation: central crop of `crop_fraction` of each side, then resize."""

    def window(shape):
        # Same window as tf.image.central_crop(image, crop_fraction).
        h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
        y = tf.cast((h - h * crop_fraction) / 2, tf.int32)
        x = tf.cast((w - w * crop_fraction) / 2, tf.int32)
        return [y, x, shape[0] - 2 * y, shape[1] - 2 * x]

    return _resize_uint8(_decode_and_crop(encoded, window), image_size)


def _example_seed(seed, shard, position, num_shards):
    """Stateless seed of the example at `position` of shard `shard`'s stream: a function of the
    example's place in the data order, whichever process reads it."""
    global_index = tf.cast(position, tf.int64) * num_shards + tf.cast(shard, tf.int64)
    return tf.stack([tf.constant(seed, tf.int64), global_index])


def _epoch_seed(seed, shard, epoch, salt):
    """A 63-bit shuffle seed that is a hash of (seed, shard, epoch, salt)."""
    counter = (tf.cast(shard, tf.int64) * 2**32 + tf.cast(epoch, tf.int64)) * 2 + salt
    key = tf.stack([tf.constant(seed, tf.int64), counter])
    bits = tf.random.stateless_uniform([], seed=key, minval=None, maxval=None, dtype=tf.int64)
    return tf.bitwise.bitwise_and(bits, tf.constant(2**63 - 1, tf.int64))


def _options(ds):
    """Deterministic order, autotuned parallelism."""
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    return ds.with_options(options)


# --------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------


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
            preprocess_eval(encoded, image_size=8, crop_fraction=1.0)
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
            return split.describe(
                {k: v.numpy() for k, v in record.items()} if isinstance(record, dict) else record
            )
    return None


def _check_no_empty_shard(split_sizes, layout, batch_size, split_name):
    """Refuses more shards than the split has examples (some would be empty)."""
    total = sum(split_sizes)
    if min(split_sizes) == 0:
        fits = max(d for d in range(1, total + 1) if batch_size % d == 0)
        raise ValueError(
            f"config.data_shards={layout.num_shards} is more than split {split_name!r} has "
            f"examples ({total}): some shards would be empty. Use data_shards={fits} (a divisor "
            f"of config.batch_size={batch_size} no larger than {total})."
        )


def _train_records(config, start_step, process_index, process_count):
    """This process's undecoded training records from step `start_step` on, in batch order.

    Returns (records, split, layout): `records` is an endless dataset of {'shard', 'position',
    'record'} in which each local batch is layout.per_step consecutive examples of each of the
    process's shards, in shard order; `position` counts the examples of that shard's stream.
    """
    layout = data_shards.layout(
        int(config.batch_size), _get(config, "data_shards", 1), process_index, process_count
    )
    train_split, _ = _splits(config)
    split = _split(config, train_split, layout.num_shards)
    _check_no_empty_shard(split.sizes, layout, int(config.batch_size), train_split)
    seed = int(_get(config, "seed", 0))
    # One buffer of shuffle_buffer records for the whole data, divided among the shards: a host
    # holds the buffers of its own shards only.
    shuffle_buffer = int(_get(config, "shuffle_buffer", 10_000)) // layout.num_shards
    sizes = tf.constant(split.sizes, tf.int64)
    # How much is read at once is spread over the process's shards; the order does not change.
    parallel_reads = max(1, 16 // layout.count)
    read_buffer = max(256 << 10, (8 << 20) // layout.count)

    def shard_stream(shard):
        def epoch(e):
            records = split.records(
                shard, _epoch_seed(seed, shard, e, salt=0), parallel_reads, read_buffer
            )
            if shuffle_buffer > 1:
                records = records.shuffle(
                    shuffle_buffer,
                    seed=_epoch_seed(seed, shard, e, salt=1),
                    reshuffle_each_iteration=False,
                )
            return records

        # The shard's stream is a sequence of its epochs; the records that steps before
        # start_step took from it are skipped while they are still encoded.
        start = tf.constant(int(start_step) * layout.per_step, tf.int64)
        start_epoch, offset = start // sizes[shard], start % sizes[shard]
        records = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
        positions = tf.data.Dataset.range(start, 2**62)
        return tf.data.Dataset.zip(positions, records).map(
            lambda position, record: {"shard": shard, "position": position, "record": record}
        )

    shards = tf.data.Dataset.range(layout.first, layout.first + layout.count)
    # Parallel: the shards' skips on resume, and their reads, run side by side.
    parallel = min(layout.count, 16)
    records = shards.interleave(
        shard_stream,
        cycle_length=layout.count,
        block_length=layout.per_step,
        **({"num_parallel_calls": parallel, "deterministic": True} if parallel > 1 else {}),
    )
    return records, split, layout


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
    records, split, layout = _train_records(config, start_step, process_index, process_count)
    seed = int(_get(config, "seed", 0))
    augment = functools.partial(
        preprocess_train,
        image_size=int(config.image_size),
        area_range=tuple(_get(config, "crop_area_range", (0.08, 1.0))),
        aspect_range=tuple(_get(config, "crop_aspect_range", (3 / 4, 4 / 3))),
        random_flip=bool(_get(config, "random_flip", True)),
    )

    def process(element):
        example = split.load(element["record"])
        example_seed = _example_seed(seed, element["shard"], element["position"], layout.num_shards)
        return {"image": augment(example["image"], example_seed), "label": example["label"]}

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
    records over all shards, read in parallel; README "Replaying a step").
    """
    batch = next(train_iterator(config, step, step + 1, process_index=0, process_count=1))
    return batch["image"], batch["label"]


def _eval_part(config, process_index, process_count):
    """(this process's eval records, the split, eval batch per process, batches per pass).

    The eval split is cut into one part per process: the order of evaluation does not matter.
    """
    local_batch = _local_batch_size(int(config.eval_batch_size), process_count, "eval_batch_size")
    split = _split(config, _resolve_eval_split(config), process_count)
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
    crop_fraction = float(_get(config, "eval_crop_fraction", DEFAULT_EVAL_CROP_FRACTION))
    num_padding = num_batches * local_batch - split.sizes[process_index]

    def process(record):
        example = split.load(record)
        image = preprocess_eval(
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


def get_dataset_info(config) -> DatasetInfo:
    """Classes and split sizes of config.dataset (builds the embedded default on first use)."""
    train_split, _ = _splits(config)
    eval_split = _resolve_eval_split(config)
    if config.dataset == IMAGE_FOLDER:
        root = _folder_root(config)
        names = _folder_classes(root)
        return DatasetInfo(
            num_classes=len(names),
            num_train_examples=len(_folder_files(root, train_split, names)[0]),
            num_eval_examples=len(_folder_files(root, eval_split, names)[0]),
            class_names=names,
        )
    builder = _tfds_builder(config)
    _, label_key = _tfds_keys(builder)
    label = builder.info.features[label_key]
    return DatasetInfo(
        num_classes=label.num_classes,
        num_train_examples=builder.info.splits[train_split].num_examples,
        num_eval_examples=builder.info.splits[eval_split].num_examples,
        class_names=tuple(label.names),
    )


# --------------------------------------------------------------------------------------------
# Host -> device
# --------------------------------------------------------------------------------------------


def _batch_sharding(mesh_or_sharding):
    """NamedSharding over the batch axis 'data' for a Mesh; a Sharding is used as is."""
    if isinstance(mesh_or_sharding, jax.sharding.Mesh):
        return jax.sharding.NamedSharding(mesh_or_sharding, jax.sharding.PartitionSpec("data"))
    return mesh_or_sharding


def to_global_batch(batch, mesh_or_sharding):
    """Per-process numpy batch -> dict of global jax.Arrays sharded on the batch axis ('data').

    Every process passes its own part; the global batch is their concatenation in process order
    (jax.make_array_from_process_local_data).
    """
    sharding = _batch_sharding(mesh_or_sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


_END = object()


class _Failure:
    """An exception raised in the prefetch thread, re-raised in the consumer."""

    def __init__(self, exc):
        self.exc = exc


def prefetch_to_device(iterator, size, sharding):
    """Yields to_global_batch(batch, sharding) for each batch, `size` batches ahead.

    A background thread pulls batches from `iterator` and starts their (asynchronous) transfer,
    so input preparation and host->device copies overlap the training step. size <= 0: no
    thread, plain conversion. Closing the generator stops the thread at its next batch.
    """
    if size <= 0:
        return (to_global_batch(batch, sharding) for batch in iterator)
    buffer = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in iterator:
                if not put(to_global_batch(batch, sharding)):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            put(_Failure(exc))
        finally:
            if hasattr(iterator, "close"):  # Release tf.data's threads in this thread.
                iterator.close()

    thread = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
    thread.start()

    def consume():
        try:
            while True:
                item = buffer.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            # Wait for the producer to leave tf.data: a daemon thread still inside TF's C++ code
            # at interpreter exit aborts the process ("FATAL: exception not rethrown").
            thread.join()

    return consume()
