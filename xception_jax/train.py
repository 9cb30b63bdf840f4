"""Training and evaluation: TrainState, pure jitted steps, and the loop that drives them."""

from __future__ import annotations

import functools
import itertools
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from xception_jax import (
    checkpoints,
    config_validation,
    data_shards,
    models,
    ops,
    optim,
    preemption,
    pretrained,
    sharding,
    storage,
    telemetry,
)

METRICS_FILE = "metrics.jsonl"


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and checkpoints)."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # Polyak average of params; None when config.ema_decay == 0.
    skipped_updates: jax.Array  # Steps whose update was dropped for a non-finite loss.


def create_model_from_config(
    config: ml_collections.ConfigDict, num_classes: int, platform: str | None = None
):
    """The flax module that `config.model` describes, with compute dtype from half_precision.

    Its op implementations are resolved for `platform` (default: JAX's backend): 'auto' becomes
    that platform's choice, so a step compiled for a TPU from a CPU host traces the TPU's ops.
    """
    overrides = {k: v for k, v in config.model.items() if k != "name"}
    overrides = ops.resolve_impls(
        {**{f"{op}_impl": "auto" for op in ops.IMPLS}, **overrides}, platform
    )
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    return models.create_model(config.model.name, num_classes=num_classes, dtype=dtype, **overrides)


