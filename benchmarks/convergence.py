"""Sophia-G against AdamW and Lion, tuned, with the real trainer: eval loss per optimizer at two regimes of
tokens per step, and Sophia-G's diagnostics (win rates, |h|, the estimator's gradient clip).

    python benchmarks/convergence.py [--size cpu|gpu] [--out DIR] [--regimes small,large]
        [--optimizers sophia_g,adamw,lion] [--seeds 2] [--max_widen 3] [--no_alternatives]
        [--grid OPT=LR,LR,...] [--rho RHO,RHO,...] [--steps N] [--dry_run] [--dotted.key VALUE ...]

Every run is `trainer.train.train(config)` in this process, the config built from configs/neox_tiny.yaml
with dotted overrides exactly as `sophia-train` builds it (the report prints each best run's command).
All optimizers of a regime share the model, data, tokens per step, schedule shape (warmup fraction,
cosine to min_lr_ratio) and seeds; each keeps its own betas and weight decay (Sophia-G 0.2, AdamW 0.1,
Lion 1.0). Per optimizer: a learning-rate grid (x rho for Sophia-G); while the best point is on the
grid's edge along an axis (no tried neighbour on one side, the other coordinates held), one more point
beyond that edge (x2 in lr, x4 in rho) is run, up to --max_widen points outside the initial range; then --seeds
seeds at the best. The first regime starts from the size's grids, later ones around the first regime's
bests (lr x1/2, x1, x2 and its rho; --independent_grids: the size's grids). Sophia-G alternatives (one
seed): the estimator's gradient not clipped (lr best/2, best, 2 best x rho 0.05, widened once) and the
Hessian batch equal to the train batch (the official runs' choice; at the best lr and rho). Sophia-G with a
bias-corrected h (`optimizer.h_bias_correction`) is tuned like an optimizer: its own grid (Sophia-G's),
widened, and --seeds seeds at its best.

Resumable: a run whose directory holds bench.json and a metrics.jsonl that reached the last step with an
eval loss is read, not rerun; an unfinished one resumes from its checkpoint, or restarts without one.
Writes <out>/<regime>/{table.md, loss.png, diagnostics.png, summary.json} and <out>/REPORT.md; the runs
live in <out>/runs/ (gitignored). `--size cpu` is a reduced model sized for a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

import convergence_report as report

__all__ = ["Campaign", "Point", "Regime", "SIZES", "Size", "main"]

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO / "configs" / "neox_tiny.yaml"
LR_FACTOR, RHO_FACTOR = 2.0, 4.0
WEIGHT_DECAY = {"sophia_g": 0.2, "adamw": 0.1, "lion": 1.0}


@dataclasses.dataclass(frozen=True)
class Regime:
    """Tokens per step (global_batch x seq_len, the batch accumulated over `microbatches`) and run length."""

    name: str
    global_batch: int
    microbatches: int
    steps: int
    eval_every: int
    log_every: int


@dataclasses.dataclass(frozen=True)
class Size:
    """A model, its data and evaluation (dotted overrides of neox_tiny.yaml), its regimes and initial grids."""

    name: str
    description: str
    overrides: dict[str, Any]
    regimes: tuple[Regime, ...]
    lr_grids: dict[str, tuple[float, ...]]
    rho_grid: tuple[float, ...]


SIZES = {
    "cpu": Size(
        "cpu", "REDUCED CPU SIZE: GPT-NeoX 2 x 64 (4 heads), seq 64, BPE vocab 512 on the embedded corpus "
        "(~0.13M matmul params), float32; sized so both regimes finish in about an hour on 2 shared cores",
        {"model.num_layers": 2, "model.hidden_dim": 64, "model.num_heads": 4, "model.seq_len": 64,
         "model.compute_dtype": "float32", "data.embedded.vocab_size": 512, "trainer.eval_batches": 8,
         "trainer.eval_batch_size": 32},
        (Regime("small", 16, 1, 300, 20, 5), Regime("large", 128, 8, 100, 10, 1)),
        {"adamw": (3e-3, 6e-3, 1.2e-2), "lion": (3e-4, 6e-4, 1.2e-3), "sophia_g": (5e-4, 1e-3, 2e-3)},
        (0.05, 0.2)),
    "gpu": Size(
        "gpu", "GPU SIZE (documented, not run here): GPT-NeoX 6 x 384 (6 heads, ~17M params with the 4096 "
        "BPE), seq 512, bfloat16 matmuls, on the embedded corpus grown to 40 MB of source (it repeats: "
        "~1.5 and ~6 epochs; pass --data.cache DIR for real text)",
        {"model.num_layers": 6, "model.hidden_dim": 384, "model.num_heads": 6, "model.seq_len": 512,
         "model.compute_dtype": "bfloat16", "data.embedded.max_bytes": 40_000_000, "trainer.eval_batches": 20,
         "trainer.eval_batch_size": 32},
        (Regime("small", 32, 1, 1500, 100, 10), Regime("large", 256, 8, 600, 50, 5)),
        {"adamw": (1e-3, 2e-3, 4e-3), "lion": (1.5e-4, 3e-4, 6e-4), "sophia_g": (2.5e-4, 5e-4, 1e-3)},
        (0.05, 0.2)),
}

# Sophia-G alternatives: (label, overrides given the regime). Not the default rule; reported apart.
VARIANTS: dict[str, tuple[str, Callable[[Regime], dict[str, Any]]]] = {
    "noclip": ("Sophia-G, estimator gradient not clipped", lambda r: {"optimizer.hessian_clip": False}),
    "fullbatch": ("Sophia-G, Hessian batch = train batch",
                  lambda r: {"optimizer.hessian_batch_fraction": 1.0,
                             "optimizer.hessian_microbatches": r.microbatches}),
    "hbias": ("Sophia-G, bias-corrected h", lambda r: {"optimizer.h_bias_correction": True}),
}
# Variants tuned like an optimizer (its own lr x rho grid, widened, --seeds seeds at its best); the others
# get one seed around the default rule's best.
TUNED_VARIANTS = ("hbias",)


@dataclasses.dataclass(frozen=True)
class Point:
    """One run: optimizer, peak lr, rho (Sophia-G), seed and variant ('' = the default rule)."""

    optimizer: str
    lr: float
    rho: float | None = None
    seed: int = 0
    variant: str = ""

    @property
    def name(self) -> str:
        rho = "" if self.rho is None else f"_rho{self.rho:g}"
        variant = f"-{self.variant}" if self.variant else ""
        return f"{self.optimizer}{variant}_lr{self.lr:.3g}{rho}_s{self.seed}"


def _settings(argv: list[str]) -> list[str]:
    """A run's command line without its run directory (the output folder may move)."""
    return [a for i, a in enumerate(argv) if a != "--run_dir" and (i == 0 or argv[i - 1] != "--run_dir")]


