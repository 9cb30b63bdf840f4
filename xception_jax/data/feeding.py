"""Feeding the devices: per-process numpy batches -> global jax.Arrays, prefetched in a thread.

No TensorFlow here: any iterator of numpy batches can be fed.
"""

import queue
import threading

import jax
import numpy as np


def _batch_sharding(mesh_or_sharding):
    """NamedSharding over the batch axis 'data' for a Mesh; a Sharding is used as is."""
    if isinstance(mesh_or_sharding, jax.sharding.Mesh):
        return jax.sharding.NamedSharding(mesh_or_sharding, jax.sharding.PartitionSpec("data"))
    return mesh_or_sharding


def to_global_batch(batch, mesh_or_sharding):
    """Per-process numpy batch -> dict of global jax.Arrays sharded on the batch axis ('data').

    Every process passes its own part; the global batch is their concatenation in process order
    (jax.make_array_from_process_local_data).
    """
    sharding = _batch_sharding(mesh_or_sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch
    )


_END = object()


class _Failure:
    """An exception raised in the prefetch thread, re-raised in the consumer."""

    def __init__(self, exc):
        self.exc = exc


def prefetch_to_device(iterator, size, sharding):
    """Yields to_global_batch(batch, sharding) for each batch, `size` batches ahead.

    A background thread pulls batches from `iterator` and starts their (asynchronous) transfer,
    so input preparation and host->device copies overlap the training step. size <= 0: no
    thread, plain conversion. Closing the generator stops the thread at its next batch.
    """
    if size <= 0:
        return (to_global_batch(batch, sharding) for batch in iterator)
    buffer = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item):
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for batch in iterator:
                if not put(to_global_batch(batch, sharding)):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread
            put(_Failure(exc))
        finally:
            if hasattr(iterator, "close"):  # Release tf.data's threads in this thread.
                iterator.close()

    thread = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
    thread.start()

    def consume():
        try:
            while True:
                item = buffer.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()
            # Wait for the producer to leave tf.data: a daemon thread still inside TF's C++ code
            # at interpreter exit aborts the process ("FATAL: exception not rethrown").
            thread.join()

    return consume()
