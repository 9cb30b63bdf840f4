"""Write Keras Xception reference files for tests/test_keras_weights.py (run as a subprocess).

Usage: ``KERAS_BACKEND=jax python tests/keras_reference.py OUT_DIR [SIZE] [BATCH] [CLASSES]``.

Builds a randomly initialised ``keras.applications.Xception(weights=None)`` with and without
top, randomises every BatchNorm (Keras initialises them to identity, which would hide a wrong
BN mapping), and writes for each model both weight layouts plus the Keras outputs on a fixed
input:

- ``{top,notop}.weights.h5``: Keras 3 ``model.save_weights``;
- ``{top,notop}.legacy.h5``: the legacy layout of the downloaded ImageNet files, written by
  ``keras.src.legacy.saving.legacy_h5_format.save_weights_to_hdf5_group`` (what Keras 2's
  ``save_weights('x.h5')`` wrote);
- ``top.model.h5``: a whole model ``model.save('x.h5')`` (weights in its ``model_weights``);
- ``reference.npz``: ``x`` (inputs in [-1, 1]), ``top`` (logits), ``notop`` (the 4-D exit
  features, ``pooling=None``).
"""

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras.src.legacy.saving import legacy_h5_format  # noqa: E402
from keras_archives import randomise_batchnorms  # noqa: E402  (tests/ is this script's path)


def main(out: str, size: int = 71, batch: int = 2, classes: int = 10) -> None:
    """Write the reference weight files and outputs into ``out``."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(-1.0, 1.0, (batch, size, size, 3)).astype("float32")
    results = {"x": x}
    for tag, kwargs in (
        ("top", {"include_top": True, "classes": classes, "classifier_activation": None}),
        ("notop", {"include_top": False, "pooling": None}),
    ):
        model = keras.applications.Xception(weights=None, input_shape=(size, size, 3), **kwargs)
        randomise_batchnorms(model, rng)
        model.save_weights(os.path.join(out, f"{tag}.weights.h5"))
        with h5py.File(os.path.join(out, f"{tag}.legacy.h5"), "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, model)
        if tag == "top":
            model.save(os.path.join(out, "top.model.h5"))
        results[tag] = keras.ops.convert_to_numpy(model(x, training=False))
    np.savez(os.path.join(out, "reference.npz"), **results)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
