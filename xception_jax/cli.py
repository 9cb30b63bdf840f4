"""Command-line flag parsing shared by train.py and every `python -m xception_jax.<tool>`.

absl flags throughout. train.py parses the global `flags.FLAGS` (its --config is an
ml_collections config file); each tool keeps its flags in a `flags.FlagValues` of its own, so
that tools imported into one process (tests, a notebook) never collide on a flag name (both
predict and evaluate have --workdir) and each in-process `main(argv)` starts from the defaults.
Importing this module loads neither JAX nor TensorFlow: --help and flag errors come back fast.

It is also the one place where errors become exit codes (`report_errors`, used by `run_tool`,
which train.py and every tool's main go through): an error the user can fix is one line on
stderr, `FATAL <what is wrong and the fix>`, with no traceback, and exit code 2 for a usage
error (a bad flag, flag value or config value: `errors.UsageError`, absl's flag errors) or 1 for
a failure at run time (`errors.InputError`, a missing or unreadable file). `--debug` (or
XCEPTION_JAX_DEBUG=1) prints the traceback too, with the same exit code. Any other exception is
a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from absl import app, flags

from xception_jax.platform import errors

FLAGS = flags.FLAGS
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")
DEBUG_ENV = "XCEPTION_JAX_DEBUG"
DEBUG_HELP = f"Show the traceback of an error too (also {DEBUG_ENV}=1), for a bug report."
# OS errors about a path the user gave (from open(), os.makedirs, ...): run-time input errors.
_PATH_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
# TensorFlow's equivalents (gs:// goes through tf.io.gfile), matched by name: importing
# TensorFlow to report an error would cost seconds.
_TF_PATH_ERRORS = ("NotFoundError", "PermissionDeniedError", "AlreadyExistsError")


def exit_code(error: BaseException) -> int | None:
    """2 for a usage error, 1 for an input error, None for a bug (anything else)."""
    if isinstance(error, (errors.UsageError, flags.Error, app.UsageError)):
        return 2
    if isinstance(error, (errors.InputError, *_PATH_ERRORS)):
        return 1
    kind = type(error)
    if kind.__module__.startswith("tensorflow") and kind.__name__ in _TF_PATH_ERRORS:
        return 1
    return None


def error_message(error: BaseException) -> str:
    """The text of an error for the user: its message; for an OS error, the path and the fix."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror} (check the path and its permissions)."
    message = getattr(error, "message", None)  # TensorFlow's errors: without the op's name.
    text = str(message if isinstance(message, str) else error).strip()
    return text or type(error).__name__


def debug_requested(argv: Sequence[str]) -> bool:
    """--debug among the options of `argv`, or XCEPTION_JAX_DEBUG set (not '' or '0')."""
    options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    flag = any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in options)
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def report_errors(argv: Sequence[str]):
    """Ends an entry point that failed on a user's error: `FATAL <message>`, the exit code.

    Usage and input errors (`exit_code`) exit 2 and 1 without a traceback (with it under
    --debug); every other exception propagates (a bug: its traceback is the report).
    """
    try:
        yield
    except Exception as e:
        code = exit_code(e)
        if code is None:
            raise
        if debug_requested(list(argv)):
            traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.write(f"FATAL {error_message(e)}\n")
        sys.stderr.flush()
        sys.exit(code)


def parse_flags(argv, flag_values: flags.FlagValues = FLAGS):
    """absl's parsing; a flag error raises errors.UsageError with one line of text.

    config_flags raises a bare KeyError/AttributeError for a misspelled field, e.g.
    --config.modle.name=x (the config is locked, so typos never pass silently): its text is
    turned into a message that names the override. `argv` includes the program name; returns
    the positional arguments (program name first).
    """
    define_debug_flag(flag_values)
    try:
        args = flag_values(argv)
    except SyntaxError as e:  # In a --config file.
        raise errors.UsageError(
            f"The config file {e.filename} does not parse: {e.msg} (line {e.lineno})."
        ) from e
    except (KeyError, AttributeError) as e:
        message = e
        while isinstance(message, BaseException) and message.args:
            message = message.args[0]  # AttributeError wraps the KeyError that has the text.
        message = str(message).replace("\n", ". ")
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        raise errors.UsageError(
            "Flags parsing error: a --config override names a field that does not exist: "
            f"{message} (overrides given: {overrides}). Every field is listed in "
            "configs/common.py (model fields in xception_jax/model/xception.py)."
        ) from None
    except flags.Error as e:
        text = str(e).replace("\n", " ")
        raise errors.UsageError(f"Flags parsing error: {text} (pass --help for the flags).") from e
    check_config_files(flag_values)
    return args


