"""Train-step time and memory of Sophia-G against AdamW in the real trainer, and where to put the
Hessian estimator: its own compiled `hessian_step` (hessian_mode 'separate') or `lax.cond` inside the
train step ('cond').

All variants run in one process on the same GPT-NeoX, mesh and synthetic batches, interleaved round by
round. A round times one full cycle of k = update_interval steps back to back (k train steps, plus the
Hessian step after the k-th for 'separate'), so a cycle's time per step is the amortized cost the issue's
goal is about (<= 5% over AdamW at k = 10). Also timed alone: a plain Sophia step, the Hessian step, and
the 'cond' step with the branch taken. Medians over rounds. Memory: XLA's compiled memory analysis of
each program (arguments, temporaries, and the bound they give; sophia-aot has TPU peaks).

    python benchmarks/train_step.py [--config configs/neox_tiny.yaml] [--rounds 7] [--dotted.key VALUE ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import numpy as np

from trainer.config import load_config
from trainer.model import flops_per_token, num_params
from trainer.sharding import make_mesh
from trainer.train import Trainer

GIB = 2**30


def build(config, optimizer: str, mode: str = "separate") -> Trainer:
    opt = dataclasses.replace(config.optimizer, type=optimizer, hessian_mode=mode)
    if optimizer == "adamw":
        opt = dataclasses.replace(opt, b1=0.9, b2=0.95, eps=1e-8)
    config = dataclasses.replace(config, optimizer=opt)
    return Trainer(config, make_mesh(config.mesh))


def memory(trainer: Trainer, which: str) -> dict[str, float]:
    """GiB per device of one compiled program: arguments, temporaries, and arguments + temporaries +
    outputs not aliased to (donated) arguments, an upper bound on what is live at once."""
    a = trainer.lower(which).compile().memory_analysis()
    # The CPU backend's peak_memory_in_bytes counts arguments only; this bound is what every backend reports.
    live = a.argument_size_in_bytes + a.temp_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes
    return {"args": a.argument_size_in_bytes / GIB, "temp": a.temp_size_in_bytes / GIB, "live": live / GIB}


class Variant:
    """One trainer and its state; `cycle()` runs k steps the way the training loop does."""

    def __init__(self, name: str, trainer: Trainer, batches: list, hessian_batch):
        self.name, self.trainer, self.batches, self.hessian_batch = name, trainer, batches, hessian_batch
        self.state = trainer.init_state()

    def step(self, i: int, hessian: bool) -> None:
        t = self.trainer
        batch = self.batches[i % len(self.batches)]
        if t.cond_mode:
            self.state, _ = t.train_step(self.state, batch, self.hessian_batch)
        else:
            self.state, _ = t.train_step(self.state, batch)
            if hessian and t.sophia:
                self.state, _ = t.hessian_step(self.state, self.hessian_batch)

    def cycle(self) -> float:
        """Seconds per step over one cycle of k steps (steps k, 2k, ... refresh h), run back to back."""
        t, k = self.trainer, self.trainer.k
        start = time.perf_counter()
        count = int(self.state.step)  # blocks: the previous cycle is done
        for i in range(k):
            self.step(i, hessian=t.hessian_due(count + i + 1))
        jax.block_until_ready(self.state.step)
        return (time.perf_counter() - start) / k

    def align(self) -> None:
        """Runs single steps until the next cycle starts right after a Hessian refresh."""
        while int(self.state.step) % self.trainer.k:
            self.step(0, hessian=self.trainer.hessian_due(int(self.state.step) + 1))
        jax.block_until_ready(self.state.step)


def time_plain(variant: Variant, n: int) -> float:
    """Seconds per plain train step (no Hessian work), n steps back to back."""
    start = time.perf_counter()
    for i in range(n):
        variant.step(i, hessian=False)
    jax.block_until_ready(variant.state.step)
    return (time.perf_counter() - start) / n


def time_hessian(variant: Variant) -> float:
    """Seconds of the Hessian work of one refresh: the hessian_step ('separate'), or the whole train step
    whose lax.cond takes the estimator branch ('cond', timed on a step k, 2k, ...)."""
    t = variant.trainer
    if t.cond_mode:
        variant.align()
        for j in range(t.k - 1):
            variant.step(j, hessian=False)
        jax.block_until_ready(variant.state.step)
    start = time.perf_counter()
    if t.cond_mode:
        variant.step(0, hessian=True)
    else:
        variant.state, _ = t.hessian_step(variant.state, variant.hessian_batch)
    jax.block_until_ready(variant.state.step)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    args, overrides = parser.parse_known_args()
    config, name = load_config(overrides)
    if config.model.vocab_size is None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=4096))
    c = config
    rng = np.random.default_rng(0)

    def batch(rows: int, sharding) -> jax.Array:
        tokens = rng.integers(0, c.model.vocab_size, (rows, c.model.seq_len + 1), dtype=np.int32)
        return jax.device_put(tokens, sharding)

    variants = []
    for label, optimizer, mode in [("adamw", "adamw", "separate"), ("sophia_g separate", "sophia_g", "separate"),
                                   ("sophia_g cond", "sophia_g", "cond")]:
        trainer = build(c, optimizer, mode)
        batches = [batch(c.trainer.global_batch, trainer.batch_sharding) for _ in range(2)]
        variants.append(Variant(label, trainer, batches, batch(trainer.hessian_batch, trainer.batch_sharding)))
    k = variants[0].trainer.k
    for v in variants:  # compile every program and start each on a cycle boundary
        v.cycle()
        v.align()
        v.cycle()

    cycles = {v.name: [] for v in variants}
    plain = {v.name: [] for v in variants}
    with_hessian = {v.name: [] for v in variants[1:]}
    for _ in range(args.rounds):
        for v in variants:
            cycles[v.name].append(v.cycle())
            plain[v.name].append(time_plain(v, n=k - 1))  # from a cycle boundary: no refresh among them
            if v.name in with_hessian:
                with_hessian[v.name].append(time_hessian(v))
            v.align()

    med = {name: statistics.median(times) for name, times in cycles.items()}
    base = med["adamw"]
    device = jax.devices()[0]
    tokens = c.trainer.global_batch * c.model.seq_len
    print(f"# {name}: {num_params(c.model) / 1e6:.1f}M params, batch {c.trainer.global_batch} x {c.model.seq_len}, "
          f"k = {k}, Hessian batch {variants[1].trainer.hessian_batch} rows, {jax.device_count()} x "
          f"{device.device_kind}, mesh {dict(variants[0].trainer.mesh.shape)}, {args.rounds} rounds (medians)")
    print(f"# {flops_per_token(c.model) * tokens / 1e9:.1f} GFLOP per train step (6N + attention)")
    print()
    print("| variant | step, amortized over k (ms) | vs adamw | plain step (ms) | Hessian step / cond step "
          "with estimator (ms) | tokens/s |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        hess = f"{1e3 * statistics.median(with_hessian[v.name]):.1f}" if v.name in with_hessian else "-"
        print(f"| {v.name} | {1e3 * med[v.name]:.1f} | {med[v.name] / base:.3f}x | "
              f"{1e3 * statistics.median(plain[v.name]):.1f} | {hess} | {tokens / med[v.name]:,.0f} |")
    print()
    print("| program | arguments (GiB) | temporaries (GiB) | args + temp + unaliased outputs (GiB) |")
    print("|---|---|---|---|")
    programs = [("adamw train_step", variants[0].trainer, "train"),
                ("sophia_g train_step (separate)", variants[1].trainer, "train"),
                ("sophia_g hessian_step (separate)", variants[1].trainer, "hessian"),
                ("sophia_g train_step (cond)", variants[2].trainer, "train")]
    for label, trainer, which in programs:
        m = memory(trainer, which)
        print(f"| {label} | {m['args']:.3f} | {m['temp']:.3f} | {m['live']:.3f} |")


if __name__ == "__main__":
    main()
