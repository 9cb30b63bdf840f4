"""Weights in from the ecosystem: Keras and timm files -> Flax variables (no Keras, no torch)."""
