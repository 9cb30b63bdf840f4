"""Stopping every process at the same step when the job is told to terminate (SIGTERM)."""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class StopSignal:
    """Answers, once per step, whether training should stop there to save and exit.

    Under `jax.distributed` JAX's preemption service catches SIGTERM on any process and
    `reached_preemption_sync_point` turns it into the same step on all of them (a Python
    handler would replace JAX's and the sync point would never fire). A lone process without
    `jax.distributed` (a notebook, a test) falls back to a Python SIGTERM handler.
    """

    def __init__(self):
        self._distributed = jax.distributed.is_initialized()
        self._steps = 0
        self._event = threading.Event()
        self._previous = None
        if not self._distributed and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame):
        logging.warning("Received signal %d: stopping after the current step.", signum)
        self._event.set()

    def reached(self, step: int) -> bool:
        """True when every process should stop after `step` (the same answer on all of them)."""
        if self._distributed:
            # JAX's sync point is the largest step id the processes reported + 1, where a
            # process that has reported none counts 0. Reporting the global step would miss a
            # signal that lands before the first step of a resumed run (sync point 1, first
            # report start + 1): report the steps this run has taken instead (the same on every
            # process, since all start from the same checkpoint).
            self._steps += 1
            return multihost_utils.reached_preemption_sync_point(self._steps)
        return self._event.is_set()

    def close(self) -> None:
        """Restores the SIGTERM handler that was there before."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
