"""Step time, tokens/s, MFU and peak memory of the real train step, as a markdown table.

Each row is one config x optimizer at one batch, run in its own process (so a row's peak memory is its
own and an out-of-memory row cannot poison the next). A row compiles the trainer's steps, runs one
warm-up step (and one Hessian step for Sophia-G), then times whole cycles of k = update_interval steps
back to back: k train steps, plus the Hessian step after the k-th for Sophia-G (on its configured
fraction of the batch), so Sophia-G's step time is its amortized cost. Step time is the median over
cycles of (cycle time / k). MFU = tokens/s x trainer.models.flops_per_token (6N + attention; the Hessian
step's FLOPs are not counted: it is overhead) / (trainer.metrics.peak_flops x devices). Peak memory is
the device allocator's peak where it reports one, else XLA's compiled bound (arguments + temporaries
+ unaliased outputs) of the largest program. Ratios: tokens/s against the same config's AdamW row; a
naive-attention row (--naive, run right after its config's rows) against that config's AdamW row.

    python benchmarks/mfu.py --configs neox_tiny:8 [neox_125m:32 neox_1_5b:16/4,model.remat=full ...] \\
        [--optimizers adamw sophia_g] [--steps 10] [--naive neox_125m:8,model.remat=full] [--find-batch] \\
        [--override model.remat=full mesh.model=1 ...] [--out table.md]

A config is NAME[:BATCH[/MICROBATCHES]][,dotted=value ...]: NAME under configs/ or a YAML path, no BATCH
= the config's global batch, and dotted overrides for that config's rows only (after --override's).
--find-batch doubles each config's batch from the one given, compiling only, while every optimizer's
steps fit the device memory (or --memory-gib) without microbatches; rows then run at the largest that
fit. Any row that runs out of memory is retried at half its batch. Configs without data get
model.vocab_size 50277 (the NeoX tokenizer's; 4096 for neox_tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

GIB = 2**30
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ADAMW = {"type": "adamw", "b1": 0.9, "b2": 0.95, "eps": 1e-8}  # the AdamW baselines' betas (configs/*_adamw.yaml)


@dataclasses.dataclass(frozen=True)
class Row:
    """What one row measures."""

    config: str  # NAME or path
    optimizer: str
    batch: int | None  # None: the config's global batch
    microbatches: int = 1
    overrides: tuple[str, ...] = ()  # dotted=value
    naive: bool = False  # model.attention=naive

    def argv(self) -> list[str]:
        """The trainer command line of this row."""
        path = self.config if self.config.endswith((".yaml", ".yml")) else str(CONFIGS / f"{self.config}.yaml")
        argv = ["--config", path]
        opt = ADAMW if self.optimizer == "adamw" else {"type": self.optimizer}
        argv += [x for k, v in opt.items() for x in (f"--optimizer.{k}", str(v))]
        if self.batch is not None:
            argv += ["--trainer.global_batch", str(self.batch), "--trainer.microbatches", str(self.microbatches)]
        from trainer.optim import OPTIMIZERS

        fields = {f.name for f in dataclasses.fields(OPTIMIZERS[self.optimizer])}
        for item in self.overrides:
            key, _, value = item.partition("=")
            if key.startswith("optimizer.") and key.split(".", 1)[1] not in fields:
                continue  # e.g. a Sophia-G Hessian setting on the AdamW row of the same config
            argv += [f"--{key}", value]
        if self.naive:
            argv += ["--model.attention", "naive"]
        return argv


# ------------------------------------------------------------------------------------------ one row (child)
def load(row: Row):
    from trainer.config import load_config

    config, name = load_config(row.argv())
    if config.model.vocab_size is None:
        vocab = 4096 if name == "neox_tiny" else 50277
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
    return config


def take_step(trainer, state, batch, hessian_batch, step: int):
    """Optimizer step number `step` (1-based) through `Trainer.step`, the training loop's own dispatch:
    the train step, and the Hessian refresh when due."""
    from trainer.steps import Batch

    state, _ = trainer.step(state, Batch(batch, hessian_batch if trainer.sophia else None), step)
    return state


def compiled_bound(trainer) -> float:
    """XLA's bound on live bytes of the largest of the trainer's programs (the train and Hessian steps)."""
    from trainer.fit import bound_bytes

    programs = ["train", "hessian"] if trainer.sophia and not trainer.cond_mode else ["train"]
    return max(bound_bytes(trainer.lower(which).compile().memory_analysis()) for which in programs)


def measure(row: Row, steps: int) -> dict:
    import jax
    import numpy as np

    from trainer.metrics import peak_flops
    from trainer.models import flops_per_token
    from trainer.sharding import make_mesh
    from trainer.steps import Trainer

    config = load(row)
    trainer = Trainer(config, make_mesh(config.mesh))
    c, k = trainer.config, trainer.k or 10  # AdamW: timed over cycles of the same length
    rng = np.random.default_rng(0)
    tokens = lambda rows: jax.device_put(  # noqa: E731
        rng.integers(0, c.model.vocab_size, (rows, c.model.seq_len + 1), dtype=np.int32), trainer.batch_sharding)
    batches, hessian_batch = [tokens(c.trainer.global_batch) for _ in range(2)], (
        tokens(trainer.hessian_batch) if trainer.sophia else None)
    device = trainer.mesh.devices.flat[0]
    start = time.perf_counter()
    # Without allocator statistics (CPU), XLA's bound; compiled before the first step, which reuses it.
    bound = None if "peak_bytes_in_use" in (device.memory_stats() or {}) else compiled_bound(trainer)
    state = trainer.init_state()
    state = take_step(trainer, state, batches[0], hessian_batch, k)  # warm-up: every program compiles and runs
    jax.block_until_ready(state)
    first_s = time.perf_counter() - start
    cycles = []
    for _ in range(max(1, -(-steps // k))):
        begin = time.perf_counter()
        for i in range(1, k + 1):
            state = take_step(trainer, state, batches[i % 2], hessian_batch, i)
        jax.block_until_ready(state)
        cycles.append((time.perf_counter() - begin) / k)
    step_s = statistics.median(cycles)
    stats = device.memory_stats() or {}
    tokens_per_s = c.trainer.global_batch * c.model.seq_len / step_s
    peak = peak_flops(device.device_kind, c.trainer.peak_flops_per_device)
    return {
        "batch": c.trainer.global_batch, "seq_len": c.model.seq_len, "microbatches": c.trainer.microbatches,
        "attention": trainer.config.model.attention, "remat": c.model.remat, "loss_chunk": c.model.loss_chunk,
        "step_ms": 1e3 * step_s, "tokens_per_s": tokens_per_s, "cycles": len(cycles), "first_s": first_s,
        "mfu": None if peak is None else tokens_per_s * flops_per_token(c.model) / (peak * trainer.mesh.size),
        "peak_gib": (bound if bound is not None else stats["peak_bytes_in_use"]) / GIB,
        "peak_from": "compiled" if bound is not None else "allocator",
        "device": f"{trainer.mesh.size} x {device.device_kind}, JAX {jax.__version__}",
    }


def fits(row: Row, optimizers: list[str], limit: float | None) -> dict:
    """Whether every optimizer's compiled steps of `row` fit `limit` bytes (default: the device's)."""
    import jax

    from trainer.sharding import make_mesh
    from trainer.steps import Trainer

    if limit is None:
        limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if limit is None:
            raise ValueError("--find-batch: this device reports no memory limit; pass --memory-gib")
    bounds = []
    for optimizer in optimizers:
        config = load(dataclasses.replace(row, optimizer=optimizer))
        try:
            bounds.append(compiled_bound(Trainer(config, make_mesh(config.mesh))))
        except Exception as error:  # noqa: BLE001  (a compile that runs out of memory says so in its message)
            if not is_oom(str(error)):
                raise
            return {"fits": False, "gib": None}
    return {"fits": max(bounds) <= limit, "gib": max(bounds) / GIB}


def is_oom(text: str) -> bool:
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def handle(request: dict) -> dict:
    """A row's measurement (or fit check) as a dict; failures are reported in it, not raised."""
    row = Row(**{**request["row"], "overrides": tuple(request["row"]["overrides"])})
    try:
        if request["mode"] == "fit":
            limit = None if request["memory_gib"] is None else request["memory_gib"] * GIB
            result = fits(row, request["optimizers"], limit)
        else:
            result = measure(row, request["steps"])
    except Exception as error:  # noqa: BLE001  (reported to the parent, which decides)
        text = str(error)
        first = (text.strip().splitlines() or [""])[0][:300].replace("|", "/")  # a table cell
        result = {"oom": is_oom(text), "error": f"{type(error).__name__}: {first}"}
    return result


