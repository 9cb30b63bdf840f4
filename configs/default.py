"""The main job: the tiny Xception on the embedded digits dataset, minutes on 2 CPU cores."""

from configs import common


def get_config():
    """Tiny CPU variant on sklearn_digits; >= 97% test accuracy in a few minutes."""
    config = common.base_config()
    config.model.name = "xception_tiny"
    # Keras's 0.99 lags on a run this short (eval near chance for ~200 steps): a faster
    # moving average of the BatchNorm statistics.
    config.model.bn_momentum = 0.9

    config.dataset = "sklearn_digits"
    config.data_dir = "data/tfds"
    config.image_size = 48
    # Digits are small and centred: the 8% minimum crop of ImageNet would cut most of them
    # away, and a flipped digit is another (or no) digit.
    config.crop_area_range = (0.5, 1.0)
    config.random_flip = False
    config.shuffle_buffer = 2048

    config.batch_size = 64
    config.eval_batch_size = 128
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 5e-5
    config.schedule.name = "cosine"
    config.schedule.base_learning_rate = 0.1
    config.schedule.warmup_epochs = 1.0

    config.num_train_steps = 400
    config.log_every_steps = 20
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    return config
