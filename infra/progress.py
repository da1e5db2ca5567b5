"""A run's progress as its run directory shows it (gs:// through gcsfs, or a local path): the last line of
metrics.jsonl (step, loss, tokens/s, when it was written), the run's length from config.yaml, and the
newest finalized checkpoint. What `sophia-tpu status` prints and how the babysitter tells a run that made
progress (a newer checkpoint) from one failing at the same place.

Checkpoints are orbax step directories `<run_dir>/checkpoints/<step>`: locally a finalized step has its
final name (orbax writes under a temporary name and renames it); on an object store orbax marks it with
`commit_success.txt` once every host is done (trainer/checkpoint.py).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

__all__ = ["Progress", "newest_checkpoint", "read"]

_TAIL_BYTES = 64 * 1024  # enough for the last metrics line (about 0.5 kB)


@dataclasses.dataclass(frozen=True)
class Progress:
    """What a run directory says; None for what it does not hold (yet)."""

    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    tokens_per_second: float | None = None
    age_seconds: float | None = None  # since metrics.jsonl was last written
    checkpoint: int | None = None

    def summary(self) -> str:
        """One line, e.g. `step 120 of 1000, loss 3.21, 5,120 tokens/s, 40 s ago; newest checkpoint 100`."""
        if self.step is None:
            parts = ["no metrics yet"]
        else:
            parts = [f"step {self.step}" + (f" of {self.total_steps}" if self.total_steps else "")]
            if self.loss is not None:
                parts.append(f"loss {self.loss:.4g}")
            if self.tokens_per_second is not None:
                parts.append(f"{self.tokens_per_second:,.0f} tokens/s")
            if self.age_seconds is not None:
                parts.append(f"last line {self.age_seconds:.0f} s ago")
        ckpt = "no checkpoint yet" if self.checkpoint is None else f"newest checkpoint {self.checkpoint}"
        return ", ".join(parts) + "; " + ckpt


def _path(run_dir: str):
    from etils import epath

    from trainer import storage

    storage.configure()
    return epath.Path(run_dir)


def newest_checkpoint(run_dir: str) -> int | None:
    """The step of the newest finalized checkpoint under `run_dir`, or None. Raises on a storage error."""
    directory = _path(run_dir) / "checkpoints"
    try:
        steps = sorted((int(p.name) for p in directory.iterdir() if p.name.isdigit()), reverse=True)
    except FileNotFoundError:
        return None
    remote = "://" in run_dir
    for step in steps:
        if not remote or (directory / str(step) / "commit_success.txt").exists():
            return step
    return None


def _last_record(path) -> tuple[dict[str, Any] | None, float | None]:
    try:
        stat = path.stat()
        with path.open("rb") as f:
            f.seek(max(0, stat.length - _TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except FileNotFoundError:
        return None, None
    for line in reversed(tail.splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn last line, or the cut first one
        if isinstance(record, dict) and "step" in record:
            return record, max(0.0, time.time() - stat.mtime)
    return None, None


def read(run_dir: str) -> Progress:
    """The run's progress (see the module docstring). Raises on a storage error."""
    import yaml

    path = _path(run_dir)
    record, age = _last_record(path / "metrics.jsonl")
    total = None
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        total = (config.get("trainer") or {}).get("num_train_steps")
    except FileNotFoundError:
        pass
    record = record or {}
    return Progress(step=record.get("step"), total_steps=total, loss=record.get("train/loss"),
                    tokens_per_second=record.get("throughput/tokens_per_second"), age_seconds=age,
                    checkpoint=newest_checkpoint(run_dir))
