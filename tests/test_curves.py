"""curves.py: grouping over seeds, labels, the figure files and the table's numbers."""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from xception_jax import curves


def _write_run(workdir, residual, seed, accs):
    os.makedirs(workdir)
    config = {"model": {"name": "xception_tiny", "residual": residual}, "seed": seed, "lr": 0.1}
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(config, f)
    rng = np.random.default_rng(seed + 10 * residual)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for i, step in enumerate(range(10, 10 * (2 * len(accs) + 1), 10)):
            record = {"step": step, "wall_time": step * 0.5 + seed, "train_loss": 2.0 / step}
            record["device_hours"] = step * 8 * (1 + residual) / 3600  # 8 devices.
            if i % 2:
                record.update(eval_accuracy=accs[i // 2], eval_loss=float(rng.random()))
            f.write(json.dumps(record) + "\n")


@pytest.fixture
def workdirs(tmp_path):
    """2 variants x 2 seeds; eval accuracy lists chosen so that best != final."""
    accs = {
        (True, 0): [0.5, 0.9123456789, 0.88],
        (True, 1): [0.6, 0.85, 0.87],
        (False, 0): [0.3, 0.7, 0.8],
        (False, 1): [0.2, 0.75, 0.7],
    }
    dirs = []
    for (residual, seed), values in accs.items():
        d = str(tmp_path / f"res{residual}" / f"seed{seed}")
        _write_run(d, residual, seed, values)
        dirs.append(d)
    return dirs


def test_groups_differ_only_by_seed_and_are_labelled_by_the_differing_field(workdirs):
    groups = curves.group_runs([curves.load_run(w) for w in workdirs])
    assert sorted(g.label for g in groups) == ["residual=False", "residual=True"]
    assert all(len(g.runs) == 2 for g in groups)
    group = next(g for g in groups if g.label == "residual=True")
    steps, _, mean, lo, hi = curves.aggregate(group, "eval_accuracy")
    np.testing.assert_array_equal(steps, [20, 40, 60])
    np.testing.assert_allclose(mean, [0.55, (0.9123456789 + 0.85) / 2, 0.875])
    np.testing.assert_allclose(lo, [0.5, 0.85, 0.87])
    np.testing.assert_allclose(hi, [0.6, 0.9123456789, 0.88])


def test_command_writes_png_svg_and_a_table_with_the_files_numbers(workdirs, tmp_path, capsys):
    out = str(tmp_path / "fig" / "curves.png")
    table_file = str(tmp_path / "table.md")
    curves.main([*workdirs, "--out", out, "--log_loss", "--table", table_file])
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 500 and image.size[1] > 400
    assert os.path.getsize(out) > 10_000
    assert os.path.getsize(out[:-4] + ".svg") > 10_000
    printed = capsys.readouterr().out
    with open(table_file) as f:
        md = f.read()
    assert md.strip() in printed
    # One row per run: final and best eval accuracy exactly as in its metrics file (4 digits).
    for workdir in workdirs:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            evals = [r for r in map(json.loads, f) if "eval_accuracy" in r]
        final, best = evals[-1], max(evals, key=lambda r: r["eval_accuracy"])
        row = next(line for line in md.splitlines() if f"| {os.path.normpath(workdir)} |" in line)
        numbers = re.findall(r"(\d\.\d{4}) \((\d+)\)", row)
        assert numbers == [
            (f"{final['eval_accuracy']:.4f}", str(final["step"])),
            (f"{best['eval_accuracy']:.4f}", str(best["step"])),
        ]
    assert "| residual=True | 2 | 0.8750 | 0.8700 | 0.8800 |" in md


def test_a_workdir_without_metrics_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        curves.load_run(str(tmp_path))


def test_curves_against_device_hours(workdirs, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    groups = curves.group_runs([curves.load_run(w) for w in workdirs])
    fig = curves.plot(groups, x_axes=("step", "device_hours"))
    axes = fig.axes
    assert [ax.get_xlabel() for ax in axes] == ["step", "device-hours"] * 2
    residual = {g.label: g for g in groups}["residual=True"]
    steps, hours, *_ = curves.aggregate(residual, "eval_accuracy", "device_hours")
    np.testing.assert_allclose(hours, steps * 16 / 3600)
    line = next(ln for ln in axes[3].lines if ln.get_label().startswith("residual=True"))
    np.testing.assert_allclose(line.get_xdata(), hours)
    with pytest.raises(ValueError, match="Unknown x axes"):
        curves.plot(groups, x_axes=("epochs",))
    curves.main([*workdirs, "--out", str(tmp_path / "c.png"), "--x", "device_hours"])
    assert Image.open(tmp_path / "c.png").size[0] < Image.open(tmp_path / "c.png").size[1] * 2


def test_table_has_params_and_gflops_and_the_accuracy_against_gflops_plot(tmp_path, capsys):
    import jax
    import jax.numpy as jnp

    from xception_jax.model import registry

    dirs = []
    for g, acc in ((1, 0.5), (-1, 0.7)):
        d = tmp_path / f"cpg{g}" / "seed0"
        meta = d / "checkpoints" / "20" / "meta"
        os.makedirs(meta)
        (meta / "metadata").write_text(json.dumps({"num_classes": 10, "layout_version": 1}))
        config = {"model": {"name": "xception_tiny", "channels_per_group": g}, "image_size": 32}
        (d / "config.json").write_text(json.dumps({**config, "seed": 0}))
        records = [{"step": 20, "train_loss": 1.0, "eval_accuracy": acc}]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        dirs.append(str(d))
    out, vs = str(tmp_path / "c.png"), str(tmp_path / "acc_gflops.png")
    curves.main([*dirs, "--out", out, "--vs_gflops", vs])
    with Image.open(vs) as image:
        assert image.format == "PNG"
    assert os.path.exists(vs[:-4] + ".svg")
    md = capsys.readouterr().out
    assert "| params | GFLOPs/image |" in md
    rows = {}
    for line in md.splitlines():
        m = re.match(r"\| channels_per_group=(-?\d) \| 1 \|.*\| ([\d,]+) \| ([\d.e+]+) \|$", line)
        if m:
            rows[int(m.group(1))] = (int(m.group(2).replace(",", "")), float(m.group(3)))
    assert set(rows) == {1, -1}
    for g, (params, gflops) in rows.items():
        model = registry.create_model("xception_tiny", num_classes=10, channels_per_group=g)
        x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
        shapes = jax.eval_shape(lambda x, model=model: model.init(jax.random.key(0), x), x)
        assert params == registry.count_params(shapes["params"])
        assert gflops > 0
    assert rows[-1][1] > rows[1][1]  # A regular 3x3 conv costs more than a depthwise one.
