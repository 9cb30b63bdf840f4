"""Device mesh, shardings and multi-host initialisation."""

from __future__ import annotations

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: every device of every process).

    Auto axes on purpose: `jax.make_mesh` defaults to Explicit axes in jax 0.10, under which
    sharded conv kernels fail with a ShardingTypeError.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a global batch: split along its leading axis over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int | None = None,
    heartbeat_timeout: int | None = None,
    shutdown_timeout: int | None = None,
) -> None:
    """Joins this process to a multi-process JAX job.

    With no coordinator, JAX detects the cluster itself (TPU pods, SLURM, ...); outside one,
    a single process runs alone and this is a no-op. The timeouts (seconds) bound how long a
    missing or dead peer can hang the job.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    if jax.distributed.is_initialized():
        return
    kwargs = {}
    if initialization_timeout is not None:
        kwargs["initialization_timeout"] = initialization_timeout
    if heartbeat_timeout is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout
    if shutdown_timeout is not None:
        kwargs["shutdown_timeout_seconds"] = shutdown_timeout
    if explicit:
        if coordinator_address is None or num_processes is None or process_id is None:
            raise ValueError(
                "Multi-process training needs all of --coordinator_address, --num_processes "
                "and --process_id (or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                "JAX_PROCESS_ID environment variables); got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}."
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    else:
        try:
            jax.distributed.initialize(**kwargs)
        except (ValueError, RuntimeError) as e:
            # No cluster detected: a plain single-process run.
            logging.info("Running as a single process (no cluster detected: %s).", e)
            return
    logging.info(
        "Process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
