"""Xception on CPU: this codebase against the peers a user would pick instead, in one run.

Measures, for each system and image size, a full training step (forward, backward, SGD with
momentum 0.9, BatchNorm in training mode, float32, 1000 classes) and inference (BatchNorm with
running statistics): images/s (median of the timed steps after a warm-up), the time of the
first call (compile + first step for XLA systems, first eager step for the others), for this
codebase the train step's compile time alone (trace, lower and XLA compile, timed ahead of the
first call), and the peak resident memory (ru_maxrss) after inference and after training.

Systems (``--systems``):
  flax            this codebase: ``xception_jax.training.steps.train_step`` (the step train.py
                  jits, with buffer donation) and ``eval``-mode ``model.apply``; ``flax:IMPL``
                  picks the depthwise implementation (``taps``, ``taps_vjp``, ``lax``; default: the
                  backend's); ``flax:IMPL@DIR`` imports xception_jax from DIR instead (e.g. an
                  older version: ``git archive REV xception_jax | tar -x -C DIR``);
                  ``flax:IMPL+remat`` sets the model's ``remat`` (recompute, less memory).
  keras-tf        Keras 3 ``keras.applications.Xception`` (the reference), TensorFlow backend,
                  ``train_on_batch`` / ``predict_on_batch`` (Keras's defaults: no XLA on CPU).
  keras-jax       the same model with the JAX backend (jitted by Keras).
  timm            timm ``legacy_xception`` on PyTorch CPU, eager, channels_last.

Every (system, size) runs in its own subprocess, so the peak memory is that system's alone; the
order of the systems alternates between repetitions, so slow drift of the machine's load (the
cores may be shared) hits every system alike. The table gives the median over repetitions and
the load average seen. timm runs under ``--torch-python`` (default ``.venv-peers/bin/python``
when present): install it as benchmarks/requirements-peers.txt says.

  python benchmarks/compare.py                                   # everything, both sizes
  python benchmarks/compare.py --sizes 128:32 --systems flax:taps flax:taps_vjp timm
  python benchmarks/compare.py --reps 3 --steps 5 --json results.json
  python benchmarks/compare.py --glibc-tunables ''    # without huge pages for malloc

Every system runs with the same ``GLIBC_TUNABLES``: by default ``glibc.malloc.hugetlb=1``, which
train.py sets for itself (xception_jax/platform/hugepages.py); the peers are measured under it too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = ("keras-tf", "keras-jax", "timm")
DEFAULT_SYSTEMS = ("flax", "keras-tf", "keras-jax", "timm")
NUM_CLASSES = 1000
RESULT_TAG = "RESULT "
HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb=1"  # = xception_jax.platform.hugepages.TUNABLE


# --------------------------------------------------------------------------------------------
# Worker side: one system, one size, in this process.
# --------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _measure(step, *, warmup: int, steps: int, max_seconds: float) -> dict:
    """First-call time, then ``warmup`` untimed calls, then up to ``steps`` timed calls.

    Stops timing early (after at least 2 timed calls) once ``max_seconds`` have passed, so that
    a slow system does not hold up the whole comparison.
    """
    t0 = time.perf_counter()
    step()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        step()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < steps and (len(times) < 2 or time.perf_counter() - start < max_seconds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"first_s": first, "step_s": times, "median_step_s": statistics.median(times)}


def _flax_runner(impl: str, size: int, batch: int, tree: str = ROOT, overrides=None):
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np
    import optax

    sys.path.insert(0, tree)
    from xception_jax.model import ops, registry, xception
    from xception_jax.training import steps, train_state

    # As train.py jits it; trees from before ops.compiler_options existed compile without.
    options = ops.compiler_options() if hasattr(ops, "compiler_options") else None

    model = registry.create_model(
        "xception", num_classes=NUM_CLASSES, depthwise_impl=impl, **(overrides or {})
    )
    config = ml_collections.ConfigDict(
        dict(
            seed=0,
            image_size=size,
            label_smoothing=0.0,
            ema_decay=0.0,
            skip_nonfinite_updates=False,
        )
    )
    tx = optax.sgd(0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    batch_data = {
        "image": jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, NUM_CLASSES, (batch,), dtype=np.int32)),
    }
    holder = {"state": jax.jit(lambda: train_state.init_state(model, tx, config))()}
    step_fn = jax.jit(
        lambda state, b: steps.train_step(state, b, model=model, tx=tx, config=config),
        donate_argnums=0,
        compiler_options=options,
    )

    @jax.jit
    def infer_fn(params, batch_stats, images):
        x = xception.preprocess(images, model.dtype)
        return model.apply({"params": params, "batch_stats": batch_stats}, x, train=False)

    compiled, compile_s = {}, {}

    def compile_once(name, fn, *args):
        # Ahead of the first call and timed on its own (trace + lower + XLA compile), so the
        # table can tell compile time from the first step's run time.
        if name not in compiled:
            t0 = time.perf_counter()
            compiled[name] = fn.lower(*args).compile()
            compile_s[name] = time.perf_counter() - t0
        return compiled[name]

    def train_step():
        step = compile_once("train", step_fn, holder["state"], batch_data)
        holder["state"], metrics = step(holder["state"], batch_data)
        jax.block_until_ready(metrics)

    def infer_step():
        s = holder["state"]
        infer = compile_once("infer", infer_fn, s.params, s.batch_stats, batch_data["image"])
        jax.block_until_ready(infer(s.params, s.batch_stats, batch_data["image"]))

    def flops():
        """XLA's cost analysis of the compiled train step (forward + backward + update)."""
        cost = compile_once("train", step_fn, holder["state"], batch_data).cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost.get("flops", 0.0)) if cost else 0.0

    return train_step, infer_step, flops, compile_s


