"""Export a trained model for serving: a `jax.export` artifact that runs without this package.

Usage: python -m xception_jax.export --workdir runs/default --out model.jaxexport

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
"""

from __future__ import annotations

import json

from absl import flags

from xception_jax import cli
from xception_jax.platform import errors, storage

FLAGS = flags.FlagValues()
cli.define_weight_source_flags(FLAGS, timm_variant_from="--model")
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


def _run(args: list[str]) -> None:
    paths = ("workdir", "keras_weights", "timm_weights", "out")
    storage.check_all_supported([(f"--{f}", FLAGS[f].value) for f in paths])
    storage.check_writable([("--out", FLAGS.out), ("--out", FLAGS.out + ".json")])
    unknown = sorted(set(FLAGS.platforms) - set(PLATFORMS))
    if unknown:
        raise errors.UsageError(
            f"--platforms: unknown platform(s) {unknown}; choose from {list(PLATFORMS)}."
        )
    from xception_jax import predict

    model, variables, names, image_size = predict.load_from_flags(FLAGS)
    image_size = FLAGS.image_size or image_size
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
