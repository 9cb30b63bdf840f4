"""What a run writes as it goes: metrics.jsonl, TensorBoard events, and the time summary."""

from __future__ import annotations

import json
import time

import jax
from absl import logging

from xception_jax.platform import storage
from xception_jax.training import telemetry

METRICS_FILE = "metrics.jsonl"


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


SUMMARY_FILE = "time_summary.json"


def report_time(summary: dict, workdir: str) -> None:
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