def _keras_runner(size: int, batch: int):
    import keras
    import numpy as np

    model = keras.applications.Xception(
        weights=None, input_shape=(size, size, 3), classes=NUM_CLASSES
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss="sparse_categorical_crossentropy",
    )
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32)

    def train_step():
        model.train_on_batch(x, y)  # returns host floats: synchronous

    def infer_step():
        model.predict_on_batch(x)

    return train_step, infer_step, None, {}


def _timm_runner(size: int, batch: int):
    import torch

    # The registry's torchvision is a CUDA build whose C extension does not load next to CPU
    # torch; timm only needs these two operator schemas to exist at import time.
    lib = torch.library.Library("torchvision", "FRAGMENT")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
    import timm

    torch.manual_seed(0)
    model = timm.create_model("legacy_xception", num_classes=NUM_CLASSES)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (batch,))

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def infer_step():
        model.eval()
        with torch.inference_mode():
            model(x)

    return train_step, infer_step, None, {}


def run_worker(args) -> dict:
    """Measure one system at one size in this process; returns the result record."""
    system, size, batch = args.worker, args.size, args.batch
    t0 = time.perf_counter()
    if system.startswith("flax"):
        spec, _, tree = system.partition("@")
        spec, _, options = spec.partition("+")
        impl = spec.split(":", 1)[1] if ":" in spec else "auto"
        if options not in ("", "remat"):
            raise ValueError(f"Unknown option +{options} in {system!r}: the option is +remat.")
        overrides = {"remat": True} if options == "remat" else {}
        runner = _flax_runner(impl, size, batch, tree or ROOT, overrides)
    elif system in ("keras-tf", "keras-jax"):
        runner = _keras_runner(size, batch)
    elif system == "timm":
        runner = _timm_runner(size, batch)
    else:
        raise ValueError(f"Unknown system {system!r}; use flax[:IMPL], {', '.join(PEERS)}.")
    train_step, infer_step, flops, compile_s = runner
    record = {"system": system, "size": size, "batch": batch, "setup_s": time.perf_counter() - t0}
    kw = dict(warmup=args.warmup, steps=args.steps, max_seconds=args.max_seconds)
    record["infer"] = _measure(infer_step, **kw)
    record["infer_peak_rss_mb"] = _peak_rss_mb()
    record["train"] = _measure(train_step, **kw)
    record["train_peak_rss_mb"] = _peak_rss_mb()
    if flops is not None:
        record["train_step_flops"] = flops()
    record["compile_s"] = compile_s  # {'train', 'infer'}: XLA systems that compile ahead
    return record


