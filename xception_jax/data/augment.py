"""RandAugment, AutoAugment (ImageNet policy) and random erasing in tf.data, on uint8 images.

The ops, their magnitude mappings and the policies are timm's (timm/data/auto_augment.py,
timm/data/random_erasing.py), written as TensorFlow graph functions so they run per example
inside the input pipeline, after the Inception crop. Every random choice is stateless, drawn
from the seed it is given (a function of the example's place in the data order,
`data/order.py`), so an augmented batch depends on (seed, step, dataset) alone, like the crop.

Parity with timm's PIL implementation (tests/test_augment.py): the colour ops are bitwise equal
where PIL's arithmetic is integer (invert, posterize, solarize, solarize_add, autocontrast,
equalize) or float32 blending (color, contrast, brightness); sharpness and the geometric ops
(rotate, shear, translate) interpolate differently at the edges and by rounding, and are
within one intensity level on nearly all pixels.
"""

from __future__ import annotations

import math

import tensorflow as tf

from xception_jax.data import shards

LEVEL_DENOM = 10.0  # timm's magnitude scale: 0..10
FILL = 128  # timm's default fill (_FILL), = round(255 * 0.5): Xception's mean.
TRANSLATE_PCT = 0.45  # timm's hparams 'translate_pct' for TranslateXRel / TranslateYRel.

# The ops in the order of timm's _RAND_TRANSFORMS: RandAugment picks among these.
RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
# Every op this module implements: RandAugment's and the one AutoAugment adds.
OPS = RAND_OPS + ("PosterizeOriginal",)

# AutoAugment's ImageNet policy (Cubuk et al. 2018, Table 9), as timm's
# auto_augment_policy_original: 25 sub-policies of two (op, probability, magnitude).
IMAGENET_POLICY = (
    (("PosterizeOriginal", 0.4, 8), ("Rotate", 0.6, 9)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
    (("PosterizeOriginal", 0.6, 7), ("PosterizeOriginal", 0.6, 6)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Equalize", 0.4, 4), ("Rotate", 0.8, 8)),
    (("Solarize", 0.6, 3), ("Equalize", 0.6, 7)),
    (("PosterizeOriginal", 0.8, 5), ("Equalize", 1.0, 2)),
    (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)),
    (("Equalize", 0.6, 8), ("PosterizeOriginal", 0.4, 6)),
    (("Rotate", 0.8, 8), ("Color", 0.4, 0)),
    (("Rotate", 0.4, 9), ("Equalize", 0.6, 2)),
    (("Equalize", 0.0, 7), ("Equalize", 0.8, 8)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
    (("Color", 0.8, 8), ("Solarize", 0.8, 7)),
    (("Sharpness", 0.4, 7), ("Invert", 0.6, 8)),
    (("ShearX", 0.6, 5), ("Equalize", 1.0, 9)),
    (("Color", 0.4, 0), ("Equalize", 0.6, 3)),
    (("Equalize", 0.4, 7), ("Solarize", 0.2, 4)),
    (("Solarize", 0.6, 5), ("AutoContrast", 0.6, 5)),
    (("Invert", 0.6, 4), ("Equalize", 1.0, 8)),
    (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
    (("Equalize", 0.8, 8), ("Equalize", 0.6, 3)),
)
POLICIES = ("", "imagenet")

# timm's RandomErasing defaults: area 2%-1/3 of the image, aspect 0.3-1/0.3, 10 attempts.
ERASE_AREA = (0.02, 1 / 3)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))
ERASE_ATTEMPTS = 10


# ------------------------------------------------------------------------------------------
# The ops: uint8 [H, W, 3] -> uint8 [H, W, 3]
# ------------------------------------------------------------------------------------------


def _lut(image, table):
    """Maps every pixel through a per-channel table: table int32 [3, 256]."""
    x = tf.cast(image, tf.int32)
    out = tf.stack([tf.gather(table[c], x[..., c]) for c in range(3)], axis=-1)
    return tf.cast(out, tf.uint8)


def auto_contrast(image):
    """PIL ImageOps.autocontrast: each channel stretched so its min is 0 and max 255."""
    x = tf.cast(image, tf.float64)
    lo = tf.reduce_min(x, axis=[0, 1])
    hi = tf.reduce_max(x, axis=[0, 1])
    # PIL's lut: int(i * scale + offset) in double precision, identity where hi <= lo.
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    stretched = tf.clip_by_value(tf.floor(x * scale + (-lo * scale)), 0.0, 255.0)
    return tf.cast(tf.where(hi > lo, stretched, x), tf.uint8)


def equalize(image):
    """PIL ImageOps.equalize: per-channel histogram equalisation with PIL's exact lut."""
    tables = []
    x = tf.cast(image, tf.int32)
    for c in range(3):
        hist = tf.math.bincount(tf.reshape(x[..., c], [-1]), minlength=256, maxlength=256)
        nonzero = tf.boolean_mask(hist, hist > 0)
        # step = (sum of the histogram but its last nonzero bin) // 255 (Pillow >= 9.x; older
        # releases divided by 256); identity when 0.
        step = (tf.reduce_sum(hist) - nonzero[-1]) // 255
        safe = tf.maximum(step, 1)
        # lut[i] = (step // 2 + sum(hist[:i])) // step
        cum = tf.concat([[0], tf.cumsum(hist)[:-1]], 0)
        lut = tf.minimum((step // 2 + cum) // safe, 255)
        tables.append(tf.where(step > 0, lut, tf.range(256)))
    return _lut(image, tf.stack(tables))


def invert(image):
    """PIL ImageOps.invert: 255 - x."""
    return 255 - image


def posterize(image, bits):
    """PIL ImageOps.posterize: keeps the `bits` most significant bits (0 <= bits <= 8)."""
    bits = tf.cast(bits, tf.int32)
    mask = tf.bitwise.bitwise_and(
        tf.bitwise.invert(tf.bitwise.left_shift(1, 8 - bits) - 1), tf.constant(255)
    )
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image, threshold):
    """PIL ImageOps.solarize: inverts the pixels >= threshold."""
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < tf.cast(threshold, tf.int32), x, 255 - x), tf.uint8)


