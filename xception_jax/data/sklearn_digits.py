"""TFDS builder for the embedded default dataset: scikit-learn's bundled handwritten digits.

scikit-learn ships the UCI "Optical Recognition of Handwritten Digits" test set inside its wheel
(1797 images of 8x8 pixels, 17 gray levels 0..16, ten classes), so this dataset builds with no
network access. Each image is scaled to 0..255, upsampled to `STORED_SIZE` x `STORED_SIZE` with
bilinear interpolation, replicated to RGB and stored as a JPEG, with the same feature spec as
`imagenet2012` (image, label, file_name): the input pipeline then treats it like any TFDS
image-classification dataset and resizes to `config.image_size`.

Split (deterministic, no random numbers): 'train' is the first 1347 images in scikit-learn's
order, 'test' the last 450 (the usual 75/25 proportion). scikit-learn's order cycles through the
classes, so both splits are balanced (train 133-137 per class, test 41-48), and a contiguous cut
keeps the blocks of writers together better than a shuffled split would.
"""

import io

import numpy as np
import tensorflow_datasets as tfds

STORED_SIZE = 64
NUM_TRAIN = 1347
NUM_EXAMPLES = 1797
JPEG_QUALITY = 95


def _load_digits():
    """Returns (images uint8 [1797, 8, 8] in 0..255, labels int64 [1797]) from scikit-learn."""
    from sklearn.datasets import load_digits  # bundled data: no download

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def _encode(image8x8, size):
    """Upsamples one 8x8 uint8 gray image to size x size RGB and returns its JPEG bytes."""
    from PIL import Image

    img = Image.fromarray(image8x8, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 1797 handwritten digits as 64x64 RGB JPEGs; TFDS name 'sklearn_digits'."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: 64x64 RGB JPEG, train = first 1347, test = last 450."
    }

    def _info(self):
        """Feature spec identical to imagenet2012's, with labels '0'..'9'."""
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "scikit-learn's bundled handwritten digits (UCI optdigits test set), 8x8 with 17 "
                f"gray levels, upsampled to {STORED_SIZE}x{STORED_SIZE} RGB JPEG. train: first "
                f"{NUM_TRAIN} images, test: last {NUM_EXAMPLES - NUM_TRAIN}."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(
                        shape=(STORED_SIZE, STORED_SIZE, 3), encoding_format="jpeg"
                    ),
                    "label": tfds.features.ClassLabel(names=[str(i) for i in range(10)]),
                    "file_name": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://archive.ics.uci.edu/dataset/80",
        )

    def _split_generators(self, dl_manager):
        """Two splits cut at a fixed index; nothing is downloaded."""
        del dl_manager
        return {
            "train": self._generate_examples(range(0, NUM_TRAIN)),
            "test": self._generate_examples(range(NUM_TRAIN, NUM_EXAMPLES)),
        }

    def _generate_examples(self, indices):
        """Yields (key, example); file_name carries the index in scikit-learn's order."""
        images, labels = _load_digits()
        for i in indices:
            yield (
                i,
                {
                    "image": _encode(images[i], STORED_SIZE),
                    "label": int(labels[i]),
                    "file_name": f"digit_{i:04d}.jpg",
                },
            )
