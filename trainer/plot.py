"""`sophia-plot RUN_DIR [RUN_DIR ...]`: one PNG comparing the loss, eval loss and win-rate curves of runs.

Run directories and the output may be local paths or gs:// URLs (etils.epath, as the trainer writes them).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib
from etils import epath

from trainer import storage

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PANELS", "load_metrics", "main", "plot_runs"]

PANELS = (("train/loss", "train loss"), ("eval/loss", "eval loss"), ("optim/win_rate", "Sophia win rate"))


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `<run_dir>/metrics.jsonl`, in file order (a torn last line is ignored)."""
    path = epath.Path(run_dir) / "metrics.jsonl"
    text = storage.read_text_if_exists(path)
    if text is None:
        raise FileNotFoundError(f"{path} does not exist; pass run directories written by sophia-train")
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> matplotlib.figure.Figure:
    """Draws each metric of PANELS against step, one line per run, and saves the figure to `out`."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    for run_dir in run_dirs:
        records = load_metrics(run_dir)
        for ax, (key, _) in zip(axes, PANELS):
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=epath.Path(run_dir).name)
    for ax, (key, title) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {key} in these runs", ha="center", va="center", transform=ax.transAxes)
    with epath.Path(out).open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sophia-plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run_dir>/curves.png)")
    args = parser.parse_args(argv)
    out = epath.Path(args.out) if args.out else epath.Path(args.run_dirs[0]) / "curves.png"
    plot_runs(args.run_dirs, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
