"""Step time of the jitted Sophia-G update against optax.adamw and optax.contrib.sophia, the fraction of
the memory-bandwidth roofline each reaches, and (without a clock) XLA's compiled cost of each update.

All optimizers are timed in one process, interleaved round by round, on a transformer-shaped pytree
(~30M parameters by default), as a trainer runs them: `(params, state) -> (params + update, state)`,
jitted with both donated. Each round times a run of back-to-back calls (dispatch pipelined, as in a
training loop); reported times are medians over rounds of the mean time per call.
The roofline is a jitted, donated triad `a*x + b*y` over the same number of elements: bytes moved per
second by each update (arrays it must read and write, x element size) divided by the triad's.

The compiled cost is deterministic: `cost_analysis()["bytes accessed"]` of the donated update
`(params, state, grads) -> (params, state)` on 8 float32 1024 x 1024 matrices, divided by 4 bytes x params
(Sophia's floor is 6: read p, g, m, h; write p, m; AdamW's 7), and the number of fusions XLA emitted; on
this machine's CPU and, with libtpu installed, for a TPU v3 core compiled without one (`--tpu v3:2x2`).
tests/test_sophia_cost.py guards the same numbers.

    python benchmarks/optimizer_step.py [--layers 4 --d_model 512 --vocab 16384 --rounds 15] [--tpu v3:2x2]
    python benchmarks/optimizer_step.py --cost_only [--tpu v3:2x2]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import sophia_jax

# Nominal HBM bandwidth by device kind, bytes/s (vendor figures), for the "% of device" column.
NOMINAL_BANDWIDTH = {"NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA H200": 4.8e12, "TPU v3": 0.9e12 / 2}


def transformer_params(layers: int, d: int, vocab: int, key: jax.Array) -> dict:
    """GPT-NeoX-shaped parameter pytree: untied embedding and head, QKV/out/MLP with biases, norms."""
    shapes = {"embed": (vocab, d), "head": (d, vocab), "final_norm": (d,)}
    for i in range(layers):
        shapes |= {
            f"layer{i}/qkv": (d, 3 * d), f"layer{i}/qkv_bias": (3 * d,),
            f"layer{i}/out": (d, d), f"layer{i}/out_bias": (d,),
            f"layer{i}/mlp_in": (d, 4 * d), f"layer{i}/mlp_in_bias": (4 * d,),
            f"layer{i}/mlp_out": (4 * d, d), f"layer{i}/mlp_out_bias": (d,),
            f"layer{i}/ln1": (d,), f"layer{i}/ln2": (d,),
        }
    keys = jax.random.split(key, len(shapes))
    return {name: 0.02 * jax.random.normal(k, shape) for k, (name, shape) in zip(keys, shapes.items())}


def time_calls(fn: Callable, carry, n: int) -> tuple[float, object]:
    """Runs `carry = fn(carry)` n times back to back (dispatch pipelined, as in a training loop) and
    returns the mean seconds per call, blocking once at the end."""
    start = time.perf_counter()
    for _ in range(n):
        carry = fn(carry)
    carry = jax.block_until_ready(carry)
    return (time.perf_counter() - start) / n, carry


def optimizer_steps(params, grads):
    """name -> (jitted trainer-style step, initial carry, arrays the fused step must move).

    The step is what a trainer runs: `(params, state) -> (params + update, state)` with both donated,
    so every output can be written over its input. Grads are a (non-donated) argument.
    """
    never = 10**9  # estimator compiled in (inside lax.cond) but never taken: the no-Hessian calls
    quadratic = lambda p: sum(jnp.sum(x * x) for x in jax.tree.leaves(p))  # noqa: E731
    optimizers = {
        # reads g, m, v, p; writes m, v, p
        "optax.adamw": (optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1), 7, {}),
        # reads g, m, h, p; writes m, p
        "sophia_g": (sophia_jax.sophia_g(1e-3, weight_decay=0.1), 6, {}),
        "sophia_g + estimator in cond": (
            sophia_jax.sophia_g(1e-3, weight_decay=0.1, update_interval=never,
                                hessian_fn=sophia_jax.hutchinson(quadratic)), 6, {}),
        "optax.contrib.sophia": (
            optax.contrib.sophia(1e-3, weight_decay=0.1, update_interval=never), 6, {"obj_fn": quadratic}),
    }
    steps = {}
    for name, (opt, arrays, extra) in optimizers.items():
        def step(carry, grads, opt=opt, extra=extra):
            params, state = carry
            updates, state = opt.update(grads, state, params, **extra)
            return optax.apply_updates(params, updates), state

        jitted = jax.jit(step, donate_argnums=0)
        carry = (jax.tree.map(jnp.copy, params), opt.init(params))
        steps[name] = (lambda carry, jitted=jitted: jitted(carry, grads), carry, arrays)
    return steps


def update_cost(opt: Any, params: Any, device: Any | None = None, **extra_args: Any) -> tuple[float, int]:
    """(bytes accessed / (4 x params), fusions) of the compiled, donated `(params, state, grads) -> (params,
    state)` of `opt` on `params` (arrays or ShapeDtypeStructs), for `device` (default: the first CPU)."""
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params, **extra_args)
        return optax.apply_updates(params, updates), state

    sharding = jax.sharding.SingleDeviceSharding(device or jax.devices("cpu")[0])
    shaped = lambda tree: jax.tree.map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
    state = jax.eval_shape(opt.init, params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(shaped(params), shaped(state), shaped(params)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per device
    n = sum(a.size for a in jax.tree.leaves(params))
    fusions = len(re.findall(r"= [^\n]*? fusion\(", compiled.as_text()))
    return cost["bytes accessed"] / (4 * n), fusions


def cost_optimizers() -> dict[str, tuple[Any, dict[str, Any]]]:
    """name -> (optimizer, extra args of its update) for the compiled-cost table."""
    quadratic = lambda p: sum(jnp.sum(x * x) for x in jax.tree.leaves(p))  # noqa: E731
    return {
        "sophia_g": (sophia_jax.sophia_g(1e-3, weight_decay=0.1), {}),
        "sophia_g, h_bias_correction": (sophia_jax.sophia_g(1e-3, weight_decay=0.1, h_bias_correction=True), {}),
        "optax.adamw": (optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.1), {}),
        "optax.contrib.sophia": (optax.contrib.sophia(1e-3, weight_decay=0.1), {"obj_fn": quadratic}),
        # Both branches of the conditional counted: the estimator's own work and h through the cond.
        "sophia_g + hutchinson in cond": (sophia_jax.sophia_g(1e-3, weight_decay=0.1,
                                                              hessian_fn=sophia_jax.hutchinson(quadratic)), {}),
    }


COST_PARAMS = {f"w{i}": jax.ShapeDtypeStruct((1024, 1024), jnp.float32) for i in range(8)}


def print_cost_table(tpu: str | None) -> None:
    devices = {"CPU": jax.devices("cpu")[0]}
    if tpu:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        from jax.experimental import topologies

        devices[f"TPU {tpu} (deviceless)"] = topologies.get_topology_desc(tpu, "tpu").devices[0]
    header = "| update (8 x 1024 x 1024 float32) | " + " | ".join(f"{d}: bytes/param, fusions" for d in devices) + " |"
    print(header)
    print("|" + "---|" * (len(devices) + 1))
    for name, (opt, extra) in cost_optimizers().items():
        cells = [update_cost(opt, COST_PARAMS, device, **extra) for device in devices.values()]
        print(f"| {name} | " + " | ".join(f"{b:.2f}, {f}" for b, f in cells) + " |", flush=True)


def bench_updates(params, rounds: int, calls: int) -> list[tuple[str, float, int]]:
    grads = jax.tree.map(lambda p: p * 0.5 + 1e-3, params)
    n = sum(x.size for x in jax.tree.leaves(params))
    triad = jax.jit(lambda xy: (2.0 * xy[0] + 3.0 * xy[1], xy[1]), donate_argnums=0)
    fns = {"triad": (triad, 3)}
    carries = {"triad": (jnp.ones(n), jnp.ones(n))}
    for name, (fn, carry, arrays) in optimizer_steps(params, grads).items():
        fns[name], carries[name] = (fn, arrays), carry
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for name, (fn, _) in fns.items():  # compile and warm up
        _, carries[name] = time_calls(fn, carries[name], 2)
    for _ in range(rounds):
        for name, (fn, _) in fns.items():
            seconds, carries[name] = time_calls(fn, carries[name], calls)
            samples[name].append(seconds)
    return [(name, statistics.median(samples[name]), arrays) for name, (_, arrays) in fns.items()]


def bench_hessian_cost(rounds: int) -> list[tuple[str, float]]:
    """A plain gradient vs one GNB and one Hutchinson estimate on a small MLP language-model head."""
    key = jax.random.PRNGKey(0)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {"w1": 0.05 * jax.random.normal(k1, (256, 1024)), "w2": 0.05 * jax.random.normal(k2, (1024, 4096))}
    x = jax.random.normal(k3, (512, 256))
    labels = jax.random.randint(k4, (512,), 0, 4096)

    def logits_fn(p, x):
        return jax.nn.gelu(x @ p["w1"]) @ p["w2"]

    def loss_fn(p, x):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p, x), labels).mean()

    fns = {
        "gradient": jax.jit(lambda p: jax.grad(loss_fn)(p, x)),
        "GNB estimate": jax.jit(lambda p: sophia_jax.gauss_newton_bartlett(logits_fn)(p, key, x=x)),
        "Hutchinson estimate": jax.jit(lambda p: sophia_jax.hutchinson(loss_fn)(p, key, x=x)),
    }
    samples = {name: [] for name in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(params))
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds, _ = time_calls(lambda c, fn=fn: fn(params), None, 5)
            samples[name].append(seconds)
    return [(name, statistics.median(s)) for name, s in samples.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per optimizer per round")
    parser.add_argument("--tpu", default=None, help="also the compiled cost for this TPU topology (needs libtpu)")
    parser.add_argument("--cost_only", action="store_true", help="only the compiled-cost table (no timing)")
    args = parser.parse_args()
    if args.cost_only:
        print_cost_table(args.tpu)
        return

    device = jax.devices()[0]
    params = transformer_params(args.layers, args.d_model, args.vocab, jax.random.PRNGKey(0))
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, optax {optax.__version__}")
    print(f"params: {n / 1e6:.1f}M float32 in {len(params)} leaves; median over {args.rounds} rounds "
          f"of {args.calls} back-to-back calls\n")

    results = bench_updates(params, args.rounds, args.calls)
    times = {name: t for name, t, _ in results}
    triad_bw = 3 * n * 4 / times["triad"]
    nominal = next((bw for kind, bw in NOMINAL_BANDWIDTH.items() if device.device_kind.startswith(kind)), None)
    header = "| step | median ms | vs adamw | vs contrib.sophia | arrays moved | GB/s | % of triad |"
    if nominal:
        header += " % of device |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, t, arrays in results:
        gbs = arrays * n * 4 / t
        row = (f"| {name} | {t * 1e3:.2f} | {t / times['optax.adamw']:.2f}x | "
               f"{t / times['optax.contrib.sophia']:.2f}x | {arrays} | {gbs / 1e9:.1f} | {gbs / triad_bw:.0%} |")
        if nominal:
            row += f" {gbs / nominal:.0%} |"
        print(row)

    print("\nHessian estimate cost on an MLP head (256 -> 1024 -> 4096 vocab, batch 512):\n")
    print("| call | median ms | vs gradient |")
    print("|---|---|---|")
    hessian = bench_hessian_cost(args.rounds)
    grad_time = dict(hessian)["gradient"]
    for name, t in hessian:
        print(f"| {name} | {t * 1e3:.2f} | {t / grad_time:.2f}x |")
    print("\nCompiled cost (XLA cost_analysis, deterministic):\n")
    print_cost_table(args.tpu)


if __name__ == "__main__":
    main()
