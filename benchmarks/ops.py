"""Micro-benchmark of the op implementations of xception_jax.model.ops, against each other.

Times the jitted forward and forward+backward (gradients w.r.t. input and, for convs, kernel)
of every implementation of the depthwise conv ('taps', 'taps_vjp', 'lax'), the stem's dense
conv ('im2col', 'lax') and the max-pool ('taps_vjp', 'lax') on Xception's shapes at 299px batch 8
and 128px batch 32; prints milliseconds (median of ``--iters`` runs after a warm-up) and the
ratio to 'lax'. Optionally times a whole model train step (SGD on cross-entropy) per
implementation of one op, the others at their defaults.

  python benchmarks/ops.py                                  # every op, every shape
  python benchmarks/ops.py --ops pool conv
  python benchmarks/ops.py --ops depthwise --model xception_tiny --batch 32 --size 64
  python benchmarks/ops.py --ops conv --model xception --batch 8 --size 299 --iters 3 --skip-layers

The grouped spatial conv of ``config.model.channels_per_group`` (g > 1, or -1 for a regular
conv): ``--channels_per_group`` times the model's train step with each g and each depthwise
implementation ('taps' and 'taps_vjp' the CPU forms of ``ops.grouped_conv``, 'lax' XLA's
grouped conv), with each step's ratio to 'lax' at the same g and to the depthwise model's
default step (g = 1, the first ``--channels_per_group``):

  python benchmarks/ops.py --ops depthwise --model xception_tiny --batch 64 --size 48 \
      --skip-layers --channels_per_group 1 2 4 8 -1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xception_jax.model import ops  # noqa: E402

# Per op, (input shape, stride[, out channels]): the layers of Xception at 299px batch 8 and at
# 128px batch 32 (entry, middle, exit flows; the stem's two convs; the four max-pools), and one
# strided depthwise case (aligned Xception).
SHAPES = {
    "depthwise": [
        ((8, 37, 37, 256), 1),
        ((8, 19, 19, 728), 1),
        ((32, 16, 16, 728), 1),
        ((8, 38, 38, 256), 2),
    ],
    "conv": [
        ((8, 299, 299, 3), 2, 32),
        ((8, 149, 149, 32), 1, 64),
        ((32, 128, 128, 3), 2, 32),
        ((32, 63, 63, 32), 1, 64),
    ],
    "pool": [
        ((8, 147, 147, 128), 2),
        ((8, 74, 74, 256), 2),
        ((8, 37, 37, 728), 2),
        ((8, 19, 19, 1024), 2),
        ((32, 61, 61, 128), 2),
    ],
}
MODEL_FIELD = {"depthwise": "depthwise_impl", "conv": "conv_impl", "pool": "pool_impl"}


def _time(fn, *args, iters: int) -> float:
    """Median wall time of ``fn(*args)`` in ms, after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _apply(op: str, impl: str, case):
    """(function of the differentiable inputs, those inputs) for one op, impl and shape."""
    shape, stride = case[0], case[1]
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape)
    if op == "pool":
        return (lambda x: ops.max_pool(x, 3, strides=stride, impl=impl)), (x,)
    if op == "conv":
        k = jax.random.normal(kk, (3, 3, shape[-1], case[2]))
        return (lambda x, k: ops.conv2d(x, k, strides=stride, padding="VALID", impl=impl)), (x, k)
    k = jax.random.normal(kk, (3, 3, 1, shape[-1]))
    return (lambda x, k: ops.depthwise_conv(x, k, strides=stride, impl=impl)), (x, k)


def bench_layer(op: str, impl: str, case, iters: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of one op on one shape."""
    fn, args = _apply(op, impl, case)
    fwd = jax.jit(fn)
    argnums = tuple(range(len(args)))
    bwd = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=argnums))
    return _time(fwd, *args, iters=iters), _time(bwd, *args, iters=iters)


def bench_model(
    name: str, op: str, impl: str, batch: int, size: int, iters: int, **fields
) -> float:
    """ms per train step (``xception_jax.training.steps.train_step``, SGD) of a registered model
    (``fields``: other model fields, e.g. ``channels_per_group``)."""
    import optax

    from configs import default
    from xception_jax.model.registry import create_model
    from xception_jax.training import steps, train_state

    model = create_model(name, num_classes=10, **{MODEL_FIELD[op]: impl}, **fields)
    config = default.get_config()
    config.image_size = size
    tx = optax.sgd(0.01)
    rng = np.random.default_rng(0)
    batch_data = {
        "image": jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)),
        "label": jnp.arange(batch) % 10,
    }
    state = jax.jit(lambda: train_state.init_state(model, tx, config))()
    step = jax.jit(
        lambda s, b: steps.train_step(s, b, model=model, tx=tx, config=config)[0],
        compiler_options=ops.compiler_options(),
    )
    return _time(step, state, batch_data, iters=iters)


def main() -> None:
    """Parse flags, run the benchmarks, print a table per op."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ops", nargs="+", default=list(ops.IMPLS), choices=list(ops.IMPLS))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--model", default=None, help="also time a train step of this variant")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument(
        "--channels_per_group",
        type=int,
        nargs="+",
        default=[1],
        help="model train steps with each of these (1 depthwise, g grouped, -1 regular)",
    )
    args = p.parse_args()
    print(f"backend={jax.default_backend()} devices={jax.devices()}")
    for op in args.ops:
        impls = ops.IMPLS[op]
        print(f"\n{op}: default {ops.default_impl(op)!r}; ms, median; f = forward, f+b = forward")
        print("+ gradients; x = 'lax' f+b / this f+b")
        if not args.skip_layers:
            print(
                f"{'shape, stride[, out]':<32}"
                + "".join(f"{i + ' f':>12}{i + ' f+b':>14}{'x':>7}" for i in impls)
            )
            for case in SHAPES[op]:
                times = {impl: bench_layer(op, impl, case, args.iters) for impl in impls}
                row = f"{str(case):<32}"
                for impl in impls:
                    f, b = times[impl]
                    row += f"{f:>12.2f}{b:>14.2f}{times['lax'][1] / b:>7.2f}"
                print(row, flush=True)
        if args.model:
            groups = args.channels_per_group if op == "depthwise" else [1]
            reference = None  # the first g's step with the backend's default impl
            for g in groups:
                fields = {"channels_per_group": g} if g != 1 else {}
                times = {}
                for impl in sorted(impls, key=lambda i: i != "lax"):  # 'lax' first: the ratios
                    times[impl] = t = bench_model(
                        args.model, op, impl, args.batch, args.size, args.iters, **fields
                    )
                    if reference is None and impl == ops.default_impl(op):
                        reference = (g, impl, t)
                    name = f"{args.model} b={args.batch} {args.size}px {op}={impl}"
                    name += f" channels_per_group={g}" if fields else ""
                    ratios = f"'lax'/this {times['lax'] / t:.2f}x"
                    if reference is not None:
                        ref_g, ref_impl, ref_t = reference
                        ratios += f", this/(g={ref_g} {ref_impl!r}) {t / ref_t:.2f}x"
                    print(f"train step {name}: {t:.1f} ms ({ratios})", flush=True)


if __name__ == "__main__":
    main()
