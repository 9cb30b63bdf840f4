"""Input pipeline: TFDS or an image folder -> tf.data -> per-process uint8 batches -> global arrays.

Sources (`config.dataset`):
- any TFDS image-classification dataset by name ('imagenet2012', 'cifar10', 'oxford_flowers102',
  the embedded default 'sklearn_digits', ...), read from `config.data_dir` and prepared on first
  use (`config.manual_dir` for manual downloads such as ImageNet's two tars);
- 'image_folder': `config.image_folder`/<split>/<class name>/<image file>.

Each process reads only its own part of a split: TFDS's `even_splits` for TFDS datasets (the same
sub-splits as `tfds.split_for_jax_process`), every `process_count`-th file for an image folder.

Determinism and exact resume. A process's training stream is a continuous sequence of epochs of
its shard. Epoch e reads the shard's files in an order shuffled with seed f(seed, e) and passes
the records through a shuffle buffer seeded with f(seed, e), so the order is a function of
(seed, epoch) alone and every epoch consumes each example of the shard exactly once (a batch may
straddle two epochs). The augmentation of the example at position p of the stream is seeded with
(seed, p * process_count + process_index) through TF's stateless random ops, never by TF's
stateful generator. `train_iterator(config, start_step)` starts the stream at epoch
(start_step * B_local) // n, skips the (start_step * B_local) % n already consumed records while
they are still encoded (no JPEG decoding), and numbers the following examples from
start_step * B_local: the batches are then exactly those of an uninterrupted iterator.

Images leave the pipeline as uint8 (scaling to [-1, 1] happens on the device).
"""

import dataclasses
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
from xception_jax import storage

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
# Sources: an unshuffled dataset of cheap, undecoded records for one process's part of a split
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Source:
    """One process's part of a split, before decoding.

    `files(epoch_seed)` gives the records of one pass; with a seed the file order is shuffled
    (None: fixed order). `load(record)` turns a record into {'image': encoded bytes, 'label'}.
    `num_examples` counts this process's records, `max_num_examples` the largest part of any
    process. `describe(record)` names a record in error messages.
    """

    files: Callable
    load: Callable
    num_examples: int
    max_num_examples: int
    describe: Callable


