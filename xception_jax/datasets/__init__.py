"""TFDS builders that need no download. Importing this package registers them with TFDS.

- 'sklearn_digits': the embedded default dataset (see `sklearn_digits.py`).
"""

from xception_jax.datasets.sklearn_digits import SklearnDigits

__all__ = ["SklearnDigits"]
