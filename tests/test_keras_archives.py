"""Keras 3 `.keras` archives: transfer-learning models saved by Keras itself, Xception nested.

Keras (TensorFlow backend) runs once per module in a subprocess (tests/keras_archives.py): it
builds the models with random weights and randomised BatchNorm statistics, saves them with
`model.save`, and computes the nested Xception's features on sklearn's sample photos. The
import (zipfile + h5py, no Keras here) must give those features, and name what it cannot use.
"""

import importlib.util
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from xception_jax.weights import keras_weights

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None, reason="keras (requirements-test.txt) not installed"
)


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """Directory with Keras's archives and reference.npz (see tests/keras_archives.py)."""
    out = tmp_path_factory.mktemp("keras_archives")
    script = Path(__file__).with_name("keras_archives.py")
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(script), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"keras_archives.py failed:\n{proc.stderr[-3000:]}"
    return out, dict(np.load(out / "reference.npz"))


def _relative_error(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


def _features(model, variables, x):
    return jax.jit(lambda v, x: model.apply(v, x, return_features=True))(variables, x)


def test_xception_in_a_sequential_gives_keras_features_and_logits(archives):
    out, ref = archives
    model, variables = keras_weights.load_model(str(out / "sequential.keras"))
    # The Sequential's single Dense on the pooled features is Xception's own top.
    assert model.include_top and model.num_classes == 5
    features = _features(model, variables, ref["x"])
    assert _relative_error(features["pre_logits"], ref["sequential_features"]) < 1e-4
    assert _relative_error(features["logits"], ref["sequential_logits"]) < 1e-4


def test_functional_with_its_own_head_gives_the_backbone_and_names_the_head(archives):
    out, ref = archives
    path = str(out / "functional.keras")
    with pytest.warns(UserWarning) as caught:
        model, variables = keras_weights.load_model(path, pooling=None)
    (warning,) = caught
    message = str(warning.message)
    # One message: where Xception sits, each head layer by its own name and shapes.
    assert "'backbone/xception'" in message
    assert "hidden (dense [(2048, 16), (16,)])" in message
    assert "scores (dense [(16, 3), (3,)])" in message
    assert not model.include_top and "predictions" not in variables["params"]
    exit_features = jax.jit(model.apply)(variables, ref["x"])
    assert _relative_error(exit_features, ref["functional_features"]) < 1e-4
    with pytest.raises(ValueError, match="user's own head.*hidden.*include_top=False"):
        keras_weights.load(path, include_top=True)


def test_config_names_are_the_names_keras_records(archives):
    """Each layer's h5 group, derived from config.json (class + counter), is the group where
    Keras 3.15 also records that layer's name (older Keras did not record it)."""
    out, _ = archives
    with zipfile.ZipFile(out / "functional.keras") as z:
        config = json.loads(z.read("config.json"))
        weights = z.read("model.weights.h5")
    with h5py.File(io.BytesIO(weights), "r") as h5:
        recorded = {}

        def record(name, obj):  # (visititems stops at a callback's first non-None value)
            if "name" in obj.attrs:
                recorded[obj.attrs["name"]] = name

        h5.visititems(record)
        entries = keras_weights._walk_config(config["config"]["layers"], h5, ())
        weighted = [e for e in entries if e.arrays]
        assert len(weighted) == 80 + 2  # Xception without top: 80 weight layers; the head: 2.
        for entry in weighted:
            np.testing.assert_array_equal(h5[recorded[entry.name]]["0"], entry.arrays[0])


def test_weights_h5_of_a_transfer_model(archives, tmp_path):
    """A Keras 3 .weights.h5 of the same models (no config.json: generic names and counter
    order alone) gives the same variables; the head is named by its generic layer names."""
    out, _ = archives
    for name in ("sequential", "functional"):
        with zipfile.ZipFile(out / f"{name}.keras") as z:
            (tmp_path / f"{name}.weights.h5").write_bytes(z.read("model.weights.h5"))
    with pytest.warns(UserWarning, match=r"dense \(dense \[\(2048, 16\).*dense_1 \(dense"):
        bare = keras_weights.load(str(tmp_path / "functional.weights.h5"))
    with pytest.warns(UserWarning):
        full = keras_weights.load(str(out / "functional.keras"))
    assert _same(bare, full)
    bare = keras_weights.load(str(tmp_path / "sequential.weights.h5"))
    assert "predictions" in bare["params"]  # The single Dense: Xception's top.
    assert _same(bare, keras_weights.load(str(out / "sequential.keras")))


def _same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def _rewrite(src: Path, dst: Path, edit=None, drop=()) -> str:
    """A copy of archive `src` without the members `drop`, model.weights.h5 edited by `edit`."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name in drop:
                continue
            data = zin.read(name)
            if name == "model.weights.h5" and edit:
                buf = io.BytesIO(data)
                with h5py.File(buf, "r+") as f:
                    edit(f)
                data = buf.getvalue()
            zout.writestr(name, data)
    return str(dst)


def test_bad_files_get_clear_errors(archives, tmp_path):
    out, _ = archives
    whole = (out / "sequential.keras").read_bytes()
    truncated = tmp_path / "truncated.keras"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="Cannot read .*truncated.keras.* as a .keras archive"):
        keras_weights.load(str(truncated))

    no_weights = _rewrite(
        out / "sequential.keras", tmp_path / "nw.keras", drop=["model.weights.h5"]
    )
    with pytest.raises(ValueError, match="a .keras archive without weights"):
        keras_weights.load(no_weights)

    def narrower(f):  # block4_sepconv2's pointwise kernel 700 wide instead of 728
        vars_ = f["layers/functional/layers/separable_conv2d_5/vars"]
        del vars_["1"]
        vars_.create_dataset("1", data=np.zeros((1, 1, 728, 700), np.float32))

    other = _rewrite(out / "sequential.keras", tmp_path / "other.keras", edit=narrower)
    with pytest.raises(ValueError) as err:
        keras_weights.load(other)
    assert "does not fit Keras's Xception" in str(err.value)
    assert "'block4_sepconv2'" in str(err.value) and "700" in str(err.value)

    with pytest.raises(ValueError, match=r"holds 2 models with separable convs \(a, b\)"):
        keras_weights.load(str(out / "two.keras"))
    with pytest.raises(ValueError, match=r"holds no Xception.*conv \(conv2d .*out \(dense"):
        keras_weights.load(str(out / "no_xception.keras"))


def test_tools_and_fine_tuning_accept_a_keras_archive(archives):
    """init_from_keras (fine-tuning) takes the backbone; predict/evaluate/export load it."""
    from configs import common
    from xception_jax import evaluate, predict
    from xception_jax.training import config_checks, pretrained

    out, _ = archives
    config = common.base_config()
    config.model.name = "xception"
    config.init_from_keras = str(out / "functional.keras")
    assert config_checks.pretrained_errors(config) == []
    with pytest.warns(UserWarning, match="hidden"):
        backbone = pretrained.load_backbone(config)
    assert len(backbone["batch_stats"]) == 40 and "predictions" not in backbone["params"]

    model, _, names, _ = predict.load_for_prediction(keras_weights=str(out / "sequential.keras"))
    assert model.num_classes == 5 and names is None
    config.dataset = "image_folder"
    model, _, _, what = evaluate.load_source(config, keras_weights=str(out / "sequential.keras"))
    assert model.num_classes == 5 and what["keras_weights"].endswith("sequential.keras")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no classifier"):
        predict.load_for_prediction(keras_weights=str(out / "functional.keras"))


def test_archive_on_gs(archives, gcs_emulator):
    import gcs

    from xception_jax.platform import storage

    out, _ = archives
    url = f"gs://{gcs.BUCKET}/keras_archives/sequential.keras"
    storage.write_atomic(url, (out / "sequential.keras").read_bytes())
    assert _same(keras_weights.load(url), keras_weights.load(str(out / "sequential.keras")))
