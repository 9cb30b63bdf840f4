"""Export to Keras and timm: trained here, loaded by Keras / timm themselves, logits equal ours.

A short run of the `xception` model (71 px, EMA on) is exported with `python -m
xception_jax.export --format keras`; Keras (TensorFlow backend, in a subprocess) loads the
`.keras` with `keras.saving.load_model` and the `.weights.h5` into
`keras.applications.Xception(weights=None, ...)`. The same trained variables, read as timm's
`legacy_xception`, go to timm, which loads them with `load_state_dict(strict=True)`; so does an
aligned `xception41`. Importing an export gives the variables back bitwise, and a model the
format cannot express is refused before a byte is written.
"""

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap

import conftest
import jax
import numpy as np
import pytest
from keras_archives import photos

from configs import finetune
from xception_jax import export
from xception_jax.model import registry
from xception_jax.training import checkpoints, loop
from xception_jax.weights import keras_export, keras_weights, timm_export, timm_weights

HAVE_KERAS = importlib.util.find_spec("keras") is not None
HAVE_TIMM = importlib.util.find_spec("timm") is not None and importlib.util.find_spec("torch")


def _train(folder, workdir, name, image_size):
    """Two steps of `name` on the noise images, with EMA: weights and statistics moved."""
    config = finetune.get_config()
    config.model.name = name
    config.model.dropout_rate = 0.0
    config.image_folder = folder
    config.image_size = image_size
    config.batch_size = 2
    config.eval_batch_size = 16
    config.data_shards = 2
    config.freeze_backbone_steps = 0
    config.num_train_steps = 2
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.checkpoint_every_steps = 2
    config.ema_decay = 0.5
    config.schedule.base_learning_rate = 0.05
    loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])
    return workdir


@pytest.fixture(scope="module")
def keras_run(noise_image_folder, tmp_path_factory):
    return _train(noise_image_folder, str(tmp_path_factory.mktemp("xception_run")), "xception", 71)


def _same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@functools.cache
def _apply(model):
    """One jitted forward per model (each variable set reuses its compilation)."""
    return jax.jit(functools.partial(model.apply, train=False))


def _logits(model, variables, x):
    return np.asarray(_apply(model)(variables, x))


def _relative_error(out, ref) -> float:
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


KERAS_LOAD = textwrap.dedent(
    """
    import sys
    import keras, numpy as np
    x = np.load(sys.argv[1])["x"]
    whole = keras.saving.load_model(sys.argv[2])
    bare = keras.applications.Xception(
        weights=None, classes=int(sys.argv[4]), input_shape=x.shape[1:], classifier_activation=None
    )
    bare.load_weights(sys.argv[3])
    np.savez(sys.argv[5], keras=np.asarray(whole(x)), weights_h5=np.asarray(bare(x)))
    """
)


@pytest.mark.skipif(not HAVE_KERAS, reason="keras (requirements-test.txt) not installed")
def test_keras_round_trip(keras_run, tmp_path, capsys):
    archive, weights = str(tmp_path / "run.keras"), str(tmp_path / "run.weights.h5")
    export.main(["--workdir", keras_run, "--format", "keras", "--ema", "--out", archive])
    export.main(["--workdir", keras_run, "--format", "keras", "--out", weights])
    assert "keras.applications.Xception(classes=2)" in capsys.readouterr().out
    model, ema, _ = checkpoints.load(keras_run, ema=True)
    _, plain, _ = checkpoints.load(keras_run)
    assert not _same(ema["params"], plain["params"])  # --ema exported something else.
    # Export -> import: the same variables, bitwise.
    assert _same(keras_weights.load(archive), ema)
    assert _same(keras_weights.load(weights), plain)

    x = photos(71)
    np.savez(tmp_path / "x.npz", x=x)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-c", KERAS_LOAD, str(tmp_path / "x.npz"), archive, weights]
    subprocess.run([*command, "2", str(tmp_path / "out.npz")], env=env, check=True, timeout=300)
    got = np.load(tmp_path / "out.npz")
    assert _relative_error(got["keras"], _logits(model, ema, x)) < 1e-4
    assert _relative_error(got["weights_h5"], _logits(model, plain, x)) < 1e-4


