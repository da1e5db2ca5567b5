"""Tables and plots of a convergence campaign (benchmarks/convergence.py): read the runs' metrics.jsonl,
summarise them, draw eval loss and Sophia-G's diagnostics.

Everything here reads files written by the real trainer (`<run_dir>/metrics.jsonl`) and by the campaign
(`<run_dir>/bench.json`: the command line, the wall-clock time); nothing is recomputed or estimated.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["GROUPS", "LABELS", "RunData", "curve", "diagnostics_row", "fmt", "load_run", "plot_diagnostics",
           "plot_losses", "steps_to_reach", "h_check", "write_regime", "write_report"]

# Keyed by optimizer, or "sophia_g-<variant>" for a Sophia-G variant tuned like an optimizer.
LABELS = {"sophia_g": "Sophia-G", "adamw": "AdamW", "lion": "Lion",
          "sophia_g-hbias": "Sophia-G, bias-corrected h (not the default rule)"}
COLORS = {"sophia_g": "tab:red", "adamw": "tab:blue", "lion": "tab:green", "sophia_g-hbias": "tab:purple"}
GROUPS = ("embedding", "attention", "mlp", "norm", "head")


@dataclasses.dataclass
class RunData:
    """One finished run: its logged records and what the campaign measured around it."""

    name: str
    records: list[dict[str, Any]]  # metrics.jsonl, in step order
    wall_s: float  # wall-clock of the invocation that finished it (compiles included)
    start_step: int  # > 0 when that invocation resumed from a checkpoint
    tokens_per_step: int

    @property
    def evals(self) -> list[tuple[int, float]]:
        """(step, eval/loss) of every evaluation; a non-finite loss is kept as inf."""
        out = []
        for r in self.records:
            if "eval/loss" in r:
                value = r["eval/loss"]
                out.append((r["step"], math.inf if value is None or not math.isfinite(value) else value))
        return out

    @property
    def final_eval(self) -> float:
        return self.evals[-1][1] if self.evals else math.inf

    @property
    def non_finite(self) -> bool:
        """A logged train or eval loss that is NaN/inf (written as null or Infinity)."""
        for r in self.records:
            for key in ("train/loss", "eval/loss"):
                if key in r and (r[key] is None or not math.isfinite(r[key])):
                    return True
        return False

    @property
    def skipped(self) -> int:
        """Steps the trainer dropped for a non-finite loss or gradient."""
        return max((r.get("optim/skipped_steps") or 0 for r in self.records), default=0)

    @property
    def blew_up(self) -> bool:
        """The eval loss ended 0.5 nats above its best, or no better than its first evaluation."""
        losses = [v for _, v in self.evals]
        if len(losses) < 2:
            return False
        return losses[-1] > min(losses) + 0.5 or losses[-1] >= losses[0]

    @property
    def diverged(self) -> bool:
        return self.non_finite or self.skipped > 0 or self.blew_up

    @property
    def tokens_per_second(self) -> float | None:
        """Median over the logged intervals (the first, which compiles, is not timed by the trainer)."""
        rates = [r["throughput/tokens_per_second"] for r in self.records if r.get("throughput/tokens_per_second")]
        return statistics.median(rates) if rates else None

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of `key` where it was logged with a finite value."""
        points = [(r["step"], r[key]) for r in self.records
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [s for s, _ in points], [v for _, v in points]


def load_run(run_dir: Path, tokens_per_step: int) -> RunData:
    """The RunData of a finished run directory (metrics.jsonl and bench.json)."""
    records = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    bench = json.loads((run_dir / "bench.json").read_text())
    return RunData(run_dir.name, records, bench["wall_s"], bench.get("start_step", 0), tokens_per_step)


def curve(runs: Sequence[RunData]) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) of the eval loss over runs (seeds), at the steps all of them evaluated."""
    common = sorted(set.intersection(*(set(s for s, _ in r.evals) for r in runs))) if runs else []
    by_run = [dict(r.evals) for r in runs]
    mean = [statistics.fmean(d[s] for d in by_run) for s in common]
    return common, mean, [min(d[s] for d in by_run) for s in common], [max(d[s] for d in by_run) for s in common]


def steps_to_reach(steps: Sequence[int], losses: Sequence[float], target: float) -> int | None:
    """The first evaluated step whose loss is <= target (resolution: the eval interval), else None."""
    for s, v in zip(steps, losses):
        if v <= target:
            return s
    return None


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan/inf"
    return f"{value:.{digits}f}"


def _second_half(run: RunData, key: str) -> float | None:
    steps, values = run.series(key)
    last = run.records[-1]["step"] if run.records else 0
    kept = [v for s, v in zip(steps, values) if s > last / 2]
    return statistics.fmean(kept) if kept else None


def h_check(run: RunData, run_dir: Path) -> float | None:
    """A parity check of the trainer's h on this run's own numbers: after the first refresh (step k),
    h = (1 - b2) * N * g_s**2 with g_s clipped to max_grad_norm, so sum(h) = (1 - b2) * N * min(|g_s|, c)**2
    (N = the Hessian batch's tokens). Returns measured / predicted sum(h) (1.0 = the rule holds)."""
    import yaml

    from trainer.config import TrainConfig, from_dict
    from trainer.models import num_params

    config = from_dict(TrainConfig, {k: v for k, v in yaml.safe_load((run_dir / "config.yaml").read_text()).items()})
    opt, k = config.optimizer, config.optimizer.update_interval
    first = next((r for r in run.records if r["step"] == k and r.get("optim/hessian_grad_norm")), None)
    if first is None:
        return None
    n = max(1, round(config.trainer.global_batch * opt.hessian_batch_fraction)) * config.model.seq_len
    g = first["optim/hessian_grad_norm"]
    if opt.hessian_clip and opt.max_grad_norm is not None:
        g = min(g, opt.max_grad_norm)
    return first["optim/hessian_mean"] * num_params(config.model) / ((1 - opt.b2) * n * g * g)


def diagnostics_row(run: RunData, k: int) -> dict[str, Any]:
    """Sophia-G's diagnostics of one run: win rates (mean over the second half, overall and per group),
    the estimator's gradient norm before its clip (median over refreshes) and how often the clip fired,
    |h| after the first refresh and at the end."""
    refreshes = [r for r in run.records if r["step"] % k == 0 and "optim/hessian_grad_norm" in r]
    norms = [r["optim/hessian_grad_norm"] for r in refreshes if r["optim/hessian_grad_norm"] is not None]
    clipped = [r["optim/hessian_grad_clipped"] for r in refreshes if r.get("optim/hessian_grad_clipped") is not None]
    _, h = run.series("optim/hessian_norm")
    h = [v for v in h if v > 0]
    return {
        "win_rate": _second_half(run, "optim/win_rate"),
        **{f"win_rate/{g}": _second_half(run, f"optim/win_rate/{g}") for g in GROUPS},
        "g_s_norm": statistics.median(norms) if norms else None,
        "clip_fired": statistics.fmean(clipped) if clipped else None,
        "h_first": h[0] if h else None,
        "h_last": h[-1] if h else None,
    }


def _band(ax: Any, x: Sequence[float], mean: Sequence[float], lo: Sequence[float], hi: Sequence[float],
          color: str, label: str, style: str = "-") -> None:
    ax.plot(x, mean, style, color=color, label=label)
    if any(a != b for a, b in zip(lo, hi)):
        ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0)


