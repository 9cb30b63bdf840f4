"""The embedded default TFDS dataset and the real imagenet2012 builder, built offline."""

import os

import numpy as np
import pytest


def _read_split(data_dir, name, split):
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    return builder, list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def test_sklearn_digits_builds_and_reads_back_every_example(digits_data_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    builder, train = _read_split(digits_data_dir, "sklearn_digits", "train")
    _, test = _read_split(digits_data_dir, "sklearn_digits", "test")
    assert (len(train), len(test)) == (1347, 450)

    # Same feature spec as imagenet2012: JPEG RGB image, ClassLabel '0'..'9', file_name.
    features = builder.info.features
    assert set(features.keys()) == {"image", "label", "file_name"}
    assert features["image"].encoding_format == "jpeg"
    assert features["label"].names == [str(i) for i in range(10)]
    assert builder.info.file_format.value == "tfrecord"

    seen = []
    for split, examples, indices in (
        ("train", train, range(1347)),
        ("test", test, range(1347, 1797)),
    ):
        got = sorted(int(ex["file_name"].decode()[6:10]) for ex in examples)
        assert got == list(indices), split  # deterministic split: train first 1347, test last 450
        for ex in examples:
            i = int(ex["file_name"].decode()[6:10])
            assert ex["label"] == digits.target[i]
            seen.append(i)
            assert ex["image"].shape == (64, 64, 3) and ex["image"].dtype == np.uint8
    assert sorted(seen) == list(range(1797))

    # The stored image is the digit: averaging 8x8 blocks gives back the 0..16 levels.
    ex = train[0]
    i = int(ex["file_name"].decode()[6:10])
    small = ex["image"][..., 0].reshape(8, 8, 8, 8).mean(axis=(1, 3)) * 16 / 255
    assert np.abs(small - digits.images[i]).mean() < 1.5


def test_imagenet2012_builder_prepares_from_fake_ilsvrc_tars(fake_imagenet):
    fake = fake_imagenet
    builder, train = _read_split(fake.data_dir, "imagenet2012", "train")
    _, val = _read_split(fake.data_dir, "imagenet2012", "validation")
    assert len(train) == len(fake.train_synsets) * fake.train_per_class
    for ex in train:  # train labels come from the per-class tar names
        synset = ex["file_name"].decode().split("_")[0]
        assert builder.info.features["label"].int2str(ex["label"]) == synset
        assert ex["label"] == fake.names.index(synset)
    # validation labels come from TFDS's bundled list, in sorted file-name order
    got = sorted((ex["file_name"].decode(), int(ex["label"])) for ex in val)
    want = [
        (f"ILSVRC2012_val_{i + 1:08d}.JPEG", fake.names.index(s))
        for i, s in enumerate(fake.val_synsets)
    ]
    assert got == want


def test_imagenet2012_missing_tars_error_names_the_files(tmp_path):
    from xception_jax.data import sources

    manual = tmp_path / "manual"
    with pytest.raises(FileNotFoundError) as err:
        sources.prepare_dataset("imagenet2012", str(tmp_path / "tfds"), str(manual))
    message = str(err.value)
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        assert os.path.join(str(manual), name) in message
    assert "xception_jax.prepare_data" in message
