"""mixup and CutMix of the global batch inside the jitted train step, with soft targets.

As timm's `Mixup` in its default 'batch' mode (timm/data/mixup.py): once per batch, with
probability `mixup_prob`, either CutMix (with probability `mixup_switch_prob` when both are on)
or mixup is applied with lambda ~ Beta(alpha, alpha); each example is mixed with the example at
the mirrored place of the global batch (timm's `x.flip(0)`), and the targets are the one-hot
(label-smoothed) labels mixed with the same lambda. CutMix's lambda is corrected to the area of
the box actually pasted (the box is clipped at the image's edges: timm's correct_lam).

Every draw comes from the step's rng, so a batch's mixing is a function of (seed, step): it
resumes and replays exactly on any number of devices and processes. Nothing runs on the host.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from xception_jax.data import shards

# Folded into the step's rng: mixing draws never reuse dropout's or drop path's randomness.
_RNG_SALT = 0x6D697875  # "mixu"


def is_on(config) -> bool:
    """Whether config.augment mixes batches (mixup or CutMix, with a nonzero probability)."""
    alphas = [float(shards.augment_field(config, f, 0.0)) for f in ("mixup_alpha", "cutmix_alpha")]
    return sum(alphas) > 0 and float(shards.augment_field(config, "mixup_prob", 1.0)) > 0


def soft_targets(labels, num_classes: int, label_smoothing: float = 0.0):
    """One-hot float32 targets with label smoothing as timm's mixup_target (off = s / C)."""
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on, off)


def cutmix_box(lam, height: int, width: int, cy, cx):
    """timm's rand_bbox: a box of sides int(size * sqrt(1 - lam)) centred at (cy, cx), clipped
    to the image. Returns (y_lo, y_hi, x_lo, x_hi) int32."""
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = (height * ratio).astype(jnp.int32)
    cut_w = (width * ratio).astype(jnp.int32)
    y_lo = jnp.clip(cy - cut_h // 2, 0, height)
    y_hi = jnp.clip(cy + cut_h // 2, 0, height)
    x_lo = jnp.clip(cx - cut_w // 2, 0, width)
    x_hi = jnp.clip(cx + cut_w // 2, 0, width)
    return y_lo, y_hi, x_lo, x_hi


def mix(images, targets, lam, use_cutmix, box):
    """Mixes float images [B, H, W, C] and soft targets [B, K] with their mirrored batch.

    mixup: lam * x + (1 - lam) * flip(x). CutMix: flip(x) pasted into `box` = (y_lo, y_hi,
    x_lo, x_hi), and lam replaced by 1 - box area / image area. Returns (images, targets, lam).
    """
    flipped = images[::-1]
    height, width = images.shape[1], images.shape[2]
    y_lo, y_hi, x_lo, x_hi = (jnp.asarray(v, jnp.int32) for v in box)
    ys = jnp.arange(height)[:, None]
    xs = jnp.arange(width)[None, :]
    inside = (ys >= y_lo) & (ys < y_hi) & (xs >= x_lo) & (xs < x_hi)
    box_lam = 1.0 - ((y_hi - y_lo) * (x_hi - x_lo)).astype(jnp.float32) / (height * width)
    cut = jnp.where(inside[None, :, :, None], flipped, images)
    blended = images * lam + flipped * (1.0 - lam)
    images = jnp.where(use_cutmix, cut, blended)
    lam = jnp.where(use_cutmix, box_lam, lam).astype(jnp.float32)
    targets = targets * lam + targets[::-1] * (1.0 - lam)
    return images, targets, lam


def _beta(key, alpha: float):
    """A Beta(alpha, alpha) draw; 1 (no mixing) where alpha is 0."""
    return jax.random.beta(key, alpha, alpha) if alpha > 0 else jnp.float32(1.0)


def sample(rng, config, height: int, width: int):
    """(lam, use_cutmix, box) of one batch, drawn from `rng` as timm's _params_per_batch."""
    mixup_alpha = float(shards.augment_field(config, "mixup_alpha", 0.0))
    cutmix_alpha = float(shards.augment_field(config, "cutmix_alpha", 0.0))
    prob = float(shards.augment_field(config, "mixup_prob", 1.0))
    switch = float(shards.augment_field(config, "mixup_switch_prob", 0.5))
    k_apply, k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(rng, 6)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = _beta(k_mixup, mixup_alpha)
    lam_cutmix = _beta(k_cutmix, cutmix_alpha)
    lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup).astype(jnp.float32)
    applied = jax.random.uniform(k_apply) < prob
    # Not applied: lam = 1, which leaves the batch as it is (timm returns early).
    lam = jnp.where(applied, lam, 1.0)
    use_cutmix = use_cutmix & applied
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    return lam, use_cutmix, cutmix_box(lam, height, width, cy, cx)


def mix_batch(images, labels, rng, config, num_classes: int):
    """The step's mixed float images and soft targets: (images, targets [B, K] float32).

    `rng` is the step's rng (fold_in(seed, step)); label smoothing (config.label_smoothing)
    is folded into the targets before mixing, as timm does.
    """
    lam, use_cutmix, box = sample(
        jax.random.fold_in(rng, _RNG_SALT), config, images.shape[1], images.shape[2]
    )
    targets = soft_targets(labels, num_classes, float(config.get("label_smoothing", 0.0)))
    images, targets, _ = mix(images, targets, lam.astype(images.dtype), use_cutmix, box)
    return images, targets
