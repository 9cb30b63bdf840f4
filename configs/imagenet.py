"""The paper's ImageNet recipe (Chollet 2017, section 4.3), line by line.

Stated by the paper: SGD with momentum 0.9, learning rate 0.045 decayed by 0.94 every 2 epochs
(staircase), weight decay 1e-5, dropout 0.5 before the classifier, Polyak averaging of the
weights for evaluation, 299x299 input, no auxiliary classifier.

Not stated, chosen here (each overridable on the command line):
- Global batch 1024 (32 per core of a 32-core pod slice); the paper's 0.045 is taken to belong
  to this batch and scales linearly when the batch changes (reference_batch_size).
- 100 epochs: with the 0.94-per-2-epochs decay the rate ends near 0.045 * 0.94**50 = 0.002,
  where the Inception recipes this one comes from stop gaining.
- EMA decay 0.9999, the value of TensorFlow's Inception training code, per step.
- Augmentation: Inception crop (8%-100% of the area, aspect 3/4-4/3) and horizontal flip; eval
  is a central crop of 87.5% resized to 299.
- Weight decay (coupled L2, added to the gradient as in Keras/TF-slim) on every conv and dense
  kernel, depthwise included; not on BatchNorm scale/offset nor on the classifier bias.

Memory (measured by compiling for each TPU slice on a CPU host, `python -m xception_jax.aot
--config configs/imagenet.py --topology <slice>`; docs/memory.md, "The paper's batch
on small slices"):
- bfloat16 compute (parameters, optimizer state and BatchNorm statistics stay float32) and
  grad_accum_steps=4: the batch of 1024 runs as 4 microbatches of 256, 64 images per chip on 4
  chips (BatchNorm statistics per microbatch of 256, cf. the paper's per-GPU BatchNorm). As
  shipped it fits a v5e-4 (9.12 of 15.75 GiB per chip), a v5e-8, a v4-8, a v5p-8 and a v6e-4,
  and any larger slice whose chip count divides 256.
- Fewer microbatches where memory allows (same FLOPs, larger matmuls): grad_accum_steps=2 on a
  v5e-8 (9.05 GiB) or a v6e-4 (15.35 of 31.25 GiB); 1 on a v4-8 (28.24 of 30.75 GiB) or a v5p-8
  (also in float32, half_precision=False: 49.63 of 95.74 GiB). In float32 with accumulation 1
  it fits neither a v5e-4 nor a v4-8 (37.1 / 38.1 GB needed, issue 14). Batch 1024 in one pass
  does not fit a v5e-4 in bf16 either (XLA: 21.75 GiB needed).
"""

from configs import common


def get_config():
    """Xception on imagenet2012 with the paper's optimizer and schedule."""
    config = common.base_config()
    config.model.name = "xception"
    config.model.dropout_rate = 0.5

    config.dataset = "imagenet2012"
    config.data_dir = None  # TFDS default (~/tensorflow_datasets); set --config.data_dir=gs://...
    config.train_split = "train"
    config.eval_split = "validation"
    config.image_size = 299
    config.crop_area_range = (0.08, 1.0)
    config.random_flip = True

    config.batch_size = 1024
    config.eval_batch_size = 1024
    # Up to 64 hosts (a v4-512 or v5e-256 slice), any power of two below; 16 images per shard
    # and step.
    config.data_shards = 64
    # Fits the paper's batch on small TPU slices (see the docstring and docs/memory.md).
    config.half_precision = True
    config.grad_accum_steps = 4

    config.optimizer.name = "sgd"
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.weight_decay = 1e-5
    config.optimizer.weight_decay_mask = "kernels"

    config.schedule.name = "exponential"
    config.schedule.base_learning_rate = 0.045
    config.schedule.reference_batch_size = 1024
    config.schedule.decay_rate = 0.94
    config.schedule.decay_every_epochs = 2.0
    config.schedule.staircase = True
    config.schedule.warmup_epochs = 0.0

    config.ema_decay = 0.9999

    config.num_train_steps = -1
    config.num_epochs = 100.0
    config.log_every_steps = 100
    config.eval_every_steps = 2 * 1251  # Every 2 epochs at batch 1024.
    config.checkpoint_every_steps = 1000
    return config
