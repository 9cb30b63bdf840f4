"""Every command and Python example of the documentation runs here, so the docs cannot rot.

tests/doc_blocks.py finds the snippets of README.md and docs/*.md: each ```python block, each
`python train.py ...` / `python -m xception_jax.<tool> ...` command (in ```bash blocks and in
inline code), each tool named in inline code, and each ```bash block without such a command.
FORMS says how each one runs here, keyed by a substring of "<file> § <chapter> § <kind> §
<text>": as written, or in its tiny form where the real one needs a TPU, ImageNet, a downloaded
weight file or a long run. A snippet that no key or two keys match fails
test_every_snippet_has_exactly_one_form, naming it; so does a key that matches nothing.

Everything runs in a sandbox directory that looks like the repository to the commands
(configs/ and train.py link to the real ones, data/tfds to the digits that conftest prepared,
docs/figures/ is an empty folder), so that relative paths work as written and nothing is
written into the repository. What the examples name is made there once, on first use
(Sandbox.MAKERS): the runs they read (TRAINED: `runs/default`, `runs/ft`, ...) by the docs'
own commands (2 steps), Keras's and timm's weight files by Keras and timm (random weights; a
Keras 3 transfer model's `.keras` and `.weights.h5` too), the images to classify, ImageNet
prepared by the docs' own prepare_data command from conftest's fake ILSVRC2012 tars. `train.py`
runs as a subprocess (in the background, while other tests run), the tools through their
`main(argv)` (what `python -m` calls) in this process and the python blocks with exec, all with
the sandbox as the working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys

import doc_blocks
import numpy as np
import procs
import pytest

TIMEOUT = 900  # Seconds per train.py process, far above what a tiny run takes.
BACKGROUND = 2  # train.py processes at a time, beside this one's work.
# The tiny form of a training command: 2 steps, an eval and a checkpoint at step 2.
TINY = (
    "--config.num_train_steps=2",
    "--config.eval_every_steps=2",
    "--config.checkpoint_every_steps=2",
    "--config.log_every_steps=1",
    "--config.batch_size=16",
)
MAIN_JOB = "python train.py --config configs/default.py --workdir runs/default"
KERAS_FILE = "xception_weights_tf_dim_ordering_tf_kernels.h5"
# The full Xception's smallest input: the examples with the full model run at it.
SMALL = "--config.image_size=71"
# docs/weights_in_and_out.md's fine-tune, the run its Keras exports read.
FT_JOB = (
    "python train.py --config configs/finetune.py --workdir runs/ft"
    f" --config.init_from_keras={KERAS_FILE.replace('.h5', '_notop.h5')}"
    " --config.image_folder=photos"
)
# docs/research_switches.md's runs with each switch, the order/segments curves read them.
ORDER_JOB = (
    "python train.py --config configs/default.py --workdir runs/pointwise_first"
    " --config.model.separable_order=pointwise_first"
)
SEGMENTS_JOB = (
    "python train.py --config configs/default.py --workdir runs/cpg4"
    " --config.model.channels_per_group=4"
)
# The xception41 run that docs/weights_in_and_out.md exports to timm (no page trains one).
X41_RUN = (
    "train.py",
    "--config",
    "configs/default.py",
    "--workdir",
    "runs/x41",
    "--config.model.name=xception41",
    *TINY,
    SMALL,
)
# The workdirs the examples read: trained by a command of the docs (its tiny form) or by an
# argv of their own, in the background from the first test on (Sandbox.prestart).
TRAINED = {
    "runs/default": MAIN_JOB,
    "runs/ft": FT_JOB,
    "runs/pointwise_first": ORDER_JOB,
    "runs/cpg4": SEGMENTS_JOB,
    "runs/x41": X41_RUN,
}


def doc_table(path: str, header: str) -> str:
    """The markdown table of `path` whose first line is `header`, as lines of text."""
    with open(os.path.join(procs.REPO, path)) as f:
        lines = f.read().splitlines()
    start = lines.index(header)
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end]) + "\n"


# What docs/research_switches.md's python block prints: the table under it.
COST_TABLE = doc_table(
    "docs/research_switches.md",
    "| separable_order | channels_per_group | parameters | GFLOPs / image (299 px) |",
)
# Keras 3 files of a transfer model, written by Keras (tests/keras_archives.py's Xception, at
# its 80 px): `Sequential([Xception(include_top=False, pooling="avg"), Dense(2)])`, 2 classes
# as the noise images, saved whole (`model.keras`) and as weights (`x.weights.h5`).
_KERAS_ARCHIVE_SCRIPT = """
import sys
import keras
import keras_archives
import numpy as np