def _scaled(value: float, factor: float) -> float:
    return float(f"{value * factor:.4g}")


class Campaign:
    """The runs of one regime of one size: run (or read) points, tune, report."""

    def __init__(self, size: Size, regime: Regime, out: Path, extra: dict[str, Any], *, dry_run: bool = False,
                 log: Callable[[str], None] = print):
        self.size, self.regime, self.extra, self.dry_run, self.log = size, regime, extra, dry_run, log
        self.runs_dir = out / "runs" / regime.name
        self.results: dict[Point, report.RunData] = {}
        self.executed, self.reused = 0, 0

    @property
    def tokens_per_step(self) -> int:
        seq = {**self.size.overrides, **self.extra}.get("model.seq_len", 128)  # neox_tiny.yaml's 128 otherwise
        return self.regime.global_batch * int(seq)

    def overrides(self, point: Point) -> dict[str, Any]:
        r = self.regime
        values = {
            **self.size.overrides,
            "optimizer.type": point.optimizer, "optimizer.learning_rate": point.lr,
            "optimizer.weight_decay": WEIGHT_DECAY[point.optimizer],
            "trainer.global_batch": r.global_batch, "trainer.microbatches": r.microbatches,
            "trainer.num_train_steps": r.steps, "trainer.eval_every": r.eval_every, "trainer.log_every": r.log_every,
            "trainer.progress": False,
            "checkpoint.every_steps": None, "checkpoint.every_minutes": 5, "checkpoint.keep": 1,
            "seed": point.seed, "run_dir": str(self.runs_dir / point.name),
        }
        if point.rho is not None:
            values["optimizer.rho"] = point.rho
        if point.variant:
            values.update(VARIANTS[point.variant][1](r))
        return {**values, **self.extra}

    def argv(self, point: Point) -> list[str]:
        """The sophia-train command line of `point` (after --config configs/neox_tiny.yaml)."""
        out = []
        for key, value in self.overrides(point).items():
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
            out += [f"--{key}", text]
        return out

    def command(self, point: Point) -> str:
        """`point`'s sophia-train command line, to run from the repository root."""
        argv = [os.path.relpath(a, REPO) if a.startswith(str(REPO)) else a for a in self.argv(point)]
        return "sophia-train --config configs/neox_tiny.yaml " + " ".join(argv)

    def _finished(self, run_dir: Path, argv: list[str]) -> bool:
        bench, metrics = run_dir / "bench.json", run_dir / "metrics.jsonl"
        if not (bench.is_file() and metrics.is_file()):
            return False
        saved = json.loads(bench.read_text())
        if _settings(saved.get("argv", [])) != _settings(argv):
            raise SystemExit(f"{run_dir} was run with other settings ({' '.join(saved.get('argv', []))}); use "
                             "another --out, or delete that run directory")
        last = [json.loads(line) for line in metrics.read_text().splitlines()[-1:] if line.strip()]
        return bool(last) and last[0].get("step") == self.regime.steps and "eval/loss" in last[0]

    def run(self, point: Point) -> report.RunData:
        """The finished run of `point`: read when its directory holds one, else trained now."""
        if point in self.results:
            return self.results[point]
        run_dir, argv = self.runs_dir / point.name, self.argv(point)
        if self._finished(run_dir, argv):
            self.reused += 1
        elif self.dry_run:
            self.log(f"  would run {point.name}: {self.command(point)}")
            return report.RunData(point.name, [], 0.0, 0, self.tokens_per_step)
        else:
            from trainer.config import load_config
            from trainer.train import train

            if run_dir.exists() and not (run_dir / "checkpoints").is_dir():
                shutil.rmtree(run_dir)  # unfinished and nothing to resume from: start clean
            config, _ = load_config(["--config", str(BASE_CONFIG), *argv])
            checkpoints = run_dir / "checkpoints"
            start_step = max((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()), default=0) \
                if checkpoints.is_dir() else 0
            self.log(f"  run {point.name}" + (f" (resuming from step {start_step})" if start_step else ""))
            begin = time.perf_counter()
            record = train(config)
            wall = time.perf_counter() - begin
            if "preempted" in record:  # SIGTERM/SIGINT: the trainer saved a checkpoint; stop the campaign here
                raise SystemExit(f"{record['preempted']} received: {point.name} saved at its last step; run the "
                                 "same command again to resume")
            shutil.rmtree(checkpoints, ignore_errors=True)  # finished: bench.json + metrics.jsonl are the record
            (run_dir / "bench.json").write_text(json.dumps({"argv": argv, "wall_s": wall, "start_step": start_step}))
            self.executed += 1
        data = report.load_run(run_dir, self.tokens_per_step)
        self.log(f"  {point.name}: eval {report.fmt(data.final_eval)}  ({data.wall_s:.0f} s)")
        self.results[point] = data
        return data

    def loss(self, point: Point) -> float:
        value = self.run(point).final_eval
        return value if math.isfinite(value) else math.inf

    def tune(self, optimizer: str, lrs: Sequence[float], rhos: Sequence[float | None], max_widen: int,
             variant: str = "") -> tuple[Point, list[str]]:
        """The best point of the grid lrs x rhos, widened while the best sits on an edge: one more point beyond
        it (x LR_FACTOR in lr, x RHO_FACTOR in rho), never more than max_widen factors outside the initial
        grid's range. Returns the best and notes on the edges the bound left."""
        tried = {Point(optimizer, lr, rho, 0, variant) for lr, rho in itertools.product(lrs, rhos)}
        for p in sorted(tried, key=lambda p: (p.lr, p.rho or 0)):
            self.run(p)
        factors = {"lr": LR_FACTOR, "rho": RHO_FACTOR}
        initial = {"lr": (min(lrs), max(lrs)), "rho": (min(rhos), max(rhos)) if rhos[0] is not None else None}
        while True:
            best = min(tried, key=lambda p: (self.loss(p), p.lr))
            new, notes = [], []
            for axis, factor in factors.items():
                if getattr(best, axis) is None:
                    continue
                line = [getattr(p, axis) for p in tried if all(getattr(p, a) == getattr(best, a)
                                                              for a in factors if a != axis)]
                lo, hi = initial[axis]
                for direction, edge in ((-1, min(line)), (1, max(line))):
                    if getattr(best, axis) != edge:
                        continue
                    value = _scaled(edge, factor if direction > 0 else 1 / factor)
                    if not lo / factor**max_widen * 0.999 <= value <= hi * factor**max_widen * 1.001:
                        notes.append(f"best {axis} {edge:g} is the {'lowest' if direction < 0 else 'highest'} tried: "
                                     f"the widening stops {max_widen} point(s) beyond the initial grid")
                        continue
                    new.append(dataclasses.replace(best, **{axis: value}))
            if not new or self.dry_run:
                return best, notes
            for p in new:
                self.log(f"  {optimizer}{'-' + variant if variant else ''}: best {best.name} on the edge; widening "
                         f"to {p.name}")
                self.run(p)
            tried.update(new)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """CPU model and core count (from /proc/cpuinfo), load average, and the accelerator JAX sees."""
    model, cores = "unknown CPU", os.cpu_count()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    import jax

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    devices = f"{jax.devices()[0].device_kind} x {jax.device_count()}"
    return f"{model}, {cores} cores (load average when this report was written: {load}), JAX devices: {devices}"


