"""Training curves of any set of workdirs, grouped over seeds, and a table of eval accuracies.

Usage: python -m xception_jax.curves WORKDIR... --out curves.png [--log_loss] [--table t.md]

    python -m xception_jax.curves runs/sweep/*/seed* --out curves.png [--log_loss] [--table t.md]
    python -m xception_jax.curves runs/sweep/*/seed* --out curves.png --vs_gflops acc_flops.png
    python -m xception_jax.curves "gs://bucket/sweep/*/seed*" --out gs://bucket/sweep/curves.png
    python -m xception_jax.curves runs/sweep/*/seed* --out cost.png --x step,device_hours

Reads `metrics.jsonl` and `config.json` of each workdir. Runs whose configs differ only in
`seed` form one group, drawn as the mean over its runs with a min-max band; groups are labelled
with the config fields that differ between them. Writes a figure (train loss and eval
accuracy, against each axis of --x: step, wall time and/or device-hours) as PNG and SVG, and
prints a markdown table of the final and best eval accuracy of every run, numbers taken as they
are from the metrics files (rounded for display only), with each group's parameter count and
forward GFLOPs per image at the run's image size (XLA's cost analysis of the lowered model,
`registry.forward_cost`; the number of classes read from the run's checkpoint). `--vs_gflops`
also plots each group's final accuracy against its GFLOPs per image (a sweep's cost/accuracy
trade-off). Importable: `load_run`, `group_runs`, `plot`, `table`, `model_cost`,
`plot_vs_gflops`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import sys

import numpy as np
from absl import flags

from xception_jax import cli
from xception_jax.platform import errors, storage

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
SEED_FIELD = "seed"

# Positional arguments: the workdirs (local or gs://); '*' patterns are expanded here (a shell
# cannot expand gs:// ones).
FLAGS = flags.FlagValues()
flags.DEFINE_string(
    "out", None, "PNG to write, local or gs:// (an .svg is written too).", flag_values=FLAGS
)
flags.DEFINE_bool("log_loss", False, "Log-scale train loss axes.", flag_values=FLAGS)
flags.DEFINE_string("table", None, "Also write the markdown table to this file.", flag_values=FLAGS)
flags.DEFINE_string("title", None, "Figure title.", flag_values=FLAGS)
flags.DEFINE_string(
    "vs_gflops",
    None,
    "Also write final eval accuracy against forward GFLOPs per image, one point per group, to "
    "this PNG (and .svg), local or gs://.",
    flag_values=FLAGS,
)
flags.DEFINE_list(
    "x",
    ["step", "wall_time"],
    "x axes, one column each: step, wall_time, device_hours.",
    flag_values=FLAGS,
)
flags.mark_flag_as_required("out", flag_values=FLAGS)


@dataclasses.dataclass
class Run:
    """One workdir: its flattened config and its metric records (one dict per logged step)."""

    workdir: str
    config: dict
    records: list[dict]

    def series(self, key: str, x: str = "wall_time") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, `x` values, values) of the records that carry `key` (x: a record field such as
        'wall_time' or 'device_hours'; NaN where a record lacks it)."""
        rows = [r for r in self.records if key in r]
        return (
            np.array([r["step"] for r in rows], np.int64),
            np.array([r.get(x, np.nan) for r in rows], np.float64),
            np.array([r[key] for r in rows], np.float64),
        )


@dataclasses.dataclass
class Group:
    """Runs that differ only by seed, and the label that tells this group from the others."""

    label: str
    runs: list[Run]


def load_run(workdir: str) -> Run:
    """Reads a workdir's (local or gs://) metrics.jsonl (required) and config.json (optional:
    empty config)."""
    path = storage.join(workdir, METRICS_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(f"{workdir} has no {METRICS_FILE}: is it a training workdir?")
    from flax import traverse_util  # JAX: loaded only here, so that input errors come fast.

    records = [json.loads(line) for line in storage.read_text(path).splitlines() if line.strip()]
    config = {}
    config_path = storage.join(workdir, CONFIG_FILE)
    if storage.exists(config_path):
        flat = traverse_util.flatten_dict(json.loads(storage.read_text(config_path)), sep=".")
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in flat.items()}
    return Run(storage.normpath(workdir), config, records)


