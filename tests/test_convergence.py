"""benchmarks/convergence.py: the grid widening (against a known loss surface), steps-to-reach, and a
2-optimizer x 10-step smoke of the real script: its table, plots, and that a rerun reuses finished runs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import convergence  # noqa: E402
import convergence_report as report  # noqa: E402


class SurfaceCampaign(convergence.Campaign):
    """A campaign whose runs are a known function of (lr, rho) instead of training."""

    def __init__(self, loss):
        super().__init__(convergence.SIZES["cpu"], convergence.SIZES["cpu"].regimes[0], Path("/nonexistent"), {},
                         log=lambda _: None)
        self.surface = loss

    def run(self, point):
        if point not in self.results:
            record = {"step": self.regime.steps, "eval/loss": self.surface(point.lr, point.rho)}
            self.results[point] = report.RunData(point.name, [record], 0.0, 0, 1)
        return self.results[point]


def bowl(lr_opt: float, rho_opt: float | None = None):
    def loss(lr, rho):
        value = math.log2(lr / lr_opt) ** 2
        return value + (0.0 if rho is None else math.log(rho / rho_opt, 4) ** 2)
    return loss


def test_widening_moves_the_grid_until_the_best_is_inside_on_both_axes():
    campaign = SurfaceCampaign(bowl(8e-3, 0.8))
    best, notes = campaign.tune("sophia_g", [1e-3, 2e-3], [0.05, 0.2], max_widen=3)
    assert (best.lr, best.rho) == (8e-3, 0.8) and notes == []
    tried = {(p.lr, p.rho) for p in campaign.results}
    assert {(4e-3, 0.2), (8e-3, 0.2), (1.6e-2, 0.8), (8e-3, 3.2)} <= tried and (8e-3, 0.05) not in tried
    # the best has a tried neighbour on both sides along each axis
    assert min(lr for lr, rho in tried if rho == best.rho) < best.lr < max(lr for lr, rho in tried if rho == best.rho)
    assert min(r for lr, r in tried if lr == best.lr) < best.rho < max(r for lr, r in tried if lr == best.lr)


def test_widening_is_bounded_and_says_so():
    campaign = SurfaceCampaign(bowl(1.0))
    best, notes = campaign.tune("adamw", [1e-3, 2e-3, 4e-3], [None], max_widen=2)
    assert best.lr == 1.6e-2 and len(campaign.results) == 5
    assert notes == ["best lr 0.016 is the highest tried: the widening stops 2 point(s) beyond the initial grid"]


def test_interior_best_is_not_widened():
    campaign = SurfaceCampaign(bowl(2e-3))
    best, notes = campaign.tune("lion", [1e-3, 2e-3, 4e-3], [None], max_widen=3)
    assert best.lr == 2e-3 and notes == [] and len(campaign.results) == 3


def test_steps_to_reach_is_the_first_evaluation_at_or_below_the_target():
    steps, losses = [10, 20, 30, 40], [5.0, 4.0, 3.5, 3.6]
    assert report.steps_to_reach(steps, losses, 4.0) == 20
    assert report.steps_to_reach(steps, losses, 3.55) == 30
    assert report.steps_to_reach(steps, losses, 3.4) is None


def test_a_finished_run_with_other_settings_is_refused_not_reused(tmp_path):
    spec = convergence.SIZES["cpu"]
    campaign = convergence.Campaign(spec, spec.regimes[0], tmp_path, {}, log=lambda _: None)
    point = convergence.Point("adamw", 1e-3)
    run_dir = campaign.runs_dir / point.name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": spec.regimes[0].steps, "eval/loss": 3.0}) + "\n")
    (run_dir / "bench.json").write_text(json.dumps({"argv": campaign.argv(point), "wall_s": 1.0}))
    assert campaign.run(point).final_eval == 3.0 and campaign.reused == 1
    other = convergence.Campaign(spec, spec.regimes[0], tmp_path, {"trainer.eval_batches": 3}, log=lambda _: None)
    with pytest.raises(SystemExit, match="was run with other settings"):
        other.run(point)


def _last_eval(run_dir: Path) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 11))  # complete, no duplicated lines
    return records[-1]["eval/loss"]


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_smoke_two_optimizers_ten_steps_then_resume(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "benchmarks" / "convergence.py"), "--out", str(out), "--regimes", "small",
               "--optimizers", "sophia_g,adamw", "--grid", "sophia_g=1e-3", "--grid", "adamw=3e-3", "--rho", "0.05",
               "--max_widen", "0", "--seeds", "2", "--no_alternatives", "--steps", "10",
               "--jax_cache", str(tmp_path / "jax_cache"), "--model.num_layers", "1", "--model.hidden_dim", "32",
               "--model.seq_len", "16", "--data.embedded.vocab_size", "300", "--data.embedded.max_bytes", "200000",
               "--data.embedded_dir", str(tmp_path / "corpus"), "--trainer.eval_batches", "2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}  # compiles 2-4x faster
    first = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "4 run(s) trained, 0 finished run(s) reused" in first.stdout

    runs = out / "runs" / "small"
    names = {"sophia_g": ["sophia_g_lr0.001_rho0.05_s0", "sophia_g_lr0.001_rho0.05_s1"],
             "adamw": ["adamw_lr0.003_s0", "adamw_lr0.003_s1"]}
    table = (out / "small" / "table.md").read_text()
    for label, opt in (("Sophia-G", "sophia_g"), ("AdamW", "adamw")):
        finals = [_last_eval(runs / name) for name in names[opt]]
        mean, half = sum(finals) / 2, abs(finals[0] - finals[1]) / 2
        assert f"| {label} | lr 0.001, rho 0.05 |" in table or f"| {label} | lr 0.003 |" in table
        assert f"{mean:.3f} ± {half:.3f} (2 seeds)" in table
    assert "Sophia-G reaches AdamW's final eval loss" in table and "AdamW reaches Sophia-G's" in table
    assert "| sophia_g_lr0.001_rho0.05_s0 |" in table  # the diagnostics row
    for png in ("loss.png", "diagnostics.png"):
        data = (out / "small" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "REDUCED CPU SIZE" in (out / "REPORT.md").read_text()

    # One run left unfinished (its record of completion gone): a rerun trains it alone and reads the rest.
    (runs / names["adamw"][1] / "bench.json").unlink()
    before = {n: (runs / n / "metrics.jsonl").stat().st_mtime_ns for ns in names.values() for n in ns}
    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "1 run(s) trained, 3 finished run(s) reused" in second.stdout
    after = {n: (runs / n / "metrics.jsonl").stat().st_mtime_ns for n in before}
    assert [n for n in before if before[n] != after[n]] == [names["adamw"][1]]
    _last_eval(runs / names["adamw"][1])



@pytest.mark.parametrize("size", sorted(convergence.SIZES))
def test_every_size_builds_valid_configs_with_regimes_8x_apart(size):
    """The documented sizes (gpu is not run here) give configs the trainer accepts, for every optimizer and
    Sophia-G variant, with the same schedule shape and a large regime >= 8x the small one's tokens."""
    from trainer.config import load_config

    spec = convergence.SIZES[size]
    tokens = []
    for regime in spec.regimes:
        campaign = convergence.Campaign(spec, regime, Path("/tmp/unused"), {}, log=lambda _: None)
        points = [convergence.Point(o, grid[0], spec.rho_grid[0] if o == "sophia_g" else None)
                  for o, grid in spec.lr_grids.items()]
        points += [convergence.Point("sophia_g", 1e-3, 0.05, variant=v) for v in convergence.VARIANTS]
        configs = [load_config(["--config", str(convergence.BASE_CONFIG), *campaign.argv(p)])[0] for p in points]
        assert {(c.optimizer.warmup, c.optimizer.min_lr_ratio, c.trainer.num_train_steps, c.seed) for c in configs} \
            == {(0.05, 0.05, regime.steps, 0)}
        tokens.append(configs[0].trainer.global_batch * configs[0].model.seq_len)
        assert campaign.tokens_per_step == tokens[-1]
    assert tokens[1] >= 8 * tokens[0] and spec.regimes[1].microbatches > 1
