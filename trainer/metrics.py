"""Where step metrics go: `<run_dir>/metrics.jsonl`, a progress bar, and wandb when enabled.

The jitted steps return metrics as arrays; only this module (outside jit) turns them into numbers.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from typing import Any

import jax
import numpy as np
from etils import epath

__all__ = ["MetricsWriter", "peak_flops"]

# Dense bf16 peak FLOP/s per JAX device (TPU v2/v3 devices are cores, two per chip).
PEAK_FLOPS = {
    "tpu v2": 45e12 / 2,
    "tpu v3": 123e12 / 2,
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6 lite": 918e12,
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
}

# Shown on the progress bar (with tqdm's own rate and ETA), under these short names.
BAR_FIELDS = {"train/loss": "loss", "eval/loss": "eval", "optim/win_rate": "win", "throughput/tokens_per_second": "tok/s"}


def peak_flops(device_kind: str, configured: float | None = None) -> float | None:
    """Peak FLOP/s of one device: `configured` if given, else by device kind, else None (unknown, e.g. CPU)."""
    if configured is not None:
        return configured
    kind = device_kind.lower()
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):  # "tpu v5 lite" before "tpu v5"
        if name in kind:
            return PEAK_FLOPS[name]
    return None


def _number(x: Any) -> float | int | None:
    value = np.asarray(x).item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


class MetricsWriter:
    """Appends one JSON object per logged step (with a `step` key) to metrics.jsonl; mirrors to wandb and
    a tqdm bar. Only process 0 writes."""

    def __init__(self, run_dir: str | os.PathLike, *, config: dict[str, Any], total_steps: int, start_step: int = 0,
                 wandb_mode: str = "disabled", wandb_project: str = "sophia-jax", name: str | None = None,
                 tags: list[str] | None = None, progress: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a") if self.enabled else None
        self._bar = None
        if self.enabled and progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self._wandb = None
        if self.enabled and wandb_mode != "disabled":
            import wandb

            # One wandb run per run directory: a resumed run continues the same id (and its charts).
            id_file = epath.Path(run_dir) / "wandb_id"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self._wandb = wandb.init(project=wandb_project, name=name, dir=str(run_dir), config=config,
                                     mode=wandb_mode, id=run_id, resume="allow", tags=tags or None)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Writes `metrics` (arrays or numbers; None kept as null) for `step`; returns the plain record."""
        record = {"step": int(step)}
        record.update({k: (None if v is None else _number(v)) for k, v in metrics.items()})
        if not self.enabled:
            return record
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step)
        if self._bar is not None:
            shown = {short: record[k] for k, short in BAR_FIELDS.items() if record.get(k) is not None}
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
