"""Shared pytest fixtures. TensorFlow is imported inside fixtures only, so that test files that do
not use the data fixtures do not pay for it."""

import functools
import io
import os
import random
import socket
import sys
import tarfile
import tempfile
import types

import gcs
import numpy as np
import pytest

# Before anything imports JAX: 8 CPU devices for the sharding tests (a mesh over the first k of
# them behaves as a k-device process), and one persistent compilation cache for the session, which
# subprocesses inherit, so each distinct program compiles once.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# CPU only, also where libtpu is installed (the TPU tests compile for abstract TPU devices).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="xj_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# --------------------------------------------------------------------------------------------
# Cloud storage: every client goes to the emulator on loopback, never to the metadata server
# --------------------------------------------------------------------------------------------

# Storage clients already loaded when the variables below were set (test_gcs checks: none).
STORAGE_CLIENTS = ("tensorflow", "tensorstore", "google.auth", "google.cloud.storage")
CLIENTS_LOADED_BEFORE_ENV = [m for m in STORAGE_CLIENTS if m in sys.modules]


def _reserved_port() -> int:
    """A free port below Linux's ephemeral range (32768+), where procs.free_port() and the
    kernel's outgoing connections never land: the emulator can start later on it."""
    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


GCS_PORTS = (_reserved_port(), _reserved_port())
GCS_DIR = tempfile.mkdtemp(prefix="xj_gcs_")
os.environ.update(gcs.client_env(*GCS_PORTS, os.path.join(GCS_DIR, "ca.pem")))


@pytest.fixture(scope="session")
def gcs_emulator():
    """fake-gcs-server + the TLS proxy for TensorFlow, on the ports the environment names."""
    emulator = gcs.Emulator(*GCS_PORTS, os.path.join(GCS_DIR, "ca.pem"), GCS_DIR)
    yield emulator
    emulator.stop()


# --------------------------------------------------------------------------------------------
# Data (owner: data engineer)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A TFDS data dir in which the embedded default 'sklearn_digits' was built from scratch."""
    from xception_jax.data import sources

    data_dir = str(tmp_path_factory.mktemp("tfds_digits"))
    sources.prepare_dataset("sklearn_digits", data_dir)
    return data_dir


@pytest.fixture(scope="session")
def tiny_run(digits_data_dir, tmp_path_factory):
    """A workdir of the main job's model trained 4 steps (one eval at the end), on one device
    (test_train.small_config). Shared: tests only read it (test_bad_input checks that)."""
    import jax
    from test_train import small_config

    from xception_jax.training import loop

    workdir = str(tmp_path_factory.mktemp("tiny_run"))
    loop.train_and_evaluate(small_config(digits_data_dir), workdir, devices=jax.devices()[:1])
    return workdir


@pytest.fixture
def data_config():
    """Factory: data_config(**overrides) -> ConfigDict of the fields input_pipeline reads."""
    return make_data_config


@pytest.fixture
def color_of_label():
    """label_color: the colour the fake datasets give to each label."""
    return label_color


@pytest.fixture
def jpeg_of_color():
    """solid_jpeg: JPEG bytes of a solid-colour image."""
    return solid_jpeg


@pytest.fixture(scope="session")
def digits_sharded_data_dir(tmp_path_factory):
    """'sklearn_digits' built into 5 files per split (exercises multi-file reading and resume)."""
    from xception_jax.data import sources

    data_dir = str(tmp_path_factory.mktemp("tfds_digits_sharded"))
    builder = sources.prepare_dataset("sklearn_digits", data_dir, num_shards=5)
    assert builder.info.splits["test"].num_shards == 5
    return data_dir


@pytest.fixture(scope="session")
def noise_image_folder(tmp_path_factory):
    """An image folder of uniform-noise PNGs: <root>/{train,test}/{a,b}/<n>.png, 16 training and
    8 test images per class, 40x40.

    Unlike the digits' exact-black backgrounds, noise has no exact ties for ReLU and max-pool to
    break by rounding noise, so runs that add in another order stay within 1e-5 to 1e-6 for
    several steps (../shared/FINDINGS.md). Smaller images tie more: the Inception crop
    upsamples a crop of 8% of the area, and the rounding to uint8 leaves equal neighbours
    (36x36 images: 1 and 8 devices differed by 2e-2 after 4 steps).
    """
    from PIL import Image

    root = tmp_path_factory.mktemp("noise_images")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 16), ("test", 8)):
        for name in ("a", "b"):
            directory = root / split / name
            directory.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(directory / f"{i}.png")
    return str(root)


_KERAS_H5_SCRIPT = """
import sys
import h5py, keras
from keras.src.legacy.saving import legacy_h5_format
keras.utils.set_random_seed(0)
model = keras.applications.Xception(
    weights=None, input_shape=(71, 71, 3), classes=int(sys.argv[2]), classifier_activation=None)
with h5py.File(sys.argv[1], "w") as f:  # The layout of Keras's ImageNet files.
    legacy_h5_format.save_weights_to_hdf5_group(f, model)
"""


