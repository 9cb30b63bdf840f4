"""Everything on gs://, against a real GCS emulator on loopback (tests/gcs.py).

The workdir and the TFDS data_dir live in the emulator's bucket; `python train.py`, the tools
and the notebook functions run as users run them. The commands are those of the section
"Running on Cloud TPU" of docs/tpu_and_cloud.md, in their emulator form (`emulator_form`); the
last test checks that each of them ran. Each case checks the result against the same thing done
locally, or what the user sees.
"""

import json
import os
import re
import shlex
import subprocess
import sys
import uuid

import conftest
import gcs
import jax
import ml_collections
import numpy as np
import procs
import pytest
from test_input_pipeline import _make_folder
from test_train import read_metrics, small_config

from xception_jax import curves, predict, sweep
from xception_jax.platform import storage
from xception_jax.training import checkpoints, loop

TIMEOUT = 300  # Seconds per process, far above what a run takes on 2 loaded cores.
STEPS = 8
# Fields that measure the machine, not the run.
TIMING = {
    "wall_time",
    "steps_per_sec",
    "images_per_sec",
    "tflops_per_device",
    "input_wait_fraction",
    "host_rss_bytes",
    "device_hours",
}


def one_device():
    return jax.devices()[:1]


def gs_dir(name: str) -> str:
    """A fresh gs:// directory in the test bucket."""
    return f"gs://{gcs.BUCKET}/{uuid.uuid4().hex[:8]}/{name}"


# What the docs call gs://my-bucket: one directory of the emulator's bucket for this module.
BUCKET_ROOT = gs_dir("my-bucket")
CLOUD_DOC = os.path.join("docs", "tpu_and_cloud.md")
CLOUD_SECTION = "## Running on Cloud TPU"
# A command on a line of its own, or inside gcloud's --command "...".
_COMMAND = re.compile(r'^(python (?:train\.py|-m xception_jax).*)$|"[^"]*&& (python [^"]*)"')
RAN = []  # The docs commands (as written there) that the tests below ran.


def cloud_doc_commands() -> list[list[str]]:
    """The `python ...` commands of docs/tpu_and_cloud.md's Cloud TPU section, as argv lists."""
    with open(os.path.join(procs.REPO, CLOUD_DOC)) as f:
        section = f.read().split(CLOUD_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [
        shlex.split(alone or quoted)
        for line in lines
        for alone, quoted in _COMMAND.findall(line.strip())
        if (alone or quoted).startswith(("python train.py", "python -m xception_jax"))
    ]


def cloud_doc_command(tool: str, contains: str = "", excludes: str = "\0") -> list[str]:
    """The one docs command of `tool` ('train.py', 'xception_jax.curves', ...) whose text
    holds `contains` and not `excludes`."""
    found = [
        c
        for c in cloud_doc_commands()
        if tool in c[:3] and contains in shlex.join(c) and excludes not in shlex.join(c)
    ]
    assert len(found) == 1, (tool, contains, found)
    return found[0]


def emulator_form(command: list[str], **fields) -> list[str]:
    """A docs command as it runs here: gs://my-bucket -> BUCKET_ROOT, the digits and
    configs/default.py for ImageNet; `fields` are --config.x=y overrides appended (e.g. fewer
    steps). Flags come as --flag=value. The argv after 'python train.py' or 'python -m'."""
    RAN.append(command)
    out, args = [], iter(command[2:])
    for arg in args:
        arg = arg.replace("gs://my-bucket", BUCKET_ROOT)
        arg = arg.replace("configs/imagenet.py", "configs/default.py")
        arg = "sklearn_digits" if arg == "imagenet2012" else arg
        if out and out[-1].startswith("--") and "=" not in out[-1] and not arg.startswith("--"):
            out[-1] += "=" + arg
        else:
            out.append(arg)
    # The digits are built from scikit-learn, not from tars.
    out = [a for a in out if not a.startswith("--manual_dir=")]
    return out + [f"--config.{k}={v}" for k, v in fields.items()]


def multi_process_args(port: int, process_id: int, workdir: str, **fields) -> list[str]:
    """The docs' GPU-cluster command, emulator form: process `process_id` of 2 on
    127.0.0.1:`port`, writing to `workdir`."""
    argv = emulator_form(cloud_doc_command("train.py", "--coordinator_address"), **fields)
    argv = replaced(
        argv,
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        workdir=workdir,
    )
    return argv + list(procs.FAST_FAIL_FLAGS)


TRAIN_FIELDS = {
    "num_train_steps": STEPS,
    "log_every_steps": 2,
    "checkpoint_every_steps": 2,
    "eval_every_steps": 4,
}


def replaced(argv: list[str], **flags) -> list[str]:
    """`argv` with each --name=... in `flags` given the new value."""
    return [
        f"{a.split('=')[0]}={flags[a[2:].split('=')[0]]}" if a[2:].split("=")[0] in flags else a
        for a in argv
    ]


def main_job_args(workdir=None, data_dir=None):
    """The docs' pod command in emulator form (the main job, STEPS steps), optionally with
    another workdir and data_dir."""
    pod = cloud_doc_command("train.py", excludes="--coordinator_address")
    argv = emulator_form(pod, **TRAIN_FIELDS)
    new = {"workdir": workdir, "config.data_dir": data_dir}
    return replaced(argv, **{k: v for k, v in new.items() if v is not None})


def read_gs_metrics(workdir):
    return [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def assert_bitwise_equal(a, b):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path)
        )


