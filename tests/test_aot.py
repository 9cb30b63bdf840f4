"""Ahead-of-time compilation for TPU slices on this CPU host (xception_jax.aot, libtpu).

Every test that loads libtpu is in this module: libtpu takes a lock file in /tmp that a second
process (the other xdist worker, or the CLI subprocesses below) would trip over without
ALLOW_MULTIPLE_LIBTPU_LOAD. Only the tiny model at 32 px is compiled here.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from procs import REPO
from test_train import small_config

from xception_jax import aot
from xception_jax.model import ops, registry
from xception_jax.training import config_checks, steps

# Before libtpu loads (at the first TPU topology below); the subprocesses inherit it.
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
GIB = 2**30
V5E_HBM = round(15.75 * GIB)  # What XLA lets a program use of a v5e chip's 16 GiB (measured).
REQUIRED = (
    "topology",
    "chips",
    "global_batch",
    "dtype",
    "fits",
    "hbm_needed_bytes",
    "hbm_available_bytes",
    "temp_bytes",
    "flops_per_step",
    "compile_seconds",
)


def tiny_config(**overrides):
    return small_config(None, image_size=32, batch_size=16, eval_batch_size=16, **overrides)


@pytest.mark.parametrize(
    "name, chips, libtpu_name, chip_config, wrap",
    [
        ("v4-8", 4, "v4:2x2x1", "megacore", (False, False, False)),
        ("v4-16", 8, "v4:2x2x2", "megacore", (False, False, False)),
        ("v4-32", 16, "v4:2x2x4", "megacore", (False, False, False)),
        ("v4-128", 64, "v4:4x4x4", "megacore", (True, True, True)),
        ("v5p-8", 4, "v5p:2x2x1", "megacore", (False, False, False)),
        ("v5e-1", 1, "v5e:1x1", "default", (False, False, False)),
        ("v5e-4", 4, "v5e:2x2", "default", (False, False, False)),
        ("v5e-8", 8, "v5e:2x4", "default", (False, False, False)),
        ("v5e-16", 16, "v5e:4x4", "default", (False, False, False)),
        ("v5e-128", 128, "v5e:8x16", "default", (False, True, False)),
        ("v6e-4", 4, "v6e:2x2", "default", (False, False, False)),
        ("v6e-256", 256, "v6e:16x16", "default", (True, True, False)),
    ],
)
def test_slice_names_map_to_libtpu_topologies(name, chips, libtpu_name, chip_config, wrap):
    topology = aot.parse_topology(name)
    assert (topology.chips, topology.topology_name) == (chips, libtpu_name)
    assert (topology.chip_config_name, topology.wrap) == (chip_config, wrap)


def test_slices_have_the_chips_their_names_say_and_bad_names_are_refused():
    for name, kind in (("v4-8", "TPU v4"), ("v5e-8", "TPU v5 lite"), ("v6e-4", "TPU v6 lite")):
        devices = aot.tpu_devices(aot.parse_topology(name))
        assert len(devices) == aot.parse_topology(name).chips
        assert {d.device_kind for d in devices} == {kind}
    for bad in ("v5e-3", "v4-4", "v3-8", "v5e"):
        with pytest.raises(aot.AotError, match="use v4-N or v5p-N"):
            aot.parse_topology(bad)
    assert aot.larger_slice(aot.parse_topology("v5e-4")) == "v5e-8"
    assert aot.larger_slice(aot.parse_topology("v4-8")) == "v4-16"


def test_a_slice_with_more_hosts_than_the_data_shards_allow_is_refused():
    from configs import imagenet

    assert [aot.parse_topology(n).hosts for n in ("v5e-1", "v4-8", "v5e-256", "v4-1024")] == [
        1, 1, 64, 128,
    ]  # fmt: skip
    config = imagenet.get_config()  # data_shards=64: up to 64 hosts
    config.grad_accum_steps = 1
    with pytest.raises(
        config_checks.ConfigError,
        match=r"data_shards=64 is not a multiple of the 128 processes.*data_shards=128",
    ):
        next(aot.run(config, ["v4-1024"], find_max=False, with_eval=False, num_classes=1000))


@pytest.fixture(scope="module")
def v5e4():
    """train.py's tiny model and steps for a v5e-4, as aot builds them, with 2 microbatches."""
    return aot.SliceCompiler(tiny_config(grad_accum_steps=2), aot.parse_topology("v5e-4"), 10)


