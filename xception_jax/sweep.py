"""Ablation sweeps: run named sets of config variants, one workdir per variant and seed.

Usage: python -m xception_jax.sweep --config configs/default.py --sweep residual --sweep_dir D

    python -m xception_jax.sweep --config configs/default.py --sweep residual \
        --sweep_dir runs/sweep_residual --seeds 3 [--dry_run] [--config.x=y ...]

Each run is `<sweep_dir>/<variant>/seed<k>` and is trained by its own `python train.py ...`
subprocess (a crash or a memory leak in one run cannot take the others down; each gets a fresh
process). The exact commands are printed first, so that they can be launched in parallel on a
cluster instead (`--dry_run` prints them and stops). Runs whose final checkpoint exists are
skipped; an interrupted run resumes from its newest checkpoint when the sweep is run again.
Every `--config.x=y` given to the sweep is passed on to each run. Seed k of a sweep trains with
`config.seed + k`. Plot the result with `python -m xception_jax.curves <sweep_dir>/*/seed*`.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time

from absl import flags
from ml_collections import config_flags

from xception_jax import cli
from xception_jax.platform import errors, storage
from xception_jax.training import recipes

# name -> list of (variant name, {dotted config field: value}).
SWEEPS: dict[str, list[tuple[str, dict]]] = {
    # The paper's Figure 9: with and without residual connections.
    "residual": [
        ("residual", {"model.residual": True}),
        ("no_residual", {"model.residual": False}),
    ],
    # The paper's Figure 10: the activation between the depthwise and the pointwise conv.
    "activation": [
        (f"act_{a}", {"model.intermediate_activation": a}) for a in ("none", "elu", "relu")
    ],
}
# The paper's open question (c): the order of the separable convs' halves.
SWEEPS["order"] = [
    (order, {"model.separable_order": order}) for order in ("depthwise_first", "pointwise_first")
]
# Question (d): channels per independent segment of the separable convs' 3x3 conv, from
# depthwise (1) to a regular conv (-1). Values the model cannot take are left out at run time.
SWEEPS["segments"] = [(f"cpg{g}", {"model.channels_per_group": g}) for g in (1, 2, 4, 8)] + [
    ("regular", {"model.channels_per_group": -1})
]
SWEEPS["segments_residual"] = [
    (f"{sn}-{rn}", {**sv, **rv})
    for (sn, sv), (rn, rv) in itertools.product(SWEEPS["segments"], SWEEPS["residual"])
]
# The paper's recipe against the modern RandAugment recipe (xception_jax.training.recipes),
# crossed with residual connections: do they matter as much under stronger regularisation?
# Without residual connections there is no branch for drop path to drop: it is off there.
SWEEPS["recipe"] = [
    (
        f"{recipe}-{rn}",
        {**fields, **rv, **({} if rv["model.residual"] else {"model.drop_path_rate": 0.0})},
    )
    for recipe, fields in recipes.RECIPES.items()
    for rn, rv in SWEEPS["residual"]
]
SWEEPS["all"] = [
    (f"{rn}-{an}", {**rv, **av})
    for (rn, rv), (an, av) in itertools.product(SWEEPS["residual"], SWEEPS["activation"])
]

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/default.py", "Base experiment config file.")
flags.DEFINE_string("sweep", "residual", f"Named set of variants: one of {sorted(SWEEPS)}.")
flags.DEFINE_string(
    "sweep_dir", None, "Directory (local or gs://) that receives one workdir per run."
)
flags.DEFINE_integer("seeds", 1, "Runs per variant, with config.seed + 0, 1, ...")
flags.DEFINE_bool("dry_run", False, "Print the commands and stop.")


class SweepDirError(errors.InputError, ValueError):
    """A run folder of the sweep that holds a run of another config (exit 1, nothing touched)."""


def _format_value(value) -> str:
    """A config value as ml_collections' command-line override syntax expects it."""
    if isinstance(value, str):
        return value
    return json.dumps(value) if not isinstance(value, bool) else str(value)