@pytest.fixture
def pool(tmp_path):
    p = procs.ProcessPool(tmp_path)
    yield p
    p.close()


def run_module(args, cwd=procs.REPO, timeout=TIMEOUT):
    """`python -m <args>` with the test environment (one CPU device); the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env=procs.env_with_devices(1),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def gs_data_dir(gcs_emulator):
    """sklearn_digits prepared into a gs:// data_dir by the docs' command."""
    done = run_module(emulator_form(cloud_doc_command("xception_jax.prepare_data")))
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sklearn_digits ready in {BUCKET_ROOT}/tfds" in done.stdout
    return f"{BUCKET_ROOT}/tfds"


@pytest.fixture(scope="module")
def main_job_runs(gs_data_dir, digits_data_dir, tmp_path_factory):
    """The main job (STEPS steps) on gs:// (workdir and data) and locally, side by side.

    Returns (gs workdir, local workdir).
    """
    tmp = tmp_path_factory.mktemp("gs_main_job")
    pool = procs.ProcessPool(tmp)
    try:
        gs_workdir, local_workdir = f"{BUCKET_ROOT}/runs/imagenet", str(tmp / "local")
        on_gs = pool.start(main_job_args(), "gs")
        local = pool.start(main_job_args(local_workdir, digits_data_dir), "local")
        for proc in (on_gs, local):
            assert proc.wait(TIMEOUT) == 0, proc.log()[-4000:]
        return gs_workdir, local_workdir
    finally:
        pool.close()


# --------------------------------------------------------------------------------------------
# The emulator and the clients
# --------------------------------------------------------------------------------------------


def test_clients_are_kept_off_the_metadata_server_from_the_start():
    # Set by conftest before any storage client was imported, inherited by every subprocess.
    assert conftest.CLIENTS_LOADED_BEFORE_ENV == []
    for name, value in gcs.NO_METADATA_SERVER.items():
        assert os.environ[name] == value, name
    for name in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
        assert os.environ[name].startswith("127.0.0.1:")
    for name in ("TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST", "https_proxy"):
        assert os.environ[name].startswith("http://127.0.0.1:"), name
    assert "127.0.0.1" in os.environ["no_proxy"]


