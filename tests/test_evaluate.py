"""evaluate.py: a workdir's numbers equal its last eval; a Keras file's equal Xception.apply."""

import json
import os

import numpy as np
import pytest
from conftest import solid_jpeg, write_random_keras_h5
from test_train import read_metrics

from xception_jax import evaluate, predict
from xception_jax.weights import keras_weights


def test_workdir_equals_its_last_eval(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "eval.jsonl")
    result = evaluate.main(["--workdir", tiny_run, "--out", out])
    last = read_metrics(tiny_run)[-1]
    # The command evaluates on every device (8 here), the run did on one: the sums' order differs.
    for key in ("eval_loss", "eval_accuracy", "eval_top5_accuracy"):
        assert result[key] == pytest.approx(last[key], rel=1e-6, abs=1e-7), key
    assert result["count"] == 450 and result["step"] == last["step"]  # The digits' test split.
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(out) as f:
        assert json.loads(f.read()) == printed == result


COLORS = {"blue": (0, 0, 255), "green": (0, 160, 0), "red": (255, 0, 0)}


def test_keras_file_equals_apply_by_hand(tmp_path):
    pytest.importorskip("keras")
    keras_file = write_random_keras_h5(tmp_path / "xception.h5", classes=3)
    # Three classes, 3 + 2 + 2 test images: 7 examples, so the last batch is padded. (The
    # dataset's class list comes from its train split: the same images.)
    paths, labels = [], []
    for label, (name, rgb) in enumerate(sorted(COLORS.items())):
        for split in ("train", "test"):
            os.makedirs(tmp_path / "images" / split / name)
        for i in range(3 if label == 0 else 2):
            jpeg = solid_jpeg(tuple(c // (i + 1) for c in rgb), size=(80 + i, 75))
            for split in ("train", "test"):
                (tmp_path / "images" / split / name / f"{i}.jpg").write_bytes(jpeg)
            paths.append(str(tmp_path / "images" / "test" / name / f"{i}.jpg"))
            labels.append(label)
    result = evaluate.main(
        [
            "--config",
            "configs/finetune.py",
            "--keras_weights",
            keras_file,
            f"--config.image_folder={tmp_path / 'images'}",
            "--config.image_size=71",
            "--config.eval_batch_size=8",
        ]
    )
    model, variables = keras_weights.load_model(keras_file)
    images = predict.load_images(paths, 71)
    logits = np.asarray(model.apply(variables, (images / 127.5 - 1.0).astype(np.float32)))
    labels = np.asarray(labels)
    shifted = logits - logits.max(-1, keepdims=True)
    losses = np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(labels)), labels]
    assert result["count"] == 7
    assert result["eval_loss"] == pytest.approx(losses.mean(), rel=1e-5)
    assert result["eval_accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == labels))
    assert result["eval_top5_accuracy"] == 1.0  # Three classes: always in the top 5.
    assert result["keras_weights"] == keras_file


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--workdir", "w", "--keras_weights", "k.h5"], "exactly one of --workdir"),
        (["--keras_weights", "k.h5"], "needs --config"),
        (["--workdir", "s3://b/run"], "--workdir='s3://b/run': s3:// is not supported"),
    ],
)
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(argv)
    assert exit_.value.code == 2  # Usage errors.
    assert message in capsys.readouterr().err


def test_split_flag_and_export_of_the_workdir(tiny_run, tmp_path, capsys):
    from jax import export as jax_export

    from xception_jax import export
    from xception_jax.training import checkpoints

    result = evaluate.main(["--workdir", tiny_run, "--split", "train"])
    assert result["count"] == 1347 and result["split"] == "train"  # The digits' train split.

    out = str(tmp_path / "model.jaxexport")
    export.main(["--workdir", tiny_run, "--out", out, "--platforms", "cpu"])
    with open(out, "rb") as f:
        exported = jax_export.deserialize(f.read())
    with open(out + ".json") as f:
        meta = json.load(f)
    model, variables, config = checkpoints.load(tiny_run)
    assert meta["image_size"] == config.image_size and len(meta["class_names"]) == 10
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ref = model.apply(variables, (images / 127.5 - 1.0).astype(np.float32))
    np.testing.assert_allclose(np.asarray(exported.call(images)), ref, rtol=1e-5, atol=1e-5)
