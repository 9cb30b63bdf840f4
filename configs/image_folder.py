"""Train on your own images: <image_folder>/<train_split>/<class>/<image>, same for eval.

    python train.py --config configs/image_folder.py --workdir runs/mine \
        --config.image_folder=/path/to/root --config.num_train_steps=2000

The tiny variant by default, so it runs on a laptop; use --config.model.name=xception and
--config.image_size=299 on an accelerator.
"""

from configs import common


def get_config():
    """Tiny Xception on a folder of class-named subfolders of images."""
    config = common.base_config()
    config.model.name = "xception_tiny"
    config.model.bn_momentum = 0.9
    config.model.dropout_rate = 0.2
    config.dataset = "image_folder"
    config.image_folder = None  # Required: --config.image_folder=/path/to/root.
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = 128
    config.crop_area_range = (0.25, 1.0)
    config.random_flip = True
    config.shuffle_buffer = 4096

    config.batch_size = 32
    config.eval_batch_size = 64
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 5e-5
    config.schedule.name = "cosine"
    config.schedule.base_learning_rate = 0.05
    config.schedule.warmup_epochs = 1.0
    config.label_smoothing = 0.1

    config.num_train_steps = -1
    config.num_epochs = 30.0
    config.log_every_steps = 20
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    return config
