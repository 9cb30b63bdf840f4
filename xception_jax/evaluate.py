"""Loss, top-1 and top-5 accuracy of a trained workdir or a Keras / timm weight file on a split.

Usage: python -m xception_jax.evaluate --config configs/default.py --workdir runs/default

    python -m xception_jax.evaluate --workdir runs/default [--use_ema] [--split test]
    python -m xception_jax.evaluate --config configs/imagenet.py --split validation \\
        --keras_weights xception_weights_tf_dim_ordering_tf_kernels.h5 --config.data_dir=D
    python -m xception_jax.evaluate --config configs/imagenet.py --split validation \\
        --timm_weights model.safetensors --config.model.name=xception65 --config.data_dir=D

The whole split, every example exactly once, on any number of processes (the training run's
evaluation: `pipeline.eval_iterator` pads and masks the last batches, `steps.eval_step`
sums over the unmasked examples). For a workdir the config is the run's own (config.json as
its checkpoint stores it; --config, when given, replaces it, e.g. to evaluate on another
dataset) and the numbers equal its last eval in metrics.jsonl at the same step. A weight file
needs --config for the data (and, for timm, `config.model.name`: the file's variant). The
result is printed as one JSON line (`eval_loss`, `eval_accuracy`, `eval_top5_accuracy`,
`count`, and what was evaluated) and, with --out, appended to that file (local or gs://).
"""

from __future__ import annotations

import functools
import json
import sys

from absl import flags
from ml_collections import config_flags

from xception_jax import cli
from xception_jax.platform import errors, storage

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (the data to evaluate on).", flag_values=FLAGS
)
cli.define_weight_source_flags(FLAGS, timm_variant_from="config.model.name")
flags.DEFINE_bool(
    "use_ema", False, "Evaluate the Polyak-averaged weights (--workdir).", flag_values=FLAGS
)
flags.DEFINE_string("split", None, "The split (default: config.eval_split).", flag_values=FLAGS)
flags.DEFINE_string("out", None, "Also append the JSON line to this file.", flag_values=FLAGS)


class EvaluateError(errors.UsageError):
    """Flags that cannot be evaluated together; the message says why and what to do."""


def load_source(config, workdir=None, keras_weights=None, timm_weights=None, step=None, ema=False):
    """(model, variables, config, description) of what to evaluate.

    `config` (may be None for a workdir: the run's own) says the data; the model comes from
    the workdir's checkpoint or the weight file.
    """
    if sum(map(bool, (workdir, keras_weights, timm_weights))) != 1:
        raise EvaluateError("Give exactly one of --workdir, --keras_weights and --timm_weights.")
    if workdir:
        from xception_jax.training import checkpoints

        model, variables, run_config = checkpoints.load(workdir, step=step, ema=ema)
        steps = checkpoints.create_manager(workdir, max_to_keep=None, read_only=True).all_steps()
        what = {"workdir": workdir, "step": step or max(steps), "ema": ema}
        return model, variables, config or run_config, what
    if config is None:
        raise EvaluateError("A weight file needs --config (the dataset to evaluate on).")
    if ema:
        raise EvaluateError("--use_ema is for a --workdir (a weight file has one set of weights).")
    if keras_weights:
        from xception_jax.weights import keras_weights as kw

        model, variables = kw.load_model(keras_weights)
        what = {"keras_weights": keras_weights, "model": "xception"}
    else:
        from xception_jax.weights import timm_weights as tw

        model, variables = tw.load_model(timm_weights, config.model.name)
        what = {"timm_weights": timm_weights, "model": config.model.name}
    return model, variables, config, what


def evaluate(model, variables, config, mesh=None) -> dict:
    """Sums over the whole eval split of `config`: {'eval_loss', 'eval_accuracy',
    'eval_top5_accuracy', 'count'} (means over the `count` examples)."""
    import jax
    import jax.numpy as jnp

    from xception_jax.data import feeding, pipeline
    from xception_jax.platform import sharding
    from xception_jax.training import steps

    mesh = mesh or sharding.create_mesh()
    replicated = sharding.replicated(mesh)
    variables = jax.device_put(variables, replicated)
    step = jax.jit(functools.partial(steps.eval_step, model=model), out_shardings=replicated)
    totals = None
    for batch in pipeline.eval_iterator(config):
        sums = step(
            variables["params"],
            variables["batch_stats"],
            feeding.to_global_batch(batch, mesh),
        )
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    count = totals.pop("count")
    # Divided as loop.evaluate divides, so a workdir's numbers equal its metrics.jsonl's.
    result = {f"eval_{k}": v / max(count, 1.0) for k, v in totals.items()}
    return {**result, "count": int(count)}


def _check_classes(model, config, info, what) -> None:
    if getattr(model, "include_top", True) and model.num_classes != info.num_classes:
        raise errors.InputError(
            f"The model has {model.num_classes} classes, dataset {config.dataset!r} has "
            f"{info.num_classes}: {what} cannot be scored on it (fine-tune it first: "
            "configs/finetune.py)."
        )


def run(
    config, workdir=None, keras_weights=None, timm_weights=None, step=None, ema=False, split=None
):
    """Evaluates what the arguments name; the result dict (the JSON line's content)."""
    model, variables, config, what = load_source(
        config, workdir, keras_weights, timm_weights, step, ema
    )
    from xception_jax.data import sources  # TensorFlow: after the checks of the weights

    if split:
        config.eval_split = split
    info = sources.get_dataset_info(config)
    _check_classes(model, config, info, what)
    result = evaluate(model, variables, config)
    return {**result, **what, "dataset": config.dataset, "split": config.get("eval_split")}


def _run(args: list[str]) -> dict:
    named = [
        (f"--{f}", FLAGS[f].value) for f in ("workdir", "keras_weights", "timm_weights", "out")
    ]
    storage.check_all_supported(named)
    storage.check_writable([("--out", FLAGS.out)])
    result = run(
        FLAGS.config,
        FLAGS.workdir,
        FLAGS.keras_weights,
        FLAGS.timm_weights,
        FLAGS.step,
        FLAGS.use_ema,
        FLAGS.split,
    )
    line = json.dumps(result)
    import jax

    if jax.process_index() == 0:
        print(line)
        sys.stdout.flush()
        if FLAGS.out:
            storage.LineFile(FLAGS.out).append([line])
    return result


def _run_distributed(args: list[str]) -> dict:
    from xception_jax.platform import sharding

    # Every process of a multi-host job runs this command (before JAX computes anything:
    # so only from the command line, not in a process that already used JAX).
    sharding.initialize_distributed()
    return _run(args)


def main(argv=None):
    """Command line (see the module docstring); `argv` without the program name."""
    run_ = _run_distributed if argv is None else _run
    return cli.run_tool(run_, FLAGS, __doc__, argv, program="python -m xception_jax.evaluate")


if __name__ == "__main__":
    main()
