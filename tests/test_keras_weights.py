"""Keras parity: Keras Xception weight files (both layouts) give Keras's outputs in Flax.

Keras runs in a subprocess (tests/keras_reference.py, KERAS_BACKEND=jax) so that its backend
choice never leaks into this process. Every BatchNorm there is randomised, so a wrong mapping
of the shortcut BNs (same shapes as their neighbours) would show in the outputs.
"""

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest

from xception_jax.model.xception import Xception
from xception_jax.weights import keras_weights

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("keras") is None, reason="keras (requirements-test.txt) not installed"
)

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Directory with the Keras files and outputs, and jitted Flax forward passes."""
    out = tmp_path_factory.mktemp("keras_ref")
    script = Path(__file__).with_name("keras_reference.py")
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, str(script), str(out), "71", "2", str(NUM_CLASSES)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"keras_reference.py failed:\n{proc.stderr[-3000:]}"
    ref = dict(np.load(out / "reference.npz"))
    top = Xception(num_classes=NUM_CLASSES)
    notop = Xception(include_top=False, pooling=None)
    return {
        "dir": out,
        **ref,
        "top_model": top,
        "notop_model": notop,
        "apply_top": jax.jit(functools.partial(top.apply, train=False)),
        "apply_notop": jax.jit(functools.partial(notop.apply, train=False)),
    }


def _assert_parity(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("fname", ["top.weights.h5", "top.legacy.h5", "top.model.h5"])
def test_parity_with_top(reference, fname):
    model, variables = keras_weights.load_model(str(reference["dir"] / fname))
    assert model == reference["top_model"]
    _assert_parity(reference["apply_top"](variables, reference["x"]), reference["top"])


@pytest.mark.parametrize("fname", ["notop.weights.h5", "notop.legacy.h5"])
def test_parity_without_top(reference, fname):
    model, variables = keras_weights.load_model(str(reference["dir"] / fname), pooling=None)
    assert model == reference["notop_model"]
    assert "predictions" not in variables["params"]
    _assert_parity(reference["apply_notop"](variables, reference["x"]), reference["notop"])


def test_include_top_switch(reference):
    variables = keras_weights.load(str(reference["dir"] / "top.legacy.h5"), include_top=False)
    assert "predictions" not in variables["params"]
    assert len(variables["batch_stats"]) == 40
    with pytest.raises(ValueError, match="no classifier"):
        keras_weights.load(str(reference["dir"] / "notop.weights.h5"), include_top=True)


def test_files_that_do_not_fit(reference, tmp_path):
    bad = tmp_path / "bad.weights.h5"
    shutil.copy(reference["dir"] / "notop.weights.h5", bad)
    with h5py.File(bad, "r+") as f:  # separable_conv2d_5 is block4_sepconv2
        del f["layers/separable_conv2d_5/vars/1"]
        f["layers/separable_conv2d_5/vars"].create_dataset("1", data=np.zeros((1, 1, 728, 700)))
    with pytest.raises(ValueError, match="block4_sepconv2.*file.*700"):
        keras_weights.load(str(bad))
    with h5py.File(bad, "r+") as f:
        del f["layers/separable_conv2d_5"]
    with pytest.raises(ValueError, match="33 separable convs"):
        keras_weights.load(str(bad))
    text = tmp_path / "not_h5.h5"
    text.write_text("hello")
    with pytest.raises(ValueError, match="Cannot open"):
        keras_weights.load(str(text))