# --------------------------------------------------------------------------------------------
# Driver side: subprocesses, interleaving, the table.
# --------------------------------------------------------------------------------------------


def _python_for(system: str, torch_python: str) -> str:
    return torch_python if system == "timm" else sys.executable


def _env_for(system: str, cache_dir: str | None, glibc_tunables: str | None) -> dict:
    env = dict(os.environ)
    if glibc_tunables is not None:  # the same for every system: a fair comparison
        env["GLIBC_TUNABLES"] = glibc_tunables
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # first-call times are cold compiles...
    if cache_dir:  # ...unless asked to show the persistent cache's effect
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if system.startswith("keras"):
        env["KERAS_BACKEND"] = {"keras-tf": "tensorflow", "keras-jax": "jax"}[system]
    return env


def run_one(system: str, size: int, batch: int, args) -> dict:
    """Run one worker subprocess; returns its record (or one with an 'error')."""
    cmd = [
        _python_for(system, args.torch_python),
        os.path.abspath(__file__),
        "--worker",
        system,
        "--size",
        str(size),
        "--batch",
        str(batch),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--max-seconds",
        str(args.max_seconds),
    ]
    load = os.getloadavg()[0]
    try:
        proc = subprocess.run(
            cmd,
            env=_env_for(system, args.compilation_cache, args.glibc_tunables),
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
    except subprocess.TimeoutExpired:
        return {"system": system, "size": size, "batch": batch, "error": "timeout", "load": load}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            record = json.loads(line[len(RESULT_TAG) :])
            record["load"] = (load + os.getloadavg()[0]) / 2
            return record
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"system": system, "size": size, "batch": batch, "error": " | ".join(tail)}


def _median(records, key):
    vals = [key(r) for r in records if "error" not in r]
    return statistics.median(vals) if vals else None


def summarize(records: list[dict], systems, sizes) -> str:
    """The results table (medians over repetitions) and the ratios of flax systems to peers."""
    lines = []
    head = (
        f"{'system':<16}{'size:batch':>11}{'train img/s':>13}{'infer img/s':>13}"
        f"{'train 1st s':>13}{'compile s':>11}{'infer 1st s':>13}{'RSS infer MB':>14}"
        f"{'RSS train MB':>14}"
        f"{'GFLOP/s':>9}{'load':>6}"
    )
    table = {}
    for size, batch in sizes:
        for system in systems:
            rs = [r for r in records if r["system"] == system and r["size"] == size]
            ok = [r for r in rs if "error" not in r]
            if not ok:
                err = rs[0].get("error", "not run") if rs else "not run"
                lines.append(f"{system:<16}{f'{size}:{batch}':>11}  FAILED: {err[:200]}")
                continue
            row = {
                "train": _median(ok, lambda r, b=batch: b / r["train"]["median_step_s"]),
                "infer": _median(ok, lambda r, b=batch: b / r["infer"]["median_step_s"]),
                "train_first": _median(ok, lambda r: r["train"]["first_s"]),
                "infer_first": _median(ok, lambda r: r["infer"]["first_s"]),
                "compile": _median(ok, lambda r: r.get("compile_s", {}).get("train", 0.0)),
                "rss_infer": _median(ok, lambda r: r["infer_peak_rss_mb"]),
                "rss_train": _median(ok, lambda r: r["train_peak_rss_mb"]),
                "load": _median(ok, lambda r: r["load"]),
            }
            flops = _median(ok, lambda r: r.get("train_step_flops", 0.0))
            gflops = flops / 1e9 * row["train"] / batch if flops else None
            table[(system, size)] = row
            compile_txt = f"{row['compile']:.1f}" if row["compile"] else "-"
            lines.append(
                f"{system:<16}{f'{size}:{batch}':>11}{row['train']:>13.2f}{row['infer']:>13.2f}"
                f"{row['train_first']:>13.1f}{compile_txt:>11}"
                f"{row['infer_first']:>13.1f}{row['rss_infer']:>14.0f}{row['rss_train']:>14.0f}"
                f"{(f'{gflops:.1f}' if gflops else '-'):>9}{row['load']:>6.1f}"
            )
    ratios = ["", "ratios (this codebase / peer; > 1 = faster):"]
    for size, batch in sizes:
        for ours in [s for s in systems if s.startswith("flax")]:
            if (ours, size) not in table:
                continue
            for peer in [s for s in systems if not s.startswith("flax")]:
                if (peer, size) not in table:
                    continue
                a, b = table[(ours, size)], table[(peer, size)]
                ratios.append(
                    f"  {size}:{batch} {ours} vs {peer}: train {a['train'] / b['train']:.2f}x, "
                    f"inference {a['infer'] / b['infer']:.2f}x, "
                    f"peak RSS {a['rss_train'] / b['rss_train']:.2f}x"
                )
    return "\n".join([head, *lines, *ratios])