def _num_classes(workdir: str) -> int | None:
    """The classifier's width, from the metadata of the run's newest checkpoint (None: none)."""
    metas = storage.glob(storage.join(workdir, "checkpoints", "*", "meta", "metadata"))
    steps = sorted((int(p.split("/")[-3]), p) for p in metas if p.split("/")[-3].isdigit())
    if not steps:
        return None
    return int(json.loads(storage.read_text(steps[-1][1]))["num_classes"])


def _hashable(value):
    """JSON lists (of lists) back to the tuples that model fields hold."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list | tuple) else value


_COSTS: dict[tuple, dict | None] = {}


def model_cost(run: Run) -> dict | None:
    """{'params', 'gflops'} of a run's model (forward, one image at its image size), or None
    when the run has no config or checkpoint to say what it is. Cached per model."""
    num_classes = _num_classes(run.workdir)
    if num_classes is None or "model.name" not in run.config or "image_size" not in run.config:
        return None
    fields = {
        k.removeprefix("model."): _hashable(v)
        for k, v in run.config.items()
        if k.startswith("model.") and k != "model.name"
    }
    name, size = run.config["model.name"], int(run.config["image_size"])
    key = (name, num_classes, size, repr(sorted(fields.items())))
    if key not in _COSTS:
        from xception_jax.model import registry  # JAX: only when a cost is asked for.

        model = registry.create_model(name, num_classes=num_classes, **fields)
        _COSTS[key] = registry.forward_cost(model, size)
    return _COSTS[key]


def _cost_cells(run: Run) -> str:
    cost = model_cost(run)
    if cost is None:
        return "- | -"
    return f"{cost['params']:,} | {cost['gflops']:.4g}"


def _short_names(fields: list[str]) -> dict[str, str]:
    """The last dotted part of each field, or more of it where that is ambiguous."""
    names = {}
    for f in fields:
        parts = f.split(".")
        for n in range(1, len(parts) + 1):
            short = ".".join(parts[-n:])
            if sum(g.split(".")[-n:] == parts[-n:] for g in fields) == 1:
                break
        names[f] = short
    return names


def _fmt(value) -> str:
    return "/".join(map(str, value)) if isinstance(value, tuple) else str(value)


def group_runs(runs: list[Run]) -> list[Group]:
    """Groups runs whose configs are equal but for the seed; labels name the differing fields.

    With a single group the label is the common parent directory of its workdirs.
    """
    # Only fields every run has: one that some configs lack was added to the code in between
    # (with a default that keeps old behaviour) and must not split otherwise equal runs.
    keys = sorted(set.intersection(*(set(r.config) for r in runs)) - {SEED_FIELD}) if runs else []
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        key = tuple((k, repr(run.config[k])) for k in keys)
        groups.setdefault(key, []).append(run)
    runs_by_group = list(groups.values())
    differing = [k for k in keys if len({repr(g[0].config.get(k)) for g in runs_by_group}) > 1]
    names = _short_names(differing)
    result = []
    for group in runs_by_group:
        if differing:
            label = ", ".join(f"{names[k]}={_fmt(group[0].config.get(k))}" for k in differing)
        else:
            label = storage.commonpath([r.workdir for r in group]) or group[0].workdir
        result.append(Group(label, group))
    return result


def aggregate(group: Group, key: str, x: str = "wall_time"):
    """(steps, mean of `x`, mean, min, max) of `key` over the group's runs.

    Only steps that every run of the group logged are kept (an unfinished run shortens the
    curve rather than making the mean jump where it stops).
    """
    series = [run.series(key, x) for run in group.runs]
    series = [s for s in series if len(s[0])]
    if not series:
        return None
    steps = series[0][0]
    for s in series[1:]:
        steps = np.intersect1d(steps, s[0])
    if not len(steps):
        return None
    times, values = [], []
    for s_steps, s_times, s_values in series:
        idx = np.searchsorted(s_steps, steps)
        times.append(s_times[idx])
        values.append(s_values[idx])
    times, values = np.stack(times), np.stack(values)
    return steps, times.mean(0), values.mean(0), values.min(0), values.max(0)


X_AXES = {"step": "step", "wall_time": "wall time (s)", "device_hours": "device-hours"}


def plot(
    groups: list[Group],
    log_loss: bool = False,
    title: str | None = None,
    x_axes: tuple[str, ...] = ("step", "wall_time"),
):
    """A matplotlib figure: rows train loss / eval accuracy, one column per x axis of `x_axes`
    (keys of X_AXES: step, wall time, device-hours)."""
    import matplotlib.pyplot as plt

    unknown = [x for x in x_axes if x not in X_AXES]
    if unknown:
        raise ValueError(f"Unknown x axes {unknown}; choose from {sorted(X_AXES)}.")
    width = len(x_axes)
    fig, axes = plt.subplots(2, width, figsize=(5.5 * width, 7.5), sharey="row", squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = (("train_loss", "train loss"), ("eval_accuracy", "eval accuracy"))
    for row, (key, name) in enumerate(panels):
        for col, x_key in enumerate(x_axes):
            ax, xname = axes[row][col], X_AXES[x_key]
            for i, group in enumerate(groups):
                agg = aggregate(group, key, "wall_time" if x_key == "step" else x_key)
                if agg is None:
                    continue
                steps, xs, mean, lo, hi = agg
                x = steps if x_key == "step" else xs
                n = len(group.runs)
                label = f"{group.label} ({n} seeds)" if n > 1 else group.label
                color = colors[i % len(colors)]
                marker = "o" if len(x) < 12 else None
                ax.plot(x, mean, color=color, label=label, lw=1.6, marker=marker, ms=3)
                if n > 1:
                    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
            ax.set_xlabel(xname)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if key == "train_loss" and log_loss:
                ax.set_yscale("log")
    axes[0][0].legend(loc="best", fontsize=9)
    band = " (line: mean over seeds; band: min-max)" if any(len(g.runs) > 1 for g in groups) else ""
    fig.suptitle((title or "Training curves") + band, fontsize=11)
    fig.tight_layout()
    return fig


def _final_and_best(run: Run):
    steps, _, acc = run.series("eval_accuracy")
    if not len(acc):
        return None
    best = int(np.argmax(acc))  # The first step that reached the best accuracy.
    return {
        "steps": int(run.records[-1]["step"]),
        "final": float(acc[-1]),
        "final_step": int(steps[-1]),
        "best": float(acc[best]),
        "best_step": int(steps[best]),
    }


def table(groups: list[Group], digits: int = 4) -> str:
    """Markdown: final and best eval accuracy of every run (values from metrics.jsonl).

    Followed by one line per group with the mean final accuracy over its seeds, and its model's
    parameter count and forward GFLOPs per image (``model_cost``; '-' when unknown).
    """
    f = lambda x: f"{x:.{digits}f}"
    lines = [
        "| run | seed | workdir | final eval acc (step) | best eval acc (step) |",
        "|---|---|---|---|---|",
    ]
    summary = [
        "",
        "| run | seeds | mean final eval acc | min | max | params | GFLOPs/image |",
        "|---|---|---|---|---|---|---|",
    ]
    for group in groups:
        finals = []
        for run in sorted(group.runs, key=lambda r: str(r.config.get(SEED_FIELD, ""))):
            r = _final_and_best(run)
            seed = run.config.get(SEED_FIELD, "")
            if r is None:
                lines.append(f"| {group.label} | {seed} | {run.workdir} | - | - |")
                continue
            finals.append(r["final"])
            lines.append(
                f"| {group.label} | {seed} | {run.workdir} | {f(r['final'])} ({r['final_step']}) "
                f"| {f(r['best'])} ({r['best_step']}) |"
            )
        if finals:
            summary.append(
                f"| {group.label} | {len(finals)} | {f(float(np.mean(finals)))} "
                f"| {f(min(finals))} | {f(max(finals))} | {_cost_cells(group.runs[0])} |"
            )
    return "\n".join(lines + summary) + "\n"


def plot_vs_gflops(groups: list[Group], title: str | None = None):
    """A matplotlib figure: each group's mean final eval accuracy (bar: min-max over seeds)
    against its model's forward GFLOPs per image (log scale when they span more than 3x).
    Groups without a cost or an eval are left out."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vPX"  # With the colours, tells apart points that lie on top of each other.
    for i, group in enumerate(groups):
        finals = [r["final"] for r in map(_final_and_best, group.runs) if r is not None]
        cost = model_cost(group.runs[0])
        if not finals or cost is None:
            continue
        mean = float(np.mean(finals))
        err = [[mean - min(finals)], [max(finals) - mean]]
        ax.errorbar(
            cost["gflops"],
            mean,
            yerr=err,
            fmt=markers[i % len(markers)],
            color=colors[i % len(colors)],
            capsize=3,
            label=group.label,
        )
    xs = [line.get_xdata()[0] for line in ax.lines]
    if xs and max(xs) > 3 * min(xs):  # A log axis only where the costs span a range.
        ax.set_xscale("log")
    ax.margins(x=0.1, y=0.15)
    if xs:  # A legend beside the axes: labels of equal-accuracy points cannot overlap there.
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    ax.set_xlabel("forward GFLOPs per image (XLA cost analysis)")
    ax.set_ylabel("final eval accuracy")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(title or "Final accuracy against compute", fontsize=11)
    fig.tight_layout()
    return fig


