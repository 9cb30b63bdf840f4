"""Classify image files with a trained workdir, a Keras or a timm Xception weight file.

Usage: python -m xception_jax.predict --workdir runs/default img1.png img2.jpg [--top_k 5]

    python -m xception_jax.predict --keras_weights xception_weights_tf_dim_ordering_tf_kernels.h5 \
        cat.jpg
    python -m xception_jax.predict --timm_weights model.safetensors --model xception65 cat.jpg

Images of any size and format that TensorFlow decodes (JPEG, PNG, BMP, GIF) go through the
evaluation preprocessing of the input pipeline (`preprocessing.preprocess_eval`: central crop
of 87.5% of each side, bilinear resize), so a prediction sees what the evaluation saw. Labels
are the dataset's class names for a workdir; for a 1000-class Keras or timm file, the ImageNet
names (in the order of `keras.applications`', timm's and TFDS imagenet2012's labels).
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sys
from collections.abc import Sequence

import numpy as np
from absl import flags

from xception_jax import cli
from xception_jax.platform import errors, storage

KERAS_IMAGE_SIZE = 299
TIMM_IMAGE_SIZE = 299  # timm's default input size for all four Xception variants.

# Positional arguments: the image files (JPEG, PNG, BMP, GIF), local or gs://.
FLAGS = flags.FlagValues()
cli.define_weight_source_flags(FLAGS, timm_variant_from="--model")
flags.DEFINE_integer("top_k", 5, "Labels to print per image.", flag_values=FLAGS)
flags.DEFINE_bool("ema", False, "Use the Polyak-averaged weights.", flag_values=FLAGS)
flags.DEFINE_integer("image_size", None, "Override the model's input size.", flag_values=FLAGS)


@functools.cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet class names in label order, as 'tench (n01440764)'.

    Both come with tensorflow_datasets, so nothing is downloaded: the synsets are TFDS's
    imagenet2012 ClassLabel file (labels.txt, the label order of TFDS and Keras), the words the
    list TFDS's SI-Score dataset keeps in the same order (parsed, not imported).
    """
    import tensorflow_datasets as tfds

    synsets = tfds.core.tfds_path("datasets/imagenet2012/labels.txt").read_text().split()
    words = None
    labels_py = tfds.core.tfds_path("datasets/siscore/labels.py")
    if labels_py.exists():
        for node in ast.parse(labels_py.read_text()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == (
                "IMAGENET_LABELS_LIST"
            ):
                words = [w.split(",")[0].strip() for w in ast.literal_eval(node.value)]
    if words is None or len(words) != len(synsets):
        return tuple(synsets)
    return tuple(f"{w} ({s})" for w, s in zip(words, synsets, strict=True))


def _encoded(item) -> bytes:
    """Encoded image bytes of a path (local or gs://), bytes, or a uint8 array [H, W, 3] (encoded
    as PNG)."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, (str, os.PathLike)):
        return storage.read_bytes(item)
    import tensorflow as tf

    array = np.asarray(item)
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype != np.uint8 or array.ndim != 3:
        raise ValueError(
            f"An image array must be uint8 [height, width, channels]; got {array.dtype} "
            f"{array.shape}."
        )
    return tf.io.encode_png(array).numpy()  # Lossless: the pipeline's decoder reads it back.


# The leading bytes of the formats TensorFlow's decode_image reads.
_IMAGE_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")


def check_image_files(paths: Sequence[str]) -> None:
    """Raises FileNotFoundError or errors.FileFormatError for a path that is not an image file
    (by its first bytes, without TensorFlow; a damaged image fails later, in `load_images`)."""
    for image in paths:
        if not storage.exists(image) or storage.isdir(image):
            raise FileNotFoundError(f"No image file {image!r}: check the path.")
        if not storage.read_bytes(image).startswith(_IMAGE_SIGNATURES):
            raise errors.FileFormatError(
                f"{image!r} is not an image file: give JPEG, PNG, BMP or GIF images."
            )


def _decode_problem(message: str) -> str:
    """TensorFlow's decode error without its op text ('{{function_node ...}}', '[Op:...]')."""
    text = message.splitlines()[0] if message else ""
    text = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\]", "", text).strip().rstrip(".")
    return text or "not an image"


def load_images(images_or_paths: Sequence, image_size: int) -> np.ndarray:
    """uint8 [N, image_size, image_size, 3]: each input through `preprocess_eval`.

    Inputs: file paths, encoded bytes, or uint8 arrays; any size, grey or RGB(A).
    """
    import tensorflow as tf

    from xception_jax.data import preprocessing

    out = []
    for item in images_or_paths:
        try:
            image = preprocessing.preprocess_eval(
                tf.constant(_encoded(item)), image_size=image_size
            )
        except tf.errors.InvalidArgumentError as e:
            name = repr(os.fspath(item)) if isinstance(item, (str, os.PathLike)) else "an image"
            raise errors.FileFormatError(
                f"Cannot decode {name}: {_decode_problem(e.message)}. Give a JPEG, PNG, BMP or "
                "GIF image file."
            ) from e
        out.append(image.numpy())
    return np.stack(out)


@functools.cache
def _probabilities():
    """The jitted softmax of the model's logits (built on first use: JAX loads only then, so
    that flag and input errors come back fast)."""
    import jax
    import jax.numpy as jnp

    from xception_jax.model import xception

    @functools.partial(jax.jit, static_argnums=0)
    def probabilities(model, variables, images):
        logits = model.apply(variables, xception.preprocess(images, model.dtype), train=False)
        return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return probabilities


