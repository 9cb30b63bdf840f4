"""Device mesh, shardings and multi-host initialisation."""

from __future__ import annotations

import hashlib
import os
import secrets

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from xception_jax.platform import errors, storage

DATA_AXIS = "data"


def create_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over `devices` (default: every device of every process).

    Auto axes on purpose: `jax.make_mesh` defaults to Explicit axes in jax 0.10, under which
    sharded conv kernels fail with a ShardingTypeError.
    """
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def mesh_platform(mesh: Mesh) -> str:
    """The platform ('cpu', 'tpu', 'gpu', ...) of the mesh's devices: what its programs target."""
    return mesh.devices.flat[0].platform


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Sharding of a global batch: split along its leading axis over the data axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


class DistributedSetupError(errors.InputError, RuntimeError):
    """A multi-process job that cannot start as configured (flags, environment, filesystem)."""


def _from_env(value, name: str, cast=str):
    """`value` when given, else environment variable `name` (cast), else None."""
    if value is not None:
        return value
    raw = os.environ.get(name)
    if raw in (None, ""):
        return None
    try:
        return cast(raw)
    except ValueError as e:
        raise DistributedSetupError(f"Environment variable {name}={raw!r} is not valid: {e}") from e


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int | None = None,
    heartbeat_timeout: int | None = None,
    shutdown_timeout: int | None = None,
) -> None:
    """Joins this process to a multi-process JAX job.

    Explicit when any of coordinator_address / num_processes / process_id is given, by argument
    or by the environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
    JAX_PROCESS_ID (JAX itself reads only the first). Otherwise JAX detects the cluster
    (TPU pods, SLURM, Open MPI, ...); where it detects none, a single process runs alone
    without `jax.distributed` and this is a no-op (preemption then falls back to a Python
    SIGTERM handler, see preemption.StopSignal). The timeouts (seconds) bound how long a missing
    or dead peer can hang the job before JAX aborts it.
    """
    if jax.distributed.is_initialized():
        return
    coordinator_address = _from_env(coordinator_address, "JAX_COORDINATOR_ADDRESS")
    num_processes = _from_env(num_processes, "JAX_NUM_PROCESSES", int)
    process_id = _from_env(process_id, "JAX_PROCESS_ID", int)
    kwargs = {}
    if initialization_timeout is not None:
        kwargs["initialization_timeout"] = initialization_timeout
    if heartbeat_timeout is not None:
        kwargs["heartbeat_timeout_seconds"] = heartbeat_timeout
    if shutdown_timeout is not None:
        kwargs["shutdown_timeout_seconds"] = shutdown_timeout
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given):
        if any(v is None for v in given):
            raise DistributedSetupError(
                "Multi-process training needs all of --coordinator_address, --num_processes "
                "and --process_id (or the JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
                "JAX_PROCESS_ID environment variables); got "
                f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
                f"process_id={process_id!r}."
            )
        if not 0 <= process_id < num_processes:
            raise DistributedSetupError(
                f"--process_id={process_id} must be in [0, --num_processes={num_processes})."
            )
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    else:
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as e:
            # No cluster detected ("coordinator_address should be defined"): a plain
            # single-process run. Other errors (a detected cluster that fails to connect)
            # propagate: running alone there would silently train N independent copies.
            logging.info("Running as a single process (no cluster detected: %s).", e)
            return
    logging.info(
        "Process %d of %d, %d local / %d global devices.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


WORKDIR_TOKEN = ".shared_workdir_check"


def check_shared_workdir(workdir: str) -> None:
    """Checks that every process sees the same `workdir` (one shared filesystem).

    Process 0 writes a random nonce into the workdir and broadcasts it; every process reads the
    file back and all of them learn who saw it. Without this, hosts with local disks would each
    write their own partial checkpoints and a resume would silently restore a mixture. Raises
    DistributedSetupError on every process (so none is left waiting) when a process differs.
    No-op for a single process. The workdir must exist on every process.
    """
    if jax.process_count() == 1:
        return
    barrier("xception_jax_check_shared_workdir")  # Start the collectives below together.
    path = storage.join(workdir, WORKDIR_TOKEN)
    nonce = np.zeros(4, np.int32)
    if jax.process_index() == 0:
        nonce = np.frombuffer(secrets.token_bytes(16), np.int32).copy()
        storage.write_atomic(path, nonce.tobytes().hex())
    # Also a barrier: no process gets the nonce before process 0 has written the file.
    expected = np.asarray(multihost_utils.broadcast_one_to_all(nonce)).tobytes().hex()
    try:
        seen = storage.read_text(path).strip() == expected
    except OSError:
        seen = False
    seen_by = np.asarray(multihost_utils.process_allgather(np.int32(seen))).reshape(-1)
    if jax.process_index() == 0:
        storage.remove(path)
    missing = [i for i, ok in enumerate(seen_by) if not ok]
    if missing:
        raise DistributedSetupError(
            f"Process(es) {missing} do not see the workdir that process 0 writes "
            f"({storage.abspath(workdir)}): the token file {WORKDIR_TOKEN} process 0 wrote there "
            "is missing or different. --workdir must be one directory shared by every host "
            "(e.g. NFS or a gs:// bucket), or checkpoints would be split across hosts."
        )


def fingerprint(tree) -> str:
    """A hash of the bytes of this process's copy of every leaf (replicated arrays)."""
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        local = leaf.addressable_shards[0].data if isinstance(leaf, jax.Array) else leaf
        digest.update(np.ascontiguousarray(np.asarray(local)).tobytes())
    return digest.hexdigest()[:16]


def check_replicas_agree(tree, what: str) -> str:
    """Checks that every process holds bitwise the same `tree`; returns its fingerprint.

    Replicated state is computed independently by each process: a silent divergence (a
    nondeterministic op, a host-dependent input) would otherwise only surface as a checkpoint
    that no process actually had. Raises DistributedSetupError naming the processes.
    """
    mine = fingerprint(tree)
    if jax.process_count() > 1:
        code = np.frombuffer(bytes.fromhex(mine), np.int32)
        codes = np.asarray(multihost_utils.process_allgather(code)).reshape(jax.process_count(), -1)
        differ = [i for i in range(len(codes)) if not np.array_equal(codes[i], codes[0])]
        if differ:
            raise DistributedSetupError(
                f"{what} of process(es) {differ} differ from process 0's: the processes "
                "diverged. Check that every host runs the same code, config and data."
            )
    logging.info(
        "%s fingerprint %s (identical on all %d processes).", what, mine, jax.process_count()
    )
    return mine


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Waits until every process reaches `name` (no-op for one process).

    A coordination-service barrier, not a device collective: it waits up to `timeout_s` (a
    dead peer is caught sooner by the heartbeat), where a CPU collective gives up after ~30 s.
    """
    if jax.process_count() == 1:
        return
    ocp.multihost.sync_global_processes(
        name, timeout=timeout_s, processes=set(range(jax.process_count()))
    )