# ------------------------------------------------------------------------------------------ the table (parent)
def execute(request: dict, args) -> dict:
    """One request, in a fresh Python process (its last RESULT line, or why there is none) or, with
    --in-process, here."""
    if args.in_process:
        return handle(request)
    timeout = args.row_timeout
    command = [sys.executable, __file__, "--child", json.dumps(request)]
    root = str(Path(__file__).resolve().parent.parent)  # this checkout's trainer, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"oom": is_oom(proc.stderr), "error": f"exit {proc.returncode}: {' / '.join(tail)[:300].replace('|', '/')}"}


def parse_spec(spec: str, overrides: list[str]) -> Row:
    """NAME[:BATCH[/MICROBATCHES]][,dotted=value ...] (after the common `overrides`) -> an AdamW Row."""
    head, *own = spec.split(",")
    for item in own:
        if "=" not in item:
            raise SystemExit(f"{spec!r}: write NAME[:BATCH[/MICROBATCHES]][,dotted=value ...]")
    name, _, size = head.partition(":")
    batch, _, micro = size.partition("/")
    return Row(name, "adamw", int(batch) if batch else None, int(micro or 1), (*overrides, *own))


def find_batch(row: Row, optimizers: list[str], args) -> int:
    """The largest batch (doubling from row.batch, at most --max-batch) whose compiled steps fit."""
    best, batch = None, row.batch or 1
    while batch <= args.max_batch:
        request = {"mode": "fit", "row": dataclasses.asdict(dataclasses.replace(row, batch=batch)),
                   "optimizers": optimizers, "memory_gib": args.memory_gib}
        result = execute(request, args)
        if "error" in result and not result.get("oom"):
            raise SystemExit(f"--find-batch {row.config} at batch {batch}: {result['error']}")
        print(f"  find-batch {row.config}: {batch} {'fits' if result.get('fits') else 'does not fit'}"
              + (f" ({result['gib']:.1f} GiB)" if result.get("gib") else ""), file=sys.stderr, flush=True)
        if not result.get("fits"):
            break
        best, batch = batch, batch * 2
    if best is None:
        raise SystemExit(f"--find-batch: {row.config} does not fit at batch {row.batch or 1}")
    return best


