"""Where examples come from: TFDS datasets and image folders, as splits of undecoded records.

Sources (`config.dataset`):
- any TFDS image-classification dataset by name ('imagenet2012', 'cifar10', 'oxford_flowers102',
  the embedded default 'sklearn_digits', ...), read from `config.data_dir` and prepared on first
  use (`config.manual_dir` for manual downloads such as ImageNet's two tars);
- 'image_folder': `config.image_folder`/<split>/<class name>/<image file>.

A split is cut into logical shards (`Split`): TFDS's even sub-splits, the same as
`tfds.split_for_jax_process` with that many processes; every num_shards-th file of an image
folder. Records stay encoded here (cheap to skip); `data/pipeline.py` decodes them.
"""

import dataclasses
import os
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import xception_jax.data.sklearn_digits  # noqa: F401  (registers 'sklearn_digits' with TFDS)
from xception_jax.data.names import IMAGE_FOLDER, dataset_name_errors
from xception_jax.platform import storage
from xception_jax.platform.errors import UsageError

# TF must not reserve accelerator memory: JAX owns the devices. (A no-op with tensorflow-cpu.)
try:
    tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # devices already initialised by someone else
    pass

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about the configured dataset."""

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    class_names: tuple[str, ...]


def config_field(config, name, default=None):
    """Reads an optional config field (works for ConfigDict, dict and plain objects)."""
    if hasattr(config, "get"):
        value = config.get(name, default)
    else:
        value = getattr(config, name, default)
    return default if value is None else value


def split_names(config):
    """(train_split, eval_split) from the config, defaults 'train' and 'validation'/'test'."""
    return config_field(config, "train_split", "train"), config_field(config, "eval_split", "")


def prepare_dataset(name, data_dir=None, manual_dir=None, *, num_shards=None):
    """Builds TFDS dataset `name` into `data_dir` if it is not there yet; returns its builder.

    imagenet2012 is prepared from the two tars in `manual_dir` (checked first, with an error that
    says exactly which files to put where). Datasets are written as TFRecord (tf.data cannot read
    ArrayRecord). The embedded default 'sklearn_digits' needs no network. Both directories may
    be local or gs://.
    """
    data_dir = os.fspath(storage.path(data_dir, "config.data_dir")) if data_dir else None
    unknown = dataset_name_errors(name)
    if unknown:
        raise UsageError(unknown[0])
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
        config.dataset,
        config_field(config, "data_dir", None),
        config_field(config, "manual_dir", None),
    )


def _tfds_keys(builder):
    """(image key, label key) of a TFDS image-classification dataset."""
    keys = builder.info.supervised_keys
    if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
        return keys
    return "image", "label"


def _default_eval_split(names):
    """'validation' when the dataset has one, else 'test'."""
    return "validation" if "validation" in names else "test"


@dataclasses.dataclass
class Split:
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

    return Split(
        sizes=tuple(part.num_examples for part in parts),
        records=records,
        load=load,
        describe=lambda record: f"a record of TFDS dataset {config.dataset!r} split {split!r}",
    )


def folder_root(config):
    """config.image_folder (local or gs://), checked to exist."""
    root = config_field(config, "image_folder", "")
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
    root = folder_root(config)
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

    return Split(
        sizes=sizes,
        records=records,
        load=load,
        describe=lambda record: os.fsdecode(record["path"]),
    )


def get_split(config, split, num_shards):
    """Split `split` of config.dataset in `num_shards` logical shards."""
    if config.dataset == IMAGE_FOLDER:
        return _folder_split(config, split, num_shards)
    return _tfds_split(config, split, num_shards)


def resolve_eval_split(config):
    """config.eval_split, or 'validation'/'test' (whichever exists) when empty."""
    _, eval_split = split_names(config)
    if eval_split:
        return eval_split
    if config.dataset == IMAGE_FOLDER:
        root = folder_root(config)
        return _default_eval_split(storage.subdirs(root))
    return _default_eval_split(_tfds_builder(config).info.splits.keys())


def get_dataset_info(config) -> DatasetInfo:
    """Classes and split sizes of config.dataset (builds the embedded default on first use)."""
    train_split, _ = split_names(config)
    eval_split = resolve_eval_split(config)
    if config.dataset == IMAGE_FOLDER:
        root = folder_root(config)
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
    for field, split in (("train_split", train_split), ("eval_split", eval_split)):
        if split not in builder.info.splits:
            raise UsageError(
                f"config.{field}={split!r} is not a split of dataset {config.dataset!r}; its "
                f"splits: {sorted(builder.info.splits.keys())}."
            )
    return DatasetInfo(
        num_classes=label.num_classes,
        num_train_examples=builder.info.splits[train_split].num_examples,
        num_eval_examples=builder.info.splits[eval_split].num_examples,
        class_names=tuple(label.names),
    )
