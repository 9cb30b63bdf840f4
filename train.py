"""Trains an Xception as a config says.

    python train.py --config configs/default.py --workdir runs/default

Every host of a multi-host job runs this same command.
"""

import logging
import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from xception_jax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the config.")
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for multi-process runs outside a "
    "detected cluster (also JAX_COORDINATOR_ADDRESS).",
)
flags.DEFINE_integer("num_processes", None, "Number of processes (also JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index (also JAX_PROCESS_ID).")
flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process to join (then abort)."
)
flags.DEFINE_integer(
    "heartbeat_timeout", 100, "Seconds without a heartbeat before a peer counts as dead."
)
flags.DEFINE_integer("shutdown_timeout", 300, "Seconds to wait for peers at shutdown.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record: logging.LogRecord) -> bool:
    """Drops orbax's per-save INFO lines (a dozen per checkpoint), keeps its warnings."""
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(args: list[str]) -> None:
    """Trains as the flags say (`args`: the positional arguments, none)."""
    absl_logging.get_absl_handler().addFilter(_quiet_orbax)
    from xception_jax.platform import hugepages

    absl_logging.info(
        "malloc with transparent huge pages: %s (GLIBC_TUNABLES=%r; see "
        "xception_jax/platform/hugepages.py)",
        hugepages.active(),
        os.environ.get("GLIBC_TUNABLES"),
    )
    # Imported here so that --help and flag errors come back without loading JAX/TF.
    from xception_jax.platform import sharding
    from xception_jax.training import loop

    # A lone process gets no jax.distributed (no coordinator port to open): preemption then
    # uses preemption.StopSignal's Python SIGTERM handler. Any multi-process job (flags, JAX_*
    # variables or a detected cluster) uses JAX's preemption sync point. Errors a user can fix
    # (config, checkpoint, cluster setup, diverged training) end in cli.report_errors.
    sharding.initialize_distributed(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        initialization_timeout=FLAGS.initialization_timeout,
        heartbeat_timeout=FLAGS.heartbeat_timeout,
        shutdown_timeout=FLAGS.shutdown_timeout,
    )
    loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    exit_without_teardown()


def exit_without_teardown() -> None:
    """Ends a finished run at once, skipping the interpreter's teardown.

    Everything is saved and flushed by now (checkpoints waited for, metrics and events closed).
    What the teardown would still do costs more than the last checkpoint's save and saves
    nothing: JAX's atexit handler clears its caches (destroying every MLIR context and
    compiled program) and Python's final garbage collection walks every object; measured on
    the main job: 7-10 s after the last eval on 2 loaded cores (py-spy). The one part that
    matters, leaving a multi-process job in step with its peers, is done here first.
    """
    import jax

    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    absl_logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    from xception_jax.platform import hugepages

    hugepages.reexec_with_hugepages()  # faster CPU steps; XCEPTION_JAX_HUGEPAGES=0 opts out
    cli.run_tool(main, FLAGS, __doc__, program="train.py")