def solarize_add(image, add, threshold=128):
    """timm's solarize_add: adds `add` (saturating) to the pixels below threshold."""
    x = tf.cast(image, tf.int32)
    added = tf.minimum(x + tf.cast(add, tf.int32), 255)
    return tf.cast(tf.where(x < threshold, added, x), tf.uint8)


def _blend(degenerate, image, factor):
    """PIL Image.blend(degenerate, image, factor): float32 in1 + a * (in2 - in1), truncated."""
    d = tf.cast(degenerate, tf.float32)
    x = tf.cast(image, tf.float32)
    out = d + tf.cast(factor, tf.float32) * (x - d)
    return tf.cast(tf.clip_by_value(tf.floor(out), 0.0, 255.0), tf.uint8)


def _grayscale(image):
    """PIL's RGB -> L conversion (ITU-R 601-2 luma, fixed point): int32 [H, W]."""
    x = tf.cast(image, tf.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536


def color(image, factor):
    """PIL ImageEnhance.Color: blend with the image's grey version."""
    gray = tf.cast(tf.repeat(_grayscale(image)[..., None], 3, axis=-1), tf.uint8)
    return _blend(gray, image, factor)


def contrast(image, factor):
    """PIL ImageEnhance.Contrast: blend with the mean grey level (rounded)."""
    mean = tf.floor(tf.reduce_mean(tf.cast(_grayscale(image), tf.float64)) + 0.5)
    return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def brightness(image, factor):
    """PIL ImageEnhance.Brightness: blend with black."""
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
    """PIL ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (3x3, centre 5, /13); the
    one-pixel border of the smoothed image is the image itself, as in PIL."""
    x = tf.cast(image, tf.float32)[None]
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.clip_by_value(tf.round(smooth), 0.0, 255.0)
    inner = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    inner_mask = tf.zeros([h - 2, w - 2, 1], tf.bool)
    border = tf.pad(inner_mask, [[1, 1], [1, 1], [0, 0]], "CONSTANT", True)
    degenerate = tf.where(border, x[0], inner)
    return _blend(degenerate, image, factor)


def _affine(image, a, b, c, d, e, f):
    """PIL Image.transform(AFFINE, (a, b, c, d, e, f), BILINEAR, fillcolor=FILL).

    Output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f) in PIL's continuous
    coordinates (pixel centres at +0.5); ImageProjectiveTransformV3 puts centres at integers.
    """
    a, b, c, d, e, f = (tf.cast(v, tf.float32) for v in (a, b, c, d, e, f))
    c = c + 0.5 * a + 0.5 * b - 0.5
    f = f + 0.5 * d + 0.5 * e - 0.5
    transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None],
        transforms=transform,
        output_shape=tf.shape(image)[:2],
        fill_value=float(FILL),
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def rotate(image, degrees):
    """PIL Image.rotate(degrees) (counter-clockwise about the centre), bilinear, grey fill."""
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    a, b = tf.cos(angle), tf.sin(angle)
    d, e = -tf.sin(angle), tf.cos(angle)
    cx, cy = w / 2, h / 2
    c = a * -cx + b * -cy + cx
    f = d * -cx + e * -cy + cy
    return _affine(image, a, b, c, d, e, f)