def config_overrides(argv: list[str]) -> list[str]:
    """The `--config.x=y` arguments of a command line, in order (`--config.x y` joined)."""
    overrides = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config."):
            if "=" not in arg and i + 1 < len(argv):
                arg = f"{arg}={argv[i + 1]}"
            overrides.append(arg)
    return overrides


def plan(sweep: str, sweep_dir: str, seeds: int, base_seed: int) -> list[dict]:
    """The runs of a sweep: [{'name', 'workdir', 'fields' (dotted -> value incl. seed)}]."""
    if sweep not in SWEEPS:
        raise errors.UsageError(
            f"Unknown sweep {sweep!r} (--sweep); named sweeps: {sorted(SWEEPS)}."
        )
    if seeds < 1:
        raise errors.UsageError(f"--seeds={seeds} must be >= 1.")
    runs = []
    for name, fields in SWEEPS[sweep]:
        for k in range(seeds):
            runs.append(
                {
                    "name": f"{name}/seed{k}",
                    "workdir": storage.join(sweep_dir, name, f"seed{k}"),
                    "fields": {**fields, "seed": base_seed + k},
                }
            )
    return runs


def command(config_file: str, workdir: str, fields: dict, overrides: list[str]) -> list[str]:
    """The `python train.py ...` argv that trains one run (the sweep's overrides go first)."""
    script = TRAIN_SCRIPT
    if os.path.dirname(script) == os.getcwd():
        script = "train.py"
    argv = ["python", script, f"--config={config_file}", f"--workdir={workdir}", *overrides]
    argv += [f"--config.{k}={_format_value(v)}" for k, v in fields.items()]
    return argv


def resolved_config(config, fields: dict):
    """A copy of `config` with the dotted `fields` set (what train.py will resolve)."""
    config = config.copy_and_resolve_references()
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise errors.UsageError(f"The config has no field {dotted!r} to sweep over.")
        node[leaf] = value
    return config


def model_refuses(config) -> str | None:
    """Why `config.model` cannot be built (a field value its variant refuses), or None."""
    if config.model.get("channels_per_group", 1) in (1, -1):
        return None  # Every variant takes these: no need to trace the model.
    from xception_jax.model import registry

    try:
        fields = {k: v for k, v in config.model.items() if k != "name"}
        registry.create_model(config.model.name, **fields)
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def status(config, workdir: str) -> str:
    """'new', 'partial' or 'done' for a run's workdir; raises if it holds another config."""
    from flax import traverse_util  # JAX: loaded only here, so that flag errors come back fast.

    config_file = storage.join(workdir, "config.json")
    if not storage.exists(config_file):
        return "new"
    have = traverse_util.flatten_dict(json.loads(storage.read_text(config_file)), sep=".")
    want = traverse_util.flatten_dict(json.loads(config.to_json_best_effort()), sep=".")
    # Fields only one side has come from another code version (a field added since): ignored.
    differ = sorted(k for k in set(have) & set(want) if have[k] != want[k])
    if differ:
        raise SweepDirError(
            f"{workdir} holds a run of another config (fields {differ} differ: "
            f"{[(k, have.get(k), want.get(k)) for k in differ[:4]]}); use another --sweep_dir "
            "or delete that workdir."
        )
    num_steps = config.num_train_steps
    if num_steps <= 0:  # Derived from num_epochs: ask the dataset (imports TensorFlow).
        from xception_jax.data import sources
        from xception_jax.training import optim

        info = sources.get_dataset_info(config)
        num_steps = optim.total_steps(config, info.num_train_examples)
    done = storage.isdir(storage.join(workdir, "checkpoints", str(num_steps)))
    return "done" if done else "partial"


def run_one(argv: list[str], workdir: str, flush_every_s: float = 10.0) -> int:
    """Runs one training command, echoing its output and keeping it in `workdir/train.log`.

    The log is written every `flush_every_s` seconds and at the end (on gs:// each write
    uploads the whole log: storage.LineFile).
    """
    storage.makedirs(workdir)
    log = storage.LineFile(storage.join(workdir, "train.log"))
    argv = [sys.executable, *argv[1:]]  # The printed 'python' is this interpreter.
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    pending, last_flush = [], time.monotonic()
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            pending.append(line.rstrip("\n"))
            if time.monotonic() - last_flush > flush_every_s:
                log.append(pending)
                pending, last_flush = [], time.monotonic()
        return proc.wait()
    finally:
        log.append(pending)


