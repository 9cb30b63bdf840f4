"""Import timm's Xception weights (``.safetensors``) into Flax variables: numpy only, no torch.

Variants: timm's aligned ``xception41`` / ``xception65`` / ``xception71`` (DeepLab's, which
have no Keras weights; this package's ``XceptionAligned``) and ``legacy_xception`` (Keras's
model as PyTorch runs it: this package's ``Xception`` with BatchNorm epsilon 1e-5 and max-pool
padding 1 on every side, the registered variant ``legacy_xception``). The file is what timm's
model hub serves (``model.safetensors``) or ``safetensors.torch.save_file(model.state_dict())``.

Mapping: every variable of the Flax model has one timm tensor, found by name (tables below);
PyTorch's OIHW kernels are transposed to HWIO (1x1 convs to [in, out], the classifier to
[features, classes]). Shapes are checked against the model; a file of another variant or with
a mismatched tensor raises ValueError listing the first mismatches with both shapes.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from xception_jax.model import registry
from xception_jax.platform import storage
from xception_jax.platform.errors import FileFormatError, UsageError

VARIANTS = ("xception41", "xception65", "xception71", "legacy_xception")
_SKIPPED = ("num_batches_tracked",)  # PyTorch BatchNorm's step counter: no use at inference.
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
# A SeparableConv's submodules -> (timm module, kind): aligned (BN after the depthwise conv)
# and legacy.
_ALIGNED_SEP = {
    "depthwise": ("conv_dw", "depthwise"),
    "depthwise_bn": ("bn_dw", "bn"),
    "pointwise": ("conv_pw", "pointwise"),
}
_LEGACY_SEP = {"depthwise": ("conv1", "depthwise"), "pointwise": ("pointwise", "pointwise")}


def _aligned_module(parts: tuple[str, ...]) -> tuple[str, str]:
    """(timm module, kind) of an XceptionAligned variable path (without collection/leaf)."""
    name = parts[0]
    if m := re.fullmatch(r"block1_conv(\d)(_bn)?", name):
        return f"stem.{int(m[1]) - 1}." + ("bn" if m[2] else "conv"), "bn" if m[2] else "conv"
    if name == "predictions":
        return "head.fc", "dense"
    m = re.fullmatch(r"block(\d+)_(shortcut|sepconv\d)(_bn)?", name)
    if not m:
        raise KeyError(name)
    block = f"blocks.{int(m[1]) - 2}"
    if m[2] == "shortcut":
        return f"{block}.shortcut." + ("bn" if m[3] else "conv"), "bn" if m[3] else "pointwise"
    conv = f"{block}.stack.conv{m[2][-1]}"
    if m[3]:
        return f"{conv}.bn_pw", "bn"
    module, kind = _ALIGNED_SEP[parts[1]]  # depthwise | depthwise_bn | pointwise
    return f"{conv}.{module}", kind


def _legacy_module(parts: tuple[str, ...], middle_blocks: int) -> tuple[str, str]:
    """(timm module, kind) of a legacy (Keras-layout) Xception variable path."""
    name = parts[0]
    if m := re.fullmatch(r"block1_conv(\d)(_bn)?", name):
        return ("bn" if m[2] else "conv") + m[1], "bn" if m[2] else "conv"
    if name == "predictions":
        return "fc", "dense"
    m = re.fullmatch(r"block(\d+)_(shortcut|sepconv(\d))(_bn)?", name)
    if not m:
        raise KeyError(name)
    block = int(m[1])
    if block == 6 + middle_blocks:  # Keras's block 14: timm's conv3/bn3, conv4/bn4.
        j = int(m[3]) + 2
        if m[4]:
            return f"bn{j}", "bn"
        module, kind = _LEGACY_SEP[parts[1]]
        return f"conv{j}.{module}", kind
    prefix = f"block{block - 1}"  # timm counts Keras's blocks 2..13 from 1.
    if m[2] == "shortcut":
        return prefix + (".skipbn" if m[4] else ".skip"), "bn" if m[4] else "pointwise"
    # timm's Block.rep: [ReLU, sep, BN] per conv; block 1 (Keras's 2) drops the leading ReLU.
    first = 0 if block == 2 else 1
    index = first + 3 * (int(m[3]) - 1)
    if m[4]:
        return f"{prefix}.rep.{index + 1}", "bn"
    module, kind = _LEGACY_SEP[parts[1]]
    return f"{prefix}.rep.{index}.{module}", kind


def _timm_key(path: tuple[str, ...], name: str, middle_blocks: int) -> tuple[str, str]:
    """(timm tensor name, kind) of one Flax variable path ('params'/'batch_stats', ...)."""
    parts = path[1:-1]
    module, kind = (
        _legacy_module(parts, middle_blocks)
        if name == "legacy_xception"
        else _aligned_module(parts)
    )
    leaf = path[-1]
    if kind == "bn":
        return f"{module}.{_BN[leaf]}", "vector"
    if kind == "dense":
        return f"{module}.{'weight' if leaf == 'kernel' else 'bias'}", (
            "dense" if leaf == "kernel" else "vector"
        )
    return f"{module}.weight", kind


def _to_flax(kind: str, array: np.ndarray) -> np.ndarray:
    """A timm tensor in this package's layout."""
    if kind in ("conv", "depthwise"):  # OIHW -> HWIO (depthwise: (C, 1, h, w) -> (h, w, 1, C))
        return array.transpose(2, 3, 1, 0)
    if kind == "pointwise":  # (O, I, 1, 1) -> (I, O)
        return array.reshape(array.shape[0], array.shape[1]).T if array.ndim == 4 else array
    if kind == "dense":  # (classes, features) -> (features, classes)
        return array.T
    return array