def write_random_keras_h5(path, classes):
    """A randomly initialised Keras Xception (71 px, `classes` classes) saved at `path` in the
    legacy .h5 layout of Keras's ImageNet files, by Keras itself in a subprocess."""
    import subprocess

    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    subprocess.run(
        [sys.executable, "-c", _KERAS_H5_SCRIPT, str(path), str(classes)],
        env=env,
        check=True,
        timeout=300,
    )
    return str(path)


def make_data_config(**overrides):
    """A data config (the fields input_pipeline reads) for small, fast test pipelines."""
    import ml_collections

    fields = dict(
        dataset="sklearn_digits",
        data_dir="",
        manual_dir="",
        image_folder="",
        train_split="train",
        eval_split="test",
        image_size=16,
        batch_size=32,
        eval_batch_size=48,
        seed=0,
        crop_area_range=(0.5, 1.0),
        crop_aspect_range=(3 / 4, 4 / 3),
        random_flip=True,
        shuffle_buffer=2048,
        data_shards=4,
        prefetch_batches=2,
    )
    fields.update(overrides)
    return ml_collections.ConfigDict(fields)


def solid_jpeg(color, size=(40, 30)):
    """JPEG bytes of a solid-colour RGB image of size (width, height)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, tuple(int(c) for c in color)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def label_color(label):
    """A colour that identifies a label (distinct for labels < 1000) after JPEG and resizing."""
    rng = np.random.RandomState(label)
    return rng.randint(20, 236, size=3)


def _add_bytes(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


# First entries of TFDS's imagenet2012 labels.txt, and the labels TFDS's validation_labels.txt
# gives to the first three validation file names in sorted order.
FAKE_IMAGENET_TRAIN_SYNSETS = ("n01440764", "n01443537", "n01484850")
FAKE_IMAGENET_VAL_SYNSETS = ("n01751748", "n09193705", "n02105855")
FAKE_IMAGENET_TRAIN_PER_CLASS = 3


@pytest.fixture(scope="session")
def fake_imagenet(tmp_path_factory):
    """imagenet2012 prepared by the real TFDS builder from tiny fake ILSVRC2012 tars.

    ILSVRC2012_img_train.tar holds one tar per synset (n01440764.tar, ...) of JPEGs; the val
    tar holds ILSVRC2012_val_0000000{1,2,3}.JPEG, whose labels TFDS takes from its bundled
    validation_labels.txt. Every image is a solid colour given by label_color(label index).
    Prepared through `python -m xception_jax.prepare_data`'s main. Returns a SimpleNamespace:
    data_dir, manual_dir, names (the 1000 synsets, index = label), train_synsets, val_synsets
    (in val file-name order), train_per_class.
    """
    import tensorflow_datasets as tfds

    from xception_jax import prepare_data

    labels_file = tfds.core.tfds_path("datasets/imagenet2012/labels.txt")
    names = labels_file.read_text().split()
    manual = tmp_path_factory.mktemp("ilsvrc2012")
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for synset in FAKE_IMAGENET_TRAIN_SYNSETS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as class_tar:
                for i in range(FAKE_IMAGENET_TRAIN_PER_CLASS):
                    jpeg = solid_jpeg(label_color(names.index(synset)))
                    _add_bytes(class_tar, f"{synset}_{i}.JPEG", jpeg)
            _add_bytes(train_tar, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for i, synset in enumerate(FAKE_IMAGENET_VAL_SYNSETS):
            jpeg = solid_jpeg(label_color(names.index(synset)), size=(30, 40))
            _add_bytes(val_tar, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg)
    data_dir = str(tmp_path_factory.mktemp("tfds_imagenet"))
    prepare_data.main(
        ["--dataset", "imagenet2012", "--data_dir", data_dir, "--manual_dir", os.fspath(manual)]
    )
    return types.SimpleNamespace(
        data_dir=data_dir,
        manual_dir=os.fspath(manual),
        names=names,
        train_synsets=FAKE_IMAGENET_TRAIN_SYNSETS,
        val_synsets=FAKE_IMAGENET_VAL_SYNSETS,
        train_per_class=FAKE_IMAGENET_TRAIN_PER_CLASS,
    )


@functools.cache
def torch_timm():
    """(torch, timm), imported once per process next to the registry's torchvision.

    The registry's torchvision is a CUDA build whose C extension does not load next to CPU
    torch; timm only needs these two operator schemas to exist at import time (FINDINGS). A
    schema may be declared once per process: every test module gets timm from here.
    """
    import torch

    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    torch_timm.lib = lib  # Keeps the schemas registered.
    import timm

    torch.set_num_threads(2)
    return torch, timm