def run_sweep(
    config, config_file: str, sweep: str, sweep_dir: str, seeds: int, overrides, dry_run=False
) -> dict[str, str]:
    """Prints every run's command, then trains the runs that are not done, one after another.

    Returns {run name: 'done' | 'skipped' | 'failed (exit N)' | 'planned'}.
    """
    runs = plan(sweep, sweep_dir, seeds, int(config.seed))
    refused = {}
    for run in runs:
        # Fails now on a field the config lacks; a model field value the variant cannot take
        # (e.g. a channels_per_group that does not divide its widths) drops that run.
        reason = model_refuses(resolved_config(config, run["fields"]))
        if reason:
            refused[run["name"]] = reason
    for name, reason in refused.items():
        print(f"# Left out {name}: {reason}")
    runs = [run for run in runs if run["name"] not in refused]
    commands = {}
    print(f"# Sweep {sweep!r}: {len(runs)} runs under {sweep_dir}. Commands (one per run):")
    for run in runs:
        commands[run["name"]] = command(config_file, run["workdir"], run["fields"], overrides)
        print(shlex.join(commands[run["name"]]))
    sys.stdout.flush()
    if dry_run:
        return {run["name"]: "planned" for run in runs}
    results = {}
    for i, run in enumerate(runs, start=1):
        state = status(resolved_config(config, run["fields"]), run["workdir"])
        if state == "done":
            print(f"# [{i}/{len(runs)}] {run['name']}: finished already, skipped.")
            results[run["name"]] = "skipped"
            continue
        verb = "resuming" if state == "partial" else "starting"
        print(f"# [{i}/{len(runs)}] {run['name']}: {verb} in {run['workdir']}")
        sys.stdout.flush()
        start = time.time()
        rc = run_one(commands[run["name"]], run["workdir"])
        if rc == 0:
            results[run["name"]] = "done"
        elif status(resolved_config(config, run["fields"]), run["workdir"]) == "done":
            # The final checkpoint is complete: a crash on the way out loses nothing.
            results[run["name"]] = f"done (but the process exited with {rc} after it)"
        else:
            results[run["name"]] = f"failed (exit {rc})"
        print(
            f"# [{i}/{len(runs)}] {run['name']}: {results[run['name']]} in "
            f"{time.time() - start:.0f} s"
        )
    print("# Summary: " + ", ".join(f"{k}: {v}" for k, v in results.items()))
    pattern = f'"{sweep_dir}/*/seed*"'  # Quoted: curves expands it (also on gs://).
    print(f"# Curves: python -m xception_jax.curves {pattern} --out {sweep_dir}/curves.png")
    return results


def _run(args: list[str]) -> None:
    """Runs (or, with --dry_run, plans) the sweep the flags name."""
    if not FLAGS.sweep_dir:
        raise errors.UsageError("--sweep_dir is required (e.g. --sweep_dir runs/sweep_residual).")
    storage.check_all_supported([("--sweep_dir", FLAGS.sweep_dir)])
    config_file = config_flags.get_config_filename(FLAGS["config"])
    results = run_sweep(
        FLAGS.config,
        config_file,
        FLAGS.sweep,
        FLAGS.sweep_dir,
        FLAGS.seeds,
        config_overrides(sys.argv[1:]),
        dry_run=FLAGS.dry_run,
    )
    failed = [k for k, v in results.items() if v.startswith("failed")]
    if failed:
        raise errors.InputError(f"{len(failed)} run(s) failed: {failed}; see their train.log.")


def main(argv=None) -> None:
    """Command line (see the module docstring); `argv` without the program name."""
    cli.run_tool(_run, FLAGS, __doc__, argv, program="python -m xception_jax.sweep")


if __name__ == "__main__":
    main()
