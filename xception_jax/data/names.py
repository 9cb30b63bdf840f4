"""The names config.dataset may take: 'image_folder' and TFDS's registered datasets (the
embedded 'sklearn_digits' included), checked without TensorFlow (TFDS's registry alone)."""

import difflib

import tensorflow_datasets as tfds

import xception_jax.data.sklearn_digits  # noqa: F401  (registers 'sklearn_digits' with TFDS)

IMAGE_FOLDER = "image_folder"


def dataset_name_errors(name: str) -> list[str]:
    """A message when `name` is neither 'image_folder' nor a registered TFDS dataset."""
    name = str(name)
    if name == IMAGE_FOLDER:
        return []
    base = name.split("/")[0]
    if ":" in base:
        base, _, version = base.partition(":")
        if not version[:1].isdigit():
            return []  # A community dataset ("namespace:name"): TFDS resolves it.
    try:
        tfds.builder_cls(base)
    except tfds.core.registered.DatasetNotFoundError:
        known = [IMAGE_FOLDER, *tfds.list_builders(with_community_datasets=False)]
        close = difflib.get_close_matches(base, known, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        return [
            f"config.dataset={name!r} is not a TFDS dataset nor 'image_folder'.{hint} The "
            "embedded default is 'sklearn_digits'."
        ]
    return []