def run_regime(campaign: Campaign, optimizers: Sequence[str], lr_grids: dict[str, Sequence[float]],
               rho_grids: dict[str, Sequence[float]], seeds: int, max_widen: int, alternatives: bool,
               out: Path) -> dict[str, Any]:
    """Tunes each optimizer (and the tuned Sophia-G variants), runs the seeds at its best and the other
    Sophia-G alternatives, writes the regime's table, plots and summary; returns the summary. The grids are
    keyed by optimizer or tuned variant ("sophia_g-hbias"; a variant without its own takes Sophia-G's)."""
    log = campaign.log
    best: dict[str, tuple[Point, list[str]]] = {}
    entries = [(opt, opt, "") for opt in optimizers]  # (key, optimizer, variant)
    if alternatives and "sophia_g" in optimizers:
        entries += [(f"sophia_g-{v}", "sophia_g", v) for v in TUNED_VARIANTS]
    for key, opt, variant in entries:
        lrs = lr_grids.get(key, lr_grids[opt])
        key_rhos = rho_grids.get(key, rho_grids["sophia_g"]) if opt == "sophia_g" else [None]
        log(f"[{campaign.regime.name}] {key}: grid lr {list(lrs)}"
            + (f" x rho {list(key_rhos)}" if opt == "sophia_g" else ""))
        best[key] = campaign.tune(opt, lrs, key_rhos, max_widen, variant=variant)
    seeded = {opt: [dataclasses.replace(p, seed=s) for s in range(seeds)] for opt, (p, _) in best.items()}
    for points in seeded.values():
        for p in points:
            campaign.run(p)
    variants: dict[str, Point] = {}
    if alternatives and "sophia_g" in best:
        b = best["sophia_g"][0]
        lrs = (_scaled(b.lr, 1 / LR_FACTOR), b.lr, _scaled(b.lr, LR_FACTOR))
        # Unclipped, h is larger by the squared norm the clip removed: rho re-tuned from the official 0.05.
        variants["noclip"], _ = campaign.tune("sophia_g", lrs, [0.05], min(max_widen, 1), variant="noclip")
        variants["fullbatch"] = dataclasses.replace(b, variant="fullbatch")
        campaign.run(variants["fullbatch"])
    if campaign.dry_run:
        return {}
    return report.write_regime(campaign, best, seeded, variants, out / campaign.regime.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<size>")
    parser.add_argument("--regimes", default=None, help="comma-separated regime names (default: all of the size)")
    parser.add_argument("--optimizers", default="sophia_g,adamw,lion")
    parser.add_argument("--seeds", type=int, default=2, help="seeds at each optimizer's best (>= 1)")
    parser.add_argument("--max_widen", type=int, default=3,
                        help="how many points (x2 lr, x4 rho) the grid may grow beyond its initial range")
    parser.add_argument("--no_alternatives", action="store_true", help="skip the Sophia-G alternative rows")
    parser.add_argument("--grid", action="append", default=[], metavar="OPT=LR,LR",
                        help="an optimizer's initial lr grid")
    parser.add_argument("--rho", default=None, help="Sophia-G's initial rho grid, comma-separated")
    parser.add_argument("--steps", type=int, default=None, help="override every regime's step count (eval/log scaled)")
    parser.add_argument("--independent_grids", action="store_true",
                        help="start every regime from the initial grids (default: later regimes start around the "
                        "first regime's bests: lr x1/2, x1, x2, its rho)")
    parser.add_argument("--dry_run", action="store_true", help="print the runs that are not finished yet")
    parser.add_argument("--jax_cache", default=None, help="persistent compilation cache (default <out>/runs/jax_cache; "
                        "'none' disables)")
    args, rest = parser.parse_known_args(argv)
    from trainer.config import parse_args

    extra = {key: yaml.safe_load(value) for key, value in parse_args(rest).overrides.items()}
    size = SIZES[args.size]
    out = args.out or REPO / "benchmarks" / "results" / size.name
    optimizers = [o for o in args.optimizers.split(",") if o]
    unknown = [o for o in optimizers if o not in size.lr_grids]
    if unknown or args.seeds < 1:
        parser.error(f"unknown optimizer(s) {unknown}; use {', '.join(size.lr_grids)}" if unknown else "--seeds >= 1")
    grids = dict(size.lr_grids)
    for item in args.grid:
        opt, _, values = item.partition("=")
        grids[opt] = tuple(float(v) for v in values.split(","))
    rho_grids = {"sophia_g": tuple(float(v) for v in args.rho.split(",")) if args.rho else size.rho_grid}
    regimes = [r for r in size.regimes if args.regimes is None or r.name in args.regimes.split(",")]
    if args.steps is not None:
        regimes = [dataclasses.replace(r, steps=args.steps, eval_every=max(1, args.steps // 5),
                                       log_every=1) for r in regimes]
    out.mkdir(parents=True, exist_ok=True)
    if args.jax_cache != "none":
        import jax

        jax.config.update("jax_compilation_cache_dir", args.jax_cache or str(out / "runs" / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    command = "python benchmarks/convergence.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started, begin = datetime.now(timezone.utc), time.perf_counter()
    machine_before = machine()
    summaries, counts = {}, [0, 0]
    for regime in regimes:
        campaign = Campaign(size, regime, out, extra, dry_run=args.dry_run, log=lambda s: print(s, flush=True))
        summary = run_regime(campaign, optimizers, grids, rho_grids, args.seeds, args.max_widen,
                             not args.no_alternatives, out)
        summaries[regime.name] = summary
        if not args.independent_grids and summary:  # the next regimes start around these bests (then widen)
            grids = {o: (_scaled(b["lr"], 1 / LR_FACTOR), b["lr"], _scaled(b["lr"], LR_FACTOR))
                     for o, b in summary["best"].items()}
            rho_grids = {**rho_grids, **{o: (b["rho"],) for o, b in summary["best"].items() if b["rho"] is not None}}
        counts[0] += campaign.executed
        counts[1] += campaign.reused
    if args.dry_run:
        return 0
    report.write_report(out, size, summaries, command=command, machine_info=machine_before,
                 started=started.strftime("%Y-%m-%d %H:%M UTC"), commit=_git("rev-parse", "--short", "HEAD"),
                 dirty=bool(_git("status", "--porcelain", "--", "sophia_jax", "trainer", "configs")),
                 wall_s=time.perf_counter() - begin, executed=counts[0], reused=counts[1])
    print(f"{counts[0]} run(s) trained, {counts[1]} finished run(s) reused; wrote {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