def check_config_files(flag_values: flags.FlagValues) -> None:
    """Raises errors.UsageError for a --config file that could not be loaded.

    ml_collections defers that error (its flag's value raises on first use, with a traceback).
    """
    for name in flag_values:
        value = flag_values[name].value
        if type(value).__name__ == "_ErrorConfig":  # config_flags' stand-in for a failed load
            cause = str(vars(value).get("_error", "")).strip().splitlines()
            raise errors.UsageError(
                f"--{name}={flag_values[name].serialize().partition('=')[2]}: cannot load the "
                f"config file ({cause[-1].strip() if cause else 'unreadable'}); give the path of "
                "a config file such as configs/default.py."
            )


def define_debug_flag(flag_values: flags.FlagValues) -> None:
    """--debug (see `report_errors`), once per set of flags."""
    if "debug" not in flag_values:
        flags.DEFINE_bool("debug", False, DEBUG_HELP, flag_values=flag_values)


def tool_help(flag_values: flags.FlagValues, doc: str) -> str:
    """--help text of a tool: its docstring (first line and usage example) and its flags."""
    if flag_values is FLAGS:  # The global flags: only those of the program's own module.
        return (
            doc.strip()
            + "\n\nFlags:\n"
            + flag_values.main_module_help()
            + f"\n  --debug: {DEBUG_HELP}"
        )
    return doc.strip() + "\n\nFlags:\n" + flag_values.get_help(include_special_flags=False)


def parse_tool_flags(
    flag_values: flags.FlagValues, argv: Sequence[str], doc: str, positional: str | None = None
) -> list[str]:
    """Parses a tool's `argv` (program name first) into `flag_values`; its positional arguments.

    --help (and -h, --helpshort, --helpfull) prints `doc` (which starts with a one-line usage
    example) and the flags, then exits 0. A wrong flag raises errors.UsageError (exit 2 through
    `report_errors`). Every call starts from the defaults, so `main(argv)` can run again
    in-process. `positional`: what the positional arguments are, when at least one is required
    (None: the tool takes none).
    """
    argv = list(argv)
    define_debug_flag(flag_values)
    options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if any(a in HELP_FLAGS for a in options):
        print(tool_help(flag_values, doc))
        sys.exit(0)
    flag_values.unparse_flags()
    # ml_collections' config flags find their --config.<field> overrides in sys.argv, not in
    # the argv parsed: an in-process main(argv) must show them its argv.
    saved, sys.argv = sys.argv, argv
    try:
        args = parse_flags(argv, flag_values)[1:]
    finally:
        sys.argv = saved
    if positional and not args:
        raise errors.UsageError(
            f"Give at least one {positional} (positional argument); pass --help for the usage."
        )
    if not positional and args:
        raise errors.UsageError(
            f"Unexpected arguments {args}: every option is a --flag (pass --help for the usage)."
        )
    FLAGS.mark_as_parsed()  # absl's app.run insists on it; the tool's flags live elsewhere.
    return args


def run_tool(
    run: Callable[[list[str]], object],
    flag_values: flags.FlagValues,
    doc: str,
    argv: Sequence[str] | None = None,
    *,
    program: str,
    positional: str | None = None,
):
    """An entry point's `main`: parse `argv` (without the program name; sys.argv's when None)
    into `flag_values`, then `run(positional arguments)`, both under `report_errors`.

    From the command line (`argv` None) it goes through absl's `app.run` (absl logging); in
    process it returns what `run` returns, and a user's error raises SystemExit(2 or 1).
    """
    full = [program, *(sys.argv[1:] if argv is None else argv)]

    def parser(full_argv):
        with report_errors(full):
            return parse_tool_flags(flag_values, full_argv, doc, positional)

    def main(args):
        with report_errors(full):
            return run(args)

    if argv is None:
        # app.run exits with main's return value: a tool's result (e.g. a TFDS builder) must
        # not become the exit status.
        app.run(lambda args: main(args) and None, argv=full, flags_parser=parser)
        return None
    return main(parser(full))


def define_weight_source_flags(flag_values: flags.FlagValues, timm_variant_from: str) -> None:
    """--workdir, --keras_weights, --timm_weights and --step: where a tool's weights come from.

    `timm_variant_from` says which flag or field names the variant of a timm file; '--model'
    also defines that flag.
    """
    flags.DEFINE_string(
        "workdir", None, "A training workdir (its newest checkpoint).", flag_values=flag_values
    )
    flags.DEFINE_string(
        "keras_weights",
        None,
        "A Keras file holding an Xception: .keras (also a transfer model with Xception nested), "
        ".weights.h5 or legacy .h5.",
        flag_values=flag_values,
    )
    flags.DEFINE_string(
        "timm_weights",
        None,
        f"A timm .safetensors weight file (its variant: {timm_variant_from}).",
        flag_values=flag_values,
    )
    if timm_variant_from == "--model":
        flags.DEFINE_string(
            "model",
            None,
            "The timm variant of --timm_weights: xception41, xception65, xception71, "
            "legacy_xception.",
            flag_values=flag_values,
        )
    flags.DEFINE_integer(
        "step", None, "Checkpoint step of --workdir (default: the newest).", flag_values=flag_values
    )
