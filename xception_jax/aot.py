"""Compile train.py's steps for a TPU slice from any host: memory fit, FLOPs, compile time.

    python -m xception_jax.aot --config configs/imagenet.py --topology v5e-4 [--config.x=y ...]
    python -m xception_jax.aot --config configs/imagenet.py --topology v4-8,v5e-8 --find_max_batch
    python -m xception_jax.aot --config configs/imagenet.py --topology v5e-4 --json

No TPU is needed: with libtpu installed (``pip install "jax[tpu]==<jax version>"``), JAX
compiles for abstract TPU devices (``jax.experimental.topologies``) on a CPU host. The programs
are exactly those train.py runs on that slice (``steps.jit_steps``: its mesh, shardings,
donation, dtypes, the TPU's op implementations and compiler options), with the batch shapes of
the input pipeline. The compile is the memory check: XLA refuses a program that does not fit a
chip's HBM. Reported per chip: argument, output and temporary bytes, HBM needed (arguments +
outputs - aliased + temporaries + code) against what the compiler may use, whether it fits,
FLOPs (XLA's cost analysis; per step = per chip x chips) and the compile time. Exit code 1 when
a step does not fit (with what to try), 2 for a bad topology or a missing libtpu.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time

from absl import flags
from ml_collections import config_flags

from xception_jax import cli
from xception_jax.platform import errors

# The tool's own flags (cli.parse_tool_flags): importing aot beside another tool (sweep's
# --config) in one process must not clash.
FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file.", lock_config=True, flag_values=FLAGS
)
flags.DEFINE_list(
    "topology",
    None,
    "TPU slices as users name them, comma separated: v4-8, v4-16, v4-32 ..., v5p-8 ... (the "
    "number counts TensorCores, 2 per chip), v5e-1, v5e-4, v5e-8 ..., v6e-1, v6e-4 ... (chips).",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "find_max_batch",
    False,
    "Search the largest global batch (a multiple of chips x grad_accum_steps and of "
    "config.data_shards) whose train step fits, instead of compiling config.batch_size.",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "eval", True, "Also compile the eval step (config.eval_batch_size).", flag_values=FLAGS
)
flags.DEFINE_bool(
    "json", False, "Print one JSON object per compiled step instead of text.", flag_values=FLAGS
)
flags.DEFINE_integer(
    "num_classes",
    1000,
    "Classes of the dataset (sizes the classifier); 1000 for ImageNet.",
    flag_values=FLAGS,
)
flags.mark_flags_as_required(["config", "topology"], flag_values=FLAGS)

# The schedule's length is a constant inside the step: any count compiles the same program.
_TRAIN_EXAMPLES = 1_281_167  # ImageNet's train split.
GIB = 2**30


class AotError(errors.UsageError):
    """A request that cannot be compiled as given (topology name, libtpu); the fix named."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice: the user's name and what libtpu's topology description takes."""

    name: str  # 'v5e-4'
    generation: str  # 'v4' | 'v5p' | 'v5e' | 'v6e'
    chips: int
    topology_name: str  # 'v5e:2x2'
    chip_config_name: str  # 'megacore': one device per chip (v4, v5p); 'default'
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]

    @property
    def hosts(self) -> int:
        """Hosts of the slice: one train.py process each."""
        return self.chips // math.prod(self.chips_per_host_bounds)


# generation -> (libtpu's prefix, TensorCores per chip counted by the name, mesh dimensions).
# As MaxText's accelerator_to_spec_map.py: v4 and v5p are named by TensorCores and run as
# megacore chips (one JAX device per chip) in a 3-D torus; v5e and v6e are named by chips on a
# 2-D grid; 4 chips per host.
_GENERATIONS = {
    "v4": ("v4", 2, 3),
    "v5p": ("v5p", 2, 3),
    "v5e": ("v5e", 1, 2),
    "v6e": ("v6e", 1, 2),
}


def _grid(chips: int, dims: int) -> tuple[int, ...] | None:
    """The slice's chip grid: from one host's 2x2(x1), double the smallest side (the last on a
    tie), which gives 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... and 2x4, 4x4, 4x8, 8x8, 8x16, 16x16."""
    if dims == 2 and chips == 1:
        return (1, 1)
    shape = [2, 2, 1][:dims]
    while shape[0] * shape[1] * (shape[2] if dims == 3 else 1) < chips:
        smallest = min(shape)
        i = max(j for j, s in enumerate(shape) if s == smallest)
        shape[i] *= 2
    return tuple(shape) if shape[0] * shape[1] * (shape[2] if dims == 3 else 1) == chips else None


