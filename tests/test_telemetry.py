"""What a run reports: FLOP/s and MFU, memory, device-hours, input stalls, where the wall time
went, and a profiler window (training/telemetry.py, wired in loop.train_and_evaluate)."""

import json
import logging
import os
import time

import jax
import pytest
from test_train import read_metrics, small_config

from xception_jax.data import pipeline, sources
from xception_jax.model import registry
from xception_jax.platform import sharding
from xception_jax.training import loop, metrics_log, optim, steps, telemetry, train_state

DELAY = 1.0  # Seconds the slowed input pipeline sleeps before each batch (a step: < 0.1 s).


@pytest.fixture(scope="module")
def slow_input_run(digits_data_dir, tmp_path_factory):
    """A short run (1 device) whose input pipeline sleeps DELAY s per batch, profiling steps
    7-8. No prefetch thread: every step waits the delay in full. Returns (workdir, config,
    absl log messages)."""
    workdir = str(tmp_path_factory.mktemp("telemetry") / "run")
    config = small_config(
        digits_data_dir,
        num_train_steps=8,
        log_every_steps=2,
        eval_every_steps=1000,
        checkpoint_every_steps=1000,
    )
    config.profile_start_step, config.profile_num_steps = 7, 2
    config.prefetch_batches = 0
    real = pipeline.train_iterator

    def slowed(*args, **kwargs):  # The test-only delay: the real batches, late.
        for batch in real(*args, **kwargs):
            time.sleep(DELAY)
            yield batch

    handler, logger = _Collect(), logging.getLogger("absl")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    pipeline.train_iterator = slowed
    try:
        loop.train_and_evaluate(config, workdir, jax.devices()[:1])
    finally:
        pipeline.train_iterator = real
        logger.removeHandler(handler)
        logger.setLevel(level)
    return workdir, config, handler.messages


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_profile_window_writes_a_trace_where_tensorboard_looks(slow_input_run):
    workdir, _, messages = slow_input_run
    traces = [
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(os.path.join(workdir, "plugins", "profile"))
        for name in names
        if name.endswith(".xplane.pb")
    ]
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
    assert "Profiling steps 7-8." in messages


def test_tflops_per_device_is_the_compiled_steps_flops_over_the_interval(
    slow_input_run, digits_data_dir
):
    workdir, config, _ = slow_input_run
    # The step train.py runs, compiled here independently: its FLOPs per device.
    info = sources.get_dataset_info(config)
    mesh = sharding.create_mesh(jax.devices()[:1])
    model = registry.create_model_from_config(
        config, info.num_classes, sharding.mesh_platform(mesh)
    )
    tx, _ = optim.create_optimizer(config, info.num_train_examples)
    p_train_step, _ = steps.jit_steps(model, tx, config, mesh)
    compiled = p_train_step.lower(
        train_state.abstract_train_state(model, tx, config, mesh),
        steps.abstract_batch(config.batch_size, config.image_size, mesh),
    ).compile()
    flops = compiled.cost_analysis()["flops"]
    assert flops > 0
    records = [r for r in read_metrics(workdir) if "train_loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    for r in records:
        expected = flops * r["steps_per_sec"] / 1e12
        assert r["tflops_per_device"] == pytest.approx(expected, rel=0.01)
        assert "mfu" not in r  # CPU: no peak, so no MFU rather than a wrong one.
        assert "device_peak_bytes" not in r  # The CPU backend keeps no memory statistics.
        assert r["host_rss_bytes"] > 100e6


def test_peak_table_gives_each_devices_figure_for_the_compute_dtype():
    peak = telemetry.peak_flops_per_second
    assert peak("TPU v4", "bfloat16") == 275e12
    assert peak("TPU v5 lite", "bfloat16") == 197e12  # v5e
    assert peak("TPU v5", "bfloat16") == 459e12  # v5p
    assert peak("TPU v5p", "float32") == 459e12
    assert peak("TPU v6 lite", "bfloat16") == 918e12  # v6e
    assert peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert peak("NVIDIA A100-SXM4-40GB", "float32") == 156e12  # TF32
    assert peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert peak("NVIDIA H200", "float32") == 494e12
    assert peak("cpu", "float32") is None
    assert peak("NVIDIA GeForce RTX 4090", "bfloat16") is None


def test_a_slow_input_pipeline_shows_in_input_wait_fraction_and_warns(slow_input_run):
    workdir, _, messages = slow_input_run
    fractions = [r["input_wait_fraction"] for r in read_metrics(workdir) if "train_loss" in r]
    # Steps 3-4 and 5-6 (1-2 had one batch ready from the startup; 7-8 stop the profiler).
    assert min(fractions[1:3]) > 0.5, fractions
    warnings = [m for m in messages if "waited for input" in m]
    assert len(warnings) == 1 and "config.prefetch_batches" in warnings[0]


def test_time_summary_parts_add_up_to_the_wall_time(slow_input_run):
    workdir, _, messages = slow_input_run
    with open(os.path.join(workdir, metrics_log.SUMMARY_FILE)) as f:
        summary = json.load(f)
    parts = sum(summary[f"{p}_seconds"] for p in telemetry.Chrono.PARTS)
    assert parts == pytest.approx(summary["wall_seconds"], rel=0.05)
    assert summary["input_seconds"] > 6 * DELAY  # 8 batches, 2 of them in flight ahead.
    assert summary["profile_seconds"] > 0
    assert any(m.startswith("Wall time ") for m in messages)
    records = read_metrics(workdir)
    hours = [r["device_hours"] for r in records]
    assert hours == sorted(hours) and hours[-1] <= summary["device_hours"]
