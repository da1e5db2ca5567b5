"""Train-step time and memory of Sophia-G against AdamW in the real trainer, and where to put the
Hessian estimator: its own compiled `hessian_step` (hessian_mode 'separate') or `lax.cond` inside the
train step ('cond').

All variants run in one process on the same GPT-NeoX, mesh and synthetic batches, interleaved round by
round, every step taken through `Trainer.step` (the training loop's own dispatch). A round times one full
cycle of k = update_interval steps back to back (k train steps, plus the Hessian step after the k-th for
'separate'), so a cycle's time per step is the amortized cost (the goal: <= 5% over AdamW at k = 10).
Also timed: the k - 1 plain steps of a cycle, and its refresh step alone. Medians over rounds. Memory:
XLA's compiled memory analysis of each program (arguments, temporaries, and the bound they give;
sophia-aot has TPU peaks).

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
from trainer.fit import bound_bytes
from trainer.models import flops_per_token, num_params
from trainer.sharding import make_mesh
from trainer.optim import OPTIMIZERS
from trainer.steps import Batch, Trainer

GIB = 2**30


def build(config, optimizer: str, mode: str = "separate") -> Trainer:
    if optimizer == "sophia_g":
        opt = dataclasses.replace(config.optimizer, hessian_mode=mode)
    else:  # AdamW with its own defaults and the config's schedule
        shared = {f.name: getattr(config.optimizer, f.name) for f in dataclasses.fields(OPTIMIZERS[optimizer])
                  if f.name != "type" and hasattr(config.optimizer, f.name) and f.name not in ("b1", "b2", "eps")}
        opt = OPTIMIZERS[optimizer](**shared)
    config = dataclasses.replace(config, optimizer=opt)
    return Trainer(config, make_mesh(config.mesh))


def memory(trainer: Trainer, which: str) -> dict[str, float]:
    """GiB per device of one compiled program: arguments, temporaries, and arguments + temporaries +
    outputs not aliased to (donated) arguments, an upper bound on what is live at once."""
    a = trainer.lower(which).compile().memory_analysis()
    # The CPU backend's peak_memory_in_bytes counts arguments only; this bound is what every backend reports.
    return {"args": a.argument_size_in_bytes / GIB, "temp": a.temp_size_in_bytes / GIB, "live": bound_bytes(a) / GIB}


class Variant:
    """One trainer and its state, stepped through `Trainer.step` (the loop's own dispatch) with a host-side
    step count; a cycle is k steps, the k-th refreshing Sophia's h."""

    def __init__(self, name: str, trainer: Trainer, batches: list, hessian_batch, k: int):
        self.name, self.trainer, self.batches, self.hessian_batch, self.k = name, trainer, batches, hessian_batch, k
        self.state, self.n = trainer.init_state(), 0

    def take(self, i: int = 0) -> None:
        """Takes the next step on batch i."""
        self.n += 1
        self.state, _ = self.trainer.step(self.state, Batch(self.batches[i % len(self.batches)], self.hessian_batch),
                                          self.n)

    def timed(self, steps: int) -> float:
        """Seconds per step over `steps` steps run back to back."""
        jax.block_until_ready(self.state.step)
        start = time.perf_counter()
        for i in range(steps):
            self.take(i)
        jax.block_until_ready(self.state.step)
        return (time.perf_counter() - start) / steps

    def align(self, offset: int = 0) -> None:
        """Takes steps until the next one is a cycle's (offset + 1)-th (offset k - 1: a refresh step)."""
        while self.n % self.k != offset:
            self.take()


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
    k = c.optimizer.update_interval
    for label, optimizer, mode in [("adamw", "adamw", "separate"), ("sophia_g separate", "sophia_g", "separate"),
                                   ("sophia_g cond", "sophia_g", "cond")]:
        trainer = build(c, optimizer, mode)
        batches = [batch(c.trainer.global_batch, trainer.batch_sharding) for _ in range(2)]
        hessian = batch(trainer.hessian_batch, trainer.batch_sharding) if trainer.sophia else None
        variants.append(Variant(label, trainer, batches, hessian, k))
    for v in variants:  # compile every program (two cycles) and start each on a cycle boundary
        v.timed(2 * k)
        v.align()

    cycles = {v.name: [] for v in variants}
    plain = {v.name: [] for v in variants}
    with_hessian = {v.name: [] for v in variants[1:]}
    for _ in range(args.rounds):
        for v in variants:
            cycles[v.name].append(v.timed(k))  # a whole cycle: k - 1 plain steps and a refresh step
            plain[v.name].append(v.timed(k - 1))  # from a cycle boundary: no refresh among them
            if v.name in with_hessian:  # the refresh step alone: train step + Hessian step, or the cond step
                with_hessian[v.name].append(v.timed(1))
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
    print("| variant | step, amortized over k (ms) | vs adamw | plain step (ms) | refresh step: train + Hessian "
          "/ cond with estimator (ms) | tokens/s |")
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
