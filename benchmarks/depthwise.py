"""Micro-benchmark of the depthwise-conv implementations of xception_jax.ops.

Times the jitted forward and forward+backward (gradients w.r.t. input and kernel) of 'taps',
'taps_vjp' and 'lax' on Xception-like shapes, prints milliseconds (median of ``--iters`` runs
after a warm-up); optionally times a whole model train step (SGD on cross-entropy) per impl.

  python benchmarks/depthwise.py                      # the layer shapes
  python benchmarks/depthwise.py --model xception_tiny --batch 32 --size 64
  python benchmarks/depthwise.py --model xception --batch 8 --size 299 --iters 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xception_jax import ops  # noqa: E402

# (batch, height, width, channels, stride): entry, middle and exit-flow shapes of Xception at
# 299 (37x37x256, 19x19x728), a larger batch, and one strided (aligned Xception) case.
DEFAULT_SHAPES = (
    (8, 37, 37, 256, 1),
    (8, 19, 19, 728, 1),
    (32, 16, 16, 728, 1),
    (8, 38, 38, 256, 2),
)


def _time(fn, *args, iters: int) -> float:
    """Median wall time of ``fn(*args)`` in ms, after one compile-and-warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_layer(shape, impl: str, iters: int, dtype=jnp.float32) -> tuple[float, float]:
    """(forward ms, forward+backward ms) of one depthwise 3x3 conv."""
    b, h, w, c, s = shape
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (b, h, w, c), dtype)
    k = jax.random.normal(kk, (3, 3, 1, c), dtype)

    fwd = jax.jit(lambda x, k: ops.depthwise_conv(x, k, strides=s, impl=impl))

    def loss(x, k):
        return jnp.sum(ops.depthwise_conv(x, k, strides=s, impl=impl).astype(jnp.float32) ** 2)

    bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return _time(fwd, x, k, iters=iters), _time(bwd, x, k, iters=iters)


def bench_model(name: str, impl: str, batch: int, size: int, iters: int) -> float:
    """ms per SGD train step (forward, backward, update, BN stats) of a registered model."""
    from xception_jax.models import create_model

    model = create_model(name, num_classes=10, depthwise_impl=impl)
    x = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)
    y = jnp.arange(batch) % 10
    variables = jax.jit(lambda: model.init(jax.random.key(0), x[:1]))()

    @jax.jit
    def step(params, stats):
        def loss_fn(p):
            logits, upd = model.apply(
                {"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            onehot = jax.nn.one_hot(y, 10)
            return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), upd

        grads, upd = jax.grad(loss_fn, has_aux=True)(params)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, params, grads)
        return params, upd["batch_stats"]

    return _time(step, variables["params"], variables["batch_stats"], iters=iters)


def main() -> None:
    """Parse flags, run the benchmarks, print a table."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--model", default=None, help="also time a train step of this variant")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument(
        "--impls", nargs="+", default=list(ops.DEPTHWISE_IMPLS), choices=ops.DEPTHWISE_IMPLS
    )
    args = p.parse_args()
    print(f"backend={jax.default_backend()} devices={jax.devices()}")
    print(f"default impl: {ops.default_impl('depthwise')}")
    if not args.skip_layers:
        impls = args.impls
        print("ms, median; f = forward, f+b = forward + gradients w.r.t. input and kernel")
        print(
            f"{'shape (B,H,W,C,stride)':<26}"
            + "".join(f"{i + ' f':>12}{i + ' f+b':>14}" for i in impls)
        )
        for shape in DEFAULT_SHAPES:
            row = f"{str(shape):<26}"
            for impl in impls:
                f, b = bench_layer(shape, impl, args.iters)
                row += f"{f:>12.2f}{b:>14.2f}"
            print(row, flush=True)
    if args.model:
        for impl in args.impls:
            t = bench_model(args.model, impl, args.batch, args.size, args.iters)
            print(f"train step {args.model} batch={args.batch} size={args.size} {impl}: {t:.1f} ms")


if __name__ == "__main__":
    main()