def shear_x(image, factor):
    """timm's shear_x: AFFINE (1, factor, 0, 0, 1, 0)."""
    return _affine(image, 1.0, factor, 0.0, 0.0, 1.0, 0.0)


def shear_y(image, factor):
    """timm's shear_y: AFFINE (1, 0, 0, factor, 1, 0)."""
    return _affine(image, 1.0, 0.0, 0.0, factor, 1.0, 0.0)


def translate_x_rel(image, pct):
    """timm's translate_x_rel: shifts by pct of the width (positive: content moves left)."""
    pixels = tf.cast(pct, tf.float32) * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, 1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def translate_y_rel(image, pct):
    """timm's translate_y_rel: shifts by pct of the height (positive: content moves up)."""
    pixels = tf.cast(pct, tf.float32) * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, 1.0, 0.0, 0.0, 0.0, 1.0, pixels)


# ------------------------------------------------------------------------------------------
# Magnitudes (timm's LEVEL_TO_ARG) and the dispatch
# ------------------------------------------------------------------------------------------


def _int(x):
    """Python's int() of a non-negative float: truncation."""
    return tf.cast(tf.floor(x), tf.int32)


def _op_fn(name):
    """fn(image, level, sign) of op `name`: `level` in [0, 10] maps to the op's argument as
    timm's LEVEL_TO_ARG does; `sign` (+1 or -1) is timm's _randomly_negate."""
    frac = lambda level: level / LEVEL_DENOM  # noqa: E731
    enhance = lambda level: frac(level) * 1.8 + 0.1  # noqa: E731  [0.1, 1.9]
    table = {
        "AutoContrast": lambda x, level, sign: auto_contrast(x),
        "Equalize": lambda x, level, sign: equalize(x),
        "Invert": lambda x, level, sign: invert(x),
        "Rotate": lambda x, level, sign: rotate(x, sign * frac(level) * 30.0),
        "Posterize": lambda x, level, sign: posterize(x, _int(frac(level) * 4)),
        "PosterizeOriginal": lambda x, level, sign: posterize(x, _int(frac(level) * 4) + 4),
        "Solarize": lambda x, level, sign: solarize(x, _int(frac(level) * 256)),
        "SolarizeAdd": lambda x, level, sign: solarize_add(x, _int(frac(level) * 110)),
        "Color": lambda x, level, sign: color(x, enhance(level)),
        "Contrast": lambda x, level, sign: contrast(x, enhance(level)),
        "Brightness": lambda x, level, sign: brightness(x, enhance(level)),
        "Sharpness": lambda x, level, sign: sharpness(x, enhance(level)),
        "ShearX": lambda x, level, sign: shear_x(x, sign * frac(level) * 0.3),
        "ShearY": lambda x, level, sign: shear_y(x, sign * frac(level) * 0.3),
        "TranslateXRel": lambda x, level, sign: translate_x_rel(
            x, sign * frac(level) * TRANSLATE_PCT
        ),
        "TranslateYRel": lambda x, level, sign: translate_y_rel(
            x, sign * frac(level) * TRANSLATE_PCT
        ),
    }
    return table[name]


