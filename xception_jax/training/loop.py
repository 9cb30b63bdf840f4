"""The training loop: set up, restore or initialise, compile, train, finish.

`train_and_evaluate(config, workdir)` is what `python train.py` runs; it reads top to bottom
as its stages, each a function below in the order they run. The pure steps they drive are in
`training/steps.py`; what they write as they go, in `training/metrics_log.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from xception_jax.data import shards
from xception_jax.model import registry
from xception_jax.platform import errors, sharding, storage
from xception_jax.training import (
    checkpoints,
    config_checks,
    metrics_log,
    optim,
    preemption,
    pretrained,
    steps,
    telemetry,
    train_state,
)
from xception_jax.training.train_state import TrainState


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, devices=None) -> TrainState:
    """Trains and evaluates as `config` says, resuming from `workdir`'s newest checkpoint.

    Args:
      config: the experiment (see configs/common.py for every field).
      workdir: where checkpoints, metrics.jsonl, TensorBoard events and config.json go: a local
        directory or a gs:// URL.
      devices: the devices to shard the batch over; every device of every process when None.

    Returns the final TrainState (replicated over the mesh).
    """
    run = set_up(config, workdir, devices)
    state = restore_or_initialise(run)
    start_step = int(jax.device_get(state.step))
    if start_step >= run.num_steps:
        logging.info(
            "Checkpoint %d is the last step of this run (%d steps): nothing left to train. "
            "Raise config.num_train_steps (or num_epochs) to train on, or train into a new "
            "--workdir.",
            start_step,
            run.num_steps,
        )
        run.manager.close()
        return state
    checkpoints.write_config(run.workdir, config)
    log = metrics_log.MetricsLog(run.workdir, start_step)
    batch_source = start_input(run, start_step)
    first = next(batch_source)
    compiled = compile_steps(run, state, first)
    batches = itertools.chain([first], batch_source)
    state, step = train_loop(run, state, compiled, batches, log, start_step)
    finish(run, state, step, batch_source, log)
    return state


@dataclasses.dataclass
class Run:
    """What the stages of one run share, made once by `set_up`."""

    config: ml_collections.ConfigDict
    workdir: str  # '~' expanded, for every writer.
    mesh: jax.sharding.Mesh
    info: Any  # data.sources.DatasetInfo: classes and split sizes.
    model: Any  # The flax module, its ops resolved for the mesh's platform.
    tx: Any  # The optax optimizer...
    schedule: Any  # ...and its learning-rate schedule (for the logs).
    num_steps: int
    manager: Any  # The orbax CheckpointManager of workdir/checkpoints.
    meta: dict  # What every checkpoint records beside the state (config, classes, ...).
    chrono: telemetry.Chrono  # Where the wall time goes.


@dataclasses.dataclass
class Compiled:
    """The compiled steps and what the train step costs."""

    train_step: Any
    eval_step: Any
    cost: dict  # telemetry.step_cost: FLOPs and memory per device.
    peak_flops: float | None  # The device's peak FLOP/s for the compute dtype (None: unknown).


def set_up(config: ml_collections.ConfigDict, workdir: str, devices=None) -> Run:
    """Checks the config, describes the dataset, and builds the mesh, model and optimizer.

    Config errors come first (nothing read, written or compiled yet), then the dataset.
    """
    chrono = telemetry.Chrono(len(devices or jax.devices()))
    config_checks.validate(config, None, workdir, num_devices=len(devices or jax.devices()))
    from xception_jax.data import sources  # TensorFlow: imported where data is read (after the
    # config checks, so that a config error comes back without it)

    workdir = os.fspath(storage.path(workdir))
    enable_compilation_cache(config)
    info = sources.get_dataset_info(config)
    config_checks.check_num_classes(config, info)
    storage.makedirs(workdir)
    sharding.check_shared_workdir(workdir)
    mesh = sharding.create_mesh(devices)
    tx, schedule = optim.create_optimizer(config, info.num_train_examples)
    return Run(
        config=config,
        workdir=workdir,
        mesh=mesh,
        info=info,
        model=registry.create_model_from_config(
            config, info.num_classes, sharding.mesh_platform(mesh)
        ),
        tx=tx,
        schedule=schedule,
        num_steps=optim.total_steps(config, info.num_train_examples),
        manager=checkpoints.create_manager(workdir, config.max_checkpoints_to_keep),
        meta=checkpoints.meta_for(config, info.num_classes, info.class_names),
        chrono=chrono,
    )


def restore_or_initialise(run: Run) -> TrainState:
    """The newest checkpoint's state, else a fresh one (from pretrained weights when asked).

    The checkpoint is restored into the abstract state: one that does not fit (another model,
    a newer layout) fails before anything compiles, and a resume skips the initialisation.
    """
    replicated = sharding.replicated(run.mesh)
    abstract = train_state.abstract_train_state(run.model, run.tx, run.config, run.mesh)
    state = checkpoints.restore_latest(run.manager, abstract)
    if state is not None:
        _note_resume(run, int(state.step))
    else:
        init = functools.partial(train_state.init_state, run.model, run.tx, run.config)
        state = jax.jit(init, out_shardings=replicated)()
        if pretrained.requested(run.config):  # Fine-tuning: a new run starts from weights.
            state = pretrained.init_state(state, run.config, run.tx, replicated)
    logging.info(
        "Model %s: %s parameters; %d steps of global batch %d on %d devices (%d processes).",
        run.config.model.name,
        f"{registry.count_params(state.params):,}",
        run.num_steps,
        run.config.batch_size,
        jax.device_count(),
        jax.process_count(),
    )
    return state


def _note_resume(run: Run, step: int) -> None:
    """Logs the resume, carries the device time on, and warns when the data order changes."""
    logging.info("Resumed from checkpoint %d in %s.", step, run.manager.directory)
    stored = checkpoints.read_meta(run.manager, step)
    run.chrono.device_seconds_before = stored.get("device_seconds", 0.0)
    changes = shards.order_changes(stored.get("config", {}), run.config)
    if changes:  # Allowed (e.g. data_shards for a larger slice), but no longer one run.
        logging.warning(
            "The data order changes at this resume (%s): the batches from step %d on are "
            "not those the run that wrote the checkpoint would have trained on.",
            "; ".join(changes),
            step,
        )


def start_input(run: Run, start_step: int):
    """This process's batches of the remaining steps, prefetched onto the mesh.

    Exactly the remaining steps' batches: the producer thread then ends on its own after the
    last one, and shutdown does not wait for it inside tf.data.
    """
    from xception_jax.data import feeding, pipeline  # TensorFlow: imported where data is read

    batches = pipeline.train_iterator(run.config, start_step=start_step, stop_step=run.num_steps)
    return feeding.prefetch_to_device(batches, run.config.prefetch_batches, run.mesh)


def compile_steps(run: Run, state: TrainState, first_batch) -> Compiled:
    """Compiles the train step for `first_batch` (and, multi-process, the eval step) now.

    Compiled here rather than at the first call: its cost and memory are logged up front.
    """
    config = run.config
    p_train_step, p_eval_step = steps.jit_steps(run.model, run.tx, config, run.mesh)
    p_train_step = p_train_step.lower(state, first_batch).compile()
    cost = telemetry.step_cost(p_train_step, config.get("grad_accum_steps", 1))
    dtype = "bfloat16" if config.half_precision else "float32"
    peak = telemetry.peak_flops_per_second(run.mesh.devices.flat[0].device_kind, dtype)
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
        from xception_jax.data import feeding, pipeline  # TensorFlow

        eval_batch = feeding.to_global_batch(next(iter(pipeline.eval_iterator(config))), run.mesh)
        p_eval_step = p_eval_step.lower(state.params, state.batch_stats, eval_batch).compile()
        sharding.barrier("xception_jax_compiled")
    return Compiled(p_train_step, p_eval_step, cost, peak)


def train_loop(run: Run, state: TrainState, compiled: Compiled, batches, log, start_step: int):
    """Steps from `start_step` to the end (or a preemption); logs, evaluates, checkpoints.

    Returns (the last state, its step).
    """
    config, chrono = run.config, run.chrono
    stop = preemption.StopSignal()
    profile = telemetry.ProfileWindow(
        run.workdir,
        config.get("profile_start_step", 0),
        config.get("profile_num_steps", 0),
        enabled=config.get("profile_all_processes", False) or jax.process_index() == 0,
    )
    pending, last_log_time, last_log_step = [], time.time(), start_step
    step = start_step
    chrono.add("startup", time.time() - chrono.start)
    try:
        while step < run.num_steps:
            chrono.timed("profile", profile.before_step, step + 1)
            batch = chrono.timed("input", next, batches)
            state, metrics = chrono.timed("train", compiled.train_step, state, batch)
            step += 1
            chrono.timed("profile", profile.after_step, step, state)
            pending.append(metrics)
            is_last = step == run.num_steps
            record = {}
            if step % config.log_every_steps == 0 or is_last:
                host = chrono.timed("train", jax.device_get, pending)
                pending = []
                if not config.skip_nonfinite_updates:
                    _check_finite([m["finite"] for m in host], step, run.manager)
                elapsed = max(time.time() - last_log_time, 1e-9)
                record.update(
                    train_record(run, compiled, state, host, step, step - last_log_step, elapsed)
                )
                last_log_time, last_log_step = time.time(), step
            if step % config.eval_every_steps == 0 or is_last:
                record.update(eval_record(run, compiled, state, step))
                last_log_time = time.time()  # Evaluation time is not training throughput.
            if record:
                record["device_hours"] = chrono.device_seconds() / 3600
                chrono.timed("logging", log.write, step, record)
            preempted = stop.reached(step)
            if step % config.checkpoint_every_steps == 0 or is_last or preempted:
                save_checkpoint(run, state, step, pending)
            if preempted:
                chrono.timed("checkpoint", run.manager.wait_until_finished)
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
        stop.close()  # Gives SIGTERM back to whoever handled it before (a notebook's kernel).
    return state, step


def train_record(run: Run, compiled: Compiled, state, host_metrics, step, steps_done, seconds):
    """The training part of a metrics record: means since the last one, throughput, memory."""
    steps_per_sec = steps_done / seconds
    flops = compiled.cost["flops_per_device"]
    record = {
        "train_loss": float(np.mean([m["loss"] for m in host_metrics])),
        "train_accuracy": float(np.mean([m["accuracy"] for m in host_metrics])),
        "learning_rate": float(run.schedule(step - 1)),
        "steps_per_sec": steps_per_sec,
        "images_per_sec": steps_per_sec * run.config.batch_size,
        "skipped_updates": int(jax.device_get(state.skipped_updates)),
        "tflops_per_device": flops * steps_per_sec / 1e12,
        "input_wait_fraction": run.chrono.input_wait_fraction(seconds),
        "host_rss_bytes": telemetry.host_rss_bytes(),
    }
    if compiled.peak_flops:  # Never a guess: no MFU on CPU or an unknown device.
        record["mfu"] = flops * steps_per_sec / compiled.peak_flops
    device_peak = telemetry.device_peak_bytes()
    if device_peak is not None:
        record["device_peak_bytes"] = device_peak
    logging.info(
        "step %d/%d  loss %.4f  acc %.3f  lr %.4g  %.1f img/s  %.3g TFLOP/s/device"
        "  input wait %.0f%%  ETA %s",
        step,
        run.num_steps,
        record["train_loss"],
        record["train_accuracy"],
        record["learning_rate"],
        record["images_per_sec"],
        record["tflops_per_device"],
        100 * record["input_wait_fraction"],
        _format_eta((run.num_steps - step) / max(steps_per_sec, 1e-9)),
    )
    return record


def eval_record(run: Run, compiled: Compiled, state: TrainState, step: int) -> dict:
    """eval_* (and, with EMA, eval_ema_*) over the whole eval split."""
    timed = functools.partial(run.chrono.timed, "eval", evaluate, compiled.eval_step)
    results = timed(state.params, state.batch_stats, run.config, run.mesh)
    record = {f"eval_{k}": v for k, v in results.items()}
    if state.ema_params is not None:
        ema = timed(state.ema_params, state.batch_stats, run.config, run.mesh)
        record.update({f"eval_ema_{k}": v for k, v in ema.items()})
    logging.info("step %d eval: %s", step, "  ".join(f"{k} {v:.4f}" for k, v in record.items()))
    return record


def save_checkpoint(run: Run, state: TrainState, step: int, pending_metrics) -> None:
    """Saves `state` (asynchronously), never one that a not yet logged non-finite step poisoned."""
    if not run.config.skip_nonfinite_updates:
        _check_finite(jax.device_get([m["finite"] for m in pending_metrics]), step, run.manager)
    run.meta["device_seconds"] = run.chrono.device_seconds()
    run.chrono.timed("checkpoint", checkpoints.save, run.manager, state, run.meta, force=True)


def finish(run: Run, state: TrainState, step: int, batch_source, log) -> None:
    """Waits for the last checkpoint, closes every writer, checks the replicas, reports time."""
    shutdown = time.time()
    # Stops the prefetch thread now: a daemon thread still inside tf.data when the interpreter
    # exits can abort the process (seen once: "terminate called ... exception not rethrown").
    batch_source.close()
    run.manager.wait_until_finished()
    run.manager.close()
    log.close()
    sharding.check_replicas_agree(state.params, f"Params at step {step}")
    run.chrono.add("shutdown", time.time() - shutdown)
    metrics_log.report_time(run.chrono.summary(), run.workdir)


def evaluate(p_eval_step, params, batch_stats, config, mesh) -> dict:
    """Loss, top-1 and top-5 accuracy over the whole eval split (each example counted once)."""
    from xception_jax.data import feeding, pipeline  # TensorFlow: imported where data is read

    totals = None
    for batch in pipeline.eval_iterator(config):
        sums = p_eval_step(params, batch_stats, feeding.to_global_batch(batch, mesh))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = max(float(totals.pop("count")), 1.0)
    return {k: float(v) / count for k, v in totals.items()}


class NonFiniteLossError(errors.InputError, FloatingPointError):
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
