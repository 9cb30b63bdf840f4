"""The registry of Xception variants: build a model by name, from overrides or a config.

``create_model(name, **overrides)`` is the one way a model is built (timm's ``create_model``);
``create_model_from_config`` adds what a training config decides (classes, compute dtype, the
op implementations of the platform compiled for).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import traverse_util

from xception_jax.model import layers, ops
from xception_jax.model.xception import Xception, XceptionAligned
from xception_jax.platform.errors import UsageError

VARIANTS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "xception": (Xception, {}),
    # CPU variant for tests and the embedded default: every width x0.25 (rounded to 8), two
    # middle blocks, usable from 32x32 (the final feature map is then 1x1).
    "xception_tiny": (
        Xception,
        {"width_multiplier": 0.25, "middle_blocks": 2, "min_input_size": 32},
    ),
    "xception41": (XceptionAligned, {"middle_blocks": 8}),
    "xception65": (XceptionAligned, {"middle_blocks": 16}),
    "xception71": (
        XceptionAligned,
        {
            "middle_blocks": 16,
            "entry_blocks": ((128, 2), (256, 1), (256, 2), (728, 1), (728, 2)),
        },
    ),
    # timm's legacy_xception (Cadene's port of Keras's weights): Keras's model with PyTorch's
    # BatchNorm epsilon and max-pool padding (FINDINGS "Independent references").
    "legacy_xception": (Xception, {"bn_epsilon": 1e-5, "pool_padding": "symmetric"}),
}


def model_fields(cls: type[nn.Module]) -> list[str]:
    """The configurable field names of a model class (flax's ``parent`` and ``name`` excluded)."""
    return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build the registered variant ``name`` with field ``overrides`` (e.g. ``num_classes=10``)."""
    if name not in VARIANTS:
        close = difflib.get_close_matches(str(name), sorted(VARIANTS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(
            f"Unknown model {name!r} (config.model.name).{hint} Registered variants: "
            f"{sorted(VARIANTS)}."
        )
    cls, defaults = VARIANTS[name]
    allowed = model_fields(cls)
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise UsageError(
            f"Model {name!r} ({cls.__name__}) has no field(s) {unknown}; fields: {allowed}."
        )
    kwargs = {**defaults, **overrides}
    for key in ("dtype", "param_dtype"):
        if isinstance(kwargs.get(key), str):
            kwargs[key] = jnp.dtype(kwargs[key])
    model = cls(**kwargs)
    check_model_fields(model, name)
    return model


def check_model_fields(model: nn.Module, name: str | None = None) -> None:
    """Raise UsageError, naming the values it can take, for a research switch the model refuses.

    Checked here, before anything is traced or compiled: ``separable_order``, and
    ``channels_per_group``, which must divide the spatial conv of every separable conv.
    """
    layers.check_separable_order(model.separable_order)
    g = model.channels_per_group
    layers.check_channels_per_group(g)
    if g in (1, -1):  # Every width takes these: no shapes to look at.
        return
    choices = channels_per_group_choices(model)
    if g not in choices:
        widths = spatial_conv_channels(model)
        raise UsageError(
            f"channels_per_group={g} does not divide the spatial conv of every separable conv of "
            f"model {name or type(model).__name__!r} (their channel counts: {widths}); use one "
            f"of {choices} (1: depthwise, -1: a regular 3x3 conv)."
        )


def check_pretrainable(fields: dict[str, Any], source: str) -> None:
    """Raise UsageError when model ``fields`` set a research switch that ``source``'s weights
    (Keras, timm: depthwise-first depthwise separable convs) cannot fill."""
    order = fields.get("separable_order", "depthwise_first")
    g = fields.get("channels_per_group", 1)
    if order != "depthwise_first" or g != 1:
        raise UsageError(
            f"{source} weights are depthwise-first depthwise separable convs; they cannot fill "
            f"separable_order={order!r}, channels_per_group={g!r}. Use separable_order="
            "'depthwise_first' and channels_per_group=1 (the defaults), or train from scratch."
        )


def spatial_conv_channels(model: nn.Module) -> list[int]:
    """The distinct channel counts of the separable convs' spatial convs, ascending.

    Depthwise-first convs filter their input channels, pointwise-first ones their output
    channels. Read from the variables' shapes (``jax.eval_shape``: nothing is computed).
    """
    depthwise = model.clone(channels_per_group=1)
    shapes = abstract_variables(depthwise, max(depthwise.min_input_size, 32))
    flat = traverse_util.flatten_dict(dict(shapes["params"]))
    return sorted({v.shape[-1] for k, v in flat.items() if k[-2:] == ("depthwise", "kernel")})


def channels_per_group_choices(model: nn.Module) -> list[int]:
    """The ``channels_per_group`` values the model takes: common divisors of its spatial convs'
    channel counts (1 = depthwise), then -1 (a regular conv)."""
    common = functools.reduce(math.gcd, spatial_conv_channels(model))
    return [d for d in range(1, common + 1) if common % d == 0] + [-1]


def count_params(tree: Any) -> int:
    """Total number of elements of the arrays (or ShapeDtypeStructs) in a pytree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def create_model_from_config(
    config: ml_collections.ConfigDict, num_classes: int, platform: str | None = None
) -> nn.Module:
    """The flax module that `config.model` describes, with compute dtype from half_precision.

    Its op implementations are resolved for `platform` (default: JAX's backend): 'auto' becomes
    that platform's choice, so a step compiled for a TPU from a CPU host traces the TPU's ops.
    """
    overrides = {k: v for k, v in config.model.items() if k != "name"}
    overrides = ops.resolve_impls(
        {**{f"{op}_impl": "auto" for op in ops.IMPLS}, **overrides}, platform
    )
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    return create_model(config.model.name, num_classes=num_classes, dtype=dtype, **overrides)


def abstract_variables(model: nn.Module, image_size: int):
    """Shapes and dtypes of the model's variables, without computing anything."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def forward_cost(model: nn.Module, image_size: int) -> dict[str, float]:
    """Parameter count and forward GFLOPs per image of ``model`` at ``image_size``.

    The FLOPs are XLA's cost analysis of the lowered inference forward pass of one image, with
    every op in its ``lax`` form (the one TPU and GPU run; the CPU forms compute the same
    values), so that the figure is the network's and not an implementation's. Nothing is
    compiled: the lowered program is analysed.
    """
    model = model.clone(**{f"{op}_impl": "lax" for op in ops.IMPLS})
    variables = abstract_variables(model, image_size)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x)
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost  # Older JAX: one dict per computation.
    return {"params": count_params(variables["params"]), "gflops": float(cost["flops"]) / 1e9}
