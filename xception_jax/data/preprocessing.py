"""Per-example preprocessing in tf.data: decode, crop, flip, resize; uint8 out.

Graph functions; every random choice is stateless, drawn from the seed it is given (the
example's place in the data order, `data/order.py`), never from TF's stateful generator.
Scaling to [-1, 1] happens on the device (`model.xception.preprocess`).
"""

import tensorflow as tf

DEFAULT_EVAL_CROP_FRACTION = 0.875  # Inception's central crop
_MAX_CROP_ATTEMPTS = 10


def _decode_and_crop(encoded, crop_window_fn):
    """Decodes an image to RGB uint8, keeping only crop_window_fn(shape) = (y, x, h, w).

    JPEGs are decoded straight into the window (tf.image.decode_and_crop_jpeg: only the crop's
    pixels are decompressed); other formats (PNG, BMP, GIF) are decoded whole and then sliced.
    """

    def jpeg():
        window = crop_window_fn(tf.image.extract_jpeg_shape(encoded))
        return tf.image.decode_and_crop_jpeg(encoded, tf.stack(window), channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        y, x, h, w = crop_window_fn(tf.shape(image))
        return image[y : y + h, x : x + w]

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _resize_uint8(image, image_size):
    """Bilinear resize to image_size x image_size, rounded back to uint8."""
    image = tf.image.resize(image, [image_size, image_size], method="bilinear")
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def preprocess_train(
    encoded,
    seed,
    *,
    image_size,
    area_range=(0.08, 1.0),
    aspect_range=(3 / 4, 4 / 3),
    random_flip=True,
):
    """Inception-style training crop of one encoded image -> uint8 [image_size, image_size, 3].

    A window with area in `area_range` (fraction of the image) and aspect ratio in
    `aspect_range` is sampled by tf.image.stateless_sample_distorted_bounding_box (the whole
    image after 10 failed attempts), decoded, flipped left-right with probability 1/2 when
    `random_flip`, and resized. `seed` (int tensor of shape [2]) fixes every random choice.
    """
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def window(shape):
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=crop_seed,
            min_object_covered=0.0,
            aspect_ratio_range=tuple(float(a) for a in aspect_range),
            area_range=tuple(float(a) for a in area_range),
            max_attempts=_MAX_CROP_ATTEMPTS,
            use_image_if_no_bounding_boxes=True,
        )
        return [begin[0], begin[1], size[0], size[1]]

    image = _decode_and_crop(encoded, window)
    if random_flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return _resize_uint8(image, image_size)


def preprocess_eval(encoded, *, image_size, crop_fraction=DEFAULT_EVAL_CROP_FRACTION):
    """Inception-style evaluation: central crop of `crop_fraction` of each side, then resize."""

    def window(shape):
        # Same window as tf.image.central_crop(image, crop_fraction).
        h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
        y = tf.cast((h - h * crop_fraction) / 2, tf.int32)
        x = tf.cast((w - w * crop_fraction) / 2, tf.int32)
        return [y, x, shape[0] - 2 * y, shape[1] - 2 * x]

    return _resize_uint8(_decode_and_crop(encoded, window), image_size)
