"""Every config field with its default; each experiment config starts from `base_config()`.

Fields are documented here once. Durations count optimizer steps unless named `*_epochs`.
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    """All fields the code reads, with defaults an experiment overrides."""
    config = ml_collections.ConfigDict()

    # Model: `name` picks a registered variant (xception_jax.model.registry.VARIANTS); every other
    # field is passed to it as an override (see xception_jax.model.xception.Xception for the list).
    config.model = ml_collections.ConfigDict()
    config.model.name = "xception"
    config.model.residual = True
    config.model.intermediate_activation = "none"  # 'none' | 'relu' | 'elu' (paper Fig. 10).
    config.model.dropout_rate = 0.0
    config.model.remat = False  # Recompute sepconvs' inner activations: less memory, 4-6% slower.
    # Recompute every block from its input in the backward pass: the least memory, about one
    # more forward pass of compute (HBM per image on TPU: docs/memory.md).
    config.model.remat_blocks = False
    # The paper's open questions (docs/research_switches.md). The order of each separable conv's
    # halves: 'depthwise_first' (Keras) | 'pointwise_first' (1x1 to the output width, then the
    # 3x3 on it). Channels per segment of its 3x3: 1 depthwise | g grouped (g divides every
    # separable conv's channels: 1, 2, 4 or 8 on every variant) | -1 a regular 3x3 conv.
    config.model.separable_order = "depthwise_first"
    config.model.channels_per_group = 1
    # Op implementations (xception_jax.model.ops.IMPLS; all equal in value): 'auto' is the backend's
    # fastest measured. E.g. 'lax' everywhere for XLA's own ops, or 'taps_vjp' to try on GPU.
    config.model.depthwise_impl = "auto"  # 'taps_vjp' | 'taps' | 'lax'
    config.model.conv_impl = "auto"  # The stem convs: 'im2col' | 'lax'
    config.model.pool_impl = "auto"  # The max-pools: 'taps_vjp' | 'lax'
    # Stochastic depth: each residual block's branch dropped per example in training, the rate
    # linear in depth up to this (timm's rule); 0: off. Needs residual=True.
    config.model.drop_path_rate = 0.0
    config.half_precision = False  # bfloat16 compute, float32 params.

    # Data (xception_jax.data).
    config.dataset = "sklearn_digits"  # A TFDS name, or 'image_folder'.
    config.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data dir.
    config.manual_dir = ml_collections.config_dict.placeholder(str)  # Manual downloads.
    config.image_folder = ml_collections.config_dict.placeholder(str)  # <root>/<split>/<class>/.
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = 299
    config.crop_area_range = (0.08, 1.0)  # Inception crop: fraction of the image area.
    config.crop_aspect_range = (3 / 4, 4 / 3)
    config.random_flip = True
    # Records in the shuffle buffers of all shards together (each shard shuffles with
    # shuffle_buffer / data_shards of them; a process holds its own shards' buffers).
    # Augmentation beyond the crop and flip (docs/modern_recipes.md); every one off by default.
    # Per example, in tf.data on the uint8 crop, seeded by the example's place in the data order
    # (xception_jax.data.augment): timm's RandAugment or AutoAugment, then random erasing.
    config.augment = ml_collections.ConfigDict()
    config.augment.randaugment_layers = 0  # Ops per image (timm's n); 0: off.
    config.augment.randaugment_magnitude = 9.0  # 0..10 (timm's m).
    config.augment.randaugment_magnitude_std = 0.0  # Per-op N(m, std) (timm's mstd); inf: U(0, m).
    config.augment.autoaugment = ""  # '' (off) | 'imagenet' (AutoAugment's ImageNet policy).
    config.augment.random_erasing = 0.0  # Probability per image (timm's 'pixel' mode).
    # Per global batch, on the device inside the train step (xception_jax.training.mixup), drawn
    # from the step's rng, soft targets (config.label_smoothing folded in): timm's Mixup.
    config.augment.mixup_alpha = 0.0  # Beta(alpha, alpha) lambda of mixup; 0: off.
    config.augment.cutmix_alpha = 0.0  # Beta(alpha, alpha) lambda of CutMix; 0: off.
    config.augment.mixup_prob = 1.0  # Probability that a batch is mixed at all.
    config.augment.mixup_switch_prob = 0.5  # With both on: probability of CutMix over mixup.
    config.shuffle_buffer = 16_384
    # Fixed logical shards of the training data (xception_jax.data.shards): each is read in its
    # own order, fixed by the seed, and every step takes batch_size / data_shards examples from
    # each. The global batch of a step then depends on (seed, step, dataset) alone, not on the
    # number of processes: a run resumes exactly on another slice size, and any step replays on
    # one machine (data.pipeline.global_batch). Constraints, checked before a run starts:
    # batch_size must be a multiple of data_shards, and data_shards a multiple of the number of
    # processes (so 16 works on 1, 2, 4, 8 and 16 hosts); no shard may be empty. Changing
    # data_shards changes the data order: keep it for the life of a run.
    config.data_shards = 16
    config.prefetch_batches = 2

    # Batch sizes are global: split over every device of every process.
    config.batch_size = 256
    config.eval_batch_size = 256
    # Gradient accumulation: each global batch is split into this many microbatches inside the
    # jitted step (a lax.scan, so only one microbatch's activations are in memory at a time);
    # their gradients are averaged into one optimizer update. Microbatch j holds examples j,
    # j + k, j + 2k, ... of the batch, i.e. an equal share of every device's part. BatchNorm
    # normalises each microbatch with that microbatch's own statistics (as the paper's per-GPU
    # BatchNorm did: batch_size / grad_accum_steps images per statistic, not batch_size) and
    # updates its running averages once per microbatch, in order; dropout draws per microbatch.
    # Loss and accuracy metrics are the whole batch's. Data order, schedule, EMA, checkpoints
    # and resume do not change. batch_size must be a multiple of grad_accum_steps x devices.
    # 1: the plain step (one forward/backward over the whole batch).
    config.grad_accum_steps = 1
    config.seed = 0

    # Optimizer (xception_jax.training.optim).
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "sgd"  # 'sgd' | 'rmsprop' | 'adamw'.
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = False
    config.optimizer.rmsprop_decay = 0.9
    config.optimizer.eps = 1.0  # RMSprop epsilon (1.0 as in the Inception recipes).
    config.optimizer.b1 = 0.9  # AdamW.
    config.optimizer.b2 = 0.999
    config.optimizer.weight_decay = 0.0
    config.optimizer.weight_decay_mask = "kernels"  # | 'kernels_except_depthwise' | 'all'.
    config.optimizer.grad_clip_norm = 0.0  # 0: off.

    # Learning-rate schedule.
    config.schedule = ml_collections.ConfigDict()
    config.schedule.name = "cosine"  # 'constant' | 'exponential' | 'cosine'.
    config.schedule.base_learning_rate = 0.1
    config.schedule.reference_batch_size = 0  # > 0: lr scales by batch_size / this.
    config.schedule.warmup_epochs = 0.0
    config.schedule.decay_rate = 0.94  # Exponential: factor per decay period.
    config.schedule.decay_every_epochs = 2.0
    config.schedule.decay_every_examples = 0  # > 0: overrides decay_every_epochs.
    config.schedule.staircase = True

    config.label_smoothing = 0.0
    config.ema_decay = 0.0  # Polyak averaging of params; 0: off. Eval reports both when on.
    config.skip_nonfinite_updates = False  # False: stop on a non-finite loss.

    # Fine-tuning (xception_jax.training.pretrained, configs/finetune.py): start a new run from
    # pretrained weights, every variable but the classifier ('predictions', fresh for the
    # dataset's classes); ignored when the workdir has a checkpoint (the run resumes instead).
    # A Keras .keras / .weights.h5 / .h5 file holding an Xception (nested or whole).
    config.init_from_keras = ml_collections.config_dict.placeholder(str)
    # timm .safetensors file of the variant config.model.name names: xception41 / 65 / 71 or
    # legacy_xception (xception_jax.weights.timm_weights).
    config.init_from_timm = ml_collections.config_dict.placeholder(str)
    config.init_from_workdir = ml_collections.config_dict.placeholder(str)  # A run's workdir.
    # Train only the classifier for this many steps (0: never freeze). Meanwhile the backbone
    # runs in inference mode: parameters and BatchNorm statistics stay exactly as loaded.
    config.freeze_backbone_steps = 0

    # Duration and cadence.
    config.num_train_steps = -1  # -1: derived from num_epochs.
    config.num_epochs = 100.0
    config.log_every_steps = 100
    config.eval_every_steps = 1000
    config.checkpoint_every_steps = 1000
    config.max_checkpoints_to_keep = 3

    # A jax.profiler trace of train steps [profile_start_step, profile_start_step +
    # profile_num_steps) into <workdir>/plugins/profile/ (TensorBoard's profile plugin; local or
    # gs://). 0 steps: off. Process 0 only, unless profile_all_processes.
    config.profile_start_step = 10
    config.profile_num_steps = 0
    config.profile_all_processes = False

    # JAX's persistent compilation cache: a rerun or resume of the same model and shapes loads
    # its compiled steps instead of compiling again. '' turns it off; the environment variable
    # JAX_COMPILATION_CACHE_DIR, when set, wins.
    config.compilation_cache_dir = "~/.cache/xception_jax/jax_compilation_cache"
    return config
