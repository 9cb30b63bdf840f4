"""Bad input at every entry point: one FATAL line, the right exit code, nothing written or lost.

Each case of CASES runs train.py or a `python -m xception_jax.<tool>` as a user does: a
subprocess, in an empty working directory of its own (every relative output path of a case
lands there). For each it checks: the exit code (2: a usage error, a bad flag or value; 1: a
failure at run time, e.g. an unreadable file or a missing workdir); no traceback; the last
thing on stderr is one `FATAL ...` line (or, for several config errors at once, one line per
error) that names every culprit of the case; the working directory is still empty (no empty
workdir, no partial output, no local `gs:` or `s3:` folder); on gs:// (the emulator), nothing
under the case's own prefix; and a trained workdir given to the command is byte-for-byte
unchanged. `xception_jax.cli.report_errors` is the one place that turns errors into exit codes;
its switch --debug, the kinds of errors and the batch-size hints are checked in process below.
"""

import dataclasses
import hashlib
import math
import os
import re
import shutil
import subprocess
import sys
import uuid

import gcs
import h5py
import numpy as np
import procs
import pytest
from conftest import solid_jpeg

TIMEOUT = 300
CONFIG = os.path.join(procs.REPO, "configs", "default.py")


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input: the entry point, its arguments ({name} filled from `paths`), what must
    happen. `culprits`: texts the FATAL message must contain (the flag, field, path, fix)."""

    tool: str  # 'train.py' or a module of xception_jax: 'predict', ...
    name: str
    args: tuple[str, ...]
    code: int
    culprits: tuple[str, ...]
    lines: int = 1  # Lines of the message (several config errors: one per error).

    @property
    def gs(self) -> bool:
        return any("{gs}" in a for a in self.args)


TRAIN = ("--config={config}", "--workdir=run", "--config.data_dir={digits}")
# Every field that config_checks.validate checks, out of range at once (one line per error).
OUT_OF_RANGE = {
    "eval_batch_size": "0",
    "grad_accum_steps": "0",
    "data_shards": "0",
    "image_size": "8",
    "schedule.base_learning_rate": "0",
    "num_train_steps": "0",
    "num_epochs": "0",
    "eval_every_steps": "0",
    "checkpoint_every_steps": "-1",
    "log_every_steps": "0",
    "ema_decay": "1.5",
    "freeze_backbone_steps": "5",
    "dataset": "imagenet2021",
    "model.depthwise_impl": "fastest",
}
OUT_OF_RANGE_CULPRITS = (
    "config.eval_batch_size=0",
    "config.grad_accum_steps=0",
    "config.data_shards=0",
    "config.image_size=8",
    "config.schedule.base_learning_rate=0",
    "num_train_steps > 0",
    "config.eval_every_steps=0",
    "config.checkpoint_every_steps=-1",
    "config.log_every_steps=0",
    "config.ema_decay=1.5",
    "config.freeze_backbone_steps=5",
    "config.dataset='imagenet2021'",
    "'imagenet2012'",
    "config.model.depthwise_impl",
)
WEIGHTS = ("--config={config}", "--config.data_dir={digits}")

CASES = [
    # ---------------------------------------------------------------- train.py
    Case("train.py", "missing config file", ("--config=nope.py", "--workdir=run"), 2,
         ("--config=nope.py", "No such file", "configs/default.py")),
    Case("train.py", "config file that does not parse", ("--config={inputs}/broken.py",
         "--workdir=run"), 2, ("broken.py", "line 1")),
    Case("train.py", "misspelled flag", ("--config={config}", "--workdri=run"), 2,
         ("'workdri'", "workdir")),
    Case("train.py", "misspelled field", (*TRAIN, "--config.batch_sise=8"), 2,
         ("batch_sise", '"batch_size"', "configs/common.py")),
    Case("train.py", "an argument that is no flag", (*TRAIN, "extra"), 2, ("['extra']",)),
    Case("train.py", "misspelled variant", (*TRAIN, "--config.model.name=xceptoin"), 2,
         ("'xceptoin'", "Did you mean 'xception'")),
    Case("train.py", "every validated field out of range",
         (*TRAIN, *(f"--config.{k}={v}" for k, v in OUT_OF_RANGE.items())), 2,
         OUT_OF_RANGE_CULPRITS, lines=len(OUT_OF_RANGE)),  # A header, a line per error
         # (num_train_steps and num_epochs share one).
    Case("train.py", "negative batch size", (*TRAIN, "--config.batch_size=-3"), 2,
         ("config.batch_size=-3", "use e.g. 16")),
    Case("train.py", "unsupported URL scheme", ("--config={config}", "--workdir=s3://b/run"), 2,
         ("--workdir='s3://b/run'", "s3:// is not supported", "gs://")),
    Case("train.py", "workdir that is a file", ("--config={config}", "--workdir={inputs}/a_file"),
         2, ("a_file is a file", "give a directory")),
    Case("train.py", "empty image folder", (*TRAIN, "--config.dataset=image_folder",
         "--config.image_folder={inputs}/empty"), 1, ("'train' not found", "empty/train")),
    Case("train.py", "missing image folder", (*TRAIN, "--config.dataset=image_folder",
         "--config.image_folder=no_such_folder"), 2, ("config.image_folder", "'no_such_folder'",
         "not a directory")),
    Case("train.py", "image folder without the eval split", (*TRAIN,
         "--config.dataset=image_folder", "--config.image_folder={inputs}/no_test"), 1,
         ("'test' not found", "no_test/test", "['train']")),
    Case("train.py", "workdir of another model", ("--config={config}", "--workdir={workdir}",
         "{small}", "--config.model.residual=False"), 1,
         ("another model", "in the checkpoint, not in this run", "new --workdir"), lines=0),
    Case("train.py", "bad value, workdir on gs://", ("--config={config}", "--workdir={gs}/run",
         "--config.data_dir={digits}", "--config.log_every_steps=0"), 2,
         ("config.log_every_steps=0",)),
    # ---------------------------------------------------------------- aot
    Case("aot", "unknown topology", ("--config={config}", "--topology=v7x-8"), 2,
         ("'v7x-8'", "v5e-N")),
    Case("aot", "missing config file", ("--config=nope.py", "--topology=v5e-4"), 2,
         ("--config=nope.py",)),
    Case("aot", "misspelled field", ("--config={config}", "--topology=v5e-4",
         "--config.modle.name=x"), 2, ("modle", '"model"')),
    Case("aot", "batch size the chips do not divide", ("--config={config}", "--topology=v5e-4",
         "--config.batch_size=6"), 2, ("config.batch_size=6", "4 devices", "use e.g. 16",
         "Use batch_size=16"), lines=3),
    Case("aot", "missing --topology", ("--config={config}",), 2, ("--topology",)),
    # ---------------------------------------------------------------- evaluate
    Case("evaluate", "no weight source", ("--config={config}",), 2,
         ("exactly one of --workdir, --keras_weights and --timm_weights",)),
    Case("evaluate", "missing workdir", ("--workdir=no_such_run",), 1,
         ("'no_such_run' does not exist",)),
    Case("evaluate", "foreign workdir", ("--workdir={inputs}/foreign",), 1,
         ("foreign", "not a training workdir")),
    Case("evaluate", "unknown split", ("--workdir={workdir}", "--split=tset"), 2,
         ("config.eval_split='tset'", "'test'")),
    Case("evaluate", "Keras file that is not HDF5", (*WEIGHTS,
         "--keras_weights={inputs}/garbage.h5"), 1, ("garbage.h5", "HDF5")),
    Case("evaluate", "HDF5 file that is no Keras model", (*WEIGHTS,
         "--keras_weights={inputs}/other.weights.h5"), 1, ("other.weights.h5", "Keras 3")),
    Case("evaluate", "timm file that is not safetensors", (*WEIGHTS,
         "--config.model.name=xception41", "--timm_weights={inputs}/garbage.safetensors"), 1,
         ("garbage.safetensors", "safetensors")),
    Case("evaluate", "misspelled timm variant", (*WEIGHTS, "--config.model.name=xceptoin41",
         "--timm_weights={inputs}/other.safetensors"), 2, ("'xceptoin41'", "xception41")),
    Case("evaluate", "--use_ema with a weight file", (*WEIGHTS, "--use_ema",
         "--keras_weights={inputs}/garbage.h5"), 2, ("--use_ema", "--workdir")),
    Case("evaluate", "unwritable --out", ("--workdir={workdir}",
         "--out={inputs}/a_file/eval.jsonl"), 1, ("--out=", "a_file is a file")),
    Case("evaluate", "unsupported URL scheme", ("--workdir={workdir}", "--out=s3://b/e.jsonl"),
         2, ("--out='s3://b/e.jsonl'",)),
    Case("evaluate", "misspelled field", ("--config={config}", "--config.eval_splt=test",
         "--workdir={workdir}"), 2, ("eval_splt",)),
    # ---------------------------------------------------------------- predict
    Case("predict", "file that is no image", ("--workdir={workdir}", "{inputs}/notes.png"), 1,
         ("notes.png", "not an image", "JPEG, PNG")),
    Case("predict", "truncated image", ("--workdir={workdir}", "{inputs}/truncated.jpg"), 1,
         ("truncated.jpg",)),
    Case("predict", "missing image", ("--workdir={workdir}", "no_such.jpg"), 1,
         ("'no_such.jpg'",)),
    Case("predict", "no image given", ("--workdir={workdir}",), 2, ("image",)),
    Case("predict", "missing workdir", ("--workdir=no_such_run", "{inputs}/ok.jpg"), 1,
         ("'no_such_run' does not exist",)),
    Case("predict", "foreign workdir", ("--workdir={inputs}/foreign", "{inputs}/ok.jpg"), 1,
         ("foreign", "not a training workdir")),
    Case("predict", "timm file without --model", ("--timm_weights={inputs}/other.safetensors",
         "{inputs}/ok.jpg"), 2, ("--timm_weights needs --model",)),
    Case("predict", "misspelled timm variant", ("--timm_weights={inputs}/other.safetensors",
         "--model=xceptoin41", "{inputs}/ok.jpg"), 2, ("'xceptoin41'", "xception41")),
    Case("predict", "timm file of another model", ("--timm_weights={inputs}/other.safetensors",
         "--model=xception41", "{inputs}/ok.jpg"), 1, ("other.safetensors", "does not fit")),
    Case("predict", "unsupported URL scheme", ("--workdir={workdir}", "s3://b/cat.jpg"), 2,
         ("image='s3://b/cat.jpg'",)),
    Case("predict", "bad flag value", ("--workdir={workdir}", "--top_k=five", "{inputs}/ok.jpg"),
         2, ("--top_k", "five")),
    # ---------------------------------------------------------------- export
    Case("export", "no --out", ("--workdir={workdir}",), 2, ("--out",)),
    Case("export", "unwritable --out", ("--workdir={workdir}", "--out={inputs}/a_file/m.jax"), 1,
         ("--out=", "a_file is a file")),
    Case("export", "--out that is a folder", ("--workdir={workdir}", "--out={inputs}/empty"), 1,
         ("empty", "is a directory")),
    Case("export", "unknown platform", ("--workdir={workdir}", "--out=m.jax",
         "--platforms=cpu,gpu"), 2, ("--platforms", "'gpu'", "cuda")),
    Case("export", "refused: EMA of a run without it", ("--workdir={workdir}", "--ema",
         "--out=m.jax"), 2, ("without EMA",)),
    Case("export", "Keras file that is not HDF5", ("--keras_weights={inputs}/garbage.h5",
         "--out=m.jax"), 1, ("garbage.h5", "HDF5")),
    Case("export", "foreign workdir, --out on gs://", ("--workdir={inputs}/foreign",
         "--out={gs}/m.jax"), 1, ("foreign", "not a training workdir")),
    # ---------------------------------------------------------------- prepare_data
    Case("prepare_data", "misspelled dataset", ("--dataset=imagenet2021", "--data_dir=tfds"), 2,
         ("'imagenet2021'", "'imagenet2012'")),
    Case("prepare_data", "ImageNet without its tars", ("--dataset=imagenet2012",
         "--data_dir=tfds", "--manual_dir={inputs}/empty"), 1,
         ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "config.manual_dir")),
    Case("prepare_data", "unsupported URL scheme", ("--dataset=sklearn_digits",
         "--data_dir=s3://b/tfds"), 2, ("'s3://b/tfds'",)),
    Case("prepare_data", "an argument that is no flag", ("imagenet2012",), 2,
         ("['imagenet2012']",)),
    # ---------------------------------------------------------------- sweep
    Case("sweep", "unknown sweep", ("--config={config}", "--sweep_dir=sweep", "--sweep=residul"),
         2, ("'residul'", "'residual'")),
    Case("sweep", "no seeds", ("--config={config}", "--sweep_dir=sweep", "--seeds=0"), 2,
         ("--seeds=0",)),
    Case("sweep", "no --sweep_dir", ("--config={config}",), 2, ("--sweep_dir",)),
    Case("sweep", "missing config file", ("--config=nope.py", "--sweep_dir=sweep"), 2,
         ("--config=nope.py",)),
    Case("sweep", "unsupported URL scheme", ("--config={config}", "--sweep_dir=s3://b/s"), 2,
         ("--sweep_dir='s3://b/s'",)),
    Case("sweep", "run folder that holds another config", ("--config={config}",
         "--sweep_dir={sweep_dir}", "--sweep=residual"), 1,
         ("residual/seed0", "another config", "another --sweep_dir")),
    # ---------------------------------------------------------------- curves
    Case("curves", "pattern that matches nothing", ("{inputs}/nothing_*", "--out=c.png"), 1,
         ("nothing_*", "check the pattern")),
    Case("curves", "folder that is no workdir", ("{inputs}/foreign", "--out=c.png"), 1,
         ("foreign", "metrics.jsonl")),
    Case("curves", "no workdir given", ("--out=c.png",), 2, ("workdir",)),
    Case("curves", "unknown x axis", ("{workdir}", "--out=c.png", "--x=step,epoch"), 2,
         ("--x", "'epoch'")),
    Case("curves", "unwritable --out", ("{workdir}", "--out={inputs}/a_file/c.png"), 1,
         ("--out=", "a_file is a file")),
    Case("curves", "gs:// bucket that does not exist", ("{workdir}",
         "--out=gs://no-such-bucket-xj/c.png"), 1, ("no-such-bucket-xj", "does not exist")),
    Case("curves", "unsupported URL scheme", ("{workdir}", "--out=s3://b/c.png"), 2,
         ("--out='s3://b/c.png'",)),
]  # fmt: skip

TOOLS = ("train.py", "aot", "evaluate", "predict", "export", "prepare_data", "sweep", "curves")


def tree_digest(root: str) -> dict[str, str]:
    """{relative path: sha256 of the content} of every file, and every folder, under `root`."""
    digest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        digest.update({os.path.join(rel, d) + "/": "dir" for d in dirnames})
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                digest[os.path.join(rel, name)] = hashlib.sha256(f.read()).hexdigest()
    return digest


@pytest.fixture(scope="module")
def paths(tiny_run, digits_data_dir, tmp_path_factory):
    """What the cases' {names} stand for: the bad inputs, written once."""
    inputs = tmp_path_factory.mktemp("bad_inputs")
    (inputs / "broken.py").write_text("def get_config(:\n")
    (inputs / "a_file").write_text("a file, not a folder\n")
    (inputs / "notes.png").write_text("meeting notes, not an image\n")
    (inputs / "ok.jpg").write_bytes(solid_jpeg((10, 200, 30)))
    jpeg = solid_jpeg((200, 10, 30), size=(64, 64))
    (inputs / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (inputs / "empty").mkdir()
    (inputs / "no_test" / "train" / "a").mkdir(parents=True)
    (inputs / "no_test" / "train" / "a" / "0.jpg").write_bytes(jpeg)
    (inputs / "foreign").mkdir()
    (inputs / "foreign" / "notes.txt").write_text("not a training workdir\n")
    (inputs / "garbage.h5").write_bytes(np.random.default_rng(0).bytes(4096))
    (inputs / "garbage.safetensors").write_bytes(np.random.default_rng(1).bytes(4096))
    with h5py.File(inputs / "other.weights.h5", "w") as f:  # HDF5, not a Keras model.
        f.create_dataset("table", data=np.arange(10))
    from safetensors.numpy import save_file

    save_file({"classifier.weight": np.zeros((3, 4), np.float32)}, inputs / "other.safetensors")
    # A sweep whose first run folder holds another run (the trained one).
    sweep_dir = tmp_path_factory.mktemp("bad_input_sweep")
    shutil.copytree(tiny_run, sweep_dir / "residual" / "seed0")
    return {
        "config": CONFIG,
        "digits": digits_data_dir,
        "workdir": tiny_run,  # A trained workdir (conftest), checked unchanged by each case.
        "inputs": str(inputs),
        "sweep_dir": str(sweep_dir),
        "small": " ".join(procs.small_overrides(digits_data_dir)),
    }


def command(case: Case, values: dict) -> list[str]:
    """The argv of a case, its {names} filled in ({small}: several arguments)."""
    args = []
    for arg in case.args:
        filled = arg.format(**values)
        args += filled.split(" ") if arg == "{small}" else [filled]
    if case.tool == "train.py":
        return [sys.executable, os.path.join(procs.REPO, "train.py"), *args]
    return [sys.executable, "-m", f"xception_jax.{case.tool}", *args]


def run_case(argv: list[str], cwd) -> subprocess.CompletedProcess:
    env = procs.env_with_devices(1)
    # The code of this checkout (and its configs/, which config_checks imports), from any cwd.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [procs.REPO, env.get("PYTHONPATH")]))
    env.pop("XCEPTION_JAX_DEBUG", None)
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def fatal_message(stderr: str) -> str:
    """The FATAL message at the end of stderr (with its continuation lines)."""
    start = stderr.rfind("\nFATAL ") + 1 if not stderr.startswith("FATAL ") else 0
    assert stderr[start:].startswith("FATAL "), f"no FATAL line at the end:\n{stderr[-3000:]}"
    return stderr[start:].rstrip("\n")


@pytest.mark.parametrize("case", CASES, ids=[f"{c.tool}: {c.name}" for c in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, paths, tmp_path, request):
    values = dict(paths)
    if case.gs:
        emulator = request.getfixturevalue("gcs_emulator")
        values["gs"] = f"gs://{gcs.BUCKET}/{uuid.uuid4().hex[:8]}"
    given = [p for p in (paths["workdir"], paths["sweep_dir"]) if any(p in a for a in
             command(case, values))]  # fmt: skip
    before = {p: tree_digest(p) for p in given}
    cwd = tmp_path / "cwd"
    cwd.mkdir()

    done = run_case(command(case, values), cwd)

    assert done.returncode == case.code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    message = fatal_message(done.stderr)
    if case.lines:
        assert message.count("\n") + 1 == case.lines, message
    for culprit in case.culprits:
        assert culprit in message, (culprit, message)
    assert sorted(os.listdir(cwd)) == []  # Nothing written: no workdir, output, 'gs:' folder.
    for path in given:
        assert tree_digest(path) == before[path], path
    if case.gs:
        assert emulator.objects(values["gs"]) == {}


def test_every_entry_point_has_cases():
    counts = {tool: sum(c.tool == tool for c in CASES) for tool in TOOLS}
    print(f"{len(CASES)} bad-input cases:", counts)  # The table's size per entry point.
    assert min(counts.values()) >= 4, counts
    for code in (1, 2):  # Each exit code is reached from several tools.
        assert len({c.tool for c in CASES if c.code == code}) >= 5, code


# --------------------------------------------------------------------------------------------
# The one error path, in process
# --------------------------------------------------------------------------------------------


def test_flag_errors_come_back_before_jax_loads(tmp_path):
    # A flag error of any tool: only absl was needed, so it is fast and never half-imports JAX.
    script = (
        "import sys\n"
        "from xception_jax import predict\n"
        "try:\n"
        "    predict.main(['--no_such_flag=1'])\n"
        "except SystemExit as e:\n"
        "    print(e.code, sorted(m for m in ('jax', 'tensorflow') if m in sys.modules))\n"
    )
    done = run_case([sys.executable, "-c", script], tmp_path)
    assert done.stdout.split() == ["2", "[]"], done.stderr[-3000:]
    assert done.stderr == (
        "FATAL Flags parsing error: Unknown command line flag 'no_such_flag' (pass --help for "
        "the flags).\n"
    )


def test_debug_shows_the_traceback_with_the_same_exit_code(tmp_path):
    argv = [sys.executable, "-m", "xception_jax.curves", "no_such_*", "--out=c.png"]
    plain = run_case(argv, tmp_path)
    debug = run_case([*argv, "--debug"], tmp_path)
    env_debug = subprocess.run(
        argv,
        cwd=tmp_path,
        env={**procs.env_with_devices(1), "XCEPTION_JAX_DEBUG": "1", "PYTHONPATH": procs.REPO},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert plain.returncode == debug.returncode == env_debug.returncode == 1
    assert "Traceback" not in plain.stderr
    for done in (debug, env_debug):
        assert "Traceback (most recent call last)" in done.stderr
        assert "FileNotFoundError" in done.stderr and 'curves.py", line' in done.stderr
        assert fatal_message(done.stderr) == fatal_message(plain.stderr)
    assert os.listdir(tmp_path) == []


def test_the_handler_keeps_bugs_and_sorts_the_users_errors(capsys):
    from absl import flags

    from xception_jax import cli
    from xception_jax.platform import errors, storage
    from xception_jax.training import checkpoints, config_checks

    usage = (errors.UsageError("u"), config_checks.ConfigError("c"), flags.Error("f"))
    usage += (storage.UnsupportedPathError("s"),)
    runtime = (errors.InputError("i"), checkpoints.CheckpointError("k"))
    runtime += (FileNotFoundError(2, "No such file or directory", "x.png"), PermissionError("p"))
    runtime += (errors.FileFormatError("f"),)
    for error, code in [(e, 2) for e in usage] + [(e, 1) for e in runtime]:
        with pytest.raises(SystemExit) as exit_:
            with cli.report_errors(["tool"]):
                raise error
        assert exit_.value.code == code, error
        assert capsys.readouterr().err.startswith("FATAL ")
    assert "x.png: No such file or directory" in cli.error_message(runtime[2])
    for bug in (ValueError("v"), KeyError("k"), RuntimeError("r"), ZeroDivisionError()):
        with pytest.raises(type(bug)):  # Not caught: the traceback is the report.
            with cli.report_errors(["tool"]):
                raise bug


@pytest.mark.parametrize("devices", [1, 2, 4, 8])
@pytest.mark.parametrize("data_shards", [1, 3, 16])
@pytest.mark.parametrize("grad_accum_steps", [1, 2, 3])
def test_a_suggested_batch_size_passes_every_check(devices, data_shards, grad_accum_steps):
    import ml_collections

    from xception_jax.training import config_checks

    def config(batch_size):
        return ml_collections.ConfigDict(
            dict(
                batch_size=batch_size,
                eval_batch_size=devices,
                data_shards=data_shards,
                grad_accum_steps=grad_accum_steps,
            )
        )

    for batch_size in (-3, 0, 1, 6, 10, 100):
        problems = config_checks.batch_errors(config(batch_size), devices)
        unit = math.lcm(devices * grad_accum_steps, data_shards)
        assert bool(problems) == (batch_size <= 0 or batch_size % unit != 0)
        suggested = {int(n) for p in problems for n in re.findall(r"batch_size=(\d+)", p)}
        suggested |= {int(n) for p in problems for n in re.findall(r"use e\.g\. (\d+)", p)}
        suggested.discard(batch_size)
        for value in suggested:  # Every hint passes every check at once.
            assert config_checks.batch_errors(config(value), devices) == [], (batch_size, value)
        if problems:
            assert suggested, problems
