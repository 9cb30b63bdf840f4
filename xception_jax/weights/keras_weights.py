"""Import Keras Xception weight files into Flax variables, with h5py only (no Keras, no TF).

Two layouts are read:

- Legacy HDF5 (Keras 2 ``save_weights('x.h5')``, the ``xception_weights_tf_dim_ordering_tf_
  kernels.h5`` / ``_notop.h5`` files that ``keras.applications`` downloads, and the
  ``model_weights`` group of a whole-model ``model.save('x.h5')``): root attribute
  ``layer_names``; per layer a group with attribute ``weight_names`` naming its datasets.
- Keras 3 ``model.save_weights('x.weights.h5')``: ``layers/<auto name>/vars/<i>``, where every
  layer is renamed after its class with a counter in ``model.layers`` order (``conv2d_3``,
  ``batch_normalization_17``, ...), so no Keras layer name survives; a nested model is a group
  of its own (``layers/functional/layers/...``).
- Keras 3 ``model.save('x.keras')``: a zip of ``config.json`` (the model's graph, with every
  layer's own name) and ``model.weights.h5`` (the layout above). Read with zipfile and h5py; the
  h5 group of each layer is derived from config.json (class name + counter per model, in the
  order config.json lists them), so layers are known by their names (``xception``,
  ``block5_sepconv2_bn``, the user's ``dense_1``).

Where Xception sits: the model (or nested model, at any depth) that holds separable convs. A
file with none or with two is refused, naming what it holds. Weight layers outside it are the
user's own head: a single Dense on Xception's 2048 pooled features (with at most global average
pooling and dropout besides) is Xception's own top; any other head is named with its shapes
and left out (the backbone alone, ``include_top=False``).

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

import io
import json
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from xception_jax.model import registry
from xception_jax.model.xception import Xception
from xception_jax.platform import storage
from xception_jax.platform.errors import FileFormatError

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
    raise FileFormatError(
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


def _snake_case(name: str) -> str:
    """A Keras class name as Keras 3 names its h5 group (keras.src.utils.naming.to_snake_case)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


_CONTAINERS = ("functional", "sequential", "model")
# Layers that may stand between Xception's pooled features and a single Dense that is then
# Xception's own top (the classifier of keras.applications.Xception with include_top=True).
_TOP_ONLY = ("input_layer", "dense", "dropout", "global_average_pooling2d")
_XCEPTION_FEATURES = 2048


@dataclass
class _Entry:
    """One layer of a Keras 3 model, weights or not."""

    name: str  # config.json's name where there is one, else the h5 group's
    cls: str  # snake-case class ('conv2d', 'dense', 'functional', ...)
    owner: tuple[str, ...]  # the names of the models it is nested in, outermost first
    arrays: list[np.ndarray] = field(default_factory=list)
    activation: str | None = None  # a Dense's, where config.json says it


@dataclass
class FileContents:
    """What a Keras weight file holds: Xception's layers and anything around it."""

    layers: list[_Layer]  # Xception's weight layers, in model.layers order per kind
    head: list[_Entry]  # weight layers outside Xception (the user's own head)
    where: str  # Xception's place, e.g. "the nested model 'xception'" ('' for the whole file)
    top_from_head: bool = False  # the head is one Dense on the pooled features: Xception's top


def _vars(group: h5py.Group | None) -> list[np.ndarray]:
    if group is None or "vars" not in group:
        return []
    return [np.asarray(group["vars"][str(i)]) for i in range(len(group["vars"]))]


def _walk_config(
    layer_cfgs: list[dict], group: h5py.Group | None, owner: tuple[str, ...]
) -> list[_Entry]:
    """The layers of one model of config.json, with their weights from its h5 `group`.

    Keras 3 names each layer's group by its class with a counter per model, in the model's
    layer order, which config.json lists (keras.src.saving.saving_lib._save_container_state).
    """
    entries, used = [], {}
    layers = group["layers"] if group is not None and "layers" in group else None
    for cfg in layer_cfgs:
        cls = _snake_case(cfg["class_name"])
        inner = cfg.get("config", {})
        name = inner.get("name") or cfg.get("name") or cls
        used[cls] = used.get(cls, -1) + 1
        key = cls if used[cls] == 0 else f"{cls}_{used[cls]}"
        sub = layers[key] if layers is not None and key in layers else None
        activation = inner.get("activation") if isinstance(inner.get("activation"), str) else None
        entries.append(_Entry(name, cls, owner, _vars(sub), activation))
        if "layers" in inner:  # a nested model (Functional, Sequential)
            entries += _walk_config(inner["layers"], sub, (*owner, name))
    return entries


