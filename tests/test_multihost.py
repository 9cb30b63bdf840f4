"""`python train.py` as several processes on 127.0.0.1: the same global batches and training on
any process count, resume on another process count, replay of a step, preemption.

Each test starts real processes in their own process groups with short jax.distributed
timeouts, and kills the groups when it ends or times out (tests/procs.py).
"""

import collections
import os
import re
import shutil
import signal
import uuid

import gcs
import jax
import numpy as np
import procs
import pytest
from test_faults import EVERY_AUGMENTATION
from test_train import assert_trees_close, read_metrics

from configs import default
from xception_jax.data import feeding, pipeline
from xception_jax.platform import sharding
from xception_jax.training import checkpoints, replay

# Seconds per process: far above the ~125 s a run took on 2 cores shared with the other xdist
# worker's tests.
TIMEOUT = 480
# Noise images (conftest.noise_image_folder), not the digits: their exact-black backgrounds
# make ReLU and max-pool ties follow the rounding noise of the all-reduce, and runs that add in
# another order drift apart after ~4 steps (../shared/FINDINGS.md). 32 training images in 4
# logical shards of 8, 4 of each per step of 16: the shards' first epochs end at step 2.
STEPS = 5
STOP = 3  # where the 2-process run stops and the 1-process run takes over
RESUMED_FROM = 2  # the 1-process checkpoint the preempted 2-process job starts from


# Every augmentation on (RandAugment here, AutoAugment in test_faults' kill and rerun): the same
# global batches, resume and replay must hold with them (issue 24).
AUGMENTATION = {
    **EVERY_AUGMENTATION,
    "augment.randaugment_layers": 2,
    "augment.randaugment_magnitude_std": 0.5,
}


@pytest.fixture
def pool(tmp_path):
    p = procs.ProcessPool(tmp_path)
    yield p
    p.close()


def noise_args(folder, workdir, num_train_steps):
    """train.py flags: the main job's config, small, on the noise images; num_train_steps only
    sets where a run stops (the schedule is constant)."""
    return [
        "--config=configs/default.py",
        f"--workdir={workdir}",
        *procs.small_overrides(
            "",
            dataset="image_folder",
            image_folder=folder,
            data_shards=4,
            num_train_steps=num_train_steps,
            checkpoint_every_steps=1,
            max_checkpoints_to_keep=STEPS,
            log_every_steps=1,
            eval_every_steps=1000,
            **AUGMENTATION,
        ),
    ]


def run_one_process(pool, folder, workdir, num_train_steps, name):
    """python train.py in one process with 2 CPU devices, to the end; its log."""
    proc = pool.start(noise_args(folder, workdir, num_train_steps), name, num_devices=2)
    assert proc.wait(TIMEOUT) == 0, proc.log()[-4000:]
    return proc.log()


def start_two_processes(pool, folder, workdir, num_train_steps, name):
    """python train.py as 2 processes with 1 CPU device each."""
    port = procs.free_port()
    return [
        pool.start(
            [
                *noise_args(folder, workdir, num_train_steps),
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *procs.FAST_FAIL_FLAGS,
            ],
            f"{name}_{i}",
            num_devices=1,
        )
        for i in range(2)
    ]


def logs_at_exit(pair):
    for p in pair:
        assert p.wait(TIMEOUT) == 0, p.log()[-4000:]
    return [p.log() for p in pair]


def logged_fingerprints(log):
    return re.findall(r"Params at step (\d+) fingerprint (\w+)", log)


