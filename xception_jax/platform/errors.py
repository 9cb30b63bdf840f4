"""The two kinds of error a user can fix, raised by any layer and reported by one handler.

Every entry point (train.py and each `python -m xception_jax.<tool>`) ends through
`xception_jax.cli.report_errors`: an error of either kind is one short message on stderr, no
traceback, and an exit code that says which kind it was. Anything else is a bug and keeps its
traceback. The message names the flag, config field, path or file at fault and the fix.

Library code subclasses these rather than catching its own errors per tool: e.g.
`config_checks.ConfigError` is a UsageError, `checkpoints.CheckpointError` an InputError.
Imports nothing (the lowest layer), so that every layer can raise them.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A bad flag, flag value or config value: the command line is what needs fixing (exit 2)."""

    exit_code = 2


class InputError(Exception):
    """A run-time failure the user's inputs cause: a missing or unreadable file, a workdir that
    holds something else, a refused action (exit 1)."""

    exit_code = 1


class FileFormatError(InputError, ValueError):
    """A file that exists but is not what it should be: not an image, not HDF5 or safetensors,
    the weights of another model."""


class RefusedError(InputError, ValueError):
    """An action refused for what it was given, e.g. an export of switches the target library
    cannot express: nothing was written (exit 1)."""