def test_storage_functions_on_gs_and_locally(gcs_emulator, tmp_path):
    for root in (gs_dir("unit"), str(tmp_path / "unit")):
        storage.makedirs(storage.join(root, "a", "b"))
        storage.write_atomic(storage.join(root, "a", "b", "f.txt"), "one")
        storage.write_atomic(storage.join(root, "a", "b", "f.txt"), "two")
        storage.write_atomic(storage.join(root, "a", "g.bin"), b"\x00\x01")
        assert storage.read_text(storage.join(root, "a", "b", "f.txt")) == "two"
        assert storage.read_bytes(storage.join(root, "a", "g.bin")) == b"\x00\x01"
        assert storage.isdir(storage.join(root, "a")) and not storage.exists(f"{root}/zz")
        assert sorted(storage.listdir(storage.join(root, "a"))) == ["b", "g.bin"]
        assert storage.subdirs(storage.join(root, "a")) == ["b"]
        assert storage.dirname(storage.join(root, "a", "g.bin")) == storage.abspath(f"{root}/a")

        log = storage.LineFile(storage.join(root, "log.jsonl"))
        assert log.read() == []
        log.append(["1", "2"])
        log.append(["3"])
        assert storage.LineFile(log.path).read() == ["1", "2", "3"]
        log.rewrite(["1"])
        log.append(["4"])
        assert storage.LineFile(log.path).read() == ["1", "4"]

        storage.move_tree(storage.join(root, "a"), storage.join(root, "moved"))
        assert not storage.exists(storage.join(root, "a", "b", "f.txt"))
        assert storage.read_text(storage.join(root, "moved", "b", "f.txt")) == "two"
        assert storage.read_bytes(storage.join(root, "moved", "g.bin")) == b"\x00\x01"
    assert storage.normpath("gs://b/x//y/../z/") == "gs://b/x/z"
    assert storage.commonpath(["gs://b/x/s0", "gs://b/x/s1"]) == "gs://b/x"
    assert storage.abspath("runs/x") == os.path.abspath("runs/x")


def test_image_folder_and_weight_files_on_gs_read_as_locally(
    gcs_emulator, tmp_path, data_config, color_of_label, jpeg_of_color
):
    import itertools

    import h5py

    from xception_jax.data import pipeline, sources
    from xception_jax.weights import keras_weights

    local = tmp_path / "folder"
    _make_folder(local, jpeg_of_color, color_of_label)
    remote = gs_dir("folder")
    for file in local.rglob("*"):
        if file.is_file():
            storage.write_atomic(f"{remote}/{file.relative_to(local)}", file.read_bytes())
    batches = {}
    for root in (str(local), remote):
        config = data_config(
            dataset="image_folder", image_folder=root, eval_split="val", image_size=20,
            batch_size=8, eval_batch_size=4,
        )  # fmt: skip
        info = sources.get_dataset_info(config)
        train = list(itertools.islice(pipeline.train_iterator(config), 3))
        batches[root] = (info, train, list(pipeline.eval_iterator(config)))
    (info, train, evals), (gs_info, gs_train, gs_evals) = batches.values()
    assert gs_info == info and info.class_names == ("cat", "dog", "eel")
    for a, b in zip(train + evals, gs_train + gs_evals, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])

    # A weight file on gs:// reaches h5py (this one is HDF5, but no Keras file).
    h5 = tmp_path / "w.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("x", data=np.arange(3))
    storage.write_atomic(f"{remote}/w.h5", h5.read_bytes())
    with pytest.raises(ValueError, match="is neither a legacy Keras weight file"):
        keras_weights.read_layers(f"{remote}/w.h5")
    with pytest.raises(ValueError, match="Cannot open .* as HDF5"):
        keras_weights.read_layers(f"{remote}/train/cat/img0.jpg")


# --------------------------------------------------------------------------------------------
# train.py on gs://
# --------------------------------------------------------------------------------------------


def test_main_job_on_gs_equals_the_same_run_locally(main_job_runs, gcs_emulator):
    gs_workdir, local_workdir = main_job_runs
    on_gs, local = read_gs_metrics(gs_workdir), read_metrics(local_workdir)
    assert [r["step"] for r in on_gs] == [2, 4, 6, 8]
    assert without_timing(on_gs) == without_timing(local)
    assert on_gs[-1]["eval_accuracy"] > 0  # An eval ran, on the gs:// data.
    # Everything at the top of the workdir, as in a local one (the shared-workdir token gone).
    top = files_under(gcs_emulator, gs_workdir.removeprefix(f"gs://{gcs.BUCKET}/") + "/")
    assert top["config.json"] > 0 and top["metrics.jsonl"] > 0
    assert [n for n in top if n.startswith("events.out.tfevents.") and top[n] > 0]
    assert not [n for n in top if n.startswith(".shared_workdir_check")]
    # max_to_keep (3): checkpoints 4, 6, 8 are kept, each committed.
    assert checkpoints.create_manager(gs_workdir, read_only=True).all_steps() == [4, 6, 8]


