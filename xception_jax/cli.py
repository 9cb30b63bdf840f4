"""Command-line helpers shared by every absl entry point (train.py, xception_jax.aot).

Imports neither JAX nor TensorFlow, so that --help and flag errors come back at once.
"""

from __future__ import annotations

import sys

from absl import flags


def parse_flags(argv):
    """absl's parsing, with a one-line error for a --config.<field> that does not exist.

    config_flags raises a bare KeyError/AttributeError (with a traceback) for a misspelled
    field, e.g. --config.modle.name=x; the config is locked, so typos never pass silently.
    Pass as ``app.run(main, flags_parser=parse_flags)``.
    """
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        message = e
        while isinstance(message, BaseException) and message.args:
            message = message.args[0]  # AttributeError wraps the KeyError that has the text.
        message = str(message).replace("\n", ". ")
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        sys.stderr.write(
            f"FATAL Flags parsing error: a --config override names a field that does not exist: "
            f"{message}\n  Overrides given: {overrides}\n  Every field is listed in "
            "configs/common.py (model fields in xception_jax/models.py).\n"
        )
        sys.exit(1)
    except flags.Error as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull.\n")
        sys.exit(1)
