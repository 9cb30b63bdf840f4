"""What a run reports about its cost: FLOPs and MFU, memory, device-hours, where the wall time
went, and a profiler trace of a window of steps.

The anchors: MaxText (per-device TFLOP/s from the compiled step, compiled memory stats, a
`profiler_steps` window), big_vision (`Chrono`: core-hours kept across restarts) and timm (data
time against update time). Nothing here changes what the run computes.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import psutil
from absl import logging

from xception_jax.platform import storage

# Peak dense matmul throughput per chip (TPU) or GPU, in TFLOP/s, for the compute dtype.
# float32 runs at the bfloat16 figure on TPU (JAX's default precision does a float32 matmul
# as one bfloat16 pass on the MXU) and at the TF32 figure on NVIDIA GPUs (JAX's default
# precision allows TF32 there). Matched against jax.Device.device_kind, first match wins.
_PEAK_TFLOPS = (
    # https://cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16 per chip ("TPU v6 lite").
    ("TPU v6", {"bfloat16": 918.0, "float32": 918.0}),
    # https://cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16 per chip ("TPU v5 lite").
    ("TPU v5 lite", {"bfloat16": 197.0, "float32": 197.0}),
    # https://cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16 per chip ("TPU v5", "TPU v5p").
    ("TPU v5", {"bfloat16": 459.0, "float32": 459.0}),
    # https://cloud.google.com/tpu/docs/v4: 275 TFLOP/s bf16 per chip.
    ("TPU v4", {"bfloat16": 275.0, "float32": 275.0}),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM 989 TFLOP/s BF16 and
    # 494 TFLOP/s TF32, dense (the sheet's 1,979 / 989 assume 2:4 sparsity).
    ("H200", {"bfloat16": 989.0, "float32": 494.0}),
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM 989 TFLOP/s BF16 and
    # 494 TFLOP/s TF32, dense.
    ("H100", {"bfloat16": 989.0, "float32": 494.0}),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): 312 TFLOP/s BF16 and
    # 156 TFLOP/s TF32, dense.
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
)

INPUT_WAIT_WARNING = 0.5  # Share of an interval spent waiting for input that warns...
INPUT_WAIT_INTERVALS = 2  # ...when it holds for this many logged intervals in a row.


def peak_flops_per_second(device_kind: str, dtype: str) -> float | None:
    """The peak FLOP/s of one device of `device_kind` for `dtype`; None when unknown (CPU)."""
    for name, peaks in _PEAK_TFLOPS:
        if name.lower() in device_kind.lower():
            tflops = peaks.get(dtype)
            return tflops * 1e12 if tflops else None
    return None


def step_cost(compiled, grad_accum_steps: int = 1) -> dict:
    """FLOPs per device of one step and its compiled memory, from XLA's own analyses.

    XLA counts a loop's body once: with k microbatches (a scan of k forward and backward
    passes) the step does about k times what it reports, so the figure is scaled by k (which
    counts the once-per-step optimizer update k times: O(parameters), negligible).
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    return {
        "flops_per_device": float(cost.get("flops", 0.0)) * grad_accum_steps,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "code_bytes": memory.generated_code_size_in_bytes,
    }


def host_rss_bytes() -> int:
    """This process's resident memory."""
    return psutil.Process().memory_info().rss


