"""Xception (Chollet, CVPR 2017) in JAX/Flax: model, input pipeline, sharded training.

The public surface, in the style of timm and Keras (every name is imported on first use, so
``import xception_jax`` stays cheap: no TensorFlow, no orbax until a function needs them)::

    import xception_jax

    model = xception_jax.create_model("xception", num_classes=10)
    model, variables, config = xception_jax.load("runs/default")  # a workdir, local or gs://
    model, variables = xception_jax.load_keras("xception_weights_tf_dim_ordering_tf_kernels.h5")
    model, variables = xception_jax.load_timm("model.safetensors", "xception65")
    logits = model.apply(variables, xception_jax.preprocess(uint8_images), train=False)

The library below it: ``model`` (ops, layers, the variants and their registry), ``weights``
(Keras and timm files), ``data`` (sources, preprocessing, data order, feeding the devices),
``training`` (state, steps, loop, optimizer, checkpoints, telemetry, preemption), ``platform``
(storage, sharding, host tuning); the command-line tools are the modules at this level
(``python -m xception_jax.<tool>``). docs/architecture.md describes the layers.
"""

import importlib

__version__ = "0.1.0"

# Public name -> (module, attribute).
_PUBLIC = {
    "create_model": ("xception_jax.model.registry", "create_model"),
    "count_params": ("xception_jax.model.registry", "count_params"),
    "Xception": ("xception_jax.model.xception", "Xception"),
    "preprocess": ("xception_jax.model.xception", "preprocess"),
    "load": ("xception_jax.training.checkpoints", "load"),
    "load_keras": ("xception_jax.weights.keras_weights", "load_model"),
    "load_timm": ("xception_jax.weights.timm_weights", "load_model"),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    """Imports a public name's module on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'xception_jax' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
