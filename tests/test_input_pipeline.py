"""The input pipeline on real TFDS files and image folders, offline, with simulated processes."""

import collections
import io
import itertools

import numpy as np
import pytest

from xception_jax.data import feeding, pipeline, preprocessing, sources

# Deterministic "augmentation": the whole image, unflipped, so that the training stream can be
# compared example by example with an evaluation pass (central crop of fraction 1).
IDENTITY_CROP = dict(crop_area_range=(1.0, 1.0), crop_aspect_range=(1.0, 1.0), random_flip=False)


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _examples(batches, n=None):
    """(image bytes, label) of the (masked-in) examples of the batches, the first n if given."""
    out = []
    for b in batches:
        mask = b.get("mask", np.ones(len(b["label"]), bool))
        out += [
            (im.tobytes(), int(lb))
            for im, lb, m in zip(b["image"], b["label"], mask, strict=True)
            if m
        ]
    return out[:n] if n is not None else out


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_train_batches_have_configured_size_dtype_and_labels(digits_data_dir, data_config):
    config = data_config(data_dir=digits_data_dir, image_size=24, batch_size=32)
    batch = next(pipeline.train_iterator(config))
    assert batch["image"].shape == (32, 24, 24, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() < 10
    info = sources.get_dataset_info(config)
    assert info.num_classes == 10 and info.class_names == tuple("0123456789")
    assert (info.num_train_examples, info.num_eval_examples) == (1347, 450)


def test_same_seed_gives_identical_batches(digits_data_dir, data_config):
    config = data_config(data_dir=digits_data_dir)
    a = _take(pipeline.train_iterator(config), 3)
    b = _take(pipeline.train_iterator(config), 3)
    _assert_same_batches(a, b)
    config.seed = 1
    c = _take(pipeline.train_iterator(config), 3)
    assert not np.array_equal(a[0]["label"], c[0]["label"])


@pytest.mark.parametrize(
    "process_count,data_dir", [(1, "digits_data_dir"), (2, "digits_sharded_data_dir")]
)
def test_start_at_step_k_equals_uninterrupted_across_epoch_boundary(
    request, data_config, process_count, data_dir
):
    # 450 examples, 32 per global step: epoch 0 ends inside step 14.
    data_dir = request.getfixturevalue(data_dir)
    config = data_config(data_dir=data_dir, train_split="test", batch_size=32)
    for index in range(process_count):
        kw = dict(process_index=index, process_count=process_count)
        uninterrupted = _take(pipeline.train_iterator(config, **kw), 17)
        resumed = _take(pipeline.train_iterator(config, start_step=13, **kw), 4)
        _assert_same_batches(uninterrupted[13:], resumed)


def _global_batches(config, steps, process_count, start_step=0):
    """The global batches of `steps` steps: every process's part, concatenated in process order
    (as jax.make_array_from_process_local_data places them)."""
    parts = [
        _take(
            pipeline.train_iterator(
                config, start_step, process_index=index, process_count=process_count
            ),
            steps,
        )
        for index in range(process_count)
    ]
    return [
        {k: np.concatenate([p[step][k] for p in parts]) for k in parts[0][step]}
        for step in range(steps)
    ]


def _fingerprints(batch):
    """One fingerprint per example: its pixels and label."""
    return collections.Counter(
        hash((image.tobytes(), int(label)))
        for image, label in zip(batch["image"], batch["label"], strict=True)
    )


@pytest.mark.parametrize("source", ["digits_sharded_data_dir", "noise_image_folder"])
def test_global_batches_are_the_same_on_any_process_count(request, data_config, source):
    # 4 logical shards; 1, 2 and 4 processes read 4, 2 and 1 of them. Step 4 starts the noise
    # folder's second epoch (32 images, 8 per step).
    path = request.getfixturevalue(source)
    if source == "noise_image_folder":
        config = data_config(dataset="image_folder", image_folder=path, batch_size=8)
    else:
        config = data_config(data_dir=path, batch_size=16)
    steps = 7
    reference = _global_batches(config, steps, 1)
    for process_count in (2, 4):
        for step, (one, many) in enumerate(
            zip(reference, _global_batches(config, steps, process_count), strict=True)
        ):
            # The same examples with the same augmentation, in the same places.
            assert _fingerprints(one) == _fingerprints(many), (process_count, step)
            _assert_same_batches([one], [many])
    # global_batch replays any step in one process, without the steps before it.
    for step in (0, 6):
        images, labels = pipeline.global_batch(config, step)
        _assert_same_batches([{"image": images, "label": labels}], [reference[step]])
    # Another seed is another order.
    config.seed = 1
    assert _fingerprints(_global_batches(config, 1, 2)[0]) != _fingerprints(reference[0])


def test_resume_on_another_process_count_continues_the_same_batches(
    digits_sharded_data_dir, data_config
):
    # 450 examples in 4 shards (113, 113, 112, 112) of 8 per step: the first shard epochs end
    # inside step 14; the resumed streams start mid-epoch after the skip.
    config = data_config(data_dir=digits_sharded_data_dir, train_split="test", batch_size=32)
    uninterrupted = _global_batches(config, 17, 2)
    for process_count in (1, 4):
        resumed = _global_batches(config, 4, process_count, start_step=13)
        _assert_same_batches(uninterrupted[13:], resumed)


def test_each_epoch_of_the_shards_covers_the_split_once(digits_data_dir, data_config):
    # 450 examples in 2 shards of 225, 15 of each per step: steps 0-14 are the first epoch of
    # both shards, steps 15-29 the second.
    config = data_config(
        data_dir=digits_data_dir, train_split="test", eval_split="test", batch_size=30,
        data_shards=2, eval_crop_fraction=1.0, **IDENTITY_CROP,
    )  # fmt: skip
    whole = collections.Counter(_examples(pipeline.eval_iterator(config, process_count=1)))
    assert sum(whole.values()) == 450
    stream = _examples(_global_batches(config, 30, 2))
    assert collections.Counter(stream[:450]) == whole
    assert collections.Counter(stream[450:]) == whole
    assert stream[:450] != stream[450:]  # each epoch in its own order


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_eval_padding_counts_every_example_once(digits_data_dir, data_config, process_count):
    config = data_config(data_dir=digits_data_dir, eval_batch_size=48, eval_crop_fraction=1.0)
    reference = collections.Counter(_examples(pipeline.eval_iterator(config, process_count=1)))
    counts, batch_counts = collections.Counter(), set()
    for index in range(process_count):
        batches = list(
            pipeline.eval_iterator(config, process_index=index, process_count=process_count)
        )
        batch_counts.add(len(batches))
        for b in batches:
            assert b["image"].shape == (48 // process_count, 16, 16, 3)
            assert not b["image"][~b["mask"]].any()  # padding is blank and masked out
        counts.update(_examples(batches))
    assert len(batch_counts) == 1  # every process runs the same number of eval steps
    assert batch_counts.pop() == pipeline.num_eval_batches(config, process_count=process_count)
    assert sum(counts.values()) == 450 and counts == reference


def _make_folder(root, jpeg_of_color, color_of_label, corrupt=None):
    """root/<split>/<class>/<img>: classes 'cat','dog','eel' (labels 0,1,2), JPEG and PNG files
    of different sizes, each a solid colour given by its label."""
    from PIL import Image

    for split, per_class in (("train", 4), ("val", 2)):
        for label, name in enumerate(("cat", "dog", "eel")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                color = tuple(int(c) for c in color_of_label(label))
                if i % 2:
                    buf = io.BytesIO()
                    Image.new("RGB", (20 + 7 * i, 33), color).save(buf, format="PNG")
                    (d / f"img{i}.png").write_bytes(buf.getvalue())
                else:
                    (d / f"img{i}.jpg").write_bytes(jpeg_of_color(color, size=(41, 27 + i)))
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored")
    if corrupt:
        (root / corrupt).write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")


def _assert_colors_match_labels(batch, color_of_label, mask=None):
    for k, (image, label) in enumerate(zip(batch["image"], batch["label"], strict=True)):
        if mask is not None and not mask[k]:
            continue
        mean = image.reshape(-1, 3).mean(axis=0)
        np.testing.assert_allclose(mean, color_of_label(int(label)), atol=6)


def test_image_folder_keeps_labels_with_images(
    tmp_path, data_config, color_of_label, jpeg_of_color
):
    _make_folder(tmp_path, jpeg_of_color, color_of_label)
    config = data_config(
        dataset="image_folder", image_folder=str(tmp_path), eval_split="val", image_size=20,
        batch_size=8, eval_batch_size=4,
    )  # fmt: skip
    info = sources.get_dataset_info(config)
    assert info.class_names == ("cat", "dog", "eel")
    assert (info.num_train_examples, info.num_eval_examples) == (12, 6)
    for batch in _take(pipeline.train_iterator(config), 4):
        assert batch["image"].shape == (8, 20, 20, 3)
        _assert_colors_match_labels(batch, color_of_label)
    evals = list(pipeline.eval_iterator(config))
    assert sum(int(b["mask"].sum()) for b in evals) == 6
    for b in evals:
        _assert_colors_match_labels(b, color_of_label, b["mask"])


def test_image_folder_undecodable_file_is_named(
    tmp_path, data_config, color_of_label, jpeg_of_color
):
    _make_folder(tmp_path, jpeg_of_color, color_of_label, corrupt="val/dog/broken.jpg")
    config = data_config(
        dataset="image_folder", image_folder=str(tmp_path), eval_split="val", batch_size=4,
        eval_batch_size=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"val/dog/broken\.jpg"):
        list(pipeline.eval_iterator(config))
    config.train_split = "val"
    with pytest.raises(ValueError, match=r"val/dog/broken\.jpg"):
        _take(pipeline.train_iterator(config), 3)


def test_image_folder_missing_split_is_explained(tmp_path, data_config, jpeg_of_color):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").write_bytes(jpeg_of_color((1, 2, 3)))
    config = data_config(dataset="image_folder", image_folder=str(tmp_path), eval_split="val")
    with pytest.raises(
        FileNotFoundError, match=r"split 'val' not found.*splits present: \['train'\]"
    ):
        sources.get_dataset_info(config)


def test_fake_imagenet_batches_are_shaped_and_labelled(fake_imagenet, data_config, color_of_label):
    fake = fake_imagenet
    config = data_config(
        dataset="imagenet2012", data_dir=fake.data_dir, manual_dir=fake.manual_dir,
        eval_split="", image_size=32, batch_size=4, eval_batch_size=2,
    )  # fmt: skip
    info = sources.get_dataset_info(config)
    assert info.num_classes == 1000 and info.class_names[0] == "n01440764"
    assert (info.num_train_examples, info.num_eval_examples) == (9, 3)
    train_labels = {fake.names.index(s) for s in fake.train_synsets}
    for batch in _take(pipeline.train_iterator(config), 3):
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert set(batch["label"].tolist()) <= train_labels
        _assert_colors_match_labels(batch, color_of_label)
    evals = list(pipeline.eval_iterator(config))  # eval_split '' -> 'validation'
    labels = [int(lb) for b in evals for lb, m in zip(b["label"], b["mask"], strict=True) if m]
    assert sorted(labels) == sorted(fake.names.index(s) for s in fake.val_synsets)
    for b in evals:
        _assert_colors_match_labels(b, color_of_label, b["mask"])


def test_preprocessing_gives_configured_size_and_is_a_function_of_the_seed(jpeg_of_color):
    import tensorflow as tf
    from PIL import Image

    gradient = np.linspace(0, 255, 50 * 70 * 3).reshape(50, 70, 3).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(gradient).save(buf, format="PNG")
    for k, encoded in enumerate((buf.getvalue(), jpeg_of_color((10, 200, 30), size=(70, 50)))):
        out = [
            preprocessing.preprocess_train(
                tf.constant(encoded), tf.constant([0, s], tf.int64), image_size=29,
                area_range=(0.2, 1.0),
            ).numpy()
            for s in (1, 1, 2)
        ]  # fmt: skip
        assert out[0].shape == (29, 29, 3) and out[0].dtype == np.uint8
        np.testing.assert_array_equal(out[0], out[1])  # same seed, same crop and flip
        if k == 0:  # the gradient shows a different crop for another seed
            assert not np.array_equal(out[0], out[2])
        ev = preprocessing.preprocess_eval(tf.constant(encoded), image_size=17).numpy()
        assert ev.shape == (17, 17, 3) and ev.dtype == np.uint8


def test_global_batch_and_prefetch_to_device(digits_data_dir, data_config):
    import jax

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    n = len(jax.devices())
    config = data_config(data_dir=digits_data_dir, batch_size=8 * n)
    host = _take(pipeline.train_iterator(config), 3)
    device = list(feeding.prefetch_to_device(iter(host), 2, mesh))
    assert len(device) == 3
    for h, d in zip(host, device, strict=True):
        assert isinstance(d["image"], jax.Array) and d["image"].shape == h["image"].shape
        assert d["image"].sharding.spec == jax.sharding.PartitionSpec("data")
        np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
        np.testing.assert_array_equal(np.asarray(d["label"]), h["label"])

    def failing():
        yield host[0]
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        list(feeding.prefetch_to_device(failing(), 2, mesh))


def test_shards_that_do_not_fit_the_batch_or_the_processes_are_refused(
    digits_data_dir, data_config
):
    config = data_config(data_dir=digits_data_dir, batch_size=30, data_shards=4)
    with pytest.raises(ValueError, match=r"batch_size=30 is not a multiple of config.data_"
                       r"shards=4.*Use batch_size=28 or data_shards=3"):  # fmt: skip
        pipeline.train_iterator(config)
    config = data_config(data_dir=digits_data_dir, batch_size=24, data_shards=4)
    with pytest.raises(ValueError, match=r"data_shards=4 is not a multiple of the 3 processes.*"
                       r"divides 4 \(\[1, 2, 4\]\).*data_shards=12"):  # fmt: skip
        pipeline.train_iterator(config, process_index=0, process_count=3)
    config = data_config(data_dir=digits_data_dir, train_split="test[:3]", data_shards=4)
    with pytest.raises(
        ValueError,
        match=r"data_shards=4 is more than split 'test\[:3\]' has examples \(3\).*"
        r"Use data_shards=2",
    ):
        pipeline.train_iterator(config)


def test_a_resume_names_what_changes_its_data_order():
    import json

    from configs import default
    from xception_jax.data import shards

    config = default.get_config()
    stored = json.loads(config.to_json_best_effort())  # as a checkpoint's meta holds it
    assert shards.order_changes(stored, config) == []  # tuples stored as lists: no change
    config.data_shards, config.seed = 8, 3
    assert shards.order_changes(stored, config) == [
        "config.seed: 0 -> 3",
        "config.data_shards: 16 -> 8",
    ]
    config.num_train_steps = 10  # where a run stops is not its data order
    assert len(shards.order_changes(stored, config)) == 2
    # Augmentation changes the batches; a checkpoint from before config.augment had it off.
    del stored["augment"]
    assert len(shards.order_changes(stored, config)) == 2
    config.augment.randaugment_layers = 2
    assert shards.order_changes(stored, config)[-1] == "config.augment.randaugment_layers: 0 -> 2"
    del stored["data_shards"]  # a checkpoint from before data_shards
    assert "predates config.data_shards" in shards.order_changes(stored, config)[0]
