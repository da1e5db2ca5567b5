"""`sophia-plot RUN_DIR [RUN_DIR ...]`: one PNG comparing the loss, eval loss and win-rate curves of runs.

Run directories and the output may be local paths or gs:// URLs (etils.epath, as the trainer writes them).
Series with few points (a run's evaluations) are drawn with markers, so that one evaluation shows as a dot.
Exit status 2 with one line `sophia-plot: ...` when a run directory holds no metrics or the PNG cannot be
written.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import matplotlib
from etils import epath

from trainer import storage

matplotlib.use("Agg")  # files only; no display needed

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["PANELS", "load_metrics", "main", "plot_runs"]

PANELS = (("train/loss", "train loss"), ("eval/loss", "eval loss"), ("optim/win_rate", "Sophia win rate"))
MARKED = 50  # a series of at most this many points gets a marker at each


def load_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `<run_dir>/metrics.jsonl`, in file order (a torn last line is ignored)."""
    path = epath.Path(run_dir) / "metrics.jsonl"
    text = storage.read_text_if_exists(path)
    if text is None:
        raise FileNotFoundError(f"{path} does not exist: {run_dir} is not a run directory written by sophia-train "
                                "(or no step has been logged yet)")
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
                marker = "o" if len(points) <= MARKED else None
                ax.plot(steps, values, marker=marker, markersize=4, label=epath.Path(run_dir).name)
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


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`sophia-plot: ...`, exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sophia-plot: {message} (see sophia-plot --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="sophia-plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", help="run directories holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: <first run_dir>/curves.png)")
    args = parser.parse_args(argv)
    out = epath.Path(args.out) if args.out else epath.Path(args.run_dirs[0]) / "curves.png"
    for run_dir in args.run_dirs:  # every run readable before anything is drawn
        try:
            load_metrics(run_dir)
        except FileNotFoundError as error:
            print(f"sophia-plot: {error}", file=sys.stderr)
            return 2
        except OSError as error:
            print(f"sophia-plot: cannot read {run_dir}/metrics.jsonl ({storage.describe(error)})", file=sys.stderr)
            return 2
    try:
        plot_runs(args.run_dirs, out)
    except OSError as error:  # the PNG: a missing or read-only directory
        print(f"sophia-plot: cannot write {out} ({storage.describe(error)}); pass --out PATH somewhere writable",
              file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