def predict(
    images_or_paths: Sequence,
    model,
    variables,
    class_names: Sequence[str] | None,
    image_size: int,
    top_k: int = 5,
) -> list[list[tuple[str, float]]]:
    """Top-k (label, probability) per image, most probable first.

    Args:
      images_or_paths: image file paths (local or gs://), encoded image bytes, or uint8 arrays
        [H, W, 3].
      model, variables: e.g. from `checkpoints.load(workdir)` or `keras_weights.load_model`.
      class_names: a name per class (None: the class index as text).
      image_size: the input size the model was trained at (config.image_size; 299 for Keras).
      top_k: how many labels per image (at most the number of classes).
    """
    images = load_images(images_or_paths, image_size)
    probs = np.asarray(_probabilities()(model, variables, images))
    k = min(top_k, probs.shape[-1])
    if class_names is not None and len(class_names) != probs.shape[-1]:
        raise ValueError(
            f"{len(class_names)} class names for a model with {probs.shape[-1]} classes."
        )
    results = []
    for p in probs:
        top = np.argsort(-p, kind="stable")[:k]
        results.append(
            [(class_names[i] if class_names is not None else str(i), float(p[i])) for i in top]
        )
    return results


def eval_examples(config, num: int) -> tuple[list[bytes], list[int]]:
    """The first `num` (encoded image, label) pairs of the config's eval split, as stored."""
    from xception_jax.data import sources

    split = config.get("eval_split") or "test"
    if config.dataset == sources.IMAGE_FOLDER:
        root = storage.join(config.image_folder, split)
        classes = sorted(storage.subdirs(root))
        names = list(config.get("class_names") or classes)
        pairs = sorted(
            (storage.join(root, c, f), names.index(c))
            for c in classes
            for f in storage.listdir(storage.join(root, c))
            if f.lower().endswith(sources.IMAGE_EXTENSIONS)
        )[:num]
        return [_encoded(p) for p, _ in pairs], [label for _, label in pairs]
    import tensorflow_datasets as tfds

    builder = sources.prepare_dataset(
        config.dataset, config.get("data_dir"), config.get("manual_dir")
    )
    keys = builder.info.supervised_keys
    image_key, label_key = keys if isinstance(keys, tuple) else ("image", "label")
    ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    examples = list(ds.take(num).as_numpy_iterator())
    return [ex[image_key] for ex in examples], [int(ex[label_key]) for ex in examples]


def load_for_prediction(
    workdir=None, keras_weights=None, step=None, ema=False, timm_weights=None, model_name=None
):
    """(model, variables, class_names, image_size) from a workdir, a Keras or a timm file.

    `model_name`: the timm variant of `timm_weights` (xception41/65/71, legacy_xception).
    """
    if sum(map(bool, (workdir, keras_weights, timm_weights))) != 1:
        raise errors.UsageError(
            "Give exactly one of --workdir, --keras_weights and --timm_weights."
        )
    if workdir:
        from xception_jax.training import checkpoints

        model, variables, config = checkpoints.load(workdir, step=step, ema=ema)
        return model, variables, config.class_names, int(config.image_size)
    if timm_weights:
        from xception_jax.weights import timm_weights as tw

        if not model_name:
            raise errors.UsageError(f"--timm_weights needs --model, one of {list(tw.VARIANTS)}.")
        model, variables = tw.load_model(timm_weights, model_name)
        source, size = timm_weights, TIMM_IMAGE_SIZE
    else:
        from xception_jax.weights import keras_weights as kw

        model, variables = kw.load_model(keras_weights)
        source, size = keras_weights, KERAS_IMAGE_SIZE
    if not model.include_top:
        raise errors.FileFormatError(
            f"{source} has no classifier (a _notop / headless file): it cannot classify; use "
            "the file with top, or fine-tune it (configs/finetune.py)."
        )
    names = imagenet_class_names() if model.num_classes == 1000 else None
    return model, variables, names, size


def load_from_flags(flag_values):
    """load_for_prediction of a tool's weight-source flags (cli.define_weight_source_flags,
    --ema, --model)."""
    return load_for_prediction(
        flag_values.workdir,
        flag_values.keras_weights,
        flag_values.step,
        flag_values.ema,
        flag_values.timm_weights,
        flag_values.model,
    )


def _run(images: list[str]) -> None:
    """Loads the model the flags name and prints the top labels of every image."""
    named = [
        ("--workdir", FLAGS.workdir),
        ("--keras_weights", FLAGS.keras_weights),
        ("--timm_weights", FLAGS.timm_weights),
    ]
    storage.check_all_supported(named + [("image", image) for image in images])
    check_image_files(images)  # Before the model loads (seconds).
    model, variables, names, image_size = load_from_flags(FLAGS)
    results = predict(images, model, variables, names, FLAGS.image_size or image_size, FLAGS.top_k)
    for path, top in zip(images, results, strict=True):
        print(path)
        for label, p in top:
            print(f"  {p:7.4f}  {label}")
    sys.stdout.flush()


def main(argv=None) -> None:
    """Command line (see the module docstring); `argv` without the program name."""
    cli.run_tool(
        _run, FLAGS, __doc__, argv, program="python -m xception_jax.predict", positional="image"
    )


if __name__ == "__main__":
    main()