def run_row(row: Row, args) -> tuple[Row, dict]:
    """Measures `row`, halving its batch after an out-of-memory failure (while it stays >= microbatches)."""
    while True:
        request = {"mode": "measure", "row": dataclasses.asdict(row), "steps": args.steps}
        result = execute(request, args)
        if not result.get("oom") or row.batch is None or row.batch // 2 < row.microbatches:
            return row, result
        print(f"  {row.config} {row.optimizer} batch {row.batch}: out of memory, trying {row.batch // 2}",
              file=sys.stderr, flush=True)
        row = dataclasses.replace(row, batch=row.batch // 2)


HEADER = ("| config | optimizer | batch x seq | microbatches | attention | remat | loss_chunk | step (ms) | tokens/s "
          "| MFU | peak memory (GiB) | tokens/s vs baseline | baseline | compile + first step (s) |")


def format_row(row: Row, r: dict, baseline: tuple[str, dict] | None) -> str:
    if "error" in r:
        return f"| {row.config} | {row.optimizer} | {row.batch} | {row.microbatches} | {'naive' if row.naive else '-'} " \
               f"| - | - | failed: {r['error']} | | | | | | |"
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    ratio, label = "-", "-"
    if baseline is not None and "error" not in baseline[1]:
        ratio, label = f"{r['tokens_per_s'] / baseline[1]['tokens_per_s']:.2f}x", baseline[0]
    return (f"| {row.config} | {row.optimizer} | {r['batch']} x {r['seq_len']} | {r['microbatches']} | {r['attention']} "
            f"| {r['remat']} | {r['loss_chunk']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {mfu} "
            f"| {r['peak_gib']:.2f}{'' if r['peak_from'] == 'allocator' else ' (compiled)'} | {ratio} | {label} "
            f"| {r['first_s']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--configs", nargs="+", default=["neox_tiny:8"], metavar="NAME[:BATCH[/MICRO]][,k=v]")
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "sophia_g"], choices=["adamw", "sophia_g", "lion"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps, rounded up to whole cycles of k")
    parser.add_argument("--naive", nargs="*", default=[], metavar="NAME[:BATCH[/MICRO]][,k=v]",
                        help="AdamW rows with model.attention=naive, compared with that config's AdamW row")
    parser.add_argument("--override", nargs="+", default=[], metavar="DOTTED=VALUE", help="applied to every row")
    parser.add_argument("--find-batch", action="store_true", help="largest batch that fits (compile-only doubling)")
    parser.add_argument("--max-batch", type=int, default=1024)
    parser.add_argument("--memory-gib", type=float, help="--find-batch's memory limit (default: the device's)")
    parser.add_argument("--row-timeout", type=float, default=600, help="seconds before a row's process is killed")
    parser.add_argument("--in-process", action="store_true",
                        help="run the rows in this process: no start-up per row, but no memory isolation (CPU)")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(handle(json.loads(args.child))), flush=True)
        return 0
    for item in args.override:
        if "=" not in item:
            parser.error(f"--override {item!r}: write dotted.key=value")

    lines = []

    def emit(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")

    emit(f"overrides: {' '.join(args.override) or 'none'}; steps {args.steps} (whole cycles of k); "
         f"ratios: tokens/s against the baseline row named\n")
    emit(HEADER)
    emit("|" + "---|" * HEADER.count(" | ") + "---|")
    adamw_rows: dict[str, tuple[str, dict]] = {}
    naive_rows = [dataclasses.replace(parse_spec(spec, args.override), naive=True) for spec in args.naive]
    names = [parse_spec(spec, []).config for spec in args.configs]
    device = None
    for spec in args.configs:
        row = parse_spec(spec, args.override)
        name = row.config
        if args.find_batch:
            row = dataclasses.replace(row, batch=find_batch(row, args.optimizers, args))
        for optimizer in args.optimizers:
            done, result = run_row(dataclasses.replace(row, optimizer=optimizer), args)
            device = result.get("device", device)
            label = f"{name} adamw {done.batch or ''}".strip()
            if optimizer == "adamw" and "error" not in result:  # the baseline of this spec's other rows
                adamw_rows[spec] = adamw_rows[name] = (label, result)  # (and of the config's naive rows)
            baseline = None if optimizer == "adamw" else adamw_rows.get(spec)
            emit(format_row(done, result, baseline))
        for row in [r for r in naive_rows if r.config == name]:  # right after their baseline
            emit(format_row(*run_row(row, args), adamw_rows.get(name)))
    for row in [r for r in naive_rows if r.config not in names]:
        emit(format_row(*run_row(row, args), None))
    emit(f"\ndevice: {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