def parse_topology(name: str) -> Topology:
    """The Topology of a slice name such as 'v4-8', 'v5e-4', 'v5p-16' or 'v6e-8'."""
    usage = (
        "use v4-N or v5p-N (N TensorCores, 2 per chip: 8, 16, 32, ...) or v5e-N or v6e-N "
        "(N chips: 1, 4, 8, 16, ...)"
    )
    match = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", name.strip().lower())
    if not match:
        raise AotError(f"Unknown TPU topology {name!r}: {usage}.")
    generation, count = match.group(1), int(match.group(2))
    prefix, cores_per_chip, dims = _GENERATIONS[generation]
    chips = count // cores_per_chip
    shape = _grid(chips, dims) if count % cores_per_chip == 0 and chips > 0 else None
    if shape is None:
        raise AotError(f"No TPU slice {name!r}: {usage}.")
    if dims == 3:  # Whole-torus wraparound from 4x4x4 up.
        wrap = (min(shape) >= 4,) * 3
    else:  # 2-D slices wrap along a side of 16 chips.
        wrap = (shape[0] == 16, shape[1] == 16, False)
    return Topology(
        name=name,
        generation=generation,
        chips=chips,
        topology_name=f"{prefix}:{'x'.join(map(str, shape))}",
        chip_config_name="megacore" if cores_per_chip == 2 else "default",
        chips_per_host_bounds=(1, 1, 1) if chips == 1 else (2, 2, 1),
        wrap=wrap,
    )


def larger_slice(topology: Topology) -> str:
    """The name of the slice of the same generation with twice the chips."""
    per_chip = _GENERATIONS[topology.generation][1]
    chips = 4 if topology.chips == 1 else topology.chips * 2
    return f"{topology.generation}-{chips * per_chip}"


def tpu_devices(topology: Topology) -> list:
    """Abstract devices of `topology` to compile for (no TPU needed; libtpu is)."""
    import jax

    try:
        import libtpu  # noqa: F401  (the TPU compiler; JAX loads it from here)
    except ImportError:
        raise AotError(
            "Compiling for TPU needs libtpu, which is not installed. Install it with: "
            f'pip install "jax[tpu]=={jax.__version__}"   (it runs on hosts without a TPU)'
        ) from None
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=topology.topology_name,
        chip_config_name=topology.chip_config_name,
        chips_per_host_bounds=topology.chips_per_host_bounds,
        num_slices=1,
        wrap=topology.wrap,
    )
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise AotError(
            f"libtpu gave {len(devices)} devices for {topology.name} ({topology.topology_name}), "
            f"expected {topology.chips}."
        )
    return devices


_SIZE = re.compile(r"\(([\d.]+)([KMGT])\)")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _compiler_bytes(message: str, after: str) -> int | None:
    """The byte count XLA prints as '(15.75G)' right after `after` in an error, if present."""
    match = _SIZE.search(message, message.find(after)) if after in message else None
    return round(float(match.group(1)) * _UNITS[match.group(2)]) if match else None


def available_hbm(devices) -> int | None:
    """HBM per chip that XLA may use on these devices, in bytes (the compiler's own figure).

    Read from the error of a program that cannot fit any TPU (256 GiB of temporaries): no API
    gives it for abstract devices (memory_stats() needs a real one).
    """
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct(
        (64 * 1024, 1024 * 1024),
        jnp.float32,
        sharding=jax.sharding.SingleDeviceSharding(devices[0]),
    )
    try:
        jax.jit(lambda x: jnp.sin(x) @ x.T).lower(x).compile()
    except jax.errors.JaxRuntimeError as e:
        return _compiler_bytes(str(e), "available HBM")
    return None


