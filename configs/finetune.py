"""Fine-tune a pretrained Xception on your own images (or any TFDS dataset).

From Keras's ImageNet weights (the file with or without top: the classifier is replaced):

    python train.py --config configs/finetune.py --workdir runs/finetune \
        --config.init_from_keras=xception_weights_tf_dim_ordering_tf_kernels_notop.h5 \
        --config.image_folder=/path/to/root            # <root>/{train,test}/<class>/<image>

A TFDS dataset instead of a folder: --config.dataset=oxford_flowers102 --config.data_dir=...
--config.eval_split=validation. From timm's weights instead of Keras's:
--config.init_from_timm=model.safetensors --config.model.name=xception65 (the file's variant).
From another run's checkpoint instead of a Keras file:
--config.init_from_workdir=runs/default (and that run's model fields, e.g.
--config.model.name=xception_tiny --config.image_size=48).

The backbone is frozen for the first `freeze_backbone_steps` steps: only the new classifier
trains, on the pretrained features (backbone parameters and BatchNorm statistics stay exactly
as loaded, BatchNorm in inference mode); then everything trains
(xception_jax/training/pretrained.py).
Resuming an interrupted fine-tune runs the same command again (the checkpoint wins over the
pretrained source).
"""

from configs import common


def get_config():
    """Keras-compatible Xception at 299 px, fresh classifier, backbone frozen for 300 steps."""
    config = common.base_config()
    config.model.name = "xception"  # What the Keras ImageNet file holds.
    config.model.bn_momentum = 0.99  # Keras's; the loaded statistics move slowly.
    config.model.dropout_rate = 0.2

    config.init_from_keras = None  # Required (or init_from_timm / _workdir): a Keras .h5 file.
    config.init_from_workdir = None
    config.freeze_backbone_steps = 300

    config.dataset = "image_folder"
    config.image_folder = None  # --config.image_folder=/path/to/root
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = 299
    config.crop_area_range = (0.25, 1.0)
    config.random_flip = True
    config.shuffle_buffer = 4096

    config.batch_size = 32
    config.eval_batch_size = 64
    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 1e-5  # The paper's ImageNet value.
    # A tenth of a from-scratch learning rate: the backbone is already good.
    config.schedule.name = "cosine"
    config.schedule.base_learning_rate = 0.01
    config.schedule.warmup_epochs = 0.0
    config.label_smoothing = 0.1

    config.num_train_steps = -1
    config.num_epochs = 10.0
    config.log_every_steps = 20
    config.eval_every_steps = 200
    config.checkpoint_every_steps = 200
    return config
