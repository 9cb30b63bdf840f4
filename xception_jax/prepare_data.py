"""Prepares a TFDS dataset ahead of training (download_and_prepare through the Python API).

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

import argparse
import sys
import time

from xception_jax import storage


def main(argv=None):
    """Parses the flags, prepares the dataset and prints its splits."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="imagenet2012", help="TFDS name, e.g. imagenet2012")
    parser.add_argument(
        "--data_dir", default=None, help="TFDS data dir, local or gs:// (TFDS default if unset)"
    )
    parser.add_argument(
        "--manual_dir",
        default=None,
        help="directory with manually downloaded files (imagenet2012: the two ILSVRC2012 tars)",
    )
    args = parser.parse_args(argv)

    from xception_jax import input_pipeline  # imports TensorFlow: after --help

    start = time.time()
    builder = input_pipeline.prepare_dataset(args.dataset, args.data_dir, args.manual_dir)
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"{args.dataset} ready in {builder.data_dir} ({time.time() - start:.1f} s): {splits}")
    return builder


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (
        FileNotFoundError,
        storage.UnsupportedPathError,
    ) as err:  # e.g. ImageNet's tars missing: the message says what to do
        sys.exit(f"error: {err}")