keras.utils.set_random_seed(0)
size = keras_archives.SIZE
model = keras.Sequential(
    [keras.Input((size, size, 3)), keras_archives.xception(pooling="avg"), keras.layers.Dense(2)]
)
keras_archives.randomise_batchnorms(model, np.random.default_rng(0))
model.save(sys.argv[1] + "/model.keras")
model.save_weights(sys.argv[1] + "/x.weights.h5")
"""


@dataclasses.dataclass(frozen=True)
class Form:
    """How a snippet runs here.

    how: 'train' (a train.py subprocess), 'tool' (the tool's main in this process), 'python'
      (exec), 'aot' (what aot checks before it compiles: flags, config, slice names, batch
      sizes; a test never compiles for a TPU), 'same_as' (its tiny form trains the same config
      as `same_as`'s: asserted, and that one runs), 'test_gcs' (run by tests/test_gcs.py
      against the GCS emulator: asserted that it reads exactly these commands), 'name' (a tool
      named in prose: it exists), 'ci' (the test command: asserted to be a line of .ci/run),
      'not_run' (`why` says why).
    subs: (old, new) text replacements, in order; `{name}` in `new` is a sandbox file or
      folder (Sandbox.MAKERS), made first.
    extra: arguments appended (tiny-form flags; later --config.x= flags win).
    setup: python run before a python block (binds its placeholders).
    needs: sandbox things made before it runs.
    expect: text its output must contain (a python block's: what it prints).
    process: a python block runs in a process of its own with one CPU device (else in this
      process, with the session's 8).
    """

    how: str
    subs: tuple = ()
    extra: tuple = ()
    setup: str = ""
    needs: tuple = ()
    expect: str = ""
    same_as: str = ""
    why: str = ""
    process: bool = False


# Keyed by a substring of "<file> § <chapter> § <kind> § <text>" (doc_blocks.Snippet); exactly
# one key per snippet.
FORMS = {
    # A tool named in prose (`python -m xception_jax.aot`): the tool exists.
    "§ name § ": Form("name"),
    # ---- train.py ------------------------------------------------------------------------
    f"§ {MAIN_JOB}": Form("train", extra=TINY),  # README's fresh machine, benchmarks.md
    "--workdir runs/nores --config.model.residual=False": Form("train", extra=TINY),
    "--config.image_folder=/data/mine": Form(  # At the main job's 48 px, not the config's 128.
        "train", subs=(("/data/mine", "{noise_folder}"),), extra=(*TINY, "--config.image_size=48")
    ),
    FT_JOB: Form(
        "train", subs=(("=photos", "={noise_folder}"),), extra=(*TINY, SMALL), needs=("keras",)
    ),
    "configs/finetune.py --workdir runs/finetune": Form(  # training.md's: the same fine-tune
        "same_as",
        subs=(("/path/to/root", "{noise_folder}"),),
        extra=(*TINY, SMALL),
        same_as=FT_JOB,
    ),
    ORDER_JOB: Form("train", extra=TINY),
    # The grouped conv's CPU form compiles and runs slowly: at 32 px.
    SEGMENTS_JOB: Form("train", extra=(*TINY, "--config.image_size=32")),
    "--workdir runs/digits_augmented": Form("train", extra=TINY),
    "--workdir runs/imagenet --config.data_dir=gs://my-bucket/tfds": Form(
        "same_as",
        subs=(("configs/imagenet.py", "configs/default.py"), ("gs://my-bucket/tfds", "data/tfds")),
        extra=TINY,
        same_as=MAIN_JOB,
    ),
    "--workdir /shared/runs/x --config.data_dir=/shared/tfds": Form(  # srun: one process here
        "same_as",
        subs=(("configs/imagenet.py", "configs/default.py"), ("/shared/tfds", "data/tfds")),
        extra=TINY,
        same_as=MAIN_JOB,
    ),
    "requirements-test.txt": Form("ci"),
    # ---- tools on the trained run --------------------------------------------------------
    "evaluate --workdir runs/default --split test": Form(
        "tool", needs=("runs/default",), expect='"count": 450'
    ),
    "predict --workdir runs/default digit.png --top_k 3": Form(
        "tool", needs=("runs/default", "images"), expect="digit.png"
    ),
    "export --workdir runs/default --out model.jaxexport": Form("tool", needs=("runs/default",)),
    # Sweeps print their train.py commands (--dry_run); the curves read the trained run.
    "sweep --config configs/default.py --sweep residual --sweep_dir runs/sweep --seeds 3": Form(
        "tool", extra=("--dry_run",), expect="--workdir=runs/sweep/no_residual/seed2"
    ),
    "curves runs/sweep/*/seed* --out curves.png --table table.md": Form(
        "tool", subs=(("runs/sweep/*/seed*", "runs/default"),), needs=("runs/default",)
    ),
    "curves runs/sweep/*/seed* --out c.png --x step,device_hours": Form(
        "tool", subs=(("runs/sweep/*/seed*", "runs/default"),), needs=("runs/default",)
    ),
    "--sweep_dir /tmp/sweep_dh": Form(
        "tool", subs=(("/tmp/sweep_dh", "runs/sweep_dh"),), extra=("--dry_run",)
    ),
    '"/tmp/sweep_dh/*/seed*" --out docs/figures/curves_device_hours.png': Form(
        "tool", subs=(('"/tmp/sweep_dh/*/seed*"', "runs/default"),), needs=("runs/default",)
    ),
    "--sweep residual --sweep_dir runs/ablations/residual --seeds 3": Form(
        "tool", extra=("--dry_run",), expect="--workdir=runs/ablations/residual/residual/seed2"
    ),
    "--sweep activation --sweep_dir runs/ablations/activation --seeds 2": Form(
        "tool", extra=("--dry_run",), expect="--workdir=runs/ablations/activation/act_relu/seed1"
    ),
    "curves runs/ablations/residual/*/seed* --log_loss": Form(
        "tool",
        subs=(("runs/ablations/residual/*/seed*", "runs/default"),),
        needs=("runs/default", "runs/ablations/residual"),
    ),
    "curves runs/ablations/activation/*/seed* --log_loss": Form(
        "tool",
        subs=(("runs/ablations/activation/*/seed*", "runs/default"),),
        needs=("runs/default", "runs/ablations/activation"),
    ),
    "--sweep order --sweep_dir runs/order": Form(
        "tool", extra=("--dry_run",), expect="--workdir=runs/order/pointwise_first/seed0"
    ),
    "--sweep segments --sweep_dir runs/segments": Form(
        "tool", extra=("--dry_run",), expect="--workdir=runs/segments/regular/seed0"
    ),
    "--sweep segments_residual --sweep_dir runs/segments_residual": Form(
        "tool",
        extra=("--dry_run",),
        expect="--workdir=runs/segments_residual/regular-no_residual/seed0",
    ),
    # The sweep's (dry) run: the recipe's four variants.
    "--sweep recipe --sweep_dir runs/recipe --dry_run": Form(
        "tool", expect="--workdir=runs/recipe/modern_ra-no_residual/seed0"
    ),
    # Two points of each sweep: the main job's run and the docs' run with the switch.
    'curves "runs/order/*/seed*" --out runs/order/curves.png': Form(
        "tool",
        subs=(('"runs/order/*/seed*"', "runs/default runs/pointwise_first"),),
        needs=("runs/default", "runs/pointwise_first"),
        expect="separable_order=pointwise_first",
    ),
    'curves "runs/segments/*/seed*" --out runs/segments/curves.png': Form(
        "tool",
        subs=(('"runs/segments/*/seed*"', "runs/default runs/cpg4"),),
        needs=("runs/default", "runs/cpg4"),
        expect="channels_per_group=4",
    ),
    "--out docs/figures/research_order_curves.png": Form(
        "tool",
        subs=(('"runs/order/*/seed*"', "runs/default runs/pointwise_first"),),
        needs=("runs/default", "runs/pointwise_first"),
        expect="separable_order=pointwise_first",
    ),
    "--out docs/figures/research_segments_curves.png": Form(
        "tool",
        subs=(('"runs/segments/*/seed*"', "runs/default runs/cpg4"),),
        needs=("runs/default", "runs/cpg4"),
        expect="channels_per_group=4",
    ),
    "--out docs/figures/research_segments_residual_curves.png": Form(
        "tool",
        subs=(('"runs/segments_residual/*/seed*"', "runs/default runs/cpg4"),),
        needs=("runs/default", "runs/cpg4"),
        expect="channels_per_group=4",
    ),
    # ---- weight files out: the fine-tune's run (the `xception` model) to Keras, xception41 to
    # timm (timm's file in its own folder: model.safetensors here is timm's xception65) ---------
    "--workdir runs/ft --format keras --out model.keras": Form(
        "tool", needs=("runs/ft",), expect="input 71 px"
    ),
    "--workdir runs/ft --format keras --out model.weights.h5": Form(
        "tool", needs=("runs/ft",), expect="keras.applications.Xception(classes=2)"
    ),
    "--workdir runs/x41 --format timm --out model.safetensors": Form(
        "tool",
        subs=(("--out model.safetensors", "--out exports/model.safetensors"),),
        needs=("runs/x41", "exports"),
        expect="xception41",
    ),
    # ---- tools on ImageNet and weight files: conftest's fake ILSVRC2012 tars ----------------
    "--data_dir ~/tensorflow_datasets --manual_dir ~/ilsvrc2012": Form(
        "tool",
        subs=(("~/tensorflow_datasets", "tfds_imagenet"), ("~/ilsvrc2012", "{imagenet_tars}")),
        expect="imagenet2012 ready in",
    ),
    "--data_dir D --manual_dir M": Form(
        "tool",
        subs=(
            ("--data_dir D", "--data_dir tfds_imagenet"),
            ("--manual_dir M", "--manual_dir {imagenet_tars}"),
        ),
        expect="imagenet2012 ready in",
    ),
    f"--keras_weights {KERAS_FILE} --config.data_dir=D": Form(
        "tool",
        subs=(("--config.data_dir=D", "--config.data_dir={imagenet_data}"),),
        extra=(SMALL, "--config.eval_batch_size=8"),
        needs=("keras",),
        expect='"count": 3',
    ),
    "--timm_weights model.safetensors --config.model.name=xception65 --config.data_dir=D": Form(
        "tool",
        subs=(("--config.data_dir=D", "--config.data_dir={imagenet_data}"),),
        extra=(SMALL, "--config.eval_batch_size=8"),
        needs=("timm",),
        expect='"count": 3',
    ),
    f"predict --keras_weights {KERAS_FILE} cat.jpg": Form(
        "tool", extra=("--image_size=71",), needs=("keras", "images"), expect=" (n"
    ),
    "predict --timm_weights model.safetensors --model xception65 cat.jpg": Form(
        "tool", extra=("--image_size=71",), needs=("timm", "images"), expect=" (n"
    ),
    # Keras 3 files saved by Keras (a transfer model, 2 classes; Sandbox._keras_archive).
    "predict --keras_weights model.keras --image_size 80 cat.jpg": Form(
        "tool",
        subs=(("model.keras", "{keras_archive}/model.keras"),),
        needs=("images",),
        expect="cat.jpg",
    ),
    "--keras_weights x.weights.h5 --config.image_folder=photos": Form(
        "tool",
        subs=(
            ("x.weights.h5", "{keras_archive}/x.weights.h5"),
            ("=photos", "={noise_folder}"),
        ),
        extra=("--config.image_size=80", "--config.eval_batch_size=8"),
        expect='"count": 16',
    ),
    # ---- aot: the commands' flags, configs and slices; no TPU compile in a test ------------
    "§ python -m xception_jax.aot ": Form("aot"),
    # ---- gs:// on Cloud TPU: tests/test_gcs.py runs each against the GCS emulator ----------
    "docs/tpu_and_cloud.md § Running on Cloud TPU § command § ": Form("test_gcs"),
    # ---- python blocks ---------------------------------------------------------------------
    "print(config.model.name, xception_jax.count_params": Form("python", needs=("runs/default",)),
    'create_model("xception_tiny", num_classes=10)': Form("python"),
    f'xception_jax.load_keras("{KERAS_FILE}")': Form(
        "python",
        setup="import numpy as np\nuint8_images = np.zeros((2, 71, 71, 3), np.uint8)",
        needs=("keras",),
    ),
    'xception_jax.load_timm("model.safetensors", "xception65", output_stride=16)': Form(
        "python", needs=("timm",)
    ),
    "replay.restore_for_replay(": Form(  # A process of one device, as the main job's run.
        "python",
        subs=(("gs://my-bucket/runs/imagenet", "runs/default"), ("123000", "2")),
        needs=("runs/default",),
        process=True,
    ),
    'xception_jax.load("gs://my-bucket/runs/imagenet")  # or on gs://': Form(
        "python",
        subs=(("gs://my-bucket/runs/imagenet", "runs/default"),),
        setup="import numpy as np\nuint8_images = np.zeros((2, 48, 48, 3), np.uint8)",
        needs=("runs/default",),
    ),
    'export.deserialize(open("model.jaxexport", "rb").read())': Form(
        "python", needs=("model.jaxexport",)
    ),
    'model, variables = xception_jax.load_keras("model.keras")': Form(
        "python", subs=(('"model.keras"', '"{keras_archive}/model.keras"'),)
    ),
    'xception_jax.load("runs/ft")': Form("python", needs=("runs/ft",)),
    "registry.forward_cost(model, 299)": Form("python", expect=COST_TABLE),
    "config = modern_ra.get_config()": Form("python", expect="randaugment_layers: 2"),
    # ---- shell blocks without a command of this project ------------------------------------
    "git clone <this repository>": Form(
        "not_run", why="sets up TPU VMs with gcloud: needs a TPU and Google Cloud"
    ),
    "python benchmarks/ops.py": Form(
        "not_run",
        why="benchmarks, run by hand (minutes each); tests/test_ops.py checks what they time",
    ),
    "python benchmarks/input_pipeline.py --augment": Form(
        "not_run",
        why="a benchmark, run by hand on the fake ImageNet JPEGs (minutes); tests/test_augment.py"
        " checks the ops it times",
    ),
}


def match_text(snippet: doc_blocks.Snippet) -> str:
    return f"{snippet.file} § {snippet.chapter} § {snippet.kind} § {snippet.text}"


def keys_of(snippet: doc_blocks.Snippet) -> list[str]:
    return [key for key in FORMS if key in match_text(snippet)]


SNIPPETS = doc_blocks.all_snippets()


def _unique(snippets):
    """One test per distinct (kind, text): the same command in two pages runs once."""
    seen = {}
    for s in snippets:
        seen.setdefault((s.kind, s.text), s)
    return list(seen.values())


# --------------------------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------------------------


def test_every_snippet_has_exactly_one_form():
    assert len(SNIPPETS) > 40, "the parser found too few snippets"
    problems = [
        f"{s}: {'no form in FORMS' if not keys_of(s) else f'several forms: {keys_of(s)}'}"
        for s in SNIPPETS
        if len(keys_of(s)) != 1
    ]
    assert problems == [], "\n".join(problems)
    unused = [key for key in FORMS if not any(key in match_text(s) for s in SNIPPETS)]
    assert unused == [], f"FORMS keys that match no snippet: {unused}"


def test_the_parser_finds_blocks_inline_commands_and_continuations(tmp_path, monkeypatch):
    page = tmp_path / "docs" / "page.md"
    page.parent.mkdir()
    page.write_text(
        "# T\n\nRun `python -m xception_jax.evaluate --workdir\nruns/x` or `python train.py`.\n"
        "## A\n\n```bash\n# a comment\npython train.py --config c \\\n    --workdir w  # why\n"
        'ssh h --command "cd x && python -m xception_jax.predict --workdir w a.png"\n```\n\n'
        "  ```python\n  print(1)\n  ```\n\n```bash\npip install x\n```\n\n```text\nnot code\n```\n"
    )
    monkeypatch.setattr(doc_blocks, "REPO", str(tmp_path))
    found = [(s.line, s.kind, s.text, s.chapter) for s in doc_blocks.snippets("docs/page.md")]
    assert found == [
        (3, "command", "python -m xception_jax.evaluate --workdir runs/x", ""),
        (4, "name", "python train.py", ""),
        (7, "command", "python train.py --config c --workdir w", "A"),
        (7, "command", "python -m xception_jax.predict --workdir w a.png", "A"),
        (14, "python", "print(1)\n", "A"),
        (18, "shell", "pip install x\n", "A"),
    ]
    page.write_text("```sh\npython train.py\n```\n")
    with pytest.raises(ValueError, match="a ```sh block"):
        doc_blocks.snippets("docs/page.md")
    page.write_text("Train:\n\n    python train.py --config c\n")
    with pytest.raises(ValueError, match="3: a command in an indented code block"):
        doc_blocks.snippets("docs/page.md")


def test_relative_links_and_figures_resolve():
    broken = []
    for path in doc_blocks.doc_files():
        with open(os.path.join(procs.REPO, path)) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                resolved = os.path.join(procs.REPO, os.path.dirname(path), target)
                if not os.path.exists(resolved):
                    broken.append(f"{path}: {target}")
    assert broken == []


# --------------------------------------------------------------------------------------------
# The sandbox
# --------------------------------------------------------------------------------------------


class Sandbox:
    """A folder that looks like the repository to the commands; things made there once.

    The train.py runs go on in the background, BACKGROUND at a time, while the tests that do
    not need them run: `prestart` queues those of the selected tests at the first test.
    """

    def __init__(self, root, digits_data_dir):
        self.root = root
        self.request = None  # The current test's, for conftest's session fixtures.
        self.made = {}
        self.runs = {}  # argv -> output of a command that ran (each runs once)
        self.procs = {}  # train.py argv -> (Popen, log path)
        self.queue = []  # train.py argvs waiting to start
        self.started = False
        for name in ("configs", "train.py"):
            os.symlink(os.path.join(procs.REPO, name), os.path.join(root, name))
        os.makedirs(os.path.join(root, "docs", "figures"))
        os.makedirs(os.path.join(root, "data"))
        # configs/default.py's data_dir.
        os.symlink(digits_data_dir, os.path.join(root, "data", "tfds"))

    def path(self, name):
        return os.path.join(self.root, name)

    def need(self, name):
        """Makes `name` (a key of MAKERS, or a folder to create) once; its path."""
        if name not in self.made:
            maker = self.MAKERS.get(name)
            if maker is None:
                os.makedirs(self.path(name), exist_ok=True)
                self.made[name] = self.path(name)
            else:
                self.made[name] = maker(self)
        return self.made[name]

    # -- train.py in the background ----------------------------------------------------------

    def prestart(self, items) -> None:
        """Queues the train.py runs of the selected tests (the main job first)."""
        self.started = True
        texts = [
            item.callspec.params["snippet"].text
            for item in items
            if item.module.__name__ == __name__ and item.originalname == "test_snippet"
        ]
        trains = [t for t in texts if FORMS[keys_of(snippet_of(t))[0]].how == "train"]
        needed = [TRAINED[n] for t in texts for n in form_of(t).needs if n in TRAINED]
        for run in sorted(dict.fromkeys(trains + needed), key=lambda t: t != MAIN_JOB):
            if isinstance(run, str):  # A command of the docs.
                form = form_of(run)
                for name in form.needs:
                    self.need(name)
                run = tuple(tiny_argv(self, run, form))
            if run not in self.queue and run not in self.procs:
                self.queue.append(run)
            self.top_up()

    def start(self, argv: tuple) -> None:
        if argv in self.procs:
            return
        if argv in self.queue:
            self.queue.remove(argv)
        log = self.path(f"train_{len(self.procs)}.log")
        with open(log, "w") as out:
            popen = subprocess.Popen(
                [sys.executable, *argv],
                cwd=self.root,
                env=subprocess_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Its own process group: killed whole on failure.
            )
        self.procs[argv] = (popen, log)

    def top_up(self) -> None:
        """Starts queued runs while fewer than BACKGROUND run."""
        while self.queue and sum(p.poll() is None for p, _ in self.procs.values()) < BACKGROUND:
            self.start(self.queue[0])

    def wait(self, argv: tuple) -> tuple[int, str]:
        """Runs `python *argv` (if not started yet) and waits: (exit code, its log)."""
        self.start(argv)
        popen, log = self.procs[argv]
        try:
            code = popen.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            raise
        finally:
            self.top_up()
        with open(log) as f:
            return code, f.read()

    def close(self) -> None:
        for popen, _ in self.procs.values():
            if popen.poll() is None:
                os.killpg(popen.pid, signal.SIGKILL)
                popen.wait()

    # -- makers --------------------------------------------------------------------------

    def _trained(self, workdir):
        """`workdir` of TRAINED, trained by its command."""
        run = TRAINED[workdir]
        if isinstance(run, str):
            run_snippet_text(self, run)
        else:
            run_train(self, list(run))
        return self.path(workdir)

    def _export(self):
        run_snippet_text(
            self, "python -m xception_jax.export --workdir runs/default --out model.jaxexport"
        )
        return self.path("model.jaxexport")

    def _keras(self):
        from conftest import write_random_keras_h5

        path = write_random_keras_h5(self.path(KERAS_FILE), classes=1000)
        # "The file with or without top": the classifier is replaced either way.
        os.symlink(path, self.path(KERAS_FILE.replace(".h5", "_notop.h5")))
        return path

    def _timm(self):
        from conftest import torch_timm
        from safetensors.torch import save_file

        torch, timm = torch_timm()
        torch.manual_seed(0)
        model = timm.create_model("xception65", num_classes=1000).eval()
        save_file(model.state_dict(), self.path("model.safetensors"))
        return self.path("model.safetensors")

    def _images(self):
        from PIL import Image

        rng = np.random.default_rng(0)
        for name, size in (("digit.png", (40, 40)), ("cat.jpg", (120, 90))):
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(self.path(name))
        return self.root

    def _keras_archive(self):
        """A folder with `model.keras` and `x.weights.h5`, written by Keras in a subprocess."""
        folder = self.path("keras_archive")
        os.makedirs(folder)
        env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
        env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
        env["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))  # keras_archives
        subprocess.run(
            [sys.executable, "-c", _KERAS_ARCHIVE_SCRIPT, folder],
            env=env,
            check=True,
            timeout=300,
        )
        return folder

    def _imagenet_tars(self):
        return self.request.getfixturevalue("fake_imagenet").manual_dir

    def _imagenet_data(self):
        # Prepared by the docs' own command (its tiny form: the fake tars).
        run_snippet_text(
            self,
            "python -m xception_jax.prepare_data --dataset imagenet2012"
            " --data_dir D --manual_dir M",
        )
        return self.path("tfds_imagenet")

    def _noise_folder(self):
        return self.request.getfixturevalue("noise_image_folder")

    MAKERS = {
        **{workdir: lambda self, w=workdir: self._trained(w) for workdir in TRAINED},
        "model.jaxexport": _export,
        "keras": _keras,
        "keras_archive": _keras_archive,
        "timm": _timm,
        "images": _images,
        "imagenet_tars": _imagenet_tars,
        "imagenet_data": _imagenet_data,
        "noise_folder": _noise_folder,
    }


@pytest.fixture(scope="module")
def module_sandbox(tmp_path_factory, digits_data_dir):
    box = Sandbox(str(tmp_path_factory.mktemp("docs_sandbox")), digits_data_dir)
    yield box
    box.close()


@pytest.fixture
def sandbox(module_sandbox, request, monkeypatch):
    """The module's Sandbox, as the working directory of the test."""
    module_sandbox.request = request
    monkeypatch.chdir(module_sandbox.root)
    if not module_sandbox.started:
        module_sandbox.prestart(request.session.items)
    module_sandbox.top_up()
    return module_sandbox


# --------------------------------------------------------------------------------------------
# Running a snippet's form
# --------------------------------------------------------------------------------------------


def snippet_of(text: str) -> doc_blocks.Snippet:
    return next(s for s in SNIPPETS if s.text == text)


def form_of(text: str) -> Form:
    (key,) = keys_of(snippet_of(text))
    return FORMS[key]


def substituted(box: Sandbox, text: str, form: Form) -> str:
    for old, new in form.subs:
        assert old in text, f"{old!r} is not in {text!r}: update FORMS"
        new = re.sub(r"\{(\w+)\}", lambda m: box.need(m.group(1)), new)
        text = text.replace(old, new)
    return text


def tiny_argv(box: Sandbox, text: str, form: Form) -> list[str]:
    """The command's argv in its tiny form (after 'python')."""
    argv = shlex.split(substituted(box, text, form))
    assert argv[0] == "python", argv
    return [*argv[1:], *form.extra]


def run_snippet_text(box: Sandbox, text: str) -> str:
    """Runs the command `text` (as the docs write it) in its form, once; its output."""
    form = form_of(text)
    for name in form.needs:
        box.need(name)
    argv = tiny_argv(box, text, form)
    key = tuple(argv)
    if key not in box.runs:
        if form.how == "train":
            box.runs[key] = run_train(box, argv)
        elif form.how == "tool":
            box.runs[key] = run_tool(argv[1], argv[2:])
        else:
            raise AssertionError(f"{text}: cannot run a {form.how!r} form")
    out = box.runs[key]
    assert form.expect in out, f"{text}: {form.expect!r} not in the output:\n{out[-3000:]}"
    return out


def subprocess_env() -> dict:
    """The session's environment (its compilation cache), one CPU device, the repository on
    the path (the configs import `configs.common`)."""
    env = procs.env_with_devices(1)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (procs.REPO, env.get("PYTHONPATH")) if p)
    return env


def run_train(box: Sandbox, argv: list[str]) -> str:
    """`python train.py ...` (argv) in the sandbox (1 CPU device); its log. Checks its records."""
    code, log = box.wait(tuple(argv))
    assert code == 0, log[-5000:]
    with open(os.path.join(box.root, flag_value(argv, "--workdir"), "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert records[-1]["step"] == 2 and "eval_accuracy" in records[-1], records[-1]
    return log


def flag_value(argv: list[str], flag: str) -> str:
    """The value of `flag` in `argv` (`--flag=value` or `--flag value`)."""
    for i, arg in enumerate(argv):
        if arg == flag:
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"no {flag} in {argv}")


def train_config(argv: list[str]) -> dict:
    """The config that `python train.py *argv` would train (its --config with the overrides)."""
    from absl import flags
    from ml_collections import config_flags

    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    flags.DEFINE_string("workdir", None, "", flag_values=values)
    saved, sys.argv = sys.argv, ["train.py", *argv]  # config_flags reads overrides there
    try:
        values(sys.argv)
    finally:
        sys.argv = saved
    return values.config.to_dict()


@contextlib.contextmanager
def config_overrides_removed(flag_values):
    """ml_collections defines a flag per --config.x override when it parses one; the next
    in-process run of a tool with the same override would find it defined twice."""
    try:
        yield
    finally:
        for name in [n for n in flag_values if n.startswith("config.")]:
            delattr(flag_values, name)


def run_tool(module: str, args: list[str]) -> str:
    """`python -m <module> *args` through the tool's main in this process; its stdout."""
    tool = importlib.import_module(module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), config_overrides_removed(tool.FLAGS):
        try:
            if module == "xception_jax.sweep":  # Reads its --config.x overrides in sys.argv.
                saved, sys.argv = sys.argv, [module, *args]
                try:
                    tool.main(args)
                finally:
                    sys.argv = saved
            else:
                tool.main(args)
        except SystemExit as e:
            assert e.code in (0, None), f"{module} {args}: exit {e.code}\n{out.getvalue()}"
    return out.getvalue()


def run_python(box: Sandbox, snippet: doc_blocks.Snippet, form: Form) -> None:
    for name in form.needs:
        box.need(name)
    source = f"{form.setup}\n{substituted(box, snippet.text, form)}"
    if form.process:
        done = subprocess.run(
            [sys.executable, "-c", source],
            cwd=box.root,
            env=subprocess_env(),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, f"{snippet}:\n{done.stderr[-5000:]}"
        out = done.stdout
    else:
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            exec(compile(source, snippet.where, "exec"), {"__name__": "__doc_example__"})
        out = printed.getvalue()
    assert form.expect in out, f"{snippet}: {form.expect!r} not in what it printed:\n{out[-3000:]}"


def check_aot(text: str) -> None:
    """What `aot` checks before it compiles: its flags and config, the slices' names, the
    batch sizes on each slice. The compile itself (libtpu, minutes for the full model) is not
    run: a test never compiles for a TPU (tests/test_aot.py compiles the tiny model only)."""
    from xception_jax import aot, cli
    from xception_jax.training import config_checks

    argv = shlex.split(text)[2:]
    assert argv[0] == "xception_jax.aot", argv
    with config_overrides_removed(aot.FLAGS):
        assert cli.parse_tool_flags(aot.FLAGS, argv, aot.__doc__) == []
        for name in aot.FLAGS.topology:
            topology = aot.parse_topology(name)
            if not aot.FLAGS.find_max_batch:
                config = aot.FLAGS.config
                errors = config_checks.batch_errors(config, topology.chips, topology.hosts)
                assert errors == [], (name, errors)


@pytest.mark.parametrize("snippet", _unique(SNIPPETS), ids=str)
def test_snippet(snippet, sandbox):
    (key,) = keys_of(snippet)
    form = FORMS[key]
    if form.how in ("train", "tool"):
        run_snippet_text(sandbox, snippet.text)
    elif form.how == "python":
        run_python(sandbox, snippet, form)
    elif form.how == "aot":
        check_aot(snippet.text)
    elif form.how == "same_as":
        # The same config as a command that runs (the workdir aside): that run covers it.
        mine = tiny_argv(sandbox, snippet.text, form)
        theirs = tiny_argv(sandbox, form.same_as, form_of(form.same_as))
        assert train_config(mine[1:]) == train_config(theirs[1:]), (mine, theirs)
        run_snippet_text(sandbox, form.same_as)
    elif form.how == "test_gcs":
        import test_gcs

        path, chapter = snippet.file, snippet.chapter
        assert [shlex.split(c) for c in doc_blocks.chapter_commands(path, chapter)] == (
            test_gcs.cloud_doc_commands()
        ), f"tests/test_gcs.py must run the commands of {path} '## {chapter}'"
        assert shlex.split(snippet.text) in test_gcs.cloud_doc_commands()
    elif form.how == "ci":
        with open(os.path.join(procs.REPO, ".ci", "run")) as f:
            assert snippet.text.strip() in f.read().splitlines()
    elif form.how == "name":
        program = snippet.text.split()[-1]
        if program == "train.py":
            assert os.path.exists(os.path.join(procs.REPO, "train.py"))
        else:
            assert importlib.util.find_spec(program) is not None, program
    elif form.how == "not_run":
        assert form.why
    else:
        raise AssertionError(f"{snippet}: unknown form {form.how!r}")