def _parse_size(text: str) -> tuple[int, int]:
    try:
        size, batch = (int(v) for v in text.split(":"))
    except ValueError as err:
        msg = f"size must be SIZE:BATCH, e.g. 299:8; got {text!r}"
        raise argparse.ArgumentTypeError(msg) from err
    return size, batch


def main(argv=None) -> None:
    """Parse flags; run as the driver, or as one worker with ``--worker``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS))
    p.add_argument("--sizes", nargs="+", type=_parse_size, default=[(299, 8), (128, 32)])
    p.add_argument("--reps", type=int, default=2, help="repetitions (system order alternates)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    p.add_argument("--steps", type=int, default=5, help="timed steps (at most)")
    p.add_argument(
        "--max-seconds", type=float, default=60.0, help="stop timing after this (>= 2 steps)"
    )
    p.add_argument("--timeout", type=float, default=900.0, help="per subprocess, seconds")
    default_torch = os.path.join(ROOT, ".venv-peers", "bin", "python")
    p.add_argument(
        "--torch-python",
        default=default_torch if os.path.exists(default_torch) else sys.executable,
        help="python with torch + timm (default: .venv-peers/bin/python if it exists)",
    )
    p.add_argument("--compilation-cache", default=None, help="JAX persistent cache dir for runs")
    p.add_argument(
        "--glibc-tunables",
        default=HUGEPAGE_TUNABLE,
        help="GLIBC_TUNABLES for every system's process (default: transparent huge pages for "
        "malloc, as train.py runs by default; '' for glibc's defaults)",
    )
    p.add_argument("--json", default=None, help="also write every record to this file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(RESULT_TAG + json.dumps(run_worker(args)), flush=True)
        return

    print(f"cpu cores: {os.cpu_count()}, load average at start: {os.getloadavg()}", flush=True)
    print(f"GLIBC_TUNABLES for every system: {args.glibc_tunables!r}", flush=True)
    records = []
    for rep in range(args.reps):
        order = list(args.systems) if rep % 2 == 0 else list(reversed(args.systems))
        for size, batch in args.sizes:
            for system in order:
                r = run_one(system, size, batch, args)
                records.append(r)
                if "error" in r:
                    msg = f"ERROR {r['error'][:300]}"
                else:
                    msg = (
                        f"train {batch / r['train']['median_step_s']:.2f} img/s "
                        f"(first {r['train']['first_s']:.1f} s), "
                        f"infer {batch / r['infer']['median_step_s']:.2f} img/s, "
                        f"RSS {r['train_peak_rss_mb']:.0f} MB, load {r['load']:.1f}"
                    )
                print(f"[rep {rep}] {system} {size}:{batch}: {msg}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=1)
    print()
    print(summarize(records, args.systems, args.sizes))


if __name__ == "__main__":
    main()
