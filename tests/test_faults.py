"""Faults: SIGKILL at any moment, damaged or foreign checkpoints, non-finite losses, bad input.

Each case checks what the user sees (the error or warning text) and that no work is lost.
"""

import json
import logging
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import procs
import pytest
from test_train import read_metrics, small_config

from xception_jax.platform import sharding
from xception_jax.training import checkpoints, config_checks, loop

TIMEOUT = 240  # Seconds per process, far above what a run takes on 2 loaded cores.


def one_device():
    return jax.devices()[:1]


@pytest.fixture
def pool(tmp_path):
    p = procs.ProcessPool(tmp_path)
    yield p
    p.close()


@pytest.fixture(scope="module")
def four_step_run(digits_data_dir, tmp_path_factory):
    """A finished 4-step run (checkpoints 2 and 4) to copy and damage: its workdir."""
    workdir = str(tmp_path_factory.mktemp("four_steps") / "run")
    loop.train_and_evaluate(small_config(digits_data_dir), workdir, one_device())
    return workdir


def test_rerunning_a_finished_run_trains_nothing_and_changes_nothing(
    four_step_run, digits_data_dir, tmp_path
):
    workdir = copy_run(four_step_run, tmp_path)
    before = snapshot(workdir)
    state = loop.train_and_evaluate(small_config(digits_data_dir), workdir, one_device())
    assert int(state.step) == 4
    assert snapshot(workdir) == before