def apply_op(image, name, level, sign=1.0):
    """Op `name` (one of OPS) at magnitude `level` (0..10) with sign +1/-1 where it has one."""
    level = tf.cast(level, tf.float32)
    return _op_fn(name)(image, level, tf.cast(sign, tf.float32))


def _apply_op_index(image, index, level, sign):
    """Op OPS[index] (a scalar tensor): only the chosen branch runs."""
    branches = [(lambda name=name: _op_fn(name)(image, level, sign)) for name in OPS]
    out = tf.switch_case(index, branches)
    return tf.ensure_shape(out, image.shape)


def _uniform(seed, minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform([], seed=seed, minval=minval, maxval=maxval)


def _sign(seed):
    return tf.where(_uniform(seed) > 0.5, -1.0, 1.0)


def rand_augment(image, seed, *, num_layers, magnitude, magnitude_std=0.0):
    """timm's RandAugment: `num_layers` ops drawn uniformly with replacement from RAND_OPS,
    each applied with probability 1/2 at a magnitude ~ N(magnitude, magnitude_std) clipped to
    [0, 10] (magnitude_std 0: fixed; inf: uniform in [0, magnitude]) and a random sign."""
    seeds = tf.random.experimental.stateless_split(seed, int(num_layers))
    for i in range(int(num_layers)):
        op_seed, apply_seed, mag_seed, sign_seed = tf.unstack(
            tf.random.experimental.stateless_split(seeds[i], 4)
        )
        index = tf.random.stateless_uniform(
            [], seed=op_seed, minval=0, maxval=len(RAND_OPS), dtype=tf.int32
        )
        if magnitude_std == float("inf"):
            level = _uniform(mag_seed, 0.0, float(magnitude))
        elif magnitude_std > 0:
            level = float(magnitude) + float(magnitude_std) * tf.random.stateless_normal(
                [], seed=mag_seed
            )
        else:
            level = tf.constant(float(magnitude))
        level = tf.clip_by_value(level, 0.0, LEVEL_DENOM)
        image = tf.cond(
            _uniform(apply_seed) < 0.5,
            lambda image=image, index=index, level=level, s=sign_seed: _apply_op_index(
                image, index, level, _sign(s)
            ),
            lambda image=image: image,
        )
    return image


def auto_augment(image, seed, *, policy="imagenet"):
    """AutoAugment: one of the policy's sub-policies drawn uniformly, each of its two ops applied
    with its probability at its magnitude (a random sign where the op has one), as timm's
    AutoAugment with auto_augment_policy_original."""
    if policy != "imagenet":
        raise ValueError(f"Unknown AutoAugment policy {policy!r}; known: {POLICIES}.")
    ops = tf.constant([[OPS.index(op) for op, _, _ in sub] for sub in IMAGENET_POLICY])
    probs = tf.constant([[p for _, p, _ in sub] for sub in IMAGENET_POLICY], tf.float32)
    levels = tf.constant([[float(m) for _, _, m in sub] for sub in IMAGENET_POLICY])
    choice_seed, *op_seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    k = tf.random.stateless_uniform(
        [], seed=choice_seed, minval=0, maxval=len(IMAGENET_POLICY), dtype=tf.int32
    )
    for j in range(2):
        apply_seed, sign_seed = op_seeds[2 * j], op_seeds[2 * j + 1]
        image = tf.cond(
            _uniform(apply_seed) < probs[k, j],
            lambda image=image, j=j, s=sign_seed: _apply_op_index(
                image, ops[k, j], levels[k, j], _sign(s)
            ),
            lambda image=image: image,
        )
    return image


def random_erasing(image, seed, *, probability):
    """timm's RandomErasing in its default mode ('pixel', one box): with `probability`, a box of
    2%-1/3 of the area and aspect 0.3-3.3 (10 tries to fit) is filled with per-pixel noise.

    timm draws the noise N(0, 1) in the network's input space; for Xception's [-1, 1] scaling
    that is 127.5 + 127.5 N(0, 1) in pixels, rounded and clipped to uint8 here.
    """
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    apply_seed, noise_seed, *attempt_seeds = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2 + ERASE_ATTEMPTS)
    )
    # The first of the attempts whose box fits (timm's loop breaks there).
    found = tf.constant(False)
    box = tf.zeros([4], tf.int32)
    for s in attempt_seeds:
        area_s, aspect_s, top_s, left_s = tf.unstack(tf.random.experimental.stateless_split(s, 4))
        area = _uniform(area_s, *ERASE_AREA) * hf * wf
        aspect = tf.exp(_uniform(aspect_s, *ERASE_LOG_ASPECT))
        bh = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
        bw = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
        fits = (bw < w) & (bh < h) & ~found
        top = tf.random.stateless_uniform(
            [], seed=top_s, minval=0, maxval=tf.maximum(h - bh + 1, 1), dtype=tf.int32
        )
        left = tf.random.stateless_uniform(
            [], seed=left_s, minval=0, maxval=tf.maximum(w - bw + 1, 1), dtype=tf.int32
        )
        box = tf.where(fits, tf.stack([top, left, bh, bw]), box)
        found = found | fits
    erase = found & (_uniform(apply_seed) < probability)
    top, left, bh, bw = tf.unstack(box)
    ys = tf.range(h)[:, None, None]
    xs = tf.range(w)[None, :, None]
    inside = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw) & erase
    noise = 127.5 + 127.5 * tf.random.stateless_normal(tf.shape(image), seed=noise_seed)
    noise = tf.cast(tf.clip_by_value(tf.round(noise), 0.0, 255.0), tf.uint8)
    return tf.where(inside, noise, image)


