"""Import Keras Xception weight files into Flax variables, with h5py only (no Keras, no TF).

Two layouts are read:

- Legacy HDF5 (Keras 2 ``save_weights('x.h5')``, the ``xception_weights_tf_dim_ordering_tf_
  kernels.h5`` / ``_notop.h5`` files that ``keras.applications`` downloads, and the
  ``model_weights`` group of a whole-model ``model.save('x.h5')``): root attribute
  ``layer_names``; per layer a group with attribute ``weight_names`` naming its datasets.
- Keras 3 ``model.save_weights('x.weights.h5')``: ``layers/<auto name>/vars/<i>``, where every
  layer is renamed after its class with a counter in ``model.layers`` order (``conv2d_3``,
  ``batch_normalization_17``, ...), so no Keras layer name survives.

Mapping: a layer whose Keras name is one of ours (``block1_conv1``, ``block5_sepconv2_bn``, ...)
maps by name. The rest (all layers of a Keras 3 file; the four shortcut conv/BN pairs of a
legacy file, whose ``conv2d_N`` / ``batch_normalization_N`` names depend on the Keras session)
map by kind, order and shape: convs, separable convs and the dense layer in order; BatchNorms
in ``model.layers`` order, where a shortcut BN follows its block's separable-conv BNs (Keras
sorts layers by graph depth). Block 13 (BN widths 728, 1024, shortcut 1024) tells that order
apart from the creation order (shortcut first), and both are tried; any misfit raises a
ValueError naming the layer and the shapes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from xception_jax.model import registry
from xception_jax.model.xception import Xception
from xception_jax.platform import storage

_BN_ORDER = ("gamma", "beta", "moving_mean", "moving_variance")


@dataclass
class _Layer:
    """One weight-carrying layer read from a file."""

    name: str  # the layer's group name in the file
    kind: str  # 'conv' | 'sep' | 'bn' | 'dense'
    arrays: list[np.ndarray]


def _decode(v: Any) -> str:
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def _kind_from_shapes(arrays: list[np.ndarray], where: str) -> str:
    shapes = [a.shape for a in arrays]
    if len(arrays) == 1 and len(shapes[0]) == 4:
        return "conv"
    if len(arrays) == 2 and len(shapes[0]) == 4 and len(shapes[1]) == 4 and shapes[0][3] == 1:
        return "sep"
    if len(arrays) == 4 and all(len(s) == 1 for s in shapes):
        return "bn"
    if len(arrays) == 2 and len(shapes[0]) == 2 and len(shapes[1]) == 1:
        return "dense"
    raise ValueError(
        f"{where}: weights with shapes {shapes} are no layer of Xception (expected a bias-free "
        "conv, a separable conv, a 4-variable BatchNorm or the dense classifier)."
    )


def _read_legacy(root: h5py.Group) -> list[_Layer]:
    layers = []
    for lname in (_decode(n) for n in root.attrs["layer_names"]):
        group = root[lname]
        wnames = [_decode(n) for n in group.attrs.get("weight_names", [])]
        if not wnames:
            continue
        by_var = {}
        for wn in wnames:
            var = wn.split("/")[-1].split(":")[0]
            by_var[var] = np.asarray(group[wn])
        if set(by_var) == set(_BN_ORDER):
            arrays = [by_var[v] for v in _BN_ORDER]  # files may list them in any order
        else:
            arrays = [np.asarray(group[wn]) for wn in wnames]
        layers.append(_Layer(lname, _kind_from_shapes(arrays, f"layer {lname!r}"), arrays))
    return layers


def _natural_key(name: str) -> tuple[str, int]:
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
    return (m.group(1), int(m.group(2) or 0))


def _read_keras3(root: h5py.Group) -> list[_Layer]:
    layers = []
    for lname in sorted(root["layers"].keys(), key=_natural_key):
        group = root["layers"][lname]
        if "vars" not in group or len(group["vars"]) == 0:
            continue
        vars_ = group["vars"]
        arrays = [np.asarray(vars_[str(i)]) for i in range(len(vars_))]
        # Keras 3 names layers after their class ('conv2d_3'): never one of ours, so these
        # all map by kind and order.
        layers.append(_Layer(lname, _kind_from_shapes(arrays, f"layers/{lname}"), arrays))
    return layers


def read_layers(path: str) -> list[_Layer]:
    """Read the weight-carrying layers of a Keras weight file (either layout), in file order.

    `path`: local or gs://.
    """
    try:
        f = h5py.File(storage.for_library(path), "r")
    except OSError as e:
        raise ValueError(
            f"Cannot open {path!r} as HDF5 ({e}); is it a Keras .h5 weight file?"
        ) from e
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            return _read_legacy(root)
        if "layers" in root:
            return _read_keras3(root)
    raise ValueError(
        f"{path!r} is neither a legacy Keras weight file (no 'layer_names' attribute) nor a "
        "Keras 3 .weights.h5 (no 'layers' group)."
    )


def _slots(middle_blocks: int, include_top: bool, shortcut_bn_first: bool) -> list[tuple[str, str]]:
    """(kind, flax name) of every weight layer, in Keras ``model.layers`` order for each kind."""
    slots = [("conv", "block1_conv1"), ("bn", "block1_conv1_bn")]
    slots += [("conv", "block1_conv2"), ("bn", "block1_conv2_bn")]

    def down(b: int) -> list[tuple[str, str]]:
        short = [("conv", f"block{b}_shortcut"), ("bn", f"block{b}_shortcut_bn")]
        body = []
        for j in (1, 2):
            body += [("sep", f"block{b}_sepconv{j}"), ("bn", f"block{b}_sepconv{j}_bn")]
        return short + body if shortcut_bn_first else body + short

    for b in (2, 3, 4):
        slots += down(b)
    for b in range(5, 5 + middle_blocks):
        for j in (1, 2, 3):
            slots += [("sep", f"block{b}_sepconv{j}"), ("bn", f"block{b}_sepconv{j}_bn")]
    slots += down(5 + middle_blocks)
    for j in (1, 2):
        b = 6 + middle_blocks
        slots += [("sep", f"block{b}_sepconv{j}"), ("bn", f"block{b}_sepconv{j}_bn")]
    if include_top:
        slots.append(("dense", "predictions"))
    return slots


def _to_flax(kind: str, arrays: list[np.ndarray]) -> tuple[dict, dict | None]:
    """(params, batch_stats) of one layer in our layout."""
    if kind == "conv":
        k = arrays[0]
        if k.shape[:2] == (1, 1):  # shortcut: PointwiseConv kernel (Cin, Cout)
            k = k.reshape(k.shape[2], k.shape[3])
        return {"kernel": k}, None
    if kind == "sep":
        dw, pw = arrays
        return {
            "depthwise": {"kernel": dw.reshape(dw.shape[0], dw.shape[1], 1, dw.shape[2])},
            "pointwise": {"kernel": pw.reshape(pw.shape[2], pw.shape[3])},
        }, None
    if kind == "bn":
        gamma, beta, mean, var = arrays
        return {"scale": gamma, "bias": beta}, {"mean": mean, "var": var}
    kernel, bias = arrays
    return {"kernel": kernel, "bias": bias}, None


def _assign(layers: list[_Layer], slots: list[tuple[str, str]], target: dict) -> dict[str, _Layer]:
    """Map file layers onto slots: by name where the name is ours, else by kind order."""
    slot_kind = dict((name, kind) for kind, name in slots)
    assigned: dict[str, _Layer] = {}
    rest: dict[str, list[_Layer]] = {}
    for layer in layers:
        if layer.name in slot_kind:
            if slot_kind[layer.name] != layer.kind:
                raise ValueError(
                    f"Layer {layer.name!r} in the file is a {layer.kind}, Xception has a "
                    f"{slot_kind[layer.name]} there."
                )
            assigned[layer.name] = layer
        else:
            rest.setdefault(layer.kind, []).append(layer)
    for kind in ("conv", "sep", "bn", "dense"):
        open_slots = [n for k, n in slots if k == kind and n not in assigned]
        got = rest.get(kind, [])
        if len(got) != len(open_slots):
            raise ValueError(
                f"The file has {len(got)} unmatched {kind} layers but the model has "
                f"{len(open_slots)} to fill (first: {open_slots[:6]})."
            )
        assigned.update(zip(open_slots, got, strict=True))
    for name, layer in assigned.items():
        want = _shapes(target["params"][name])
        have = _shapes(_to_flax(layer.kind, layer.arrays)[0])
        if want != have:
            raise ValueError(
                f"Shape mismatch for {name!r} ({layer.kind}, file layer {layer.name!r}): "
                f"file {have}, model {want}."
            )
    return assigned


def _shapes(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: tuple(a.shape), tree)


def infer_config(layers: list[_Layer]) -> dict[str, Any]:
    """``Xception`` fields (num_classes, include_top, middle_blocks) that fit the file's layers."""
    n_sep = sum(layer.kind == "sep" for layer in layers)
    dense = [layer for layer in layers if layer.kind == "dense"]
    if n_sep < 10 or (n_sep - 10) % 3:
        raise ValueError(
            f"The file has {n_sep} separable convs; an Xception has 10 + 3 * middle_blocks "
            "(34 for Keras's model). Is this an Xception weight file?"
        )
    if len(dense) > 1:
        raise ValueError(f"The file has {len(dense)} dense layers; Xception has at most one.")
    cfg = {"middle_blocks": (n_sep - 10) // 3, "include_top": bool(dense)}
    if dense:
        cfg["num_classes"] = int(dense[0].arrays[0].shape[1])
    return cfg


def load(path: str, *, include_top: bool | None = None) -> dict[str, Any]:
    """Read a Keras Xception weight file into ``{'params': ..., 'batch_stats': ...}``.

    The variables fit ``Xception(num_classes=N, include_top=..., middle_blocks=M)`` with N and M
    taken from the file (``load_model`` builds that module too). ``include_top=False`` drops a
    file's classifier (e.g. to fine-tune with another number of classes: merge into a fresh
    init). Raises ValueError naming the layer and shapes when the file does not fit.
    """
    layers = read_layers(path)
    cfg = infer_config(layers)
    if include_top is False and cfg["include_top"]:
        layers = [layer for layer in layers if layer.kind != "dense"]
        cfg = {"middle_blocks": cfg["middle_blocks"], "include_top": False}
    elif include_top and not cfg["include_top"]:
        raise ValueError(f"{path!r} has no classifier (a _notop file); use include_top=False.")
    model = Xception(**cfg)
    target = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 71, 71, 3), jnp.float32))
    )
    errors = []
    for first in (False, True):
        try:
            assigned = _assign(
                layers, _slots(cfg["middle_blocks"], cfg["include_top"], first), target
            )
            break
        except ValueError as e:
            errors.append(e)
    else:
        raise ValueError(f"{path!r} does not fit Xception{cfg}: {errors[0]}")

    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for name, layer in assigned.items():
        p, s = _to_flax(layer.kind, layer.arrays)
        params[name] = p
        if s is not None:
            stats[name] = s
    variables = {"params": params, "batch_stats": stats}
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), variables)
    # Final guard: the exact tree structure and shapes the model expects.
    if _shapes(variables) != _shapes(dict(target)):
        raise ValueError(
            f"Internal mapping error: variables of {path!r} do not match Xception{cfg}."
        )
    return variables


def load_model(path: str, **overrides: Any) -> tuple[Xception, dict[str, Any]]:
    """``(Xception(...), variables)`` for a Keras weight file; ``overrides`` set other fields.

    ``overrides`` may set e.g. ``dtype``, ``dropout_rate`` or ``include_top=False``; fields that
    change parameter shapes (``width_multiplier``, ``middle_blocks``, ``num_classes``) must agree
    with the file.
    """
    registry.check_pretrainable(overrides, "Keras")
    variables = load(path, include_top=overrides.get("include_top"))
    cfg = infer_config(read_layers(path))
    if overrides.get("include_top") is False:
        cfg.pop("num_classes", None)
    cfg.update(overrides)
    return Xception(**cfg), variables
