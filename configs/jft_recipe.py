"""The paper's JFT optimizer (section 4.3) on a configurable dataset.

Stated by the paper: RMSprop with momentum 0.9, learning rate 0.001 decayed by 0.9 every
3,000,000 samples, no dropout. JFT itself is not public: the dataset defaults to imagenet2012
(override --config.dataset). RMSprop's decay 0.9 and epsilon 1.0 are the values of the
Inception V3 recipe the paper's setup follows; they are not stated in the paper. Batch 1024 as
in configs/imagenet.py; the learning rate is not rescaled (the paper gives it per sample count).
"""

from configs import imagenet


def get_config():
    """Xception with RMSprop 0.001, x0.9 every 3M samples, no dropout."""
    config = imagenet.get_config()
    config.model.dropout_rate = 0.0

    config.optimizer.name = "rmsprop"
    config.optimizer.momentum = 0.9
    config.optimizer.rmsprop_decay = 0.9
    config.optimizer.eps = 1.0
    config.optimizer.weight_decay = 1e-5

    config.schedule.name = "exponential"
    config.schedule.base_learning_rate = 0.001
    config.schedule.reference_batch_size = 0
    config.schedule.decay_rate = 0.9
    config.schedule.decay_every_examples = 3_000_000
    config.schedule.staircase = True
    return config