# ------------------------------------------------------------------------------------------
# The config
# ------------------------------------------------------------------------------------------


def is_on(config) -> bool:
    """Whether any per-example augmentation of config.augment is on (tf.data side)."""
    return (
        int(shards.augment_field(config, "randaugment_layers", 0)) > 0
        or bool(shards.augment_field(config, "autoaugment", ""))
        or float(shards.augment_field(config, "random_erasing", 0.0)) > 0
    )


def augment_fn(config):
    """fn(uint8 image, seed) applying config.augment's per-example augmentation in timm's
    order (RandAugment or AutoAugment, then random erasing); None when all are off."""
    if not is_on(config):
        return None
    layers = int(shards.augment_field(config, "randaugment_layers", 0))
    magnitude = float(shards.augment_field(config, "randaugment_magnitude", 9.0))
    magnitude_std = float(shards.augment_field(config, "randaugment_magnitude_std", 0.0))
    policy = str(shards.augment_field(config, "autoaugment", ""))
    erasing = float(shards.augment_field(config, "random_erasing", 0.0))
    if policy not in POLICIES:
        raise ValueError(f"config.augment.autoaugment={policy!r} must be one of {POLICIES}.")

    def fn(image, seed):
        policy_seed, erase_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        if layers > 0:
            image = rand_augment(
                image,
                policy_seed,
                num_layers=layers,
                magnitude=magnitude,
                magnitude_std=magnitude_std,
            )
        elif policy:
            image = auto_augment(image, policy_seed, policy=policy)
        if erasing > 0:
            image = random_erasing(image, erase_seed, probability=erasing)
        return image

    return fn