@pytest.fixture(scope="module")
def runs(noise_image_folder, gcs_emulator, tmp_path_factory):
    """One config trained on 1 process x 2 devices and on 2 processes x 1 device, resumed from
    one to the other. Returns {name: (workdir, [logs])}:
    - 'one': 1 process, STEPS steps uninterrupted, a checkpoint at every step;
    - 'two_then_one': 2 processes to STOP, then 1 process to STEPS, in one gs:// workdir (the
      GCS emulator, tests/gcs.py), as on a TPU pod whose hosts share no disk;
    - 'preempted': the 'one' run's checkpoints up to RESUMED_FROM, resumed on 2 processes and
      told to terminate (SIGTERM to process 1 only, as TPU maintenance or `scancel` would);
    - 'rerun': the same 2-process command again, to STEPS.
    Every 2-process run pays a full compilation (process 1 never hits the persistent cache,
    which only process 0 writes): hence one set of runs for every test below.
    """
    tmp = tmp_path_factory.mktemp("process_counts")
    pool = procs.ProcessPool(tmp)
    folder = noise_image_folder
    try:
        one = str(tmp / "one")
        runs = {"one": (one, [run_one_process(pool, folder, one, STEPS, "one")])}

        two_then_one = f"gs://{gcs.BUCKET}/{uuid.uuid4().hex[:8]}/two_then_one"
        logs = logs_at_exit(start_two_processes(pool, folder, two_then_one, STOP, "two"))
        logs.append(run_one_process(pool, folder, two_then_one, STEPS, "then_one"))
        runs["two_then_one"] = (two_then_one, logs)

        one_then_two = str(tmp / "one_then_two")
        shutil.copytree(one, one_then_two)
        for step in range(RESUMED_FROM + 1, STEPS + 1):
            shutil.rmtree(os.path.join(one_then_two, "checkpoints", str(step)))
        pair = start_two_processes(pool, folder, one_then_two, STEPS, "preempted")
        # Process 1 has joined jax.distributed (JAX's SIGTERM notifier is installed) and is
        # compiling: the signal lands well before the last step however fast the machine is.
        procs.wait_for(lambda: "Model xception_tiny" in pair[1].log(), pair, TIMEOUT, "init")
        pair[1].signal(signal.SIGTERM)
        runs["preempted"] = (one_then_two, logs_at_exit(pair))
        pair = start_two_processes(pool, folder, one_then_two, STEPS, "rerun")
        runs["rerun"] = (one_then_two, logs_at_exit(pair))
        return runs
    finally:
        pool.close()


def example_fingerprints(images, labels):
    """The multiset of (pixels, label) of a batch's examples."""
    return collections.Counter(
        (image.tobytes(), int(label)) for image, label in zip(images, labels, strict=True)
    )


def params_at(workdir, step):
    return checkpoints.load(workdir, step=step)[1]["params"]


def test_two_processes_and_one_process_train_on_the_same_global_batches(
    runs, noise_image_folder, data_config
):
    # The batches: the 2 processes' parts hold the examples of the global batch, with the same
    # augmentation (per-example fingerprints), step by step.
    config = data_config(
        dataset="image_folder", image_folder=noise_image_folder, image_size=32, batch_size=16
    )
    config.augment = default.get_config().augment
    config.augment.update(
        {k.partition(".")[2]: v for k, v in AUGMENTATION.items() if k.startswith("augment.")}
    )
    for step in range(STOP):
        parts = [
            next(pipeline.train_iterator(config, step, process_index=i, process_count=2))
            for i in (0, 1)
        ]
        images, labels = pipeline.global_batch(config, step)
        assert example_fingerprints(images, labels) == example_fingerprints(
            np.concatenate([p["image"] for p in parts]), np.concatenate([p["label"] for p in parts])
        )
    # The training: STOP steps on 2 processes x 1 device give the params of the same steps on
    # 1 process x 2 devices (only the all-reduce differs: gloo across processes vs in-process).
    one, _ = runs["one"]
    two, logs = runs["two_then_one"]
    assert "on 2 devices (2 processes)" in logs[0]
    assert_trees_close(params_at(two, STOP), params_at(one, STOP), 1e-6, 1e-6)


