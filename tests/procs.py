"""Launching `python train.py` processes for tests: free ports, logs, hard timeouts.

Every process starts in its own session (process group), so that a timeout or a failed test
kills it and anything it spawned with one `os.killpg`, and a hung peer can never outlive the
test. Processes inherit the test session's compilation cache (tests/conftest.py).
"""

import os
import signal
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Short multi-process timeouts: a missing or dead peer aborts in seconds, not minutes.
FAST_FAIL_FLAGS = (
    "--initialization_timeout=60",
    "--heartbeat_timeout=20",
    "--shutdown_timeout=30",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_overrides(data_dir, **overrides) -> list[str]:
    """--config.* flags giving tests/test_train.py's small_config (keep the two in step)."""
    fields = {
        "data_dir": data_dir,
        "image_size": 32,
        "batch_size": 16,
        "eval_batch_size": 64,
        "schedule.name": "constant",
        "schedule.warmup_epochs": 0.0,
        "schedule.base_learning_rate": 0.02,
        "num_train_steps": 4,
        "log_every_steps": 2,
        "eval_every_steps": 4,
        "checkpoint_every_steps": 2,
    }
    fields.update({k.replace("__", "."): v for k, v in overrides.items()})
    return [f"--config.{k}={v}" for k, v in fields.items()]


def env_with_devices(num_devices: int) -> dict:
    """The test environment with `num_devices` CPU devices per process."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Proc:
    """One `python train.py ...` process, its output in a log file."""

    def __init__(self, args, log_path, env):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.popen = subprocess.Popen(
            [sys.executable, "train.py", *args],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def log(self) -> str:
        """Everything the process wrote so far."""
        with open(self.log_path) as f:
            return f.read()

    def signal(self, signum) -> None:
        """Sends `signum` to this process only (not its group)."""
        self.popen.send_signal(signum)

    def kill_group(self) -> None:
        """SIGKILL to the whole process group, if still running."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()
        self._log.close()

    def wait(self, timeout: float) -> int:
        """The exit code; kills the group and fails the test after `timeout` seconds."""
        try:
            code = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group()
            raise AssertionError(
                f"{self.log_path}: no exit within {timeout}s (killed):\n{self.log()[-3000:]}"
            ) from None
        self._log.close()
        return code


def wait_for(predicate, procs, timeout: float, what: str, poll: float = 0.002) -> None:
    """Polls `predicate()` until true; fails (killing `procs`) on timeout or if one exits."""
    deadline = time.monotonic() + timeout
    while not predicate():
        exited = [p for p in procs if p.popen.poll() is not None]
        if exited or time.monotonic() > deadline:
            for p in procs:
                p.kill_group()
            reason = "a process exited" if exited else f"{timeout}s passed"
            raise AssertionError(
                f"Waiting for {what}: {reason}.\n" + "\n".join(p.log()[-3000:] for p in procs)
            )
        time.sleep(poll)


class ProcessPool:
    """Starts processes for one test and kills any still running when the test ends."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, args, name, num_devices=1, env=None) -> Proc:
        """Starts `python train.py *args` with `num_devices` CPU devices."""
        proc = Proc(args, str(self.tmp_path / f"{name}.log"), env or env_with_devices(num_devices))
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        """Kills every process group still running."""
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.kill_group()