def plot_losses(best: dict[str, list[RunData]], extras: dict[str, RunData], out: Path, title: str) -> None:
    """Eval loss against steps and against tokens: the best setting of each optimizer (mean over its
    seeds, min-max shaded) and, dashed, single-seed Sophia-G alternatives."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    styles = iter(["--", ":", "-."])
    for label, runs, color, style in ([(f"{LABELS[o]} ({len(r)} seeds)", r, COLORS[o], "-") for o, r in best.items()]
                                      + [(name, [r], "tab:orange", next(styles, "--")) for name, r in extras.items()]):
        steps, mean, lo, hi = curve(runs)
        for ax, scale in zip(axes, (1, runs[0].tokens_per_step)):
            _band(ax, [s * scale for s in steps], mean, lo, hi, color, label, style)
    finals = [v for runs in best.values() for r in runs for v in [r.final_eval] if math.isfinite(v)]
    for ax, xlabel in zip(axes, ("step", "tokens")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval loss")
        ax.grid(alpha=0.3)
        if finals:  # the interesting part: the last 70% of the way down
            first = [r.evals[0][1] for runs in best.values() for r in runs if r.evals]
            top = min(max(first), min(finals) + 1.5) if first else None
            ax.set_ylim(min(finals) - 0.05, top)
    axes[0].legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_diagnostics(best: RunData, others: dict[str, RunData], k: int, clip_norm: float | None, out: Path,
                     title: str) -> None:
    """Sophia-G's win rate (best and others), its per-group win rates, |h| (log scale) and the estimator's
    gradient norm before the clip, with the clip threshold."""
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2), constrained_layout=True)
    runs = {f"best: {best.name}": best, **others}
    colors = plt.cm.viridis([i / max(len(runs) - 1, 1) for i in range(len(runs))])
    for (name, run), color in zip(runs.items(), colors):
        lw = 2.2 if run is best else 1.0
        axes[0].plot(*run.series("optim/win_rate"), color=color, lw=lw, label=name)
        axes[2].plot(*run.series("optim/hessian_norm"), color=color, lw=lw, label=name)
        refresh = [(r["step"], r["optim/hessian_grad_norm"]) for r in run.records
                   if r["step"] % k == 0 and r.get("optim/hessian_grad_norm")]
        if refresh:
            axes[3].plot(*zip(*refresh), color=color, lw=lw, marker=".", label=name)
    for group in GROUPS:
        axes[1].plot(*best.series(f"optim/win_rate/{group}"), label=group)
    if clip_norm is not None:
        axes[3].axhline(clip_norm, color="k", ls="--", lw=1, label=f"clip at {clip_norm:g}")
    for ax, (name, log) in zip(axes, (("win rate (fraction not clipped)", False),
                                      (f"win rate per group ({best.name})", False),
                                      ("|h| (L2 norm)", True), ("estimator gradient norm before clip", True))):
        ax.set_title(name, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    axes[0].legend(fontsize="x-small")
    axes[1].legend(fontsize="x-small")
    axes[3].legend(fontsize="x-small")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(out, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ tables
def _mean_spread(values: Sequence[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < len(values):
        return f"nan/inf in {len(values) - len(finite)} of {len(values)} seeds"
    half = (max(values) - min(values)) / 2
    seeds = f" ({len(values)} seeds)" if len(values) > 1 else " (1 seed)"
    return f"{statistics.fmean(values):.3f} ± {half:.3f}{seeds}"


def _setting(point: Any) -> str:
    return f"lr {point.lr:g}" + ("" if point.rho is None else f", rho {point.rho:g}")


def _divergences(runs: Sequence[RunData]) -> str:
    kinds = {"non-finite loss": sum(r.non_finite for r in runs), "skipped steps": sum(r.skipped > 0 for r in runs),
             "loss blew up": sum(r.blew_up for r in runs)}
    shown = [f"{n} {kind}" for kind, n in kinds.items() if n]
    return f"{sum(r.diverged for r in runs)} of {len(runs)}" + (f" ({', '.join(shown)})" if shown else "")


def _reach(name: str, runs: Sequence[RunData], target_name: str, target: float, tokens: int) -> str:
    steps, mean, _, _ = curve(runs)
    hit = steps_to_reach(steps, mean, target)
    where = "not reached" if hit is None else f"step {hit} ({hit * tokens:,} tokens)"
    return f"- {name} reaches {target_name}'s final eval loss {target:.3f}: **{where}**"


def write_regime(campaign: Any, best: dict[str, tuple[Any, list[str]]], seeded: dict[str, list[Any]],
                 variants: dict[str, Any], out: Path) -> dict[str, Any]:
    """Writes out/{table.md, loss.png, diagnostics.png, summary.json} for one regime; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    regime, tokens = campaign.regime, campaign.tokens_per_step
    results = campaign.results
    seeds = {opt: [results[p] for p in points] for opt, points in seeded.items()}
    alt = {label: results[p] for key, p in variants.items() for label in [f"{VARIANT_LABELS[key]} ({_setting(p)})"]}
    lines = [f"### Regime `{regime.name}`: {tokens:,} tokens per step ({regime.global_batch} x "
             f"{tokens // regime.global_batch} tokens, {regime.microbatches} microbatch(es)), {regime.steps} steps", "",
             "| optimizer | best setting | final eval loss (mean ± half-range) | wall-clock per run | tokens/s "
             "| divergences in its grid |", "|---|---|---|---|---|---|"]
    summary: dict[str, Any] = {"regime": regime.name, "tokens_per_step": tokens, "steps": regime.steps, "best": {}}
    for opt, runs in seeds.items():
        grid = [r for p, r in results.items() if _key(p) == opt and p.seed == 0]
        point = best[opt][0]
        finals = [r.final_eval for r in runs]
        tps = [r.tokens_per_second for r in runs if r.tokens_per_second]
        lines.append(f"| {LABELS[opt]} | {_setting(point)} | {_mean_spread(finals)} | "
                     f"{statistics.fmean(r.wall_s for r in runs):.0f} s | "
                     f"{fmt(statistics.fmean(tps) if tps else None, 0)} | "
                     f"{_divergences(grid)} |")
        summary["best"][opt] = {"lr": point.lr, "rho": point.rho, "finals": finals, "mean": statistics.fmean(finals),
                                "edge_notes": best[opt][1], "command": campaign.command(seeded[opt][0])}
    for label, r in alt.items():
        lines.append(f"| {label}, not the default rule | (1 seed) | {fmt(r.final_eval)} | {r.wall_s:.0f} s | "
                     f"{fmt(r.tokens_per_second, 0)} | {_divergences([r])} |")
    lines.append("")
    if "sophia_g" in seeds and "adamw" in seeds:
        s, a = summary["best"]["sophia_g"]["mean"], summary["best"]["adamw"]["mean"]
        lines += [_reach("Sophia-G", seeds["sophia_g"], "AdamW", a, tokens),
                  _reach("AdamW", seeds["adamw"], "Sophia-G", s, tokens)]
        summary["reach"] = {
            "sophia_to_adamw": steps_to_reach(*curve(seeds["sophia_g"])[:2], a),
            "adamw_to_sophia": steps_to_reach(*curve(seeds["adamw"])[:2], s)}
        if "sophia_g-hbias" in seeds:
            hb = summary["best"]["sophia_g-hbias"]["mean"]
            lines += [_reach("Sophia-G with bias-corrected h", seeds["sophia_g-hbias"], "AdamW", a, tokens),
                      _reach("AdamW", seeds["adamw"], "Sophia-G with bias-corrected h", hb, tokens)]
            summary["reach"]["hbias_to_adamw"] = steps_to_reach(*curve(seeds["sophia_g-hbias"])[:2], a)
            summary["reach"]["adamw_to_hbias"] = steps_to_reach(*curve(seeds["adamw"])[:2], hb)
    lines += ["", "(curves are the mean over seeds, evaluated every "
              f"{regime.eval_every} steps; wall-clock includes compilation, on a shared machine)", ""]
    notes = [f"{LABELS[o]}: {n}" for o, (_, ns) in best.items() for n in ns]
    if notes:
        lines += ["**Grid edges left:** " + "; ".join(notes), ""]
    lines += ["| grid point (seed 0) | final eval loss | diverged |", "|---|---|---|"]
    for p, r in sorted(results.items(), key=lambda pr: (pr[0].variant, pr[0].optimizer, pr[0].rho or 0, pr[0].lr)):
        if p.seed == 0:
            tag = f" ({VARIANT_LABELS[p.variant]})" if p.variant else ""
            diverged = "yes" if r.diverged else "no"
            lines.append(f"| {LABELS[p.optimizer]}{tag}, {_setting(p)} | {fmt(r.final_eval)} | {diverged} |")
    k = campaign.overrides(next(iter(results))).get("optimizer.update_interval", 10)
    sophia = {p: r for p, r in results.items() if p.optimizer == "sophia_g" and p.seed == 0}
    if sophia:
        lines += ["", "Sophia-G diagnostics (seed 0): win rate = fraction of coordinates NOT clipped, mean over the "
                  "second half; g_s = the estimator's sampled-label gradient norm before its clip (median over "
                  "refreshes); clip fired = fraction of refreshes where it exceeded the clip norm; |h| after the "
                  "first refresh and at the end; h check = sum(h) after the first refresh over (1 - b2) N "
                  "min(g_s, clip)^2, the official rule's value with N the Hessian batch's tokens (1.0000 = exact).", "",
                  "| run | eval | win rate | " + " | ".join(GROUPS)
                  + " | g_s norm | clip fired | \\|h\\| first → last | h check |",
                  "|---|---|---|" + "---|" * len(GROUPS) + "---|---|---|---|"]
        summary["diagnostics"] = {}
        for p, r in sorted(sophia.items(), key=lambda item: (item[0].variant, item[0].rho or 0, item[0].lr)):
            d = diagnostics_row(r, k)
            d["h_check"] = h_check(r, campaign.runs_dir / p.name)
            summary["diagnostics"][p.name] = d
            lines.append(f"| {p.name} | {fmt(r.final_eval)} | {fmt(d['win_rate'])} | "
                         + " | ".join(fmt(d[f'win_rate/{g}']) for g in GROUPS)
                         + f" | {fmt(d['g_s_norm'], 2)} | {fmt(d['clip_fired'], 2)} | "
                         f"{fmt(d['h_first'], 3)} → {fmt(d['h_last'], 3)} | {fmt(d['h_check'], 4)} |")
    summary["grid"] = {p.name: {"final": r.final_eval, "diverged": r.diverged} for p, r in results.items()}
    summary["runs"], summary["runs_wall_s"] = len(results), sum(r.wall_s for r in results.values())
    finished = [(campaign.runs_dir / p.name / "bench.json").stat().st_mtime for p in results]
    summary["finished"] = [min(finished), max(finished)]
    lines += ["", f"{len(results)} runs in this regime, {summary['runs_wall_s'] / 60:.1f} min of wall-clock in all "
              "(each run's own, compiles included)."]
    table = "\n".join(lines) + "\n"
    (out / "table.md").write_text(table)
    title = f"{campaign.size.name} size, regime {regime.name}: {tokens:,} tokens/step"
    plot_losses(seeds, alt, out / "loss.png", title)
    if "sophia_g" in seeds:
        b = best["sophia_g"][0]
        others = {p.name: r for p, r in sophia.items() if p != b and (p.lr == b.lr or p.variant)}
        clip = campaign.overrides(b).get("optimizer.max_grad_norm", 1.0)
        plot_diagnostics(results[b], others, k, clip, out / "diagnostics.png", title)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    summary["table"] = table
    return summary