def compile_step(step, args, topology: Topology, global_batch: int, config, which: str) -> dict:
    """Compiles one jitted step for its abstract `args`; the report as a dict (see module doc)."""
    import jax

    from xception_jax.training import telemetry

    result = {
        "topology": topology.name,
        "libtpu_topology": topology.topology_name,
        "chips": topology.chips,
        "step": which,
        "global_batch": global_batch,
        "batch_per_chip": global_batch // topology.chips,
        "dtype": "bfloat16" if config.half_precision else "float32",
        "remat": config.model.remat,
        "remat_blocks": config.model.get("remat_blocks", False),
        "grad_accum_steps": config.get("grad_accum_steps", 1) if which == "train" else 1,
        "image_size": config.image_size,
        "model": config.model.name,
    }
    start = time.perf_counter()
    try:
        compiled = step.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        result.update(
            fits=False,
            # XLA's "total memory required" (arguments, outputs and temporaries).
            hbm_needed_bytes=_compiler_bytes(str(e), "required for"),
            hbm_available_bytes=_compiler_bytes(str(e), "available HBM"),
            argument_bytes=None,
            output_bytes=None,
            alias_bytes=None,
            temp_bytes=None,
            flops_per_step=None,
            flops_per_image=None,
            compile_seconds=round(time.perf_counter() - start, 2),
        )
        return result
    seconds = time.perf_counter() - start
    # Per chip, the microbatch loop counted k times (telemetry.step_cost, as train.py logs it).
    cost = telemetry.step_cost(compiled, result["grad_accum_steps"])
    flops = cost["flops_per_device"] * topology.chips
    result.update(
        fits=True,
        hbm_needed_bytes=cost["argument_bytes"]
        + cost["output_bytes"]
        - cost["alias_bytes"]
        + cost["temp_bytes"]
        + cost["code_bytes"],
        hbm_available_bytes=None,
        argument_bytes=cost["argument_bytes"],
        output_bytes=cost["output_bytes"],
        alias_bytes=cost["alias_bytes"],
        temp_bytes=cost["temp_bytes"],
        flops_per_step=flops,
        flops_per_image=flops / global_batch,
        compile_seconds=round(seconds, 2),
    )
    return result


class SliceCompiler:
    """train.py's model, optimizer and jitted steps for one TPU slice, compiled on request."""

    def __init__(self, config, topology: Topology, num_classes: int):
        from xception_jax.model import registry
        from xception_jax.platform import sharding
        from xception_jax.training import optim, steps, train_state

        self.config, self.topology = config, topology
        self.devices = tpu_devices(topology)
        self.mesh = sharding.create_mesh(self.devices)
        platform = sharding.mesh_platform(self.mesh)
        self.model = registry.create_model_from_config(config, num_classes, platform)
        self.tx, _ = optim.create_optimizer(config, _TRAIN_EXAMPLES)
        self.train_step, self.eval_step = steps.jit_steps(self.model, self.tx, config, self.mesh)
        self.state = train_state.abstract_train_state(self.model, self.tx, config, self.mesh)
        self.hbm = available_hbm(self.devices)

    def train(self, global_batch: int) -> dict:
        """The report of the train step at `global_batch`."""
        from xception_jax.training import steps

        batch = steps.abstract_batch(global_batch, self.config.image_size, self.mesh)
        result = compile_step(
            self.train_step, (self.state, batch), self.topology, global_batch, self.config, "train"
        )
        return self._with_hbm(result)

    def eval(self) -> dict:
        """The report of the eval step at config.eval_batch_size."""
        from xception_jax.training import steps

        size = self.config.eval_batch_size
        batch = steps.abstract_batch(size, self.config.image_size, self.mesh, eval_mask=True)
        args = (self.state.params, self.state.batch_stats, batch)
        return self._with_hbm(
            compile_step(self.eval_step, args, self.topology, size, self.config, "eval")
        )

    def _with_hbm(self, result: dict) -> dict:
        if result["hbm_available_bytes"] is None:
            result["hbm_available_bytes"] = self.hbm
        return result


def find_max_batch(compiler: SliceCompiler, start: int) -> tuple[dict | None, list[dict]]:
    """(report of the largest fitting train-step batch or None, every report made on the way).

    Batches are multiples of chips x grad_accum_steps and of config.data_shards (every batch
    found then trains); doubles (or halves) from `start` to bracket the limit, then bisects.
    """
    unit = math.lcm(
        compiler.topology.chips * compiler.config.get("grad_accum_steps", 1),
        compiler.config.get("data_shards", 1),
    )
    tried: dict[int, dict] = {}

    def fits(units: int) -> bool:
        if units not in tried:
            tried[units] = compiler.train(units * unit)
        return tried[units]["fits"]

    n = max(1, start // unit)
    if fits(n):
        lo, hi = n, None
        while hi is None:
            if fits(2 * lo):
                lo *= 2
            else:
                hi = 2 * lo
    else:
        hi, lo = n, None
        while lo is None and hi > 1:
            hi_next = hi // 2
            if fits(hi_next):
                lo = hi_next
            else:
                hi = hi_next
        if lo is None:
            return None, list(tried.values())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return tried[lo], [tried[k] for k in sorted(tried)]


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.2f}"