def _walk_h5(group: h5py.Group, owner: tuple[str, ...]) -> list[_Entry]:
    """The layers of a Keras 3 .weights.h5 (no config): group names, in counter order."""
    entries = []
    for key in sorted(group["layers"].keys(), key=_natural_key):
        sub = group["layers"][key]
        entries.append(_Entry(key, _natural_key(key)[0], owner, _vars(sub)))
        if "layers" in sub:
            entries += _walk_h5(sub, (*owner, key))
    return entries


def _describe(entry: _Entry) -> str:
    where = "/".join((*entry.owner, entry.name))
    return f"{where} ({entry.cls} {[tuple(a.shape) for a in entry.arrays]})"


def _locate_xception(entries: list[_Entry], path: str) -> FileContents:
    """Split a model's layers into Xception's and the rest (see the module docstring)."""
    sep_owners = sorted({e.owner for e in entries if e.cls == "separable_conv2d"})
    weighted = [e for e in entries if e.arrays]
    if not sep_owners:
        found = ", ".join(_describe(e) for e in weighted[:8]) or "no weights at all"
        raise FileFormatError(
            f"{path!r} holds no Xception (no model in it has separable convs); it holds "
            f"{len(weighted)} layers with weights: {found}{' ...' if len(weighted) > 8 else ''}."
        )
    if len(sep_owners) > 1:
        names = [" / ".join(o) or "the file's model itself" for o in sep_owners]
        raise FileFormatError(
            f"{path!r} holds {len(sep_owners)} models with separable convs ({', '.join(names)}); "
            "import one Xception at a time: save that sub-model alone "
            "(model.get_layer(name).save('x.keras'))."
        )
    (owner,) = sep_owners
    inside = lambda e: e.owner[: len(owner)] == owner  # noqa: E731
    layers = []
    for e in entries:
        if inside(e) and e.arrays:
            where = "/".join((*e.owner, e.name))
            layers.append(_Layer(e.name, _kind_from_shapes(e.arrays, f"layer {where!r}"), e.arrays))
    head = [e for e in weighted if not inside(e)]
    outside = {e.cls for e in entries if not inside(e) and e.name not in owner}
    has_top = any(layer.kind == "dense" for layer in layers)
    top_from_head = (
        not has_top
        and len(head) == 1
        and head[0].cls == "dense"
        and head[0].arrays[0].shape[0] == _XCEPTION_FEATURES
        # Logits or their softmax (as Keras's own top); another activation is the user's head.
        and head[0].activation in (None, "linear", "softmax")
        and outside <= set(_TOP_ONLY) | set(_CONTAINERS)
        and not any(e.cls.startswith("global_max") for e in entries if inside(e))
    )
    if top_from_head:
        d = head[0]
        layers.append(_Layer(d.name, "dense", d.arrays))
    where = f"the nested model {'/'.join(owner)!r}" if owner else ""
    return FileContents(layers, [] if top_from_head else head, where, top_from_head)


def _open_h5(data, path: str) -> h5py.File:
    try:
        return h5py.File(data, "r")
    except OSError as e:
        raise FileFormatError(
            f"Cannot open {path!r} as HDF5 ({e}); is it a Keras .h5 / .weights.h5 file?"
        ) from e