def device_peak_bytes() -> int | None:
    """The largest peak memory in use of this process's devices; None where the backend keeps
    no statistics (CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


class Chrono:
    """Where the wall time of a run goes, and its device-hours across resumes.

    Parts: 'startup' (from the start to the first step: setup, restore, the train step's
    compilation, the first batch), 'input' (waiting for the next batch), 'train' (dispatching
    steps and waiting for their results), 'eval' (the eval step's compilation included),
    'checkpoint', 'logging' (metrics.jsonl, TensorBoard), 'profile' (stopping and writing a
    trace) and 'shutdown'. `device_seconds` counts
    devices x wall seconds since the run started, plus what the restored checkpoint carried.
    """

    PARTS = ("startup", "input", "train", "eval", "checkpoint", "logging", "profile", "shutdown")

    def __init__(self, num_devices: int):
        self.start = time.time()
        self.num_devices = num_devices
        self.device_seconds_before = 0.0
        self.totals = dict.fromkeys(self.PARTS, 0.0)
        self._interval_input = 0.0
        self._high_input_intervals = 0
        self._warned = False

    def add(self, part: str, seconds: float) -> None:
        """Counts `seconds` of wall time as `part`."""
        self.totals[part] += seconds
        if part == "input":
            self._interval_input += seconds

    def timed(self, part: str, fn, *args, **kwargs):
        """fn(*args, **kwargs), its wall time counted as `part`."""
        start = time.time()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add(part, time.time() - start)

    def device_seconds(self) -> float:
        """Devices x seconds of every run of this workdir up to now (for checkpoints)."""
        return self.device_seconds_before + self.num_devices * (time.time() - self.start)

    def input_wait_fraction(self, interval_seconds: float) -> float:
        """Share of the interval just ended spent waiting for input; starts a new interval.

        Warns (once) when the share stays above INPUT_WAIT_WARNING for INPUT_WAIT_INTERVALS
        intervals in a row.
        """
        fraction = min(self._interval_input / max(interval_seconds, 1e-9), 1.0)
        self._interval_input = 0.0
        self._high_input_intervals = (
            self._high_input_intervals + 1 if fraction > INPUT_WAIT_WARNING else 0
        )
        if self._high_input_intervals >= INPUT_WAIT_INTERVALS and not self._warned:
            self._warned = True
            logging.warning(
                "The training loop waited for input %.0f%% of the last interval: the devices "
                "are idle that long. Try a larger config.prefetch_batches, a data_dir closer to "
                "the hosts (same region; local disk), fewer augmentation ops (crop/flip), or "
                "hosts with more CPU cores.",
                100 * fraction,
            )
        return fraction

    def summary(self) -> dict:
        """{'wall_seconds', each part's seconds, 'device_hours'}: call at the very end."""
        wall = time.time() - self.start
        return {
            "wall_seconds": round(wall, 3),
            **{f"{part}_seconds": round(s, 3) for part, s in self.totals.items()},
            "device_hours": self.device_seconds() / 3600,
        }


class ProfileWindow:
    """A jax.profiler trace of train steps [start_step, start_step + num_steps) into
    `workdir/plugins/profile/` (where TensorBoard's profile plugin looks), local or gs://.

    The trace is written to a local directory and copied into the workdir when it stops, so a
    gs:// workdir gets it too. `close()` stops a trace still running (the run ended or was
    preempted inside the window).
    """

    def __init__(self, workdir: str, start_step: int, num_steps: int, enabled: bool = True):
        self.workdir, self.first, self.end = workdir, start_step, start_step + num_steps
        self.enabled = enabled and num_steps > 0
        self._local = None

    def before_step(self, step: int) -> None:
        """Call before running step `step` (the step number once it is done, 1-based)."""
        if self.enabled and self._local is None and self.first <= step < self.end:
            self._local = tempfile.mkdtemp(prefix="xception_jax_profile_")
            jax.profiler.start_trace(self._local)
            logging.info("Profiling steps %d-%d.", step, self.end - 1)

    def after_step(self, step: int, state) -> None:
        """Call after step `step`; stops the trace after the window's last step."""
        if self._local is not None and step >= self.end - 1:
            jax.block_until_ready(state)  # The window's device work belongs in the trace.
            self.close()

    def close(self) -> None:
        """Stops a running trace and copies it into the workdir."""
        if self._local is None:
            return
        local, self._local = self._local, None
        jax.profiler.stop_trace()
        for dirpath, _, filenames in os.walk(local):
            for name in filenames:
                relative = os.path.relpath(os.path.join(dirpath, name), local)
                target = storage.join(self.workdir, *relative.split(os.sep))
                storage.makedirs(storage.dirname(target))
                with open(os.path.join(dirpath, name), "rb") as f:
                    storage.write_atomic(target, f.read())
        logging.info("Profile written to %s.", storage.join(self.workdir, "plugins", "profile"))
