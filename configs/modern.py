"""A modern recipe for Xception on ImageNet: Nesterov SGD, warmup + cosine, label smoothing.

Linear warmup for 5 epochs (Goyal et al. 2017) then cosine decay to 0 (Loshchilov & Hutter),
label smoothing 0.1, lr 0.1 per 256 images scaled with the global batch, weight decay 4e-5
sparing depthwise kernels (MobileNet/EfficientNet practice), EMA for evaluation.
"""

from configs import imagenet


def get_config():
    """Xception on imagenet2012, 90 epochs of warmup + cosine."""
    config = imagenet.get_config()
    config.optimizer.name = "sgd"
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 4e-5
    config.optimizer.weight_decay_mask = "kernels_except_depthwise"
    config.schedule.name = "cosine"
    config.schedule.base_learning_rate = 0.1
    config.schedule.reference_batch_size = 256
    config.schedule.warmup_epochs = 5.0
    config.label_smoothing = 0.1
    config.num_epochs = 90.0
    return config