VARIANT_LABELS = {"noclip": "estimator gradient not clipped", "fullbatch": "Hessian batch = train batch",
                  "hbias": "bias-corrected h"}


def _key(point: Any) -> str:
    """The table key of a run: its optimizer, or "sophia_g-<variant>" for a variant."""
    return point.optimizer + (f"-{point.variant}" if point.variant else "")


def _utc(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_report(out: Path, size: Any, summaries: dict[str, dict[str, Any]], *, command: str, machine_info: str,
                 started: str, commit: str, dirty: bool, wall_s: float, executed: int, reused: int) -> None:
    """out/REPORT.md: what was run, where, when, from which commit, and each regime's tables and plots."""
    lines = [f"# Convergence: Sophia-G vs AdamW vs Lion ({size.name} size)", "",
             f"**{size.description}.**", "",
             f"- command: `{command}`",
             f"- machine: {machine_info}",
             f"- this report written by an invocation started {started}, commit {commit}"
             f"{' (with uncommitted changes to the trainer)' if dirty else ''}; "
             f"{executed} run(s) trained in this invocation, {reused} finished run(s) reused "
             f"({wall_s / 60:.1f} min wall-clock); the runs' own wall-clock adds up to "
             f"{sum(s.get('runs_wall_s', 0) for s in summaries.values()) / 60:.1f} min, and they finished between "
             f"{_utc(min(s['finished'][0] for s in summaries.values()))} and "
             f"{_utc(max(s['finished'][1] for s in summaries.values()))}",
             "- each best setting's exact run: the `command` of summary.json in each regime's folder", ""]
    for name, summary in summaries.items():
        lines += [summary["table"], f"![eval loss]({name}/loss.png)", "",
                  f"![Sophia-G diagnostics]({name}/diagnostics.png)"
                  if (out / name / "diagnostics.png").is_file() else "",
                  ""]
    (out / "REPORT.md").write_text("\n".join(lines))
