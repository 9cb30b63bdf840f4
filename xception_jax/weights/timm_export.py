"""Export Flax Xception variables to timm: a ``.safetensors`` that ``timm.create_model(name,
num_classes=N).load_state_dict(..., strict=True)`` accepts (numpy only, no torch).

The tensor names are the importer's (``timm_weights._timm_key``), so one table serves both
directions; kernels go back from HWIO to PyTorch's OIHW. Every BatchNorm also gets PyTorch's
step counter ``num_batches_tracked`` (0), which a strict load requires.

The model must be one of timm's four variants (``registry.VARIANTS``'s ``xception41``,
``xception65``, ``xception71``, ``legacy_xception``) with that variant's switches; `variant_of`
names every difference otherwise, before anything is written. Fields that do not change what the
weights compute (dtype, op implementations, remat, dropout, BN momentum) and ``output_stride``
(timm's own argument: the weights are the same) do not matter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import traverse_util

from xception_jax.model import registry
from xception_jax.platform import storage
from xception_jax.platform.errors import RefusedError
from xception_jax.weights import timm_weights
from xception_jax.weights.keras_export import field_value

# Fields that leave the weights' meaning unchanged (see the module docstring).
_FREE = {
    "name",
    "parent",
    "num_classes",
    "dtype",
    "param_dtype",
    "depthwise_impl",
    "conv_impl",
    "pool_impl",
    "remat",
    "remat_blocks",
    "dropout_rate",
    "bn_momentum",
    "min_input_size",
    "output_stride",
}


def _differences(model, name: str) -> list[str]:
    cls, _ = registry.VARIANTS[name]
    if type(model) is not cls:
        return [f"a {type(model).__name__}, timm's {name!r} is a {cls.__name__}"]
    reference = registry.create_model(name)
    return [
        f"{field}={getattr(model, field)!r} (timm's {name!r}: {getattr(reference, field)!r})"
        for field in registry.model_fields(cls)
        if field not in _FREE and field_value(model, field) != field_value(reference, field)
    ]


def variant_of(model) -> str:
    """The timm variant `model` is; ValueError naming the switches timm cannot express."""
    closest = None
    for name in timm_weights.VARIANTS:
        diff = _differences(model, name)
        if not diff:
            return name
        # Another class is the farthest of all (a model of the same class differs in fields).
        rank = (type(model) is not registry.VARIANTS[name][0], len(diff))
        if closest is None or rank < closest[0]:
            closest = (rank, name, diff)
    _, name, diff = closest
    raise RefusedError(
        f"Cannot export to timm: no timm Xception has this model's switches; the closest, "
        f"{name!r}, differs in " + "; ".join(diff) + "."
    )


def _from_flax(kind: str, array: np.ndarray) -> np.ndarray:
    """Our layout -> timm's: the inverse of `timm_weights._to_flax`."""
    if kind in ("conv", "depthwise"):  # HWIO -> OIHW
        return array.transpose(3, 2, 0, 1)
    if kind == "pointwise":  # (I, O) -> (O, I, 1, 1)
        return array.T.reshape(array.shape[1], array.shape[0], 1, 1)
    if kind == "dense":
        return array.T
    return array


def state_dict(model, variables: dict[str, Any]) -> tuple[str, dict[str, np.ndarray]]:
    """(timm variant, its state dict as numpy arrays) for `variables` of `model`."""
    name = variant_of(model)
    if not model.include_top:
        raise RefusedError("Cannot export to timm: the model has no classifier (include_top).")
    tensors = {}
    flat = traverse_util.flatten_dict({k: variables[k] for k in ("params", "batch_stats")})
    for path, value in flat.items():
        key, kind = timm_weights._timm_key(path, name, model.middle_blocks)
        tensors[key] = np.ascontiguousarray(_from_flax(kind, np.asarray(value, np.float32)))
        if key.endswith(".running_mean"):
            counter = key[: -len("running_mean")] + "num_batches_tracked"
            tensors[counter] = np.zeros((), np.int64)
    return name, tensors


def write_timm(path: str, model, variables: dict[str, Any]) -> str:
    """Write `variables` as timm's ``.safetensors`` at `path` (local or gs://); the variant."""
    from safetensors.numpy import save

    name, tensors = state_dict(model, variables)
    storage.write_atomic(path, save(tensors))
    return name