def test_refused_exports_write_nothing(keras_run, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit):
        export.main(["--workdir", keras_run, "--format", "timm", "--out", str(out)])
    err = capsys.readouterr().err
    assert "the closest, 'legacy_xception', differs in bn_epsilon=0.001" in err
    assert not out.exists()
    with pytest.raises(SystemExit):
        export.main(["--workdir", keras_run, "--format", "keras", "--out", str(tmp_path / "x.h5")])
    assert "writes .keras or .weights.h5 files" in capsys.readouterr().err

    model = registry.create_model("xception", residual=False, intermediate_activation="relu")
    variables = {"params": {}, "batch_stats": {}}  # Refused before the variables are read.
    for path in ("x.keras", "x.weights.h5"):
        with pytest.raises(ValueError, match=r"residual=False .*intermediate_activation='relu'"):
            export.write_weights("keras", str(tmp_path / path), model, variables, 71)
    tiny = registry.create_model("xception_tiny")
    with pytest.raises(ValueError, match=r"width_multiplier=0.25.*middle_blocks=2"):
        export.write_weights("timm", str(out), tiny, variables, 32)
    with pytest.raises(ValueError, match="XceptionAligned has no Keras counterpart"):
        keras_export.write_weights_h5(
            str(tmp_path / "a.weights.h5"), registry.create_model("xception41"), variables
        )
    assert sorted(os.listdir(tmp_path)) == []


def _timm_logits(name, path, x, num_classes):
    """timm's `name` with the state dict at `path` loaded strictly: its logits on NHWC `x`."""
    torch, timm = conftest.torch_timm()
    from safetensors.torch import load_file

    net = timm.create_model(name, num_classes=num_classes).eval()
    net.load_state_dict(load_file(path), strict=True)
    with torch.no_grad():
        return net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


@pytest.mark.skipif(not HAVE_TIMM, reason="timm and torch (requirements-test.txt) not installed")
def test_timm_round_trip(keras_run, tmp_path):
    """The trained weights as timm's legacy_xception (Keras's model with PyTorch's BatchNorm
    epsilon and pool padding: the same variables, another model) through the export tool's
    writer; timm's logits equal this package's legacy_xception's."""
    _, ema, _ = checkpoints.load(keras_run, ema=True)
    model = registry.create_model("legacy_xception", num_classes=2)
    path = str(tmp_path / "legacy.safetensors")
    assert "'legacy_xception'" in export.write_weights("timm", path, model, ema, 77)
    assert _same(timm_weights.load(path, "legacy_xception"), ema)
    x = photos(77)  # Even sizes before the first pools: there the two paddings differ.
    assert (
        _relative_error(_logits(model, ema, x), _timm_logits("legacy_xception", path, x, 2)) < 1e-4
    )


@pytest.mark.skipif(not HAVE_TIMM, reason="timm and torch (requirements-test.txt) not installed")
def test_aligned_xception_to_timm(tmp_path):
    """xception41 (random, BatchNorm statistics randomised) -> timm, strict, same logits."""
    model = registry.create_model("xception41", num_classes=3)
    rng = np.random.default_rng(0)
    # Random values of the variables' shapes (no init to compile): kernels ~ N(0, 1/fan-in).
    variables = jax.tree.map(
        lambda a: (rng.normal(0, 1, a.shape) / np.sqrt(np.prod(a.shape[:-1]) or 1)).astype(
            np.float32
        ),
        registry.abstract_variables(model, 32),
    )
    stats = variables["batch_stats"]
    variables["batch_stats"] = jax.tree.map(lambda a: np.abs(a) + 0.5, stats)
    path = str(tmp_path / "x41.safetensors")
    assert timm_export.write_timm(path, model, variables) == "xception41"
    assert _same(timm_weights.load(path, "xception41"), variables)
    x = photos(32)
    assert (
        _relative_error(_logits(model, variables, x), _timm_logits("xception41", path, x, 3)) < 1e-4
    )


def test_export_to_gs(keras_run, gcs_emulator, capsys):
    import gcs

    url = f"gs://{gcs.BUCKET}/exports/run.weights.h5"
    export.main(["--workdir", keras_run, "--format", "keras", "--out", url])
    assert _same(keras_weights.load(url), checkpoints.load(keras_run)[1])
