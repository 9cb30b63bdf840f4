"""Xception (Chollet, CVPR 2017) in JAX/Flax: model, input pipeline, sharded training."""

__version__ = "0.1.0"