def format_report(r: dict) -> str:
    """Human-readable lines of one report."""
    head = (
        f"{r['topology']} ({r['chips']} chips, {r['libtpu_topology']}), {r['step']} step, "
        f"{r['model']} {r['image_size']}px, global batch {r['global_batch']} "
        f"({r['batch_per_chip']} per chip), {r['dtype']}, remat={r['remat']}, "
        f"remat_blocks={r['remat_blocks']}, grad_accum_steps={r['grad_accum_steps']}"
    )
    verdict = "fits" if r["fits"] else "DOES NOT FIT"
    lines = [head + ":"]
    if r["fits"]:
        lines.append(
            f"  per chip: arguments {_gib(r['argument_bytes'])} GiB, outputs "
            f"{_gib(r['output_bytes'])} GiB ({_gib(r['alias_bytes'])} aliased to arguments), "
            f"temporaries {_gib(r['temp_bytes'])} GiB"
        )
    lines.append(
        f"  HBM per chip: needs {_gib(r['hbm_needed_bytes'])} GiB of "
        f"{_gib(r['hbm_available_bytes'])} GiB: {verdict}"
    )
    if r["fits"]:
        lines.append(
            # Three significant digits: the tiny model's 0.06 GFLOPs must not print as 0.0.
            f"  FLOPs: {r['flops_per_step'] / 1e12:.3g} T per step, "
            f"{r['flops_per_image'] / 1e9:.3g} G per image"
        )
    lines.append(f"  compiled in {r['compile_seconds']:.1f} s")
    return "\n".join(lines)


def not_fit_message(r: dict, topology: Topology) -> str:
    """One line: what does not fit, by how much, and what to try."""
    tries = []
    if r["dtype"] == "float32":
        tries.append("bf16 (--config.half_precision=True)")
    # Cheapest first: sepconv remat costs <1% more FLOPs on TPU, block remat ~30% (docs/memory.md).
    if not r["remat"]:
        tries.append("remat (--config.model.remat=True)")
    elif not r["remat_blocks"]:
        tries.append("block remat (--config.model.remat_blocks=True)")
    if r["step"] == "train":
        k = r["grad_accum_steps"]
        tries.append(f"gradient accumulation (--config.grad_accum_steps={2 * k})")
    else:
        tries.append("a smaller --config.eval_batch_size")
    tries.append(f"a larger slice (--topology {larger_slice(topology)})")
    return (
        f"Does not fit: the {r['step']} step at global batch {r['global_batch']} on "
        f"{r['topology']} needs {_gib(r['hbm_needed_bytes'])} GiB of HBM per chip, and a chip "
        f"has {_gib(r['hbm_available_bytes'])} GiB. Try: {', '.join(tries)}."
    )


def run(config, topology_names: list[str], *, find_max: bool, with_eval: bool, num_classes: int):
    """Compiles as the flags say; yields (report, topology) pairs.

    With `find_max`, one train-step report per topology: the largest batch that fits (or the
    smallest tried, which does not), with the batches tried under "probes".
    """
    from xception_jax.training import config_checks

    for name in topology_names:
        topology = parse_topology(name)
        errors = config_checks.batch_errors(config, topology.chips, topology.hosts)
        if errors and not find_max:
            raise config_checks.ConfigError.of(errors)
        compiler = SliceCompiler(config, topology, num_classes)
        if find_max:
            best, tried = find_max_batch(compiler, config.batch_size)
            report = dict(best or tried[0])  # None fits: the smallest batch tried.
            report["probes"] = [
                {"global_batch": r["global_batch"], "fits": r["fits"]} for r in tried
            ]
            yield report, topology
        else:
            yield compiler.train(config.batch_size), topology
        if with_eval:
            yield compiler.eval(), topology


def _run(args: list[str]) -> None:
    failed = False
    for report, topology in run(
        FLAGS.config,
        FLAGS.topology,
        find_max=FLAGS.find_max_batch,
        with_eval=FLAGS.eval,
        num_classes=FLAGS.num_classes,
    ):
        if FLAGS.json:
            print(json.dumps(report), flush=True)
        else:
            print(format_report(report), flush=True)
            if "probes" in report and report["fits"]:
                print(f"  the largest global batch that fits {topology.name}", flush=True)
        if not report["fits"]:
            failed = True
            sys.stderr.write(not_fit_message(report, topology) + "\n")
    if failed:
        sys.exit(1)


def main(argv=None) -> None:
    """Command line: see the module docstring (argv without the program name; sys.argv's when
    None)."""
    cli.run_tool(_run, FLAGS, __doc__, argv, program="python -m xception_jax.aot")


if __name__ == "__main__":
    main()
