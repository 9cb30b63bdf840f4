"""predict.py: a model trained to 100% on ten colours predicts the trained labels."""

import io
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image
from test_train import small_config

from xception_jax import predict
from xception_jax.training import loop

# Ten colours, one class each (image-folder labels follow the sorted names). Ten classes,
# 32 px, batch 16: the programs of tests/test_train.py's small_config, compiled once a session.
PALETTE = {
    "black": (0, 0, 0),
    "blue": (0, 0, 255),
    "cyan": (0, 255, 255),
    "gray": (128, 128, 128),
    "green": (0, 160, 0),
    "magenta": (255, 0, 255),
    "orange": (255, 140, 0),
    "red": (255, 0, 0),
    "white": (255, 255, 255),
    "yellow": (255, 255, 0),
}
CLASSES = tuple(sorted(PALETTE))


def textured(rgb, size, rng):
    """JPEG bytes of a colour with pixel noise (solid images give BatchNorm no spatial variance
    and made training unstable)."""
    pixels = np.asarray(rgb, np.int16) + rng.integers(-40, 41, (size[1], size[0], 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def color_folder(tmp_path_factory):
    """<root>/{train,test}/<colour>/*.jpg: noisy colour JPEGs of a few sizes."""
    root = tmp_path_factory.mktemp("colors")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("test", 1)):
        for name, rgb in PALETTE.items():
            os.makedirs(root / split / name)
            for i in range(count):
                data = textured(rgb, (40 + 3 * i, 30 + 5 * i), rng)
                (root / split / name / f"{i}.jpg").write_bytes(data)
    return str(root)


@pytest.fixture(scope="module")
def color_run(color_folder, tmp_path_factory):
    """A workdir of the tiny model trained on the colour folder to 100% eval accuracy."""
    config = small_config(
        None,
        dataset="image_folder",
        image_folder=color_folder,
        num_train_steps=150,
        log_every_steps=30,
        eval_every_steps=150,
        checkpoint_every_steps=150,
    )
    # A constant learning rate for 80 steps left one of the ten test images flipping between
    # right and wrong from one evaluation to the next, so the 100% hung on float rounding; a
    # cosine decay over 150 steps settles at 100% (checked under two float-rounding orders).
    config.schedule.name = "cosine"
    config.schedule.base_learning_rate = 0.04
    workdir = str(tmp_path_factory.mktemp("colors_run"))
    loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert json.loads(f.readlines()[-1])["eval_accuracy"] == 1.0
    return workdir


def test_predict_returns_the_trained_labels(color_run, color_folder, capsys):
    model, variables, names, image_size = predict.load_for_prediction(workdir=color_run)
    assert tuple(names) == CLASSES and image_size == 32
    paths = [os.path.join(color_folder, "train", name, "3.jpg") for name in CLASSES]
    # Any size and format: a big PNG, and a uint8 array.
    png = io.BytesIO()
    Image.new("RGB", (300, 170), PALETTE["green"]).save(png, "PNG")
    array = np.full((20, 90, 3), PALETTE["red"], np.uint8)
    results = predict.predict(
        [*paths, png.getvalue(), array], model, variables, names, image_size, top_k=5
    )
    assert [r[0][0] for r in results] == [*CLASSES, "green", "red"]
    for top in results:
        assert len(top) == 5
        probs = [p for _, p in top]
        assert probs == sorted(probs, reverse=True) and len({n for n, _ in top}) == 5
        assert top[0][1] > 0.5

    predict.main(["--workdir", color_run, "--top_k", "2", paths[1]])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == paths[1] and out[1].split()[-1] == "blue" and len(out) == 3


def test_undecodable_file_is_named(color_run, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        predict.load_images([str(bad)], 32)


def test_imagenet_names_ship_with_tfds():
    names = predict.imagenet_class_names()
    assert len(names) == 1000
    assert names[0] == "tench (n01440764)" and names[999].endswith("(n15075141)")
