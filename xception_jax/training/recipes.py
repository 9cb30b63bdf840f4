"""Training recipes as sets of config fields: the paper's and a modern RandAugment recipe.

`configs/imagenet.py` is the paper's recipe and `configs/modern_ra.py` the modern one; the
fields in which they differ are listed here once, so that `xception_jax.sweep --sweep recipe`
can train one recipe or the other from any base config (docs/modern_recipes.md).
"""

from __future__ import annotations

# The paper's recipe (Chollet 2017, section 4.3; configs/imagenet.py): SGD momentum 0.9,
# lr 0.045 per 1024 images decayed by 0.94 every 2 epochs, weight decay 1e-5, no label
# smoothing, and no augmentation beyond the Inception crop and flip.
PAPER = {
    "optimizer.name": "sgd",
    "optimizer.nesterov": False,
    "optimizer.weight_decay": 1e-5,
    "optimizer.weight_decay_mask": "kernels",
    "schedule.name": "exponential",
    "schedule.base_learning_rate": 0.045,
    "schedule.reference_batch_size": 1024,
    "schedule.warmup_epochs": 0.0,
    "label_smoothing": 0.0,
    "augment.randaugment_layers": 0,
    "augment.randaugment_magnitude": 9.0,
    "augment.randaugment_magnitude_std": 0.0,
    "augment.autoaugment": "",
    "augment.random_erasing": 0.0,
    "augment.mixup_alpha": 0.0,
    "augment.cutmix_alpha": 0.0,
    "augment.mixup_prob": 1.0,
    "augment.mixup_switch_prob": 0.5,
    "model.drop_path_rate": 0.0,
}

# The modern RandAugment recipe, each value with its source:
MODERN_RA = {
    # Nesterov SGD, lr 0.1 per 256 images (Goyal et al. 2017), weight decay 4e-5 sparing the
    # depthwise kernels (MobileNet / EfficientNet practice): configs/modern.py.
    "optimizer.name": "sgd",
    "optimizer.nesterov": True,
    "optimizer.weight_decay": 4e-5,
    "optimizer.weight_decay_mask": "kernels_except_depthwise",
    # 5 epochs of linear warmup (Goyal et al. 2017), then cosine to 0 (Loshchilov & Hutter 2017).
    "schedule.name": "cosine",
    "schedule.base_learning_rate": 0.1,
    "schedule.reference_batch_size": 256,
    "schedule.warmup_epochs": 5.0,
    # Label smoothing 0.1 (Szegedy et al. 2016; DeiT, Touvron et al. 2021, Table 9).
    "label_smoothing": 0.1,
    # RandAugment 2 ops at magnitude 9, magnitude std 0.5: timm's `rand-m9-mstd0.5` (its
    # EfficientNet / ResNet RA recipes; DeiT's is rand-m9-mstd0.5-inc1). Cubuk et al. 2020
    # give N=2, M=9 for ResNet-50 on ImageNet.
    "augment.randaugment_layers": 2,
    "augment.randaugment_magnitude": 9.0,
    "augment.randaugment_magnitude_std": 0.5,
    "augment.autoaugment": "",
    # Random erasing 0.25, timm's 'pixel' mode (Zhong et al. 2020; DeiT's reprob 0.25).
    "augment.random_erasing": 0.25,
    # mixup 0.8, CutMix 1.0, switch 0.5, every batch (DeiT, Table 9; timm's train.py flags
    # --mixup 0.8 --cutmix 1.0 --mixup-switch-prob 0.5 --mixup-prob 1.0).
    "augment.mixup_alpha": 0.8,
    "augment.cutmix_alpha": 1.0,
    "augment.mixup_prob": 1.0,
    "augment.mixup_switch_prob": 0.5,
    # Stochastic depth 0.1 (DeiT-S, Table 9; timm's --drop-path 0.1), linear in depth.
    "model.drop_path_rate": 0.1,
}

RECIPES = {"paper": PAPER, "modern_ra": MODERN_RA}


def apply(config, fields: dict):
    """Sets the dotted `fields` of `config` in place; returns it."""
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config