def test_sigkill_mid_save_and_mid_run_and_a_damaged_checkpoint_then_rerun_equals_the_uninterrupted_gs_run(  # noqa: E501
    main_job_runs, gs_data_dir, gcs_emulator, pool
):
    uninterrupted, _ = main_job_runs
    workdir = gs_dir("killed")
    args = main_job_args(workdir)
    root = workdir.removeprefix(f"gs://{gcs.BUCKET}/")
    prefix = root + "/checkpoints/"

    def saving_step_4():  # On gs:// orbax writes in place and commits with a marker object.
        names = gcs_emulator.objects(prefix)
        started = any(n.startswith(prefix + "4/") for n in names)
        return started and prefix + "4/commit_success.txt" not in names

    def saved_step_4():  # The rerun has resumed from 2 and written 4 again, whole.
        return prefix + "4/commit_success.txt" in gcs_emulator.objects(prefix + "4/")

    for moment, name in ((saving_step_4, "kill_mid_save"), (saved_step_4, "kill_mid_run")):
        proc = pool.start(args, name)
        procs.wait_for(moment, [proc], TIMEOUT, name, poll=0.01)
        proc.kill_group()  # SIGKILL: no handler, no cleanup, no flush.
    # Then the newest complete checkpoint is damaged: every array file overwritten.
    steps = checkpoints.create_manager(workdir, read_only=True).all_steps()
    newest, previous = steps[-1], steps[-2]
    data = [n for n in gcs_emulator.objects(f"{prefix}{newest}/") if "/d/" in n]
    assert data
    for name in data:
        storage.write_atomic(f"gs://{gcs.BUCKET}/{name}", b"garbage")
    damaged = files_under(gcs_emulator, f"{prefix}{newest}/")

    final = pool.start(args, "final")
    assert final.wait(TIMEOUT) == 0, final.log()[-4000:]
    assert f"checkpoints/{newest} is unreadable" in final.log()
    assert f"Resumed from checkpoint {previous}" in final.log()
    # Moved aside whole (copied, then removed from checkpoints/), nothing deleted.
    assert files_under(gcs_emulator, f"{root}/{checkpoints.UNREADABLE_DIR}/{newest}/") == damaged

    resumed, expected = checkpoints.load(workdir)[1], checkpoints.load(uninterrupted)[1]
    assert_bitwise_equal(resumed, expected)
    assert [r["step"] for r in read_gs_metrics(workdir)] == [2, 4, 6, 8]
    assert without_timing(read_gs_metrics(workdir)) == without_timing(
        read_gs_metrics(uninterrupted)
    )


def files_under(emulator, prefix):
    """{name below prefix: size} of the objects under prefix, without directory markers."""
    objects = emulator.objects(prefix).items()
    return {n.removeprefix(prefix): size for n, size in objects if not n.endswith("/")}


# Tiny and short: the docs' GPU-cluster command as 2 processes on loopback.
TWO_PROCESS_FIELDS = {
    "image_size": 32,
    "batch_size": 16,
    "eval_batch_size": 64,
    "num_train_steps": 2,
    "eval_every_steps": 1000,
    "checkpoint_every_steps": 2,
}


def two_process_job(pool, workdirs, name):
    """Starts the 2 processes, process i writing to workdirs[i]."""
    port = procs.free_port()
    return [
        pool.start(multi_process_args(port, i, workdir, **TWO_PROCESS_FIELDS), f"{name}_{i}")
        for i, workdir in enumerate(workdirs)
    ]


