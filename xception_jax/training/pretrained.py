"""Start a training run from pretrained weights (fine-tuning).

Sources (config fields, see configs/common.py and configs/finetune.py):
- `config.init_from_keras`: a Keras Xception weight file (the ImageNet
  `xception_weights_tf_dim_ordering_tf_kernels[_notop].h5`, or any file `keras_weights` reads:
  a `.keras` transfer model with Xception nested and a head of its own included);
  the model must be the full `xception` (same widths and middle-flow depth as the file);
- `config.init_from_timm`: timm's `.safetensors` weights of the variant `config.model.name`
  names (`xception41`, `xception65`, `xception71` or `legacy_xception`; `timm_weights`);
- `config.init_from_workdir`: the newest checkpoint of another run (any model; it must match).

Every variable of the model except the classifier (`optim.HEAD_MODULES`, i.e. 'predictions')
is taken from the source: parameters and BatchNorm statistics. The classifier keeps its fresh
initialisation, sized for the dataset's number of classes. The optimizer state starts fresh.
This only happens when a run starts: a workdir with a checkpoint resumes from it instead.

Freezing (`config.freeze_backbone_steps` = N > 0): for the first N steps only the classifier
trains; the backbone's parameters get exactly zero updates (`optim.freeze_for_steps`) and the
model runs in inference mode, so BatchNorm normalises with the loaded statistics and leaves
them as they are (what Keras does for a frozen layer, `trainable=False`): the backbone is then
bitwise the pretrained one and the first phase is a linear classifier on the pretrained
features. Head dropout is off during that phase too (inference mode). From step N on,
everything trains as usual, BatchNorm in training mode.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import traverse_util

from xception_jax.platform import storage
from xception_jax.platform.errors import FileFormatError, UsageError
from xception_jax.training import optim

# The config fields that name a pretrained source (at most one may be set), and its kind.
SOURCE_FIELDS = {
    "init_from_keras": "Keras file",
    "init_from_timm": "timm file",
    "init_from_workdir": "workdir",
}


def requested(config: ml_collections.ConfigDict) -> bool:
    """Whether the config asks to start from pretrained weights."""
    return any(config.get(field) for field in SOURCE_FIELDS)


def source_of(config: ml_collections.ConfigDict) -> str:
    """A description of the pretrained source, checked to exist."""
    given = {field: config.get(field) for field in SOURCE_FIELDS if config.get(field)}
    if len(given) > 1:
        raise UsageError(
            f"Set only one of {', '.join('config.' + f for f in SOURCE_FIELDS)} (set: "
            + ", ".join(f"{f}={p!r}" for f, p in given.items())
            + ")."
        )
    ((field, path),) = given.items()
    if not storage.exists(path):
        raise FileNotFoundError(f"config.{field}={path!r} does not exist.")
    return f"{SOURCE_FIELDS[field]} {path}"


def load_backbone(config: ml_collections.ConfigDict) -> dict:
    """{'params', 'batch_stats'} of the pretrained source, without the classifier."""
    if config.get("init_from_keras"):
        from xception_jax.weights import keras_weights

        variables = keras_weights.load(config.init_from_keras, include_top=False)
    elif config.get("init_from_timm"):
        from xception_jax.weights import timm_weights

        variables = timm_weights.load(config.init_from_timm, config.model.name, include_top=False)
    else:
        from xception_jax.training import checkpoints

        _, variables, _ = checkpoints.load(config.init_from_workdir)
    return {
        col: {k: v for k, v in variables[col].items() if k not in optim.HEAD_MODULES}
        for col in ("params", "batch_stats")
    }


def merge(fresh: dict, pretrained: dict, source: str = "the pretrained weights") -> dict:
    """`fresh` variables with every non-classifier entry replaced by `pretrained`'s.

    Raises ValueError listing the variables that are missing, extra or of another shape (the
    model in config.model does not match the source).
    """
    merged, problems = {}, []
    for col in ("params", "batch_stats"):
        have = traverse_util.flatten_dict(pretrained.get(col, {}))
        want = traverse_util.flatten_dict(fresh[col])
        out = {}
        for path, value in want.items():
            name = "/".join((col, *path))
            if path[0] in optim.HEAD_MODULES:
                out[path] = value
            elif path not in have:
                problems.append(f"{name} {tuple(value.shape)} is not in {source}")
            elif tuple(have[path].shape) != tuple(value.shape):
                problems.append(
                    f"{name}: model {tuple(value.shape)}, {source} {tuple(have[path].shape)}"
                )
            else:
                out[path] = np.asarray(have[path]).astype(value.dtype)
        for path in sorted(set(have) - set(want)):
            problems.append(f"{'/'.join((col, *path))} of {source} has no place in the model")
        merged[col] = traverse_util.unflatten_dict(out)
    if problems:
        raise FileFormatError(
            f"config.model does not fit {source} ({len(problems)} problems; e.g. "
            + "; ".join(problems[:5])
            + "). For a Keras file use config.model.name='xception' with the default widths "
            "and residual=True; for a timm file the name of its variant; for a workdir the same "
            "model fields as that run."
        )
    return merged


def init_state(state, config: ml_collections.ConfigDict, tx, sharding):
    """A fresh TrainState `state` with the pretrained backbone loaded (see the module doc).

    `sharding`: where the state's arrays live (the trainer's replicated sharding).
    """
    source = source_of(config)
    backbone = load_backbone(config)
    fresh = {"params": state.params, "batch_stats": state.batch_stats}
    host = merge(jax.device_get(fresh), backbone, source)
    merged = jax.device_put(host, sharding)
    params = merged["params"]
    # The EMA starts at the pretrained params, in buffers of its own: the train step donates
    # the state, and one buffer given twice is refused ("donate the same buffer twice").
    ema_params = jax.device_put(host["params"], sharding) if state.ema_params is not None else None
    opt_state = jax.jit(tx.init, out_shardings=sharding)(params)
    count = sum(np.size(x) for x in jax.tree.leaves(backbone))
    logging.info(
        "Initialised from %s: %s pretrained values; classifier %s fresh; backbone frozen for "
        "%d steps.",
        source,
        f"{count:,}",
        optim.HEAD_MODULES,
        config.get("freeze_backbone_steps", 0),
    )
    return state.replace(
        params=params,
        batch_stats=merged["batch_stats"],
        opt_state=opt_state,
        ema_params=ema_params,
    )