def save(fig, out: str) -> list[str]:
    """Writes `out` (PNG, local or gs://) and the same name with .svg; returns the paths."""
    storage.makedirs(storage.dirname(out))
    base, _ = os.path.splitext(out)
    paths = [out, base + ".svg"]
    for path, kwargs in zip(paths, ({"dpi": 90, "format": "png"}, {"format": "svg"}), strict=True):
        image = io.BytesIO()
        fig.savefig(image, **kwargs)
        storage.write_atomic(path, image.getvalue())
    return paths


def _run(workdirs: list[str]) -> None:
    """Expands the workdir patterns, plots, writes the figure and the table."""
    import matplotlib

    matplotlib.use("Agg")
    outputs = [("--out", FLAGS.out), ("--table", FLAGS.table), ("--vs_gflops", FLAGS.vs_gflops)]
    storage.check_all_supported(outputs + [("workdir", w) for w in workdirs])  # Before reading.
    storage.check_writable(outputs)
    unknown = [x for x in FLAGS.x if x not in X_AXES]
    if unknown:
        raise errors.UsageError(f"--x: unknown axes {unknown}; choose from {sorted(X_AXES)}.")
    expanded = []
    for pattern in workdirs:
        matches = storage.glob(pattern) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise FileNotFoundError(
                f"No workdir matches {pattern!r}: check the pattern (quote it, so that curves "
                "expands it, also on gs://)."
            )
        expanded += matches
    groups = group_runs([load_run(w) for w in expanded])
    fig = plot(groups, log_loss=FLAGS.log_loss, title=FLAGS.title, x_axes=tuple(FLAGS.x))
    paths = save(fig, FLAGS.out)
    if FLAGS.vs_gflops:
        paths += save(plot_vs_gflops(groups, title=FLAGS.title), FLAGS.vs_gflops)
    md = table(groups)
    print(md)
    if FLAGS.table:
        storage.write_atomic(FLAGS.table, md)
        paths.append(FLAGS.table)
    print("Wrote " + ", ".join(paths), file=sys.stderr)


def main(argv=None) -> None:
    """Command line (see the module docstring); `argv` without the program name."""
    cli.run_tool(
        _run, FLAGS, __doc__, argv, program="python -m xception_jax.curves", positional="workdir"
    )


if __name__ == "__main__":
    main()