def test_two_processes_with_different_gs_workdirs_fail_the_shared_workdir_check(
    gs_data_dir, gcs_emulator, pool
):
    job = two_process_job(pool, [gs_dir("p0"), gs_dir("p1")], "split")
    codes = [proc.wait(TIMEOUT) for proc in job]
    assert codes == [1, 1], [p.log()[-3000:] for p in job]
    for proc in job:
        assert "Process(es) [1] do not see the workdir that process 0 writes" in proc.log()


# --------------------------------------------------------------------------------------------
# Tools on a gs:// workdir
# --------------------------------------------------------------------------------------------


def test_load_curves_predict_and_sweep_on_gs(main_job_runs, gcs_emulator, capsys):
    gs_workdir, local_workdir = main_job_runs
    # checkpoints.load, the notebook's entry point.
    model, variables, config = checkpoints.load(gs_workdir)
    _, local_variables, local_config = checkpoints.load(local_workdir)
    assert_bitwise_equal(variables, local_variables)
    assert config.class_names == local_config.class_names

    # curves: a gs:// workdir in, PNG / SVG / table out to gs://.
    curves.main(emulator_form(cloud_doc_command("xception_jax.curves", "runs/imagenet"))[1:])
    for name in ("curves.png", "curves.svg", "eval.md"):
        assert storage.exists(f"{gs_workdir}/{name}"), name
    assert storage.read_bytes(f"{gs_workdir}/curves.png").startswith(b"\x89PNG")
    assert gs_workdir in storage.read_text(f"{gs_workdir}/eval.md")

    # predict: a gs:// workdir and a gs:// image; the answer of the run's own model.
    encoded, _ = predict.eval_examples(config, 1)
    storage.write_atomic(f"{BUCKET_ROOT}/images/cat.jpg", encoded[0])
    capsys.readouterr()
    predict.main(emulator_form(cloud_doc_command("xception_jax.predict"))[1:])
    label, p = predict.predict(encoded, model, variables, config.class_names, config.image_size)[0][
        0
    ]
    assert f"{p:7.4f}  {label}" in capsys.readouterr().out

    # sweep: the docs' dry run prints the commands and writes nothing; then the same sweep,
    # short, trains each variant into gs://.
    sweep_dir = f"{BUCKET_ROOT}/sweeps/residual"
    command = emulator_form(cloud_doc_command("xception_jax.sweep"))
    dry = run_module(command)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert f"--workdir={sweep_dir}/no_residual/seed0" in dry.stdout
    assert not gcs_emulator.objects(sweep_dir.removeprefix(f"gs://{gcs.BUCKET}/"))
    short = {"image_size": 32, "batch_size": 16, "num_train_steps": 2, "eval_every_steps": 2}
    command = [a for a in command if a != "--dry_run"] + [
        f"--config.{k}={v}" for k, v in short.items()
    ]
    done = run_module(command, timeout=2 * TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for variant in ("residual", "no_residual"):
        workdir = f"{sweep_dir}/{variant}/seed0"
        assert [r["step"] for r in read_gs_metrics(workdir)] == [2]
        assert "Model xception_tiny" in storage.read_text(f"{workdir}/train.log")
        # What a second `sweep` would do: see this run's config and final checkpoint on gs://.
        written = ml_collections.ConfigDict(json.loads(storage.read_text(f"{workdir}/config.json")))
        assert sweep.status(written, workdir) == "done"
    # curves with a gs:// pattern (no shell can expand it): both variants, one figure.
    curves.main(emulator_form(cloud_doc_command("xception_jax.curves", "*"))[1:])
    table = capsys.readouterr().out
    assert "residual=True" in table and "residual=False" in table
    assert storage.exists(f"{sweep_dir}/curves.png")


def test_fine_tuning_from_a_gs_workdir(main_job_runs, gs_data_dir, gcs_emulator, tmp_path):
    gs_workdir, _ = main_job_runs
    config = small_config(gs_data_dir, num_train_steps=2, eval_every_steps=2)
    config.init_from_workdir = gs_workdir
    config.freeze_backbone_steps = 2
    workdir = gs_dir("finetuned")
    state = loop.train_and_evaluate(config, workdir, one_device())
    _, source, _ = checkpoints.load(gs_workdir)
    # A frozen backbone: bitwise the source run's after its steps.
    backbone = {k: v for k, v in state.params.items() if k != "predictions"}
    assert_bitwise_equal(backbone, {k: v for k, v in source["params"].items() if k in backbone})
    assert checkpoints.create_manager(workdir, read_only=True).all_steps() == [2]


def test_gs_checkpoint_of_another_model_or_a_newer_layout_is_refused_untouched(
    main_job_runs, gs_data_dir, gcs_emulator
):
    # The last user of the main job's gs:// workdir: this test rewrites its newest meta.
    workdir, _ = main_job_runs
    prefix = workdir.removeprefix(f"gs://{gcs.BUCKET}/") + "/"
    config = small_config(gs_data_dir, **TRAIN_FIELDS)
    before = files_under(gcs_emulator, prefix)
    config.model.width_multiplier = 0.5  # xception_tiny has 0.25.
    with pytest.raises(checkpoints.CheckpointError, match=f"Checkpoint {STEPS} .* another model"):
        loop.train_and_evaluate(config, workdir, one_device())
    config.model.width_multiplier = 0.25
    meta = f"{checkpoints.checkpoint_dir(workdir)}/{STEPS}/meta/metadata"
    newer = json.loads(storage.read_text(meta))
    newer["layout_version"] = checkpoints.LAYOUT_VERSION + 1
    storage.write_atomic(meta, json.dumps(newer))
    before_layout = files_under(gcs_emulator, prefix)
    with pytest.raises(checkpoints.CheckpointError, match="has layout version 2, this code reads"):
        loop.train_and_evaluate(config, workdir, one_device())
    after = files_under(gcs_emulator, prefix)
    assert after == before_layout and after.keys() == before.keys()


# --------------------------------------------------------------------------------------------
# Schemes nothing here supports
# --------------------------------------------------------------------------------------------


def test_s3_is_a_clear_error_before_anything_is_written(
    digits_data_dir, tmp_path, monkeypatch, capsys
):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(procs.REPO, "train.py"),
            f"--config={os.path.join(procs.REPO, 'configs/default.py')}",
            "--workdir=s3://my-bucket/runs/x",
            f"--config.data_dir={digits_data_dir}",
        ],
        cwd=cwd,
        env=procs.env_with_devices(1),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]  # A usage error.
    assert "--workdir='s3://my-bucket/runs/x': s3:// is not supported" in proc.stderr
    assert "orbax 0.12.8 cannot checkpoint to s3://" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(cwd.iterdir()) == []
    with pytest.raises(storage.UnsupportedPathError, match="workdir='s3://b/x'"):
        checkpoints.load("s3://b/x")
    done = run_module(
        ["xception_jax.prepare_data", "--dataset", "sklearn_digits", "--data_dir", "s3://b/tfds"],
        cwd=cwd,
    )
    assert done.returncode == 2 and "--data_dir='s3://b/tfds'" in done.stderr
    monkeypatch.chdir(cwd)
    for main, argv, what in (
        (curves.main, ["runs/x", "--out", "s3://b/c.png"], "--out"),
        (predict.main, ["--workdir", "s3://b/run", "cat.jpg"], "--workdir"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert f"{what}='s3://" in capsys.readouterr().err
    assert list(cwd.iterdir()) == []


def test_every_cloud_doc_command_ran_here():
    # Run after the tests above (one module runs in file order on one worker).
    assert cloud_doc_commands(), f"{CLOUD_DOC} section {CLOUD_SECTION!r} has no python command"
    missing = [shlex.join(c) for c in cloud_doc_commands() if c not in RAN]
    assert missing == []


def test_no_local_folder_named_after_a_scheme_was_left(tmp_path_factory):
    roots = [procs.REPO, str(tmp_path_factory.getbasetemp().parent), conftest.GCS_DIR]
    found = [
        os.path.join(dirpath, name)
        for root in roots
        for dirpath, dirnames, _ in os.walk(root)
        for name in dirnames
        if name in ("gs:", "s3:") and ".git" not in dirpath
    ]
    assert found == []
