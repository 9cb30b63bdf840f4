"""Micro-benchmark of the depthwise-conv implementations ('taps' vs 'lax') of xception_jax.ops.

Times the jitted forward and forward+backward (gradients w.r.t. input and kernel) on
Xception-like shapes, prints milliseconds (median of ``--iters`` runs after a warm-up) and the
lax/taps ratio; optionally times a whole model train step (SGD on cross-entropy) with each impl.

  python benchmarks/depthwise.py                      # the layer shapes
  python benchmarks/depthwise.py --model xception_tiny --batch 32 --size 64
  python benchmarks/depthwise.py --model xception --batch 8 --size 299 --iters 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from xception_jax import ops

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
    args = p.parse_args()
    print(f"backend={jax.default_backend()} devices={jax.devices()}")
    print(f"default impl: {ops.default_depthwise_impl()}")
    if not args.skip_layers:
        print(
            f"{'shape (B,H,W,C,stride)':<26}{'taps fwd':>10}{'lax fwd':>10}{'ratio':>7}"
            f"{'taps f+b':>10}{'lax f+b':>10}{'ratio':>7}"
        )
        for shape in DEFAULT_SHAPES:
            tf, tb = bench_layer(shape, "taps", args.iters)
            lf, lb = bench_layer(shape, "lax", args.iters)
            print(
                f"{str(shape):<26}{tf:>10.2f}{lf:>10.2f}{lf / tf:>7.2f}"
                f"{tb:>10.2f}{lb:>10.2f}{lb / tb:>7.2f}"
            )
    if args.model:
        t = {
            i: bench_model(args.model, i, args.batch, args.size, args.iters)
            for i in ops.DEPTHWISE_IMPLS
        }
        print(
            f"train step {args.model} batch={args.batch} size={args.size}: "
            f"taps {t['taps']:.1f} ms, lax {t['lax']:.1f} ms, lax/taps {t['lax'] / t['taps']:.2f}"
        )


if __name__ == "__main__":
    main()
