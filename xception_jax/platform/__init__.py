"""The platform layer: storage (local and gs://), sharding and jax.distributed, host tuning."""
