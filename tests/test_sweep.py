"""sweep.py: the printed commands, a 2-variant sweep of real subprocess runs, skip on rerun."""

import json
import os
import shlex
import subprocess
import sys

import pytest
from ml_collections import config_flags

from configs import default
from xception_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_overrides(data_dir):
    """tests/test_train.py's small_config as command-line overrides (its compiled programs)."""
    return [
        f"--config.data_dir={data_dir}",
        "--config.image_size=32",
        "--config.batch_size=16",
        "--config.eval_batch_size=64",
        "--config.schedule.name=constant",
        "--config.schedule.warmup_epochs=0.0",
        "--config.schedule.base_learning_rate=0.02",
        "--config.num_train_steps=2",
        "--config.log_every_steps=1",
        "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2",
    ]


def test_dry_run_prints_one_command_per_variant_and_seed(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "xception_jax.sweep",
            "--config=configs/default.py",
            "--sweep=activation",
            f"--sweep_dir={tmp_path}",
            "--seeds=2",
            "--dry_run",
            "--config.num_train_steps=7",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("python")]
    assert len(commands) == 6
    first = commands[0]
    assert first[:3] == ["python", "train.py", "--config=configs/default.py"]
    assert f"--workdir={tmp_path}/act_none/seed0" in first
    assert "--config.num_train_steps=7" in first
    assert "--config.model.intermediate_activation=elu" in commands[2]
    assert "--config.seed=1" in commands[3]
    assert not os.listdir(tmp_path)  # A dry run writes nothing.


def test_unknown_sweep_or_field_is_named():
    with pytest.raises(ValueError, match="Unknown sweep 'depth'"):
        sweep.plan("depth", "x", 1, 0)
    with pytest.raises(ValueError, match="no field 'model.nope'"):
        sweep.resolved_config(default.get_config(), {"model.nope": 1})


def test_research_switch_sweeps_and_values_a_variant_cannot_take():
    segments = dict(sweep.SWEEPS["segments"])
    assert {k: v["model.channels_per_group"] for k, v in segments.items()} == {
        "cpg1": 1,
        "cpg2": 2,
        "cpg4": 4,
        "cpg8": 8,
        "regular": -1,
    }
    orders = [v["model.separable_order"] for _, v in sweep.SWEEPS["order"]]
    assert orders == ["depthwise_first", "pointwise_first"]
    crossed = dict(sweep.SWEEPS["segments_residual"])
    assert len(crossed) == 10
    assert crossed["cpg4-no_residual"] == {
        "model.channels_per_group": 4,
        "model.residual": False,
    }
    config = default.get_config()
    assert sweep.model_refuses(sweep.resolved_config(config, segments["cpg8"])) is None
    # A value the variant cannot take leaves that run out, saying why.
    refused = sweep.model_refuses(sweep.resolved_config(config, {"model.channels_per_group": 3}))
    assert "use one of [1, 2, 4, 8, -1]" in refused


def test_two_variant_sweep_trains_both_workdirs_and_skips_them_on_rerun(
    digits_data_dir, tmp_path, capsys, monkeypatch
):
    overrides = small_overrides(digits_data_dir)
    config = default.get_config()
    # The sweep's own config: configs/default.py with the overrides, as absl would apply them.
    for arg in overrides:
        config_flags.config_path.set_value(*_path_and_value(config, arg))
    sweep_dir = str(tmp_path / "sweep")
    monkeypatch.chdir(REPO)
    # One device per run: compiling for conftest's 8 virtual devices takes several times longer.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    results = sweep.run_sweep(config, "configs/default.py", "residual", sweep_dir, 1, overrides)
    assert results == {"residual/seed0": "done", "no_residual/seed0": "done"}
    for name, residual in (("residual", True), ("no_residual", False)):
        workdir = os.path.join(sweep_dir, name, "seed0")
        with open(os.path.join(workdir, "config.json")) as f:
            assert json.load(f)["model"]["residual"] is residual
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        assert [r["step"] for r in records] == [1, 2] and "eval_accuracy" in records[-1]
        assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
        assert os.path.exists(os.path.join(workdir, "train.log"))
    capsys.readouterr()
    again = sweep.run_sweep(config, "configs/default.py", "residual", sweep_dir, 1, overrides)
    assert set(again.values()) == {"skipped"}
    assert "finished already, skipped" in capsys.readouterr().out
    # A sweep dir holding runs of another config is refused, not silently mixed.
    config.schedule.base_learning_rate = 0.5
    with pytest.raises(ValueError, match="schedule.base_learning_rate"):
        sweep.run_sweep(config, "configs/default.py", "residual", sweep_dir, 1, overrides)


def _path_and_value(config, arg):
    dotted, value = arg[len("--config.") :].split("=", 1)
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    current = node[leaf]
    parsed = type(current)(value) if current is not None else value
    return dotted, config, parsed


def test_recipe_sweep_crosses_paper_and_modern_ra_with_residual():
    from configs import imagenet, modern_ra
    from xception_jax.training import config_checks

    runs = sweep.plan("recipe", "/tmp/sweep", 1, 0)
    assert [r["name"] for r in runs] == [
        "paper-residual/seed0",
        "paper-no_residual/seed0",
        "modern_ra-residual/seed0",
        "modern_ra-no_residual/seed0",
    ]
    base = imagenet.get_config()
    configs = {r["name"].split("/")[0]: sweep.resolved_config(base, r["fields"]) for r in runs}
    # The paper's variant is configs/imagenet.py itself; the modern one trains as
    # configs/modern_ra.py does (but for its length, which the base config sets).
    assert configs["paper-residual"].to_dict() == {**base.to_dict(), "seed": 0}
    expected = modern_ra.get_config()
    expected.num_epochs = base.num_epochs
    assert configs["modern_ra-residual"].to_dict() == expected.to_dict()
    # No residual branch, no drop path; every variant passes the checks.
    assert configs["modern_ra-no_residual"].model.drop_path_rate == 0.0
    for config in configs.values():
        assert config_checks.augment_errors(config) == []