def test_train_and_eval_steps_compile_for_a_tpu_slice_with_a_full_report(v5e4):
    train_report, eval_report = v5e4.train(16), v5e4.eval()
    for report, step in ((train_report, "train"), (eval_report, "eval")):
        assert set(REQUIRED) <= set(report)
        assert report["step"] == step and report["fits"] is True
        assert (report["topology"], report["chips"], report["dtype"]) == ("v5e-4", 4, "float32")
        assert report["hbm_available_bytes"] == V5E_HBM
        parts = report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"]
        assert report["hbm_needed_bytes"] >= parts + report["temp_bytes"] > 0
        assert report["hbm_needed_bytes"] < report["hbm_available_bytes"]
        assert report["flops_per_step"] > 0 and report["compile_seconds"] > 0
        assert report["flops_per_image"] * report["global_batch"] == pytest.approx(
            report["flops_per_step"]
        )
    assert train_report["global_batch"] == 16 and train_report["batch_per_chip"] == 4
    assert train_report["grad_accum_steps"] == 2
    # The state is donated: its outputs reuse the arguments' buffers.
    assert train_report["alias_bytes"] > 0
    # A train step does about 3x the FLOPs of inference per image (forward + 2x backward).
    assert 2 < train_report["flops_per_image"] / eval_report["flops_per_image"] < 4
    text = aot.format_report(train_report)
    assert "HBM per chip: needs" in text and "of 15.75 GiB: fits" in text


def test_tpu_compile_takes_the_tpu_ops_and_compiler_options(v5e4):
    # The host is a CPU: built for it, 'auto' means the CPU forms.
    host = registry.create_model_from_config(v5e4.config, 10)
    assert (host.depthwise_impl, host.conv_impl, host.pool_impl) == (
        "taps_vjp",
        "im2col",
        "taps_vjp",
    )
    model = v5e4.model
    assert (model.depthwise_impl, model.conv_impl, model.pool_impl) == ("lax", "lax", "lax")
    batch = steps.abstract_batch(16, 32, v5e4.mesh)
    lowered = v5e4.train_step.lower(v5e4.state, batch).as_text()
    assert "feature_group_count" in lowered  # the depthwise conv as XLA's grouped convolution
    assert "reduce_window" in lowered  # the max-pools as XLA's
    # The step keeps its optimisation barriers (ops.relu, BatchNorm), which XLA TPU only
    # compiles without the CPU's option; with it, the same barrier fails (the control below).
    assert "optimization_barrier" in lowered
    device = jax.sharding.SingleDeviceSharding(v5e4.devices[0])
    x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=device)

    def barrier(x):
        return jax.lax.optimization_barrier(x * 2) + 1

    jax.jit(barrier, compiler_options=ops.compiler_options("tpu")).lower(x).compile()
    with pytest.raises(jax.errors.JaxRuntimeError, match="opt-barrier"):
        jax.jit(barrier, compiler_options=ops.compiler_options("cpu")).lower(x).compile()


def run_aot(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    return subprocess.run(
        [sys.executable, "-m", "xception_jax.aot", "--config=configs/default.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_batch_that_cannot_fit_is_one_clear_line_and_exit_code_1():
    out = run_aot(
        "--topology=v5e-1",
        "--config.image_size=32",
        "--config.batch_size=262144",
        "--noeval",
        "--json",
    )
    assert out.returncode == 1, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(REQUIRED) <= set(report)
    assert report["fits"] is False and report["global_batch"] == 262144
    assert report["hbm_needed_bytes"] > report["hbm_available_bytes"] == V5E_HBM
    line = next(x for x in out.stderr.splitlines() if x.startswith("Does not fit"))
    needed = f"{report['hbm_needed_bytes'] / GIB:.2f} GiB"
    assert f"needs {needed} of HBM per chip, and a chip has 15.75 GiB" in line
    for fix in (
        "half_precision=True",
        "remat=True",
        "grad_accum_steps=2",
        "--topology v5e-4",
    ):
        assert fix in line


def test_missing_libtpu_names_the_install_command():
    script = (
        "import sys, runpy\n"
        "sys.modules['libtpu'] = None  # as if not installed\n"
        "sys.argv = ['aot', '--config=configs/default.py', '--topology=v5e-4']\n"
        "runpy.run_module('xception_jax.aot', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2
    assert f'pip install "jax[tpu]=={jax.__version__}"' in out.stderr


def test_a_bad_topology_name_is_a_clear_error():
    out = run_aot("--topology=v5e-3")
    assert out.returncode == 2
    assert "No TPU slice 'v5e-3': use v4-N or v5p-N" in out.stderr