def copy_run(src, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(src, dst)
    return dst


def snapshot(path):
    """{relative path: (size, mtime)} of everything under `path` (or of the file itself)."""
    if os.path.isfile(path):
        return {".": (os.path.getsize(path), os.path.getmtime(path))}
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            out[os.path.relpath(full, path)] = (os.path.getsize(full), os.path.getmtime(full))
    return out


def params_of(workdir):
    _, variables, _ = checkpoints.load(workdir)
    return variables


def assert_bitwise_equal(a, b):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


# --------------------------------------------------------------------------------------------
# SIGKILL at any moment, then the same command again
# --------------------------------------------------------------------------------------------

KILL_STEPS = 8
# train.py overrides (procs.small_overrides) turning on every augmentation but the policy.
EVERY_AUGMENTATION = {
    "augment.random_erasing": 0.5,
    "augment.mixup_alpha": 0.8,
    "augment.cutmix_alpha": 1.0,
    "augment.mixup_switch_prob": 0.5,
    "model.drop_path_rate": 0.2,
    "label_smoothing": 0.1,
}


def test_sigkill_at_three_moments_then_rerun_equals_the_uninterrupted_run(
    digits_data_dir, pool, tmp_path
):
    def args(workdir):
        return [
            "--config=configs/default.py",
            f"--workdir={workdir}",
            *procs.small_overrides(
                digits_data_dir,
                num_train_steps=KILL_STEPS,
                log_every_steps=2,
                checkpoint_every_steps=2,
                eval_every_steps=1000,
                # The accumulated step (a lax.scan over 2 microbatches): its resume is covered
                # too, and the plain step's by test_train.test_resume_equals_uninterrupted_run.
                grad_accum_steps=2,
                # Every augmentation on (AutoAugment here, RandAugment in test_multihost): the
                # per-example draws follow the data order, mixing and drop path the step's rng.
                **EVERY_AUGMENTATION,
                augment__autoaugment="imagenet",
            ),
        ]

    # The uninterrupted run, alongside. A process, not this test's: a 1-device process and a
    # 1-device mesh in this 8-device process compile to different code (losses differ by 2e-7
    # at step 2, which the digits' ReLU/max-pool ties amplify to 3e-2 by step 8).
    whole_dir = str(tmp_path / "whole")
    whole = pool.start(args(whole_dir), "whole")
    workdir = str(tmp_path / "run")
    ckpt_dir = checkpoints.checkpoint_dir(workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")

    def logged_steps():
        if not os.path.exists(metrics):
            return []
        with open(metrics) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]

    def run_until(moment, name):
        proc = pool.start(args(workdir), name)
        procs.wait_for(moment, [proc], TIMEOUT, name)
        proc.kill_group()  # SIGKILL: no handler, no cleanup, no flush.
        return proc

    # 1. Mid-step: right after checkpoint 2 is finalised, while step 3 runs.
    run_until(lambda: os.path.isdir(os.path.join(ckpt_dir, "2")), "kill_mid_step")
    # 2. Mid-save: while checkpoint 4 is being written (orbax's temporary directory exists).
    tmp4 = os.path.join(ckpt_dir, "4.orbax-checkpoint-tmp")
    run_until(
        lambda: any(d.startswith("4.orbax-checkpoint-tmp") for d in os.listdir(ckpt_dir)),
        "kill_mid_save",
    )
    left = os.listdir(ckpt_dir)
    assert "4" not in left and any(d.startswith(os.path.basename(tmp4)) for d in left), left
    # 3. After metrics past the newest checkpoint were written (they must not be duplicated).
    run_until(lambda: 6 in logged_steps(), "kill_after_metrics")
    # The device-hours spent so far travel with the checkpoints: make them unmistakable.
    steps = checkpoints.create_manager(workdir, read_only=True).all_steps()
    for step in steps:
        path = os.path.join(ckpt_dir, str(step), "meta", "metadata")
        with open(path) as f:
            meta = json.load(f)
        assert meta["device_seconds"] > 0
        meta["device_seconds"] = 3600e3
        with open(path, "w") as f:
            json.dump(meta, f)

    final = pool.start(args(workdir), "final")
    assert final.wait(TIMEOUT) == 0, final.log()[-4000:]
    assert f"Resumed from checkpoint {steps[-1]}" in final.log()
    # device_hours continues from the checkpoint's count, not from 0.
    records = read_metrics(workdir)
    assert all(r["device_hours"] > 1000 for r in records if r["step"] > steps[-1])
    assert all(r["device_hours"] < 1 for r in records if r["step"] <= steps[-1])
    assert whole.wait(TIMEOUT) == 0, whole.log()[-4000:]

    # Bitwise: every example of every epoch consumed once, in the same order, same rng.
    resumed, expected = params_of(workdir), params_of(whole_dir)
    assert_bitwise_equal(resumed["params"], expected["params"])
    assert_bitwise_equal(resumed["batch_stats"], expected["batch_stats"])
    assert [r["step"] for r in read_metrics(workdir)] == [2, 4, 6, 8]
    assert [r["train_loss"] for r in read_metrics(workdir)] == [
        r["train_loss"] for r in read_metrics(whole_dir)
    ]


# --------------------------------------------------------------------------------------------
# Damaged or foreign checkpoints
# --------------------------------------------------------------------------------------------


def test_truncated_newest_checkpoint_is_skipped_with_a_warning(
    four_step_run, digits_data_dir, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="absl")
    workdir = copy_run(four_step_run, tmp_path)
    newest = os.path.join(checkpoints.checkpoint_dir(workdir), "4")
    for root, _, files in os.walk(newest):
        for name in files:
            path = os.path.join(root, name)
            os.truncate(path, os.path.getsize(path) // 2)

    state = loop.train_and_evaluate(
        small_config(digits_data_dir, num_train_steps=6), workdir, one_device()
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"Checkpoint {newest} is unreadable" in w for w in warnings), warnings
    assert any("Resumed from checkpoint 2" in r.getMessage() for r in caplog.records)
    assert int(state.step) == 6
    # Set aside, not deleted; the resumed run wrote its own checkpoint 4.
    assert os.path.isdir(os.path.join(workdir, checkpoints.UNREADABLE_DIR, "4"))
    assert checkpoints.create_manager(workdir, read_only=True).all_steps() == [2, 4, 6]


def test_checkpoint_of_another_model_names_the_mismatch(four_step_run, digits_data_dir, tmp_path):
    workdir = copy_run(four_step_run, tmp_path)
    before = snapshot(workdir)
    config = small_config(digits_data_dir, num_train_steps=6)
    config.model.width_multiplier = 0.5  # xception_tiny has 0.25.
    with pytest.raises(checkpoints.CheckpointError) as e:
        loop.train_and_evaluate(config, workdir, one_device())
    message = str(e.value)
    assert "Checkpoint 4" in message and "another model" in message, message
    assert "model/params/block1_conv1/kernel: (3, 3, 3, 8) float32 in the checkpoint" in message
    assert "(3, 3, 3, 16) float32 in this run" in message
    assert snapshot(workdir) == before


# --------------------------------------------------------------------------------------------
# Non-finite losses
# --------------------------------------------------------------------------------------------


def diverging_config(data_dir, **overrides):
    """A learning rate so large that the loss is non-finite from step 2 on."""
    config = small_config(data_dir, num_train_steps=6, checkpoint_every_steps=1, **overrides)
    config.schedule.base_learning_rate = 1e30
    return config


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    digits_data_dir, tmp_path
):
    workdir = str(tmp_path / "run")
    with pytest.raises(loop.NonFiniteLossError) as e:
        loop.train_and_evaluate(
            diverging_config(digits_data_dir, log_every_steps=3), workdir, one_device()
        )
    message = str(e.value)
    assert "Non-finite loss or gradient at step 2" in message, message
    assert "is kept (step 1)" in message and "skip_nonfinite_updates" in message
    # Checked before every save, not only at log steps: no poisoned checkpoint was written.
    assert checkpoints.create_manager(workdir, read_only=True).all_steps() == [1]
    for leaf in jax.tree.leaves(params_of(workdir)):
        assert np.all(np.isfinite(leaf))


def test_nonfinite_updates_can_be_skipped_and_are_counted(digits_data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = diverging_config(digits_data_dir, log_every_steps=2, skip_nonfinite_updates=True)
    state = loop.train_and_evaluate(config, workdir, one_device())
    assert int(state.step) == 6
    skipped = [r["skipped_updates"] for r in read_metrics(workdir)]
    assert skipped == [1, 3, 5], skipped  # Every step after the first.
    for leaf in jax.tree.leaves(state.params):
        assert np.all(np.isfinite(np.asarray(leaf)))


# --------------------------------------------------------------------------------------------
# Bad input: a clear error before any compilation, nothing in the workdir touched
# --------------------------------------------------------------------------------------------


def _newer_layout(workdir):
    for step in checkpoints.create_manager(workdir, read_only=True).all_steps():
        path = os.path.join(checkpoints.checkpoint_dir(workdir), str(step), "meta", "metadata")
        with open(path) as f:
            meta = json.load(f)
        meta["layout_version"] = checkpoints.LAYOUT_VERSION + 1
        with open(path, "w") as f:
            json.dump(meta, f)


BAD_INPUTS = {
    # name: (config changes, expected error type, expected text)
    "unknown_dataset": (
        {"dataset": "sklearn_digts"},
        config_checks.ConfigError,
        "config.dataset='sklearn_digts' is not a TFDS dataset nor 'image_folder'. "
        "Did you mean 'sklearn_digits'",
    ),
    "unknown_model": (
        {"model.name": "xception_tiyn"},
        config_checks.ConfigError,
        "config.model: Unknown model 'xception_tiyn'",
    ),
    "unknown_op_implementation": (
        {"model.pool_impl": "taps"},
        config_checks.ConfigError,
        "config.model.pool_impl: Unknown pool impl 'taps'; use 'auto' or one of "
        "['taps_vjp', 'lax']",
    ),
    "batch_not_divisible": (
        {"batch_size": 12, "devices": 8},
        config_checks.ConfigError,
        "config.batch_size=12 must be a positive multiple of the 8 devices",
    ),
    "image_too_small_for_the_full_model": (
        {"model.name": "xception", "image_size": 64},
        config_checks.ConfigError,
        "config.image_size=64 is below the 71px minimum of model 'xception'",
    ),
    "learning_rate_not_positive": (
        {"schedule.base_learning_rate": 0.0},
        config_checks.ConfigError,
        "config.schedule.base_learning_rate=0.0 must be > 0",
    ),
    "frozen_backbone_without_pretrained_weights": (
        {"freeze_backbone_steps": 10},
        config_checks.ConfigError,
        "config.freeze_backbone_steps=10 would freeze a randomly initialised backbone",
    ),
    "missing_pretrained_file": (
        {"init_from_keras": "/nonexistent/xception.h5"},
        config_checks.ConfigError,
        "config.init_from_keras='/nonexistent/xception.h5' does not exist",
    ),
    "channels_per_group_the_model_cannot_take": (
        {"model.name": "xception", "model.channels_per_group": 3},
        config_checks.ConfigError,
        "config.model: channels_per_group=3 does not divide the spatial conv of every separable "
        "conv of model 'xception' (their channel counts: [64, 128, 256, 728, 1024, 1536]); use "
        "one of [1, 2, 4, 8, -1]",
    ),
    "unknown_separable_order": (
        {"model.separable_order": "pointwise_last"},
        config_checks.ConfigError,
        "config.model: Unknown separable_order 'pointwise_last'; use 'depthwise_first'",
    ),
    "keras_weights_for_a_grouped_model": (
        {"init_from_keras": "/nonexistent/xception.h5", "model.channels_per_group": 2},
        config_checks.ConfigError,
        "config.init_from_keras: Keras weights are depthwise-first depthwise separable convs; "
        "they cannot fill separable_order='depthwise_first', channels_per_group=2",
    ),
    "workdir_is_a_file": (
        {"workdir_is_a_file": True},
        config_checks.ConfigError,
        "is a file; give a directory",
    ),
    "misspelled_top_level_field": (
        {"add": ("modle", 1)},
        config_checks.ConfigError,
        "config.modle is not a config field. Did you mean config.model?",
    ),
    "misspelled_nested_field": (
        {"add": ("optimizer.momentun", 0.5)},
        config_checks.ConfigError,
        "config.optimizer.momentun is not a config field. Did you mean config.optimizer.momentum?",
    ),
    "checkpoint_of_a_newer_layout": (
        {"newer_layout": True},
        checkpoints.CheckpointError,
        f"has layout version {checkpoints.LAYOUT_VERSION + 1}, this code reads version "
        f"{checkpoints.LAYOUT_VERSION}",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_the_workdir_is_untouched(
    case, digits_data_dir, four_step_run, tmp_path
):
    changes, error, text = BAD_INPUTS[case]
    changes = dict(changes)
    config = small_config(digits_data_dir)
    devices = jax.devices()[: changes.pop("devices", 1)]
    if changes.pop("workdir_is_a_file", False):
        workdir = str(tmp_path / "run")
        with open(workdir, "w") as f:
            f.write("not a directory")
    elif changes.pop("newer_layout", False):
        workdir = copy_run(four_step_run, tmp_path)
        _newer_layout(workdir)
    else:
        workdir = copy_run(four_step_run, tmp_path)  # A run to resume: nothing may be lost.
    if "add" in changes:
        name, value = changes.pop("add")
        parent, _, leaf = name.rpartition(".")
        (config[parent] if parent else config)[leaf] = value
    for key, value in changes.items():
        parent, _, leaf = key.rpartition(".")
        (config[parent] if parent else config)[leaf] = value
    before = snapshot(workdir)
    with pytest.raises(error) as e:
        loop.train_and_evaluate(config, workdir, devices)
    assert text in str(e.value), str(e.value)
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    "override, text",
    [
        ("--config.modle.name=x", '\'modle\'. Did you mean "model" instead of "modle"?'),
        (
            "--config.optimizer.momentun=0.5",
            '\'momentun\'. Did you mean "momentum" instead of "momentun"?',
        ),
    ],
)
def test_misspelled_config_flag_fails_on_the_command_line(override, text, pool, tmp_path):
    workdir = tmp_path / "run"
    proc = pool.start(["--config=configs/default.py", f"--workdir={workdir}", override], "typo")
    assert proc.wait(60) == 2  # A usage error.
    log = proc.log()
    assert "FATAL Flags parsing error: a --config override names a field that does not exist" in log
    assert text in log and "Traceback" not in log, log
    assert not workdir.exists()


def test_incomplete_multi_process_flags_are_a_clear_error():
    with pytest.raises(sharding.DistributedSetupError, match="needs all of --coordinator_address"):
        sharding.initialize_distributed(num_processes=2, process_id=0)
    with pytest.raises(sharding.DistributedSetupError, match=r"--process_id=2 must be in \[0, "):
        sharding.initialize_distributed("127.0.0.1:1", num_processes=2, process_id=2)


# --------------------------------------------------------------------------------------------
# SIGTERM to a lone process (no jax.distributed): preemption.StopSignal's Python handler
# --------------------------------------------------------------------------------------------


def test_sigterm_to_a_single_process_run_saves_that_step_and_returns(
    digits_data_dir, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="absl")
    handler_before = signal.getsignal(signal.SIGTERM)
    workdir = str(tmp_path / "run")
    metrics = os.path.join(workdir, "metrics.jsonl")

    def terminate_after_the_first_record():
        deadline = time.monotonic() + TIMEOUT
        while not (os.path.exists(metrics) and os.path.getsize(metrics)):
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGTERM)  # Kills pytest itself if no handler caught it.

    threading.Thread(target=terminate_after_the_first_record, daemon=True).start()
    config = small_config(digits_data_dir, num_train_steps=200, checkpoint_every_steps=100)
    state = loop.train_and_evaluate(config, workdir, one_device())
    stop = int(state.step)
    assert 2 <= stop < 200
    assert any(
        f"Stopped by a termination signal at step {stop}; checkpoint {stop} is complete. "
        "Run the same command again to resume." in r.getMessage()
        for r in caplog.records
    )
    assert checkpoints.create_manager(workdir, read_only=True).all_steps() == [stop]
    # The handler is gone again: SIGTERM is back to what handled it before.
    assert signal.getsignal(signal.SIGTERM) == handler_before
