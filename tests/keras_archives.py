"""Write Keras 3 ``.keras`` archives for tests/test_keras_archives.py (run as a subprocess).

Usage: ``KERAS_BACKEND=tensorflow python tests/keras_archives.py OUT_DIR``.

Transfer-learning models as users build them, saved by Keras itself (``model.save``), with
``keras.applications.Xception(weights=None)`` nested inside and every BatchNorm randomised
(Keras initialises them to identity, which would hide a wrong mapping):

- ``sequential.keras``: ``Sequential([Xception(include_top=False, pooling='avg'), Dense(5)])``
  (the single Dense on the pooled features is Xception's own top);
- ``functional.keras``: a functional model: input -> ``Sequential('backbone', [Xception(
  include_top=False)])`` (Xception two models deep) -> global average pooling -> Dense(16,
  relu) -> Dropout -> Dense(3) (the user's own head);
- ``two.keras``: two Xceptions side by side; ``no_xception.keras``: a small conv net;
- ``reference.npz``: ``x`` (sklearn's two sample photos, resized, scaled to [-1, 1]),
  ``sequential_features`` / ``sequential_logits`` (pooled features and logits),
  ``functional_features`` (the 4-D exit features of the nested Xception).
"""

import os
import sys

import numpy as np

SIZE = 80


def randomise_batchnorms(model, rng: np.random.Generator) -> None:
    """Every BatchNorm of Keras `model` (nested models included) gets random statistics."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomise_batchnorms(layer, rng)
        elif isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.8, 1.2, c).astype("float32"),  # gamma
                    rng.normal(0.0, 0.1, c).astype("float32"),  # beta
                    rng.normal(0.0, 0.1, c).astype("float32"),  # moving mean
                    rng.uniform(0.8, 1.2, c).astype("float32"),  # moving variance
                ]
            )


def photos(size: int) -> np.ndarray:
    """sklearn's two sample photos (china, flower), centre-cropped, resized, in [-1, 1].

    Importable without Keras (the round-trip tests use it too)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for image in load_sample_images().images:
        h, w = image.shape[:2]
        s = min(h, w)
        crop = image[(h - s) // 2 : (h + s) // 2, (w - s) // 2 : (w + s) // 2]
        out.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR)))
    return (np.stack(out).astype("float32") / 127.5 - 1.0).astype("float32")


def xception(**kwargs):
    import keras

    return keras.applications.Xception(
        weights=None, include_top=False, input_shape=(SIZE, SIZE, 3), **kwargs
    )


def main(out: str) -> None:
    """Write the archives and the Keras outputs into `out`."""
    import keras

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = photos(SIZE)
    ref = {"x": x}

    backbone = xception(pooling="avg")
    model = keras.Sequential([keras.Input((SIZE, SIZE, 3)), backbone, keras.layers.Dense(5)])
    randomise_batchnorms(model, rng)
    model.save(os.path.join(out, "sequential.keras"))
    ref["sequential_features"] = keras.ops.convert_to_numpy(backbone(x, training=False))
    ref["sequential_logits"] = keras.ops.convert_to_numpy(model(x, training=False))

    backbone = xception()
    inputs = keras.Input((SIZE, SIZE, 3))
    h = keras.Sequential([backbone], name="backbone")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(16, activation="relu", name="hidden")(h)
    h = keras.layers.Dropout(0.2)(h)
    model = keras.Model(inputs, keras.layers.Dense(3, name="scores")(h))
    randomise_batchnorms(model, rng)
    model.save(os.path.join(out, "functional.keras"))
    ref["functional_features"] = keras.ops.convert_to_numpy(backbone(x, training=False))

    inputs = keras.Input((71, 71, 3))
    a = keras.applications.Xception(weights=None, include_top=False, pooling="avg", name="a")
    b = keras.applications.Xception(weights=None, include_top=False, pooling="avg", name="b")
    both = keras.layers.Concatenate()([a(inputs), b(inputs)])
    keras.Model(inputs, keras.layers.Dense(2)(both)).save(os.path.join(out, "two.keras"))

    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(8, 3, name="conv")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    keras.Model(inputs, keras.layers.Dense(2, name="out")(h)).save(
        os.path.join(out, "no_xception.keras")
    )
    np.savez(os.path.join(out, "reference.npz"), **ref)


if __name__ == "__main__":
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    main(sys.argv[1])
