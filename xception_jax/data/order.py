"""The data order: which example each step trains on, and the seeds of its augmentation.

The same global batches on any number of processes. The training split is cut into
`config.data_shards` fixed logical shards (`data/sources.py`). Each shard is a stream of epochs
of its own: epoch e reads the shard's files in an order shuffled with seed f(seed, shard, e) and
passes the records through a shuffle buffer seeded likewise, so every epoch consumes each example
of the shard exactly once. Step s takes the next batch_size / data_shards examples of every
shard, in shard order: the global batch of step s is a function of (seed, s, the dataset) alone.
Process p of P reads shards p * S/P to (p+1) * S/P - 1 (`data/shards.py`), and the processes'
parts concatenated in process order are that global batch. The augmentation of an example is
seeded with (seed, its position in its shard's stream, the shard): it follows the example, not
the process.

Exact resume on any supported process count: `train_records(config, start_step, ...)` starts
each shard's stream at position start_step * batch_size / data_shards, derived from the step
alone. It skips the records already consumed while they are still encoded (no JPEG decoding),
less than one epoch of the shard, all of a process's shards side by side.
"""

import tensorflow as tf

from xception_jax.data import shards, sources


def example_seed(seed, shard, position, num_shards):
    """Stateless seed of the example at `position` of shard `shard`'s stream: a function of the
    example's place in the data order, whichever process reads it."""
    global_index = tf.cast(position, tf.int64) * num_shards + tf.cast(shard, tf.int64)
    return tf.stack([tf.constant(seed, tf.int64), global_index])


def _epoch_seed(seed, shard, epoch, salt):
    """A 63-bit shuffle seed that is a hash of (seed, shard, epoch, salt)."""
    counter = (tf.cast(shard, tf.int64) * 2**32 + tf.cast(epoch, tf.int64)) * 2 + salt
    key = tf.stack([tf.constant(seed, tf.int64), counter])
    bits = tf.random.stateless_uniform([], seed=key, minval=None, maxval=None, dtype=tf.int64)
    return tf.bitwise.bitwise_and(bits, tf.constant(2**63 - 1, tf.int64))


def _check_no_empty_shard(split_sizes, layout, batch_size, split_name):
    """Refuses more shards than the split has examples (some would be empty)."""
    total = sum(split_sizes)
    if min(split_sizes) == 0:
        fits = max(d for d in range(1, total + 1) if batch_size % d == 0)
        raise ValueError(
            f"config.data_shards={layout.num_shards} is more than split {split_name!r} has "
            f"examples ({total}): some shards would be empty. Use data_shards={fits} (a divisor "
            f"of config.batch_size={batch_size} no larger than {total})."
        )


def train_records(config, start_step, process_index, process_count):
    """This process's undecoded training records from step `start_step` on, in batch order.

    Returns (records, split, layout): `records` is an endless dataset of {'shard', 'position',
    'record'} in which each local batch is layout.per_step consecutive examples of each of the
    process's shards, in shard order; `position` counts the examples of that shard's stream.
    """
    layout = shards.layout(
        int(config.batch_size),
        sources.config_field(config, "data_shards", 1),
        process_index,
        process_count,
    )
    train_split, _ = sources.split_names(config)
    split = sources.get_split(config, train_split, layout.num_shards)
    _check_no_empty_shard(split.sizes, layout, int(config.batch_size), train_split)
    seed = int(sources.config_field(config, "seed", 0))
    # One buffer of shuffle_buffer records for the whole data, divided among the shards: a host
    # holds the buffers of its own shards only.
    shuffle_buffer = (
        int(sources.config_field(config, "shuffle_buffer", 10_000)) // layout.num_shards
    )
    sizes = tf.constant(split.sizes, tf.int64)
    # How much is read at once is spread over the process's shards; the order does not change.
    parallel_reads = max(1, 16 // layout.count)
    read_buffer = max(256 << 10, (8 << 20) // layout.count)

    def shard_stream(shard):
        def epoch(e):
            records = split.records(
                shard, _epoch_seed(seed, shard, e, salt=0), parallel_reads, read_buffer
            )
            if shuffle_buffer > 1:
                records = records.shuffle(
                    shuffle_buffer,
                    seed=_epoch_seed(seed, shard, e, salt=1),
                    reshuffle_each_iteration=False,
                )
            return records

        # The shard's stream is a sequence of its epochs; the records that steps before
        # start_step took from it are skipped while they are still encoded.
        start = tf.constant(int(start_step) * layout.per_step, tf.int64)
        start_epoch, offset = start // sizes[shard], start % sizes[shard]
        records = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch).skip(offset)
        positions = tf.data.Dataset.range(start, 2**62)
        return tf.data.Dataset.zip(positions, records).map(
            lambda position, record: {"shard": shard, "position": position, "record": record}
        )

    shard_ids = tf.data.Dataset.range(layout.first, layout.first + layout.count)
    # Parallel: the shards' skips on resume, and their reads, run side by side.
    parallel = min(layout.count, 16)
    records = shard_ids.interleave(
        shard_stream,
        cycle_length=layout.count,
        block_length=layout.per_step,
        **({"num_parallel_calls": parallel, "deterministic": True} if parallel > 1 else {}),
    )
    return records, split, layout
