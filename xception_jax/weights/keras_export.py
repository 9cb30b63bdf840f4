"""Export Flax Xception variables to Keras 3: a ``.weights.h5`` and a ``.keras`` archive.

- ``.weights.h5``: what ``keras.applications.Xception(weights=None, classes=N,
  input_shape=...).load_weights(path)`` reads; written with h5py alone, in Keras 3's layout
  (``layers/<class>_<counter>/vars/<i>``, counters in ``model.layers`` order per class). The
  layer order is the one the importer maps by (``keras_weights._slots``), so one table serves
  both directions.
- ``.keras``: a whole model for ``keras.saving.load_model``: Keras itself is imported inside
  `write_keras` (only there), builds ``keras.applications.Xception`` with the exported classes
  and input size, loads the ``.weights.h5`` and saves; the model outputs logits
  (``classifier_activation=None``), as this package's model does.

Only the model Keras has can be exported: ``Xception`` with Keras's switches (`keras_errors`
names every other one, before anything is written). Fields that do not change what the
trained weights compute (compute dtype, op implementations, rematerialisation, dropout, BN
momentum) do not matter.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import h5py
import numpy as np

from xception_jax.model.layers import get_activation
from xception_jax.model.xception import Xception
from xception_jax.platform import storage
from xception_jax.platform.errors import RefusedError
from xception_jax.weights import keras_weights

# Keras's Xception: these fields at these values (keras/src/applications/xception.py).
KERAS_FIELDS = {
    "residual": True,
    "intermediate_activation": None,
    "width_multiplier": 1.0,
    "middle_blocks": 8,
    "bn_epsilon": 1e-3,
    "pool_padding": "SAME",
    "include_top": True,
    "pooling": "avg",
}
# Keras 3's h5 group prefix of each kind of weight layer (its class name in snake case).
_KERAS_CLASS = {
    "conv": "conv2d",
    "sep": "separable_conv2d",
    "bn": "batch_normalization",
    "dense": "dense",
}
MIN_IMAGE_SIZE = 71  # keras.applications.Xception's smallest input.


def field_value(model, name: str):
    """A model field as it acts: configs spell "no intermediate activation" 'none' too."""
    value = getattr(model, name)
    if name == "intermediate_activation" and get_activation(value) is None:
        return None
    return value


def keras_errors(model, image_size: int | None = None) -> list[str]:
    """Why `model` cannot be exported to Keras's Xception (empty: it can), each by name."""
    if type(model) is not Xception:
        return [
            f"{type(model).__name__} has no Keras counterpart (keras.applications.Xception is "
            "the paper's model, 'xception'); export the aligned models to timm (--format timm)."
        ]
    errors = [
        f"{name}={getattr(model, name)!r} (Keras's Xception has {want!r})"
        for name, want in KERAS_FIELDS.items()
        if field_value(model, name) != want
    ]
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        errors.append(f"image_size={image_size} (Keras's Xception takes {MIN_IMAGE_SIZE} or more)")
    return errors


def _check(model, image_size: int | None = None) -> None:
    errors = keras_errors(model, image_size)
    if errors:
        raise RefusedError(
            "Cannot export to Keras: Keras's Xception cannot express " + "; ".join(errors) + "."
        )


def _from_flax(kind: str, params: dict, stats: dict | None) -> list[np.ndarray]:
    """A layer's Keras variables (in Keras's order) from our params/batch_stats: the inverse
    of `keras_weights._to_flax`."""
    if kind == "conv":
        k = params["kernel"]
        return [k.reshape(1, 1, *k.shape) if k.ndim == 2 else k]  # shortcut: (Cin, Cout)
    if kind == "sep":
        dw, pw = params["depthwise"]["kernel"], params["pointwise"]["kernel"]
        return [dw.reshape(dw.shape[0], dw.shape[1], dw.shape[3], 1), pw.reshape(1, 1, *pw.shape)]
    if kind == "bn":
        return [params["scale"], params["bias"], stats["mean"], stats["var"]]
    return [params["kernel"], params["bias"]]


def weights_h5_bytes(model, variables: dict[str, Any]) -> bytes:
    """The Keras 3 ``.weights.h5`` of `variables` (an exportable `model`'s) as bytes."""
    _check(model)
    params = {k: v for k, v in variables["params"].items()}
    stats = variables.get("batch_stats", {})
    buf = io.BytesIO()
    counters: dict[str, int] = {}
    with h5py.File(buf, "w") as f:
        layers = f.create_group("layers")
        f.create_group("vars")
        for kind, name in keras_weights._slots(model.middle_blocks, True, False):
            cls = _KERAS_CLASS[kind]
            n = counters[cls] = counters.get(cls, -1) + 1
            group = layers.create_group(cls if n == 0 else f"{cls}_{n}")
            vars_ = group.create_group("vars")
            vars_.attrs["name"] = name  # As Keras 3.15 records each layer's own name.
            leaves = _from_flax(kind, params[name], stats.get(name))
            for i, array in enumerate(leaves):
                vars_.create_dataset(str(i), data=np.asarray(array, np.float32))
    return buf.getvalue()


def write_weights_h5(path: str, model, variables: dict[str, Any]) -> None:
    """Write `variables` as a Keras 3 ``.weights.h5`` at `path` (local or gs://)."""
    storage.write_atomic(path, weights_h5_bytes(model, variables))


def write_keras(path: str, model, variables: dict[str, Any], image_size: int) -> None:
    """Write a ``.keras`` archive of Keras's Xception holding `variables` (local or gs://).

    Imports Keras (with whatever backend KERAS_BACKEND names) here and only here. The model
    takes float images [b, image_size, image_size, 3] in [-1, 1] and returns logits.
    """
    _check(model, image_size)
    data = weights_h5_bytes(model, variables)
    import keras

    keras_model = keras.applications.Xception(
        weights=None,
        classes=int(model.num_classes),
        input_shape=(image_size, image_size, 3),
        classifier_activation=None,
    )
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "model.weights.h5")
        with open(weights, "wb") as f:
            f.write(data)
        keras_model.load_weights(weights)
        archive = os.path.join(tmp, "model.keras")
        keras_model.save(archive)
        with open(archive, "rb") as f:
            storage.write_atomic(path, f.read())