def _tfds_source(config, split, process_index, process_count):
    """A TFDS split's part for one process (even_splits, like tfds.split_for_jax_process)."""
    builder = _tfds_builder(config)
    image_key, label_key = _tfds_keys(builder)

    def subsplit(i):
        return tfds.split_for_jax_process(split, process_index=i, process_count=process_count)

    sizes = [builder.info.splits[subsplit(i)].num_examples for i in range(process_count)]
    instructions = builder.info.splits[subsplit(process_index)].file_instructions
    filenames = tf.constant([os.fspath(fi.filename) for fi in instructions], tf.string)
    skips = tf.constant([fi.skip for fi in instructions], tf.int64)
    takes = tf.constant([fi.take for fi in instructions], tf.int64)
    features = builder.info.features
    cycle = max(1, min(16, len(instructions)))

    def files(epoch_seed):
        ds = tf.data.Dataset.from_tensor_slices((filenames, skips, takes))
        if epoch_seed is not None:
            ds = ds.shuffle(len(instructions), seed=epoch_seed, reshuffle_each_iteration=False)
        return ds.interleave(
            lambda f, s, t: tf.data.TFRecordDataset(f, buffer_size=8 << 20).skip(s).take(t),
            cycle_length=cycle,
            block_length=1,
            **({"num_parallel_calls": cycle, "deterministic": True} if cycle > 1 else {}),
        )

    def load(serialized):
        # Parsing the proto is cheap; the image stays encoded (decoded after any skip).
        ex = features.deserialize_example(
            serialized, decoders={image_key: tfds.decode.SkipDecoding()}
        )
        return {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int32)}

    return _Source(
        files=files,
        load=load,
        num_examples=sizes[process_index],
        max_num_examples=max(sizes),
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


def _folder_source(config, split, process_index, process_count):
    """Every process_count-th file of an image-folder split (no TFDS sub-splits needed)."""
    root = _folder_root(config)
    paths, labels = _folder_files(root, split, _folder_classes(root))
    mine_paths = paths[process_index::process_count]
    mine_labels = np.asarray(labels[process_index::process_count], np.int32)
    sizes = [len(paths[i::process_count]) for i in range(process_count)]

    def files(epoch_seed):
        # Records are just (path, label): the shuffle and any skip never touch the image files.
        ds = tf.data.Dataset.from_tensor_slices({"path": mine_paths, "label": mine_labels})
        if epoch_seed is not None:
            ds = ds.shuffle(len(mine_paths), seed=epoch_seed, reshuffle_each_iteration=False)
        return ds

    def load(record):
        return {"image": tf.io.read_file(record["path"]), "label": record["label"]}

    return _Source(
        files=files,
        load=load,
        num_examples=sizes[process_index],
        max_num_examples=max(sizes),
        describe=lambda record: os.fsdecode(record["path"]),
    )


def _source(config, split, process_index, process_count):
    """The source for config.dataset."""
    if config.dataset == IMAGE_FOLDER:
        return _folder_source(config, split, process_index, process_count)
    return _tfds_source(config, split, process_index, process_count)


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


def _example_seed(seed, position, process_index, process_count):
    """Stateless seed of the example at `position` of this process's stream."""
    global_index = position * process_count + process_index
    return tf.stack([tf.constant(seed, tf.int64), tf.cast(global_index, tf.int64)])


def _epoch_seed(seed, epoch, salt):
    """A 63-bit shuffle seed that is a hash of (seed, epoch, salt)."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64) * 2 + salt])
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


def _numpy_batches(ds, records_ds, source, batch_size):
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
            bad = _find_undecodable(records_ds.skip(count * batch_size).take(batch_size), source)
            if bad is None:
                raise
            raise ValueError(
                f"cannot decode image {bad}: {err.message.splitlines()[0]} "
                "Remove or replace this file (or re-encode it as JPEG/PNG)."
            ) from err
        count += 1
        yield batch


def _find_undecodable(records_ds, source):
    """Description of the first record of records_ds whose image fails to decode, or None."""
    for record in records_ds:
        encoded = source.load(record)["image"]
        try:
            preprocess_eval(encoded, image_size=8, crop_fraction=1.0)
        except (tf.errors.InvalidArgumentError, tf.errors.DataLossError):
            return source.describe(
                {k: v.numpy() for k, v in record.items()} if isinstance(record, dict) else record
            )
    return None


def train_iterator(
    config, start_step=0, stop_step=None, *, process_index=None, process_count=None
) -> Iterator[dict]:
    """Per-process training batches {'image': uint8 [B_local,S,S,3], 'label': int32} of steps
    [start_step, stop_step) (endless when stop_step is None).

    B_local = config.batch_size // process_count. The sequence is a function of (config.seed,
    epoch); starting at `start_step` yields exactly the batches an uninterrupted iterator yields
    from that step (see the module docstring for how). process_index / process_count default to
    jax.process_index() / jax.process_count(); tests override them to simulate several hosts.
    """
    process_index, process_count = _processes(process_index, process_count)
    local_batch = _local_batch_size(int(config.batch_size), process_count, "batch_size")
    train_split, _ = _splits(config)
    source = _source(config, train_split, process_index, process_count)
    if source.num_examples == 0:
        raise ValueError(f"process {process_index} has no examples of split {train_split!r}.")
    seed = int(_get(config, "seed", 0))
    image_size = int(config.image_size)
    area_range = tuple(_get(config, "crop_area_range", (0.08, 1.0)))
    aspect_range = tuple(_get(config, "crop_aspect_range", (3 / 4, 4 / 3)))
    random_flip = bool(_get(config, "random_flip", True))
    shuffle_buffer = int(_get(config, "shuffle_buffer", 10_000))

    start = int(start_step) * local_batch  # position in this process's stream
    start_epoch, offset = divmod(start, source.num_examples)

    def epoch(e):
        records = source.files(_epoch_seed(seed, e, salt=0))  # file order
        if shuffle_buffer > 1:
            records = records.shuffle(
                shuffle_buffer, seed=_epoch_seed(seed, e, salt=1), reshuffle_each_iteration=False
            )
        return records

    # Endless stream of epochs; the consumed records are skipped while still undecoded.
    records = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)

    def process(position, record):
        example = source.load(record)
        image = preprocess_train(
            example["image"],
            _example_seed(seed, position, process_index, process_count),
            image_size=image_size,
            area_range=area_range,
            aspect_range=aspect_range,
            random_flip=random_flip,
        )
        return {"image": image, "label": example["label"]}

    ds = records.enumerate(start=start)
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True)
    if stop_step is not None:
        ds = ds.take(max(int(stop_step) - int(start_step), 0))
    ds = ds.prefetch(tf.data.AUTOTUNE)
    return _numpy_batches(_options(ds), records, source, local_batch)


def num_eval_batches(config, *, process_count=None):
    """Number of batches of one eval pass (the same on every process)."""
    _, process_count = _processes(0, process_count)
    local_batch = _local_batch_size(int(config.eval_batch_size), process_count, "eval_batch_size")
    source = _source(config, _resolve_eval_split(config), 0, process_count)
    return math.ceil(source.max_num_examples / local_batch)


def eval_iterator(config, *, process_index=None, process_count=None) -> Iterator[dict]:
    """One pass over this process's part of the eval split, in a fixed order.

    Yields {'image': uint8 [B_local,S,S,3], 'label': int32, 'mask': bool}; B_local =
    config.eval_batch_size // process_count. The last batches are padded (zero images, label 0,
    mask False) so that every process yields ceil(largest part / B_local) batches and the masked
    examples count each example of the split exactly once.
    """
    process_index, process_count = _processes(process_index, process_count)
    local_batch = _local_batch_size(int(config.eval_batch_size), process_count, "eval_batch_size")
    source = _source(config, _resolve_eval_split(config), process_index, process_count)
    image_size = int(config.image_size)
    crop_fraction = float(_get(config, "eval_crop_fraction", DEFAULT_EVAL_CROP_FRACTION))
    num_batches = math.ceil(source.max_num_examples / local_batch)
    num_padding = num_batches * local_batch - source.num_examples

    def process(record):
        example = source.load(record)
        image = preprocess_eval(
            example["image"], image_size=image_size, crop_fraction=crop_fraction
        )
        return {"image": image, "label": example["label"], "mask": tf.constant(True)}

    records = source.files(None)
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
    return _numpy_batches(_options(ds), records, source, local_batch)


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
