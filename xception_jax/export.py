"""Export a trained model: a `jax.export` serving artifact (default), or Keras / timm weights.

Usage: python -m xception_jax.export --workdir runs/default --out model.jaxexport

    python -m xception_jax.export --workdir runs/finetune --format keras --out model.keras
    python -m xception_jax.export --workdir runs/finetune --format keras --out x.weights.h5
    python -m xception_jax.export --workdir runs/xception65 --format timm --out x.safetensors

    python -m xception_jax.export --keras_weights xception_weights_tf_dim_ordering_tf_kernels.h5 \\
        --out xception.jaxexport
    python -m xception_jax.export --timm_weights model.safetensors --model xception65 \
        --out xception65.jaxexport

The artifact is inference: uint8 NHWC images [batch, S, S, 3] in (S: the model's input size,
`config.image_size` of a workdir, 299 for a Keras or timm file), float32 logits [batch, classes]
out, with the scaling to [-1, 1] inside, the weights as constants, the batch dimension symbolic
(any batch size) and CPU, CUDA and TPU as target platforms (--platforms). Images must already
be resized/cropped to S (e.g. `predict.load_images`, the evaluation's preprocessing). Serving
needs only JAX:

    from jax import export
    exported = export.deserialize(open("model.jaxexport", "rb").read())
    logits = exported.call(images_uint8)

Beside the artifact, `<out>.json` records the input size, the class names and the source.

--format keras (the `xception` model with Keras's switches): `--out *.keras`, a whole model for
`keras.saving.load_model` (float images in [-1, 1] of the run's input size -> logits; Keras is
imported for this one), or `--out *.weights.h5` for `keras.applications.Xception(weights=None,
classes=N, input_shape=...).load_weights`. --format timm (xception41/65/71, legacy_xception with
timm's switches): `--out *.safetensors` for `timm.create_model(name, num_classes=N)
.load_state_dict(safetensors.torch.load_file(path), strict=True)`. A model with switches the
other library cannot express (e.g. residual=False) is refused by name before anything is
written. --ema exports the Polyak-averaged weights. Details: docs/weights_in_and_out.md.
"""

from __future__ import annotations

import json

from absl import flags

from xception_jax import cli
from xception_jax.platform import errors, storage

FLAGS = flags.FlagValues()
cli.define_weight_source_flags(FLAGS, timm_variant_from="--model")
flags.DEFINE_enum(
    "format",
    "jax",
    ["jax", "keras", "timm"],
    "jax: a jax.export serving artifact; keras: a .keras or .weights.h5 (by --out's name); "
    "timm: a .safetensors state dict.",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "ema", False, "Export the Polyak-averaged weights (--workdir).", flag_values=FLAGS
)
flags.DEFINE_integer("image_size", None, "Override the model's input size.", flag_values=FLAGS)
flags.DEFINE_list("platforms", ["cpu", "cuda", "tpu"], "Target platforms.", flag_values=FLAGS)
flags.DEFINE_string("out", None, "The artifact to write, local or gs://.", flag_values=FLAGS)
flags.mark_flag_as_required("out", flag_values=FLAGS)

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # What jax.export lowers for.
# XLA's own ops: the per-platform 'auto' choice (xception_jax.model.ops) would bake the exporting
# host's implementations into an artifact meant for every platform. Equal in value.
PORTABLE_IMPLS = {"depthwise_impl": "lax", "conv_impl": "lax", "pool_impl": "lax"}


def export_inference(model, variables, image_size: int, platforms=("cpu", "cuda", "tpu")):
    """A `jax.export.Exported` of uint8 [b, S, S, 3] -> logits, b symbolic, weights inside."""
    import jax
    import jax.numpy as jnp
    from jax import export

    from xception_jax.model import xception

    model = model.clone(**PORTABLE_IMPLS)

    def infer(images):
        return model.apply(variables, xception.preprocess(images, model.dtype), train=False)

    (batch,) = export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
    return export.export(jax.jit(infer), platforms=tuple(platforms))(spec)


def write_weights(fmt: str, out: str, model, variables, image_size: int) -> str:
    """Writes `variables` of `model` as a Keras ('keras') or timm ('timm') file `out`.

    Refuses (errors.RefusedError naming the switches) a model the format cannot express, before any
    byte is written. Returns what was written, in words.
    """
    if fmt == "timm":
        from xception_jax.weights import timm_export

        name = timm_export.write_timm(out, model, variables)
        return f"timm.create_model({name!r}, num_classes={model.num_classes})'s state dict"
    from xception_jax.weights import keras_export

    if out.endswith(".weights.h5"):
        keras_export.write_weights_h5(out, model, variables)
        return f"weights of keras.applications.Xception(classes={model.num_classes})"
    keras_export.write_keras(out, model, variables, image_size)
    return f"keras.applications.Xception(classes={model.num_classes}), input {image_size} px"


def _run(args: list[str]) -> None:
    paths = ("workdir", "keras_weights", "timm_weights", "out")
    storage.check_all_supported([(f"--{f}", FLAGS[f].value) for f in paths])
    sidecar = [("--out", FLAGS.out + ".json")] if FLAGS.format == "jax" else []
    storage.check_writable([("--out", FLAGS.out), *sidecar])
    unknown = sorted(set(FLAGS.platforms) - set(PLATFORMS))
    if unknown:
        raise errors.UsageError(
            f"--platforms: unknown platform(s) {unknown}; choose from {list(PLATFORMS)}."
        )
    suffixes = {"keras": (".keras", ".weights.h5"), "timm": (".safetensors",)}
    if FLAGS.format in suffixes and not FLAGS.out.endswith(suffixes[FLAGS.format]):
        raise errors.UsageError(
            f"--format {FLAGS.format} writes {' or '.join(suffixes[FLAGS.format])} files; "
            f"--out={FLAGS.out!r} is neither."
        )
    from xception_jax import predict

    model, variables, names, image_size = predict.load_from_flags(FLAGS)
    image_size = FLAGS.image_size or image_size
    if FLAGS.format != "jax":
        what = write_weights(FLAGS.format, FLAGS.out, model, variables, image_size)
        print(f"Wrote {FLAGS.out} ({what})")
        return
    exported = export_inference(model, variables, image_size, FLAGS.platforms)
    storage.write_atomic(FLAGS.out, bytes(exported.serialize()))
    source = FLAGS.workdir or FLAGS.keras_weights or FLAGS.timm_weights
    meta = {
        "image_size": image_size,
        "input": f"uint8 [batch, {image_size}, {image_size}, 3]",
        "class_names": list(names) if names is not None else None,
        "platforms": list(exported.platforms),
        "source": source,
    }
    storage.write_atomic(FLAGS.out + ".json", json.dumps(meta, indent=1) + "\n")
    print(f"Wrote {FLAGS.out} ({exported.platforms}, input {meta['input']}) and {FLAGS.out}.json")


def main(argv=None) -> None:
    """Command line (see the module docstring); `argv` without the program name."""
    cli.run_tool(_run, FLAGS, __doc__, argv, program="python -m xception_jax.export")


if __name__ == "__main__":
    main()
