"""End-to-end training on the embedded digits dataset: outputs, sharding, resume, load."""

import glob
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import default
from xception_jax.training import checkpoints, loop


def small_config(data_dir, **overrides):
    """The main job's config, shrunk to seconds: 32px images, small batches, few steps."""
    config = default.get_config()
    config.data_dir = data_dir
    config.image_size = 32
    config.batch_size = 16
    config.eval_batch_size = 64
    config.schedule.name = "constant"
    config.schedule.warmup_epochs = 0.0
    config.schedule.base_learning_rate = 0.02
    config.num_train_steps = 4
    config.log_every_steps = 2
    config.eval_every_steps = 4
    config.checkpoint_every_steps = 2
    for key, value in overrides.items():
        config[key] = value
    return config


def read_metrics(workdir):
    """The records of a workdir's metrics.jsonl (local or gs://)."""
    from xception_jax.platform import storage

    text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
    return [json.loads(line) for line in text.splitlines()]


def assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_allclose(
            np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path)
        )


def test_training_writes_its_outputs_and_the_loss_falls(digits_data_dir, tmp_path):
    config = small_config(
        digits_data_dir, num_train_steps=30, log_every_steps=5, eval_every_steps=15
    )
    config.schedule.base_learning_rate = 0.02
    config.ema_decay = 0.9
    workdir = str(tmp_path / "run")
    state = loop.train_and_evaluate(config, workdir, devices=jax.devices()[:1])

    assert int(state.step) == 30
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for key in ("train_loss", "train_accuracy", "learning_rate", "steps_per_sec", "images_per_sec"):
        assert all(np.isfinite(r[key]) for r in records), key
    evals = [r for r in records if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [15, 30]
    for key in ("eval_loss", "eval_accuracy", "eval_top5_accuracy", "eval_ema_accuracy"):
        assert key in evals[-1]
    assert records[-1]["train_loss"] < 0.8 * records[0]["train_loss"]
    assert evals[-1]["eval_top5_accuracy"] >= evals[-1]["eval_accuracy"]

    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["num_train_steps"] == 30
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    manager = checkpoints.create_manager(workdir, read_only=True)
    assert manager.latest_step() == 30


@pytest.fixture(scope="module")
def eight_device_run(digits_data_dir, tmp_path_factory):
    """A short run sharded over 8 CPU devices: (workdir, final state)."""
    assert jax.device_count() >= 8, "tests/conftest.py gives the test process 8 CPU devices"
    workdir = str(tmp_path_factory.mktemp("eight") / "run")
    state = loop.train_and_evaluate(small_config(digits_data_dir), workdir, jax.devices()[:8])
    return workdir, state


def test_one_and_eight_devices_agree(noise_image_folder, tmp_path):
    # BatchNorm statistics come from the global batch, so the split cannot change the result.
    # Noise images, not digits: the digits' exactly black background gives exact ties, where
    # the gradient of ReLU (and max-pool) is decided by the sign of rounding noise, which the
    # reduction order (the device count) sets: 1 and 8 devices then differ by 2% of some
    # gradients after one step. With 1e-5 of noise added to the digits they agree to 6e-6.
    def run(devices, name):
        config = small_config(None, dataset="image_folder", image_folder=noise_image_folder)
        config.eval_split = "test"
        return loop.train_and_evaluate(config, str(tmp_path / name), devices=devices)

    sharded, single = run(jax.devices()[:8], "eight"), run(jax.devices()[:1], "one")
    assert_trees_close(sharded.params, single.params, rtol=1e-5, atol=1e-5)
    assert_trees_close(sharded.batch_stats, single.batch_stats, rtol=1e-5, atol=1e-5)


def test_resume_equals_uninterrupted_run(digits_data_dir, tmp_path):
    one_device = jax.devices()[:1]
    whole = loop.train_and_evaluate(
        small_config(digits_data_dir, num_train_steps=6), str(tmp_path / "whole"), one_device
    )
    resumed_dir = str(tmp_path / "resumed")
    loop.train_and_evaluate(
        small_config(digits_data_dir, num_train_steps=3), resumed_dir, one_device
    )
    resumed = loop.train_and_evaluate(
        small_config(digits_data_dir, num_train_steps=6), resumed_dir, one_device
    )
    # Bitwise: same batches (the pipeline restarts at step 3), same per-step rng, same program.
    for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert [r["step"] for r in read_metrics(resumed_dir)] == [2, 3, 4, 6]


def test_load_into_a_one_device_process_matches_the_trainers_eval(eight_device_run):
    workdir, _ = eight_device_run
    expected = [r for r in read_metrics(workdir) if "eval_loss" in r][-1]
    # A fresh process with one CPU device, as a notebook would be.
    script = textwrap.dedent(
        f"""
        import json, jax, numpy as np
        import xception_jax
        from xception_jax.data import pipeline
        from xception_jax.training import steps
        assert jax.device_count() == 1
        model, variables, config = xception_jax.load({workdir!r})
        loss = correct = count = 0.0
        for batch in pipeline.eval_iterator(config):
            logits = model.apply(variables, xception_jax.preprocess(batch["image"]), train=False)
            mask = batch["mask"]
            per_example = steps.cross_entropy(logits, batch["label"], model.num_classes)
            loss += float(np.sum(np.asarray(per_example) * mask))
            correct += float(np.sum((np.argmax(logits, -1) == batch["label"]) * mask))
            count += float(mask.sum())
        print(json.dumps({{"loss": loss / count, "accuracy": correct / count}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["loss"] == pytest.approx(expected["eval_loss"], rel=1e-5, abs=1e-6)
    assert got["accuracy"] == pytest.approx(expected["eval_accuracy"], abs=1e-6)