def _timm_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape timm stores for a Flax variable of `shape` (for error messages)."""
    if kind in ("conv", "depthwise"):
        return (shape[3], shape[2], shape[0], shape[1])
    if kind == "pointwise":
        return (shape[1], shape[0], 1, 1)
    if kind == "dense":
        return (shape[1], shape[0])
    return tuple(shape)


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """The tensors of a ``.safetensors`` file (local or gs://) as numpy arrays, by name."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as load_safetensors

    try:
        tensors = load_safetensors(storage.read_bytes(path))
    except (SafetensorError, ValueError) as e:
        raise FileFormatError(
            f"Cannot read {path!r} as safetensors ({e}); give timm's model.safetensors (the "
            "hub's file) or a file written by safetensors.torch.save_file(model.state_dict())."
        ) from e
    return {k: v for k, v in tensors.items() if not k.endswith(_SKIPPED)}


def guess_variant(names) -> str | None:
    """Which timm Xception the tensor names look like (None when none)."""
    names = set(names)
    if "block1.rep.0.conv1.weight" in names:
        return "legacy_xception"
    blocks = {int(m[1]) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))}
    by_count = {13: "xception41", 21: "xception65", 23: "xception71"}
    return by_count.get(len(blocks)) if "stem.0.conv.weight" in names else None


def _num_classes(tensors: dict[str, np.ndarray], name: str) -> int | None:
    key = "fc.weight" if name == "legacy_xception" else "head.fc.weight"
    return int(tensors[key].shape[0]) if key in tensors else None


def _check_name(name: str) -> None:
    if name not in VARIANTS:
        raise UsageError(f"No timm weights for model {name!r}; timm variants: {list(VARIANTS)}.")


def load(path: str, name: str, *, include_top: bool | None = None) -> dict[str, Any]:
    """Read timm's weights of variant `name` into ``{'params': ..., 'batch_stats': ...}``.

    The variables fit ``registry.create_model(name, num_classes=N)`` with N from the file (the
    classifier's rows; a headless file gives ``include_top=False``). ``include_top=False``
    drops the file's classifier (to fine-tune with other classes). Raises ValueError listing
    the first mismatched tensors, with both shapes, when the file is not of this variant.
    """
    _check_name(name)
    tensors = read_tensors(path)
    num_classes = _num_classes(tensors, name)
    if include_top and num_classes is None:
        raise FileFormatError(f"{path!r} has no classifier; use include_top=False.")
    top = num_classes is not None and include_top is not False
    model = registry.create_model(
        name, include_top=top, **({"num_classes": num_classes} if top else {})
    )
    size = max(model.min_input_size, 32)
    target = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    )
    flat_target = traverse_util.flatten_dict(dict(target))
    out, problems, used = {}, [], set()
    for path_, want in flat_target.items():
        key, kind = _timm_key(path_, name, model.middle_blocks)
        used.add(key)
        if key not in tensors:
            problems.append(f"{key}: missing in the file (model {_timm_shape(kind, want.shape)})")
            continue
        array = _to_flax(kind, np.asarray(tensors[key]))
        if array.shape != tuple(want.shape):
            problems.append(
                f"{key}: file {tensors[key].shape}, model {_timm_shape(kind, want.shape)}"
            )
            continue
        out[path_] = jnp.asarray(array, jnp.float32)
    head_names = ("fc.", "head.fc.")
    extra = sorted(k for k in set(tensors) - used if top or not k.startswith(head_names))
    problems += [f"{k}: in the file {tensors[k].shape}, not in the model" for k in extra]
    if problems:
        guess = guess_variant(tensors)
        hint = f" The file looks like timm's {guess!r}." if guess and guess != name else ""
        raise FileFormatError(
            f"{path!r} does not fit timm's {name!r} ({len(problems)} mismatched tensors; first: "
            + "; ".join(problems[:5])
            + f").{hint} Pass the variant the file was saved from (one of {list(VARIANTS)})."
        )
    return traverse_util.unflatten_dict(out)


def load_model(path: str, name: str, **overrides: Any) -> tuple[Any, dict[str, Any]]:
    """``(module, variables)`` for timm's weights of variant `name`.

    ``overrides`` set other model fields (e.g. ``output_stride=16`` for the aligned variants,
    ``dtype``, ``include_top=False``); the number of classes comes from the file.
    """
    registry.check_pretrainable(overrides, "timm")
    variables = load(path, name, include_top=overrides.get("include_top"))
    fields = dict(overrides)
    if "predictions" in variables["params"]:
        fields["num_classes"] = int(variables["params"]["predictions"]["bias"].shape[0])
    else:
        fields["include_top"] = False
    return registry.create_model(name, **fields), variables