def _read_archive(data: bytes, path: str) -> FileContents:
    """A Keras 3 ``.keras`` zip: config.json names the layers, model.weights.h5 holds them."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
        if "model.weights.h5" not in names:
            raise FileFormatError(
                f"{path!r} is a .keras archive without weights (members: {names}; a Keras 3 "
                "model.save('x.keras') has model.weights.h5)."
            )
        config = json.loads(archive.read("config.json")) if "config.json" in names else None
        weights = archive.read("model.weights.h5")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise FileFormatError(f"Cannot read {path!r} as a .keras archive (zip): {e}.") from e
    with _open_h5(io.BytesIO(weights), f"{path}:model.weights.h5") as f:
        if config is None:
            return _locate_xception(_walk_h5(f, ()), path)
        inner = config.get("config", {})
        if "layers" not in inner:
            raise FileFormatError(
                f"{path!r}: config.json describes a {config.get('class_name')!r}, not a "
                "Functional or Sequential model; re-save the model or its Xception alone."
            )
        return _locate_xception(_walk_config(inner["layers"], f, ()), path)


def read_file(path: str) -> FileContents:
    """What a Keras weight file holds (any layout above): Xception's layers and the rest.

    `path`: local or gs://.
    """
    data = storage.read_bytes(path)
    if data[:4] == b"PK\x03\x04" or path.endswith(".keras"):
        return _read_archive(data, path)
    with _open_h5(io.BytesIO(data), path) as f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in root.attrs:
            return FileContents(_read_legacy(root), [], "")
        if "layers" in root:
            return _locate_xception(_walk_h5(root, ()), path)
    raise FileFormatError(
        f"{path!r} is neither a legacy Keras weight file (no 'layer_names' attribute) nor a "
        "Keras 3 .weights.h5 (no 'layers' group) nor a .keras archive."
    )


def read_layers(path: str) -> list[_Layer]:
    """Xception's weight-carrying layers in a Keras weight file (any layout), in file order.

    `path`: local or gs://.
    """
    return read_file(path).layers


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
                raise FileFormatError(
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
            raise FileFormatError(
                f"The file has {len(got)} unmatched {kind} layers but the model has "
                f"{len(open_slots)} to fill (first: {open_slots[:6]})."
            )
        assigned.update(zip(open_slots, got, strict=True))
    for name, layer in assigned.items():
        want = _shapes(target["params"][name])
        have = _shapes(_to_flax(layer.kind, layer.arrays)[0])
        if want != have:
            raise FileFormatError(
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
        raise FileFormatError(
            f"The file has {n_sep} separable convs; an Xception has 10 + 3 * middle_blocks "
            "(34 for Keras's model). Is this an Xception weight file?"
        )
    if len(dense) > 1:
        raise FileFormatError(f"The file has {len(dense)} dense layers; Xception has at most one.")
    cfg = {"middle_blocks": (n_sep - 10) // 3, "include_top": bool(dense)}
    if dense:
        cfg["num_classes"] = int(dense[0].arrays[0].shape[1])
    return cfg


def _head_message(path: str, contents: FileContents) -> str:
    heads = "; ".join(_describe(e) for e in contents.head)
    return (
        f"{path!r}: Xception ({contents.where or 'the whole model'}) has the user's own head "
        f"on top, which Xception cannot hold: {heads}."
    )


def _load(path: str, include_top: bool | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(variables, Xception fields) of a Keras file; see `load`."""
    contents = read_file(path)
    layers = contents.layers
    if contents.head:
        if include_top:
            raise FileFormatError(
                _head_message(path, contents) + " Load the backbone with include_top=False."
            )
        warnings.warn(
            _head_message(path, contents) + " Loading the backbone alone (include_top=False).",
            stacklevel=3,
        )
    try:
        cfg = infer_config(layers)
    except ValueError as e:
        raise FileFormatError(f"{path!r}: {contents.where or 'the model'}: {e}") from None
    if include_top is False and cfg["include_top"]:
        layers = [layer for layer in layers if layer.kind != "dense"]
        cfg = {"middle_blocks": cfg["middle_blocks"], "include_top": False}
    elif include_top and not cfg["include_top"]:
        raise FileFormatError(f"{path!r} has no classifier (a _notop file); use include_top=False.")
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
        where = f" ({contents.where})" if contents.where else ""
        raise FileFormatError(
            f"{path!r}{where} does not fit Keras's Xception (widths of "
            f"keras.applications.Xception, {cfg}): {errors[0]}"
        )

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
        raise RuntimeError(
            f"Internal mapping error: variables of {path!r} do not match Xception{cfg}."
        )
    return variables, cfg


def load(path: str, *, include_top: bool | None = None) -> dict[str, Any]:
    """Read a Keras Xception weight file into ``{'params': ..., 'batch_stats': ...}``.

    Files: legacy ``.h5``, Keras 3 ``.weights.h5`` and ``.keras`` archives, with Xception the
    whole model or nested at any depth (local or gs://). The variables fit
    ``Xception(num_classes=N, include_top=..., middle_blocks=M)`` with N and M taken from the
    file (``load_model`` builds that module too). ``include_top=False`` drops a file's
    classifier (e.g. to fine-tune with another number of classes: merge into a fresh init). A
    user's own head (more than one Dense on the pooled features) is named in a warning and left
    out; ``include_top=True`` then raises. Raises ValueError naming the layer and shapes when
    the file does not fit, and what the file holds when it has no Xception or two.
    """
    return _load(path, include_top)[0]


def load_model(path: str, **overrides: Any) -> tuple[Xception, dict[str, Any]]:
    """``(Xception(...), variables)`` for a Keras weight file; ``overrides`` set other fields.

    ``overrides`` may set e.g. ``dtype``, ``dropout_rate`` or ``include_top=False``; fields that
    change parameter shapes (``width_multiplier``, ``middle_blocks``, ``num_classes``) must agree
    with the file.
    """
    registry.check_pretrainable(overrides, "Keras")
    variables, cfg = _load(path, overrides.get("include_top"))
    cfg = dict(cfg)
    if overrides.get("include_top") is False:
        cfg.pop("num_classes", None)
    cfg.update(overrides)
    return Xception(**cfg), variables
