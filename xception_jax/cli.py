"""Command-line flag parsing shared by train.py and every `python -m xception_jax.<tool>`.

absl flags throughout. train.py parses the global `flags.FLAGS` (its --config is an
ml_collections config file); each tool keeps its flags in a `flags.FlagValues` of its own, so
that tools imported into one process (tests, a notebook) never collide on a flag name (both
predict and evaluate have --workdir) and each in-process `main(argv)` starts from the defaults.
Importing this module loads neither JAX nor TensorFlow: --help and flag errors come back fast.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from absl import app, flags

FLAGS = flags.FLAGS
HELP_FLAGS = ("-h", "--help", "--helpshort", "--helpfull", "-?")


def parse_flags(argv, flag_values: flags.FlagValues = FLAGS):
    """absl's parsing, with a one-line error for a --config.<field> that does not exist.

    config_flags raises a bare KeyError/AttributeError (with a traceback) for a misspelled
    field, e.g. --config.modle.name=x; the config is locked, so typos never pass silently.
    `argv` includes the program name; returns the positional arguments (program name first).
    --help prints the program's docstring (its usage example) and flags and exits 0 (absl's own
    help exits 1).
    """
    options = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    if flag_values is FLAGS and any(a in HELP_FLAGS for a in options):
        print(tool_help(FLAGS, sys.modules["__main__"].__doc__ or ""))
        sys.exit(0)
    try:
        return flag_values(argv)
    except (KeyError, AttributeError) as e:
        message = e
        while isinstance(message, BaseException) and message.args:
            message = message.args[0]  # AttributeError wraps the KeyError that has the text.
        message = str(message).replace("\n", ". ")
        overrides = " ".join(a for a in argv[1:] if a.startswith("--config."))
        sys.stderr.write(
            f"FATAL Flags parsing error: a --config override names a field that does not exist: "
            f"{message}\n  Overrides given: {overrides}\n  Every field is listed in "
            "configs/common.py (model fields in xception_jax/model/xception.py).\n"
        )
        sys.exit(1)
    except flags.Error as e:
        sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull.\n")
        sys.exit(1)


def tool_help(flag_values: flags.FlagValues, doc: str) -> str:
    """--help text of a tool: its docstring (first line and usage example) and its flags."""
    if flag_values is FLAGS:  # The global flags: only those of the program's own module.
        return doc.strip() + "\n\nFlags:\n" + flag_values.main_module_help()
    return doc.strip() + "\n\nFlags:\n" + flag_values.get_help(include_special_flags=False)


def parse_tool_flags(
    flag_values: flags.FlagValues, argv: Sequence[str], doc: str, positional: str | None = None
) -> list[str]:
    """Parses a tool's `argv` (program name first) into `flag_values`; its positional arguments.

    --help (and -h, --helpshort, --helpfull) prints `doc` (which starts with a one-line usage
    example) and the flags, then exits 0. A wrong flag exits 1 with absl's message (as
    train.py). Every call starts from the defaults, so `main(argv)` can run again in-process.
    `positional`: what the positional arguments are, when at least one is required.
    """
    argv = list(argv)
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
        sys.stderr.write(
            f"FATAL Flags parsing error: give at least one {positional} (positional argument)."
            "\nPass --help for the usage.\n"
        )
        sys.exit(1)
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
    """A tool's `main`: parse `argv` (without the program name; sys.argv's when None), run.

    From the command line (`argv` None) it goes through absl's `app.run`, as train.py does
    (absl logging, the same exit codes); in-process it returns what `run` returns.
    """

    def parser(full_argv):
        return parse_tool_flags(flag_values, full_argv, doc, positional)

    if argv is None:
        # app.run exits with main's return value: a tool's result (e.g. a TFDS builder) must
        # not become the exit status.
        app.run(lambda args: run(args) and None, argv=[program, *sys.argv[1:]], flags_parser=parser)
        return None
    return run(parser([program, *argv]))


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