def abstract_variables(model, image_size: int):
    """Shapes and dtypes of the model's variables, without computing anything."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def init_state(model, tx, config: ml_collections.ConfigDict) -> TrainState:
    """A fresh TrainState (pure: a function of config.seed only)."""
    x = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    variables = model.init(jax.random.key(config.seed), x, train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        ema_params=params if config.ema_decay > 0 else None,
        skipped_updates=jnp.zeros((), jnp.int32),
    )


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy with optional label smoothing."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _loss_fn(params, batch_stats, images, labels, rng, step, *, model, config):
    """Mean cross-entropy of one (micro)batch and (logits, updated batch_stats), for grad."""

    def forward(train: bool):
        variables = {"params": params, "batch_stats": batch_stats}
        if not train:  # Frozen backbone (pretrained.py): inference mode, statistics kept,
            # no backward pass through it (its updates are zero anyway).
            variables["params"] = jax.tree.map(
                lambda p, frozen: jax.lax.stop_gradient(p) if frozen else p,
                params,
                optim.backbone_mask(params),
            )
            return model.apply(variables, images, train=False), batch_stats
        logits, new_vars = model.apply(
            variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        return logits, new_vars["batch_stats"]

    if config.get("freeze_backbone_steps", 0) > 0:
        frozen = step < config.freeze_backbone_steps
        logits, batch_stats = jax.lax.cond(frozen, lambda: forward(False), lambda: forward(True))
    else:
        logits, batch_stats = forward(True)
    loss = cross_entropy(logits, labels, model.num_classes, config.label_smoothing)
    return loss.mean(), (logits, batch_stats)


def microbatches(x: jax.Array, k: int) -> jax.Array:
    """``[B, ...]`` -> ``[k, B/k, ...]``; microbatch j holds examples j, j + k, j + 2k, ...

    Strided, not contiguous: the batch is sharded on its leading axis, and each device's
    contiguous share then splits evenly over the k microbatches (a contiguous split would put
    each microbatch on B/k's worth of devices and leave the others idle).
    """
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def _accumulated_grads(state: TrainState, batch, rng, *, model, config):
    """(loss, accuracy, batch_stats, grads) of a batch as config.grad_accum_steps microbatches.

    One ``lax.scan`` over the microbatches: only one microbatch's activations are alive at a
    time. Each microbatch is normalised with its own BatchNorm statistics and updates the
    running averages in turn; its dropout rng is the step's folded with its index. The
    gradient is the mean of the microbatches' gradients (each the gradient of that
    microbatch's mean loss), which for equal microbatches is the gradient of the batch's mean
    loss; loss and accuracy are those of the whole batch.
    """
    k = config.grad_accum_steps
    grad_fn = jax.value_and_grad(
        functools.partial(_loss_fn, model=model, config=config), has_aux=True
    )

    def body(carry, micro):
        batch_stats, grad_sum, loss_sum, correct = carry
        images = models.preprocess(micro["image"], model.dtype)
        rng_i = jax.random.fold_in(rng, micro["index"])
        (loss, (logits, batch_stats)), grads = grad_fn(
            state.params, batch_stats, images, micro["label"], rng_i, state.step
        )
        grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
        correct = correct + jnp.sum(jnp.argmax(logits, -1) == micro["label"])
        return (batch_stats, grad_sum, loss_sum + loss, correct), None

    micro = {
        "image": microbatches(batch["image"], k),
        "label": microbatches(batch["label"], k),
        "index": jnp.arange(k),
    }
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (state.batch_stats, zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (batch_stats, grad_sum, loss_sum, correct), _ = jax.lax.scan(body, init, micro)
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    return loss_sum / k, correct / batch["label"].shape[0], batch_stats, grads


def train_step(state: TrainState, batch, *, model, tx, config) -> tuple[TrainState, dict]:
    """One optimizer step on a global batch: forward, backward, update, EMA. Pure.

    With config.grad_accum_steps = k > 1 the batch is k microbatches (``_accumulated_grads``)
    and the update is made once from their mean gradient; k = 1 is the plain step.
    """
    rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    if config.get("grad_accum_steps", 1) > 1:
        loss, accuracy, batch_stats, grads = _accumulated_grads(
            state, batch, rng, model=model, config=config
        )
    else:
        images = models.preprocess(batch["image"], model.dtype)
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(
            functools.partial(_loss_fn, model=model, config=config), has_aux=True
        )(state.params, state.batch_stats, images, batch["label"], rng, state.step)
        accuracy = None
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = (
        optim.ema_update(state.ema_params, params, config.ema_decay)
        if state.ema_params is not None
        else None
    )
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        ema_params=ema_params,
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    if config.skip_nonfinite_updates:
        # Keep the old state (but advance the step) so one bad batch cannot poison the run.
        kept = state.replace(step=state.step + 1, skipped_updates=state.skipped_updates + 1)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, kept)
    if accuracy is None:
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    metrics = {"loss": loss, "accuracy": accuracy, "finite": finite}
    return new_state, metrics


def eval_step(params, batch_stats, batch, *, model) -> dict:
    """Sums of loss and correct predictions over the unmasked examples of a global batch."""
    images = models.preprocess(batch["image"], model.dtype)
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    mask = batch["mask"].astype(jnp.float32)
    labels = batch["label"]
    loss = cross_entropy(logits, labels, model.num_classes)
    top5 = jax.lax.top_k(logits, min(5, model.num_classes))[1]
    return {
        "loss": jnp.sum(loss * mask),
        "accuracy": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
        "top5_accuracy": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def jit_steps(model, tx, config: ml_collections.ConfigDict, mesh, donate: bool = True):
    """The jitted train and eval steps of `config` on `mesh`, as train_and_evaluate runs them.

    The one place that sets how the steps compile (output shardings, donation of the train
    state, compiler options for the mesh's platform), shared by train_and_evaluate, by
    xception_jax.aot, which compiles them for a TPU slice, and by replays (restore_for_replay,
    which keeps the state it is given: donate=False). Build `model` for the same platform
    (create_model_from_config(..., platform=sharding.mesh_platform(mesh))).
    """
    replicated = sharding.replicated(mesh)
    p_train_step = jax.jit(
        functools.partial(train_step, model=model, tx=tx, config=config),
        out_shardings=(replicated, replicated),
        donate_argnums=0 if donate else (),
        compiler_options=ops.compiler_options(sharding.mesh_platform(mesh)),
    )
    p_eval_step = jax.jit(functools.partial(eval_step, model=model), out_shardings=replicated)
    return p_train_step, p_eval_step


def abstract_train_state(model, tx, config: ml_collections.ConfigDict, mesh):
    """Shapes, dtypes and shardings (replicated on `mesh`) of a TrainState; computes nothing."""
    replicated = sharding.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        jax.eval_shape(functools.partial(init_state, model, tx, config)),
    )


def restore_for_replay(workdir: str, step: int, devices=None, data_dir: str | None = None):
    """Checkpoint `step` of a run as a full TrainState, to replay the run's step `step`.

    Returns (state, p_train_step, mesh, config): the TrainState after `step` steps (params,
    BatchNorm statistics, optimizer state), replicated on a mesh over `devices` (every device
    when None), the run's train step jitted for that mesh (it leaves `state` intact), and the
    run's config (`data_dir` replaces config.data_dir when given, e.g. where a copy of the data
    is). With the step's batch (input_pipeline.global_batch) the train step computes what the
    run computed at that step, up to the order of float additions when the device count
    differs: README "Replaying a step".
    """
    from xception_jax import input_pipeline  # TensorFlow: imported where data is read

    manager = checkpoints.create_manager(workdir, max_to_keep=None, read_only=True)
    if step not in manager.all_steps():
        raise FileNotFoundError(
            f"No checkpoint {step} in {manager.directory}; have {manager.all_steps()}. Replay a "
            "step that a checkpoint starts (config.checkpoint_every_steps sets which), or the "
            "nearest one before it and the steps in between."
        )
    config = ml_collections.ConfigDict(checkpoints.read_meta(manager, step)["config"])
    if data_dir is not None:
        config.data_dir = data_dir
    info = input_pipeline.get_dataset_info(config)
    mesh = sharding.create_mesh(devices)
    model = create_model_from_config(config, info.num_classes, sharding.mesh_platform(mesh))
    tx, _ = optim.create_optimizer(config, info.num_train_examples)
    state = checkpoints.restore_state(manager, step, abstract_train_state(model, tx, config, mesh))
    manager.close()
    p_train_step, _ = jit_steps(model, tx, config, mesh, donate=False)
    return state, p_train_step, mesh, config


def abstract_batch(batch_size: int, image_size: int, mesh, eval_mask: bool = False) -> dict:
    """Shapes, dtypes and shardings of a global batch as input_pipeline delivers it."""
    sharded = sharding.batch_sharded(mesh)
    batch = {
        "image": jax.ShapeDtypeStruct(
            (batch_size, image_size, image_size, 3), jnp.uint8, sharding=sharded
        ),
        "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=sharded),
    }
    if eval_mask:
        batch["mask"] = jax.ShapeDtypeStruct((batch_size,), jnp.bool_, sharding=sharded)
    return batch


def evaluate(p_eval_step, params, batch_stats, config, mesh) -> dict:
    """Loss, top-1 and top-5 accuracy over the whole eval split (each example counted once)."""
    from xception_jax import input_pipeline  # TensorFlow: imported where data is read

    totals = None
    for batch in input_pipeline.eval_iterator(config):
        sums = p_eval_step(params, batch_stats, input_pipeline.to_global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    return {k: float(v) / count for k, v in totals.items()}


class MetricsLog:
    """Process 0's `metrics.jsonl`, TensorBoard events and progress lines.

    On gs:// metrics.jsonl is uploaded whole at each write (storage.LineFile): a killed run
    loses at most the record being written, never an older one.
    """

    def __init__(self, workdir: str, start_step: int):
        from clu import metric_writers  # imports TensorFlow (for its summary writer)

        self.is_writer = jax.process_index() == 0
        self.file = storage.LineFile(storage.join(workdir, METRICS_FILE))
        self.writer = metric_writers.create_default_writer(
            workdir, just_logging=not self.is_writer, asynchronous=False
        )
        self.wall_offset = self._truncate_after(start_step) if self.is_writer else 0.0
        self.start = time.time()

    def _truncate_after(self, step: int) -> float:
        """Drops records newer than the restored checkpoint (a resumed run writes them again).

        Returns the training wall time already spent, so curves against time stay continuous.
        """
        lines = [line for line in self.file.read() if line.strip()]
        records = []
        for i, line in enumerate(lines):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # A local append cut short by a kill: the last line.
                logging.warning("Dropped unreadable line %d of %s: %r", i + 1, self.file.path, line)
        kept = [r for r in records if r["step"] <= step]
        if len(kept) < len(lines):
            self.file.rewrite([json.dumps(r) for r in kept])
        return kept[-1].get("wall_time", 0.0) if kept else 0.0

    def wall_time(self) -> float:
        """Seconds of training so far, across resumes."""
        return self.wall_offset + time.time() - self.start

    def write(self, step: int, record: dict) -> None:
        """Writes one record (JSON line + TensorBoard scalars) for `step`."""
        if not self.is_writer:
            return
        record = {"step": step, "wall_time": round(self.wall_time(), 3), **record}
        self.file.append([json.dumps(record)])
        self.writer.write_scalars(step, {k: v for k, v in record.items() if k != "step"})

    def close(self) -> None:
        """Flushes the TensorBoard writer."""
        self.writer.flush()
        self.writer.close()


class NonFiniteLossError(FloatingPointError):
    """Training produced a non-finite loss or gradient (and skip_nonfinite_updates is off)."""


def _check_finite(finite_flags, step: int, manager) -> None:
    """Raises NonFiniteLossError naming the first bad step among the last len(flags) steps.

    Waits for the saves in flight first, so that the last good checkpoint is complete.
    """
    if all(finite_flags):
        return
    bad = step - len(finite_flags) + 1 + next(i for i, ok in enumerate(finite_flags) if not ok)
    manager.wait_until_finished()
    raise NonFiniteLossError(
        f"Non-finite loss or gradient at step {bad}; stopping. The last good checkpoint in "
        f"{manager.directory} is kept (step {manager.latest_step()}). Lower the learning rate "
        "or set --config.skip_nonfinite_updates=True to skip such updates (counted in "
        "metrics.jsonl as skipped_updates)."
    )


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def enable_compilation_cache(config: ml_collections.ConfigDict) -> str | None:
    """Turns on JAX's persistent compilation cache at config.compilation_cache_dir.

    The environment variable JAX_COMPILATION_CACHE_DIR (which JAX reads itself) wins; an empty
    field turns the cache off. Returns the directory in use, or None.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    path = config.get("compilation_cache_dir", "")
    if not path:
        return None
    directory = storage.path(path, "config.compilation_cache_dir")
    directory.mkdir(parents=True, exist_ok=True)
    path = os.fspath(directory)
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
    """Trains and evaluates as `config` says, resuming from `workdir`'s newest checkpoint.

    Args:
      config: the experiment (see configs/common.py for every field).
      workdir: where checkpoints, metrics.jsonl, TensorBoard events and config.json go: a local
        directory or a gs:// URL.
      devices: the devices to shard the batch over; every device of every process when None.

    Returns the final TrainState (replicated over the mesh).
    """
    from xception_jax import input_pipeline  # TensorFlow: imported where data is read

    chrono = telemetry.Chrono(len(devices or jax.devices()))
    # Config errors first (nothing read, written or compiled yet), then the dataset.
    config_validation.validate(config, None, workdir, num_devices=len(devices or jax.devices()))
    workdir = os.fspath(storage.path(workdir))  # '~' expanded once, for every writer below.
    enable_compilation_cache(config)
    info = input_pipeline.get_dataset_info(config)
    config_validation.check_num_classes(config, info)
    storage.makedirs(workdir)
    sharding.check_shared_workdir(workdir)
    mesh = sharding.create_mesh(devices)
    replicated = sharding.replicated(mesh)

    model = create_model_from_config(config, info.num_classes, sharding.mesh_platform(mesh))
    tx, schedule = optim.create_optimizer(config, info.num_train_examples)
    num_steps = optim.total_steps(config, info.num_train_examples)
    init = jax.jit(functools.partial(init_state, model, tx, config), out_shardings=replicated)
    # Restore into the abstract state: a checkpoint that does not fit (another model, a newer
    # layout) fails before anything compiles, and a resume skips the initialisation.
    abstract_state = abstract_train_state(model, tx, config, mesh)
    manager = checkpoints.create_manager(workdir, config.max_checkpoints_to_keep)
    meta = checkpoints.meta_for(config, info.num_classes, info.class_names)
    state = checkpoints.restore_latest(manager, abstract_state)
    if state is not None:
        logging.info("Resumed from checkpoint %d in %s.", int(state.step), manager.directory)
        stored = checkpoints.read_meta(manager, int(state.step))
        chrono.device_seconds_before = stored.get("device_seconds", 0.0)
        changes = data_shards.order_changes(stored.get("config", {}), config)
        if changes:  # Allowed (e.g. data_shards for a larger slice), but no longer one run.
            logging.warning(
                "The data order changes at this resume (%s): the batches from step %d on are "
                "not those the run that wrote the checkpoint would have trained on.",
                "; ".join(changes),
                int(state.step),
            )
    else:
        state = init()
        if pretrained.requested(config):  # Fine-tuning: a new run starts from pretrained weights.
            state = pretrained.init_state(state, config, tx, replicated)
    logging.info(
        "Model %s: %s parameters; %d steps of global batch %d on %d devices (%d processes).",
        config.model.name,
        f"{models.count_params(state.params):,}",
        num_steps,
        config.batch_size,
        jax.device_count(),
        jax.process_count(),
    )

    start_step = int(jax.device_get(state.step))
    if start_step >= num_steps:
        logging.info(
            "Checkpoint %d is the last step of this run (%d steps): nothing left to train. "
            "Raise config.num_train_steps (or num_epochs) to train on, or train into a new "
            "--workdir.",
            start_step,
            num_steps,
        )
        manager.close()
        return state
    checkpoints.write_config(workdir, config)
    log = MetricsLog(workdir, start_step)

    p_train_step, p_eval_step = jit_steps(model, tx, config, mesh)
    # Exactly the remaining steps' batches: the producer thread then ends on its own after the
    # last one, and shutdown does not wait for it inside tf.data.
    batches = batch_source = input_pipeline.prefetch_to_device(
        input_pipeline.train_iterator(config, start_step=start_step, stop_step=num_steps),
        config.prefetch_batches,
        mesh,
    )
    first = next(batches)
    # Compiled here rather than at the first call: its cost and memory are logged up front.
    p_train_step = p_train_step.lower(state, first).compile()
    cost = telemetry.step_cost(p_train_step, config.get("grad_accum_steps", 1))
    dtype = "bfloat16" if config.half_precision else "float32"
    peak = telemetry.peak_flops_per_second(mesh.devices.flat[0].device_kind, dtype)
    logging.info(
        "Train step per device: %.4g GFLOP (XLA cost analysis); memory: arguments %.1f MB, "
        "outputs %.1f MB (%.1f MB aliased), temporaries %.1f MB; peak %s.",
        cost["flops_per_device"] / 1e9,
        *(cost[k] / 1e6 for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")),
        f"{peak / 1e12:.0f} TFLOP/s {dtype}" if peak else "unknown (no MFU)",
    )
    if jax.process_count() > 1:
        # Compile every program before the first collective, then wait for the slowest process
        # at a coordination-service barrier: on CPU a collective whose peer arrives more than
        # ~30 s late (still compiling: the compilation cache is per device assignment, so one
        # process can hit it while another compiles) aborts the job (gloo's timeout).
        eval_batch = input_pipeline.to_global_batch(
            next(iter(input_pipeline.eval_iterator(config))), mesh
        )
        p_eval_step = p_eval_step.lower(state.params, state.batch_stats, eval_batch).compile()
        sharding.barrier("xception_jax_compiled")
    batches = itertools.chain([first], batch_source)
    stop = preemption.StopSignal()
    profile = telemetry.ProfileWindow(
        workdir,
        config.get("profile_start_step", 0),
        config.get("profile_num_steps", 0),
        enabled=config.get("profile_all_processes", False) or jax.process_index() == 0,
    )

    pending, last_log_time, last_log_step = [], time.time(), start_step
    step = start_step
    chrono.add("startup", time.time() - chrono.start)
    try:
        while step < num_steps:
            chrono.timed("profile", profile.before_step, step + 1)
            batch = chrono.timed("input", next, batches)
            state, metrics = chrono.timed("train", p_train_step, state, batch)
            step += 1
            chrono.timed("profile", profile.after_step, step, state)
            pending.append(metrics)
            is_last = step == num_steps
            record = {}
            if step % config.log_every_steps == 0 or is_last:
                host = chrono.timed("train", jax.device_get, pending)
                pending = []
                if not config.skip_nonfinite_updates:
                    _check_finite([m["finite"] for m in host], step, manager)
                elapsed = max(time.time() - last_log_time, 1e-9)
                steps_per_sec = (step - last_log_step) / elapsed
                record.update(
                    train_loss=float(np.mean([m["loss"] for m in host])),
                    train_accuracy=float(np.mean([m["accuracy"] for m in host])),
                    learning_rate=float(schedule(step - 1)),
                    steps_per_sec=steps_per_sec,
                    images_per_sec=steps_per_sec * config.batch_size,
                    skipped_updates=int(jax.device_get(state.skipped_updates)),
                    tflops_per_device=cost["flops_per_device"] * steps_per_sec / 1e12,
                    input_wait_fraction=chrono.input_wait_fraction(elapsed),
                    host_rss_bytes=telemetry.host_rss_bytes(),
                )
                if peak:  # Never a guess: no MFU on CPU or an unknown device.
                    record["mfu"] = cost["flops_per_device"] * steps_per_sec / peak
                device_peak = telemetry.device_peak_bytes()
                if device_peak is not None:
                    record["device_peak_bytes"] = device_peak
                logging.info(
                    "step %d/%d  loss %.4f  acc %.3f  lr %.4g  %.1f img/s  %.3g TFLOP/s/device"
                    "  input wait %.0f%%  ETA %s",
                    step,
                    num_steps,
                    record["train_loss"],
                    record["train_accuracy"],
                    record["learning_rate"],
                    record["images_per_sec"],
                    record["tflops_per_device"],
                    100 * record["input_wait_fraction"],
                    _format_eta((num_steps - step) / max(steps_per_sec, 1e-9)),
                )
                last_log_time, last_log_step = time.time(), step
            if step % config.eval_every_steps == 0 or is_last:
                results = chrono.timed(
                    "eval", evaluate, p_eval_step, state.params, state.batch_stats, config, mesh
                )
                record.update({f"eval_{k}": v for k, v in results.items()})
                if state.ema_params is not None:
                    ema = chrono.timed(
                        "eval", evaluate, p_eval_step, state.ema_params, state.batch_stats,
                        config, mesh,
                    )  # fmt: skip
                    record.update({f"eval_ema_{k}": v for k, v in ema.items()})
                logging.info(
                    "step %d eval: %s",
                    step,
                    "  ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval_")),
                )
                last_log_time = time.time()  # Evaluation time is not training throughput.
            if record:
                record["device_hours"] = chrono.device_seconds() / 3600
                chrono.timed("logging", log.write, step, record)
            preempted = stop.reached(step)
            if step % config.checkpoint_every_steps == 0 or is_last or preempted:
                if not config.skip_nonfinite_updates:
                    # Never checkpoint a state that a non-finite step (not yet logged) poisoned.
                    _check_finite(jax.device_get([m["finite"] for m in pending]), step, manager)
                meta["device_seconds"] = chrono.device_seconds()
                chrono.timed("checkpoint", checkpoints.save, manager, state, meta, force=True)
            if preempted:
                chrono.timed("checkpoint", manager.wait_until_finished)
                logging.warning(
                    "Stopped by a termination signal at step %d; checkpoint %d is complete. "
                    "Run the same command again to resume.",
                    step,
                    step,
                )
                break
    finally:
        # Also when the run ends or stops inside the window.
        chrono.timed("profile", profile.close)
    shutdown = time.time()
    # Stops the prefetch thread now: a daemon thread still inside tf.data when the interpreter
    # exits can abort the process (seen once: "terminate called ... exception not rethrown").
    batch_source.close()
    stop.close()  # Gives SIGTERM back to whoever handled it before (a notebook's kernel).
    manager.wait_until_finished()
    manager.close()
    log.close()
    sharding.check_replicas_agree(state.params, f"Params at step {step}")
    chrono.add("shutdown", time.time() - shutdown)
    _report_time(chrono.summary(), workdir)
    return state


SUMMARY_FILE = "time_summary.json"


def _report_time(summary: dict, workdir: str) -> None:
    """Logs where this run's wall time went and writes it to workdir/time_summary.json."""
    wall = summary["wall_seconds"]
    seconds = {part: summary[f"{part}_seconds"] for part in telemetry.Chrono.PARTS}
    parts = "  ".join(
        f"{part} {s:.1f} s ({100 * s / max(wall, 1e-9):.0f}%)" for part, s in seconds.items()
    )
    logging.info(
        "Wall time %.1f s: %s. Device-hours so far: %.4g.", wall, parts, summary["device_hours"]
    )
    if jax.process_index() == 0:
        storage.write_atomic(storage.join(workdir, SUMMARY_FILE), json.dumps(summary, indent=2))
