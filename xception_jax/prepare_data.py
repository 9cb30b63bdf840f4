"""Prepares a TFDS dataset ahead of training (download_and_prepare through the Python API).

Usage: python -m xception_jax.prepare_data --dataset imagenet2012 --data_dir D --manual_dir M

ImageNet from the two ILSVRC2012 tars:

    python -m xception_jax.prepare_data --dataset imagenet2012 \\
        --data_dir ~/tensorflow_datasets --manual_dir ~/ilsvrc2012

where ~/ilsvrc2012 holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar as downloaded
(about 2-5 hours and ~150 GB of TFRecord files for the full dataset, on one machine). Any other
TFDS name works too ('cifar10' downloads; 'sklearn_digits', the embedded default, needs no
network). Multi-host jobs should prepare once before training rather than on first use.
Both directories may be local or gs:// (a pod's hosts then read the one copy):

    python -m xception_jax.prepare_data --dataset imagenet2012 \\
        --data_dir gs://my-bucket/tfds --manual_dir gs://my-bucket/ilsvrc2012
"""

import time

from absl import flags

from xception_jax import cli
from xception_jax.platform import errors, storage

FLAGS = flags.FlagValues()
flags.DEFINE_string("dataset", "imagenet2012", "TFDS name, e.g. imagenet2012.", flag_values=FLAGS)
flags.DEFINE_string(
    "data_dir", None, "TFDS data dir, local or gs:// (TFDS default if unset).", flag_values=FLAGS
)
flags.DEFINE_string(
    "manual_dir",
    None,
    "Directory with manually downloaded files (imagenet2012: the two ILSVRC2012 tars).",
    flag_values=FLAGS,
)


def _run(args: list[str]):
    """Prepares the dataset the flags name and prints its splits; returns the TFDS builder."""
    # The flags first, without TensorFlow (seconds): the dataset name and the paths.
    from xception_jax.data import names

    storage.check_all_supported(
        [("--data_dir", FLAGS.data_dir), ("--manual_dir", FLAGS.manual_dir)]
    )
    unknown = names.dataset_name_errors(FLAGS.dataset)
    if unknown:
        raise errors.UsageError(unknown[0].replace("config.dataset=", "--dataset="))
    from xception_jax.data import sources  # imports TensorFlow

    start = time.time()
    # e.g. ImageNet's tars missing: FileNotFoundError, its message says what to do.
    builder = sources.prepare_dataset(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"{FLAGS.dataset} ready in {builder.data_dir} ({time.time() - start:.1f} s): {splits}")
    return builder


def main(argv=None):
    """Command line (see the module docstring); `argv` without the program name."""
    return cli.run_tool(_run, FLAGS, __doc__, argv, program="python -m xception_jax.prepare_data")


if __name__ == "__main__":
    main()
