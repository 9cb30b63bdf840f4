"""A modern RandAugment recipe for Xception on ImageNet, in the style of timm's RA recipes.

configs/modern.py (Nesterov SGD, 5 epochs of warmup then cosine, lr 0.1 per 256 images,
label smoothing 0.1, weight decay 4e-5 sparing depthwise kernels, EMA) plus the regularisation
of today's baselines, each value with its source in xception_jax/training/recipes.py
(MODERN_RA): RandAugment 2 ops at m9 with magnitude std 0.5 (timm's rand-m9-mstd0.5), mixup
0.8 / CutMix 1.0 switching at 0.5 (DeiT), random erasing 0.25 (DeiT), drop path 0.1 (DeiT-S).
The paper's dropout of 0.5 before the classifier is kept. docs/modern_recipes.md has the
fields and the recipe sweep against the paper's recipe.
"""

from configs import modern
from xception_jax.training import recipes


def get_config():
    """Xception on imagenet2012, 90 epochs of warmup + cosine with RandAugment, mixup/CutMix,
    random erasing and drop path."""
    return recipes.apply(modern.get_config(), recipes.MODERN_RA)