def test_sigterm_to_one_process_stops_both_at_one_step_with_a_complete_checkpoint(runs):
    workdir, logs = runs["preempted"]
    stops = [re.findall(r"Stopped by a termination signal at step (\d+)", log) for log in logs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, stops
    stop = int(stops[0][0])
    assert RESUMED_FROM < stop < STEPS, "the run ended before the signal took effect"
    for log in logs:
        assert "Run the same command again to resume" in log
    # The checkpoint of that step is complete: orbax lists it (no tmp dir left) and it loads.
    manager = checkpoints.create_manager(workdir, read_only=True)
    assert stop in manager.all_steps()
    checkpoints.load(workdir, step=stop)
    # Both stopped with bitwise the same params (train.py checks and logs it).
    assert logged_fingerprints(logs[0]) == logged_fingerprints(logs[1])
    assert logged_fingerprints(logs[0])[0][0] == str(stop)


@pytest.mark.parametrize("resumed", ["two_then_one", "preempted"])
def test_a_run_resumes_exactly_on_another_process_count(runs, resumed):
    # 2 processes -> 1 process at STOP; 1 process -> 2 processes at RESUMED_FROM (then the
    # preemption and the 2-process rerun): both end where the 1-process run ends.
    one, _ = runs["one"]
    workdir, logs = runs[resumed]
    resumes = {"two_then_one": logs[-1:], "preempted": logs}[resumed]
    for log in resumes:
        assert re.search(r"Resumed from checkpoint \d+", log), log[-3000:]
        assert "The data order changes" not in log
    if resumed == "preempted":
        _, logs = runs["rerun"]
        # Both processes resume and end with bitwise the same params, which the checkpoint
        # holds.
        fingerprints = [logged_fingerprints(log) for log in logs]
        assert fingerprints[0] == fingerprints[1] and fingerprints[0][0][0] == str(STEPS)
        _, variables, _ = checkpoints.load(workdir)
        assert sharding.fingerprint(variables["params"]) == fingerprints[0][0][1]
    assert [r["step"] for r in read_metrics(workdir)][-1] == STEPS
    assert_trees_close(params_at(workdir, STEPS), params_at(one, STEPS), 1e-6, 1e-6)


def test_global_batch_replays_the_step_the_trainer_took(runs):
    # Checkpoint s, trained on global_batch(config, s) by the run's own train step in this
    # process, gives checkpoint s + 1 of the 1-process run.
    one, _ = runs["one"]
    step = 2
    state, p_train_step, mesh, config = replay.restore_for_replay(one, step, jax.devices()[:2])
    images, labels = pipeline.global_batch(config, step)
    batch = feeding.to_global_batch({"image": images, "label": labels}, mesh)
    replayed, metrics = p_train_step(state, batch)
    assert int(replayed.step) == step + 1 and np.isfinite(float(metrics["loss"]))
    assert_trees_close(replayed.params, params_at(one, step + 1), 1e-6, 1e-6)
    # The state is left intact (no donation): a notebook can replay again.
    again, _ = p_train_step(state, batch)
    assert_trees_close(again.params, replayed.params, 0, 0)


def test_processes_that_do_not_share_the_workdir_fail_clearly(digits_data_dir, pool, tmp_path):
    port = procs.free_port()
    pair = [
        pool.start(
            [
                "--config=configs/default.py",
                f"--workdir={tmp_path / f'host{i}'}",  # As if each host had its own disk.
                *procs.small_overrides(digits_data_dir),
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *procs.FAST_FAIL_FLAGS,
            ],
            f"unshared_{i}",
            num_devices=2,
        )
        for i in range(2)
    ]
    for p in pair:
        assert p.wait(TIMEOUT) == 1, p.log()[-4000:]
        assert "Process(es) [1] do not see the workdir that process 0 writes" in p.log()
    # Nothing was trained or written but the (empty) workdirs.
    assert os.listdir(tmp_path / "host0") == []
    assert not os.path.exists(tmp_path / "host1" / "checkpoints")


# --------------------------------------------------------------------------------------------
# The same global batches on any number of processes (config.data_shards)
# --------------------------------------------------------------------------------------------

# Noise images (conftest.noise_image_folder): 48 training images in 4 shards of 12, 4 of each
# per step of 16: the shards' first epochs end at step 3, inside every run below.
NOISE_STEPS = 5
NOISE_STOP = 3
