"""One command-line convention: every `python -m xception_jax.<tool>` takes absl flags."""

import importlib
import subprocess
import sys

import pytest

TOOLS = ("curves", "predict", "prepare_data", "evaluate", "export", "sweep")


@pytest.mark.parametrize("tool", TOOLS)
def test_help_exits_0_with_a_usage_example(tool):
    done = subprocess.run(
        [sys.executable, "-m", f"xception_jax.{tool}", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"Usage: python -m xception_jax.{tool} " in done.stdout
    assert "Flags:" in done.stdout


@pytest.mark.parametrize("tool", [t for t in TOOLS if t != "sweep"])
def test_a_wrong_flag_exits_2_with_absls_message(tool, capsys):
    # In-process (as tests/test_gcs.py calls them): main(argv) without the program name.
    module = importlib.import_module(f"xception_jax.{tool}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--no_such_flag=1"])
    assert exit_.value.code == 2  # A usage error (xception_jax.cli.report_errors).
    assert "Unknown command line flag 'no_such_flag'" in capsys.readouterr().err


def test_a_wrong_flag_exits_2_from_the_command_line():
    done = subprocess.run(
        [sys.executable, "-m", "xception_jax.sweep", "--sweep_dri=x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Unknown command line flag 'sweep_dri'. Did you mean: sweep_dir ?" in done.stderr


@pytest.mark.parametrize(
    "argv, usage",
    [
        (["train.py"], "python train.py --config configs/default.py --workdir runs/default"),
        (["-m", "xception_jax.aot"], "python -m xception_jax.aot --config configs/imagenet.py"),
    ],
)
def test_train_and_aot_help_exit_0_with_a_usage_example(argv, usage):
    done = subprocess.run(
        [sys.executable, *argv, "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert usage in done.stdout and "--config" in done.stdout.split("Flags:")[1]
