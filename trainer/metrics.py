"""Where step metrics go: `<run_dir>/metrics.jsonl`, a progress bar, and wandb when enabled.

The jitted steps return metrics as arrays; only this module (outside jit) turns them into numbers.

metrics.jsonl in a local run directory is appended to and flushed line by line. An object store (gs://)
has no append, so there the writer keeps every line of the run (those already in the object, read once at
start, plus the new ones) and rewrites the whole object: at most every `flush_seconds`, on `flush()` - the
loop calls it before each checkpoint, so the object always holds the lines up to the newest checkpoint
and a resumed run loses none - and at `close()` (the end, or a preemption). One object rather than a
segment per session keeps readers (sophia-plot, a person) unchanged and trimming on resume one rewrite;
its cost is re-uploading the lines, about 0.5 kB each (7 MB for 10k logged steps, every flush_seconds).
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import jax
import numpy as np
from etils import epath

from trainer import storage

__all__ = ["MetricsWriter", "Progress", "peak_flops"]

logger = logging.getLogger(__name__)

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

# Shown on the progress bar (with tqdm's own rate and ETA) or the progress line, under these short names.
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


class Progress:
    """The run's progress on stderr: on a terminal, tqdm's bar (rate, ETA, the latest loss); elsewhere - a
    log file, CI, a TPU worker's log - one plain line per logged step, since a bar redrawn with carriage
    returns would be one endless line there."""

    def __init__(self, total_steps: int, start_step: int = 0, stream: IO[str] | None = None):
        self.total_steps = total_steps
        stream = sys.stderr if stream is None else stream
        self._bar = None
        if stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                             file=stream)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def show(self, record: dict[str, Any]) -> None:
        """The latest logged record: on the bar, or as a line `step 10/300: loss 5.2, eval 5.4, win 0.04, ...`."""
        shown = {short: record[k] for k, short in BAR_FIELDS.items() if record.get(k) is not None}
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            return
        if "lr" in record and record["lr"] is not None:
            shown["lr"] = record["lr"]
        values = ", ".join(f"{k} {v:.4g}" for k, v in shown.items())
        logger.info("step %d/%d%s", record["step"], self.total_steps, f": {values}" if values else "")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class MetricsWriter:
    """Writes one JSON object per logged step (with a `step` key) to metrics.jsonl (appended locally,
    rewritten on an object store: see the module docstring); mirrors to wandb and `Progress` (a tqdm bar
    on a terminal, else a line per logged step). Only process 0 writes.

    wandb keeps its own files on a local disk: `wandb_dir`, else the run directory when it is local, else
    `~/.cache/sophia-jax/wandb/gs/<bucket>/<prefix>` (trainer.storage.local_dir_for). The run id lives in
    `<run_dir>/wandb_id`, so a resumed run on any machine continues the same wandb run, rewound to
    `start_step` (`_start_wandb`): its charts hold what metrics.jsonl holds.
    """

    def __init__(self, run_dir: str | os.PathLike, *, config: dict[str, Any], total_steps: int, start_step: int = 0,
                 wandb_mode: str = "disabled", wandb_project: str = "sophia-jax", name: str | None = None,
                 tags: list[str] | None = None, progress: bool = True, wandb_dir: str | None = None,
                 flush_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.enabled = jax.process_index() == 0
        self.path = epath.Path(run_dir) / "metrics.jsonl"
        self.remote = storage.is_remote(run_dir)
        self.flush_seconds, self._clock = flush_seconds, clock
        self._file, self._lines, self._unflushed, self._last_flush = None, [], False, clock()
        if self.enabled and self.remote:
            self._lines = (storage.read_text_if_exists(self.path) or "").splitlines()
        elif self.enabled:
            self._file = self.path.open("a")
        self._progress = Progress(total_steps, start_step) if self.enabled and progress else None
        self._wandb = None
        if self.enabled and wandb_mode != "disabled":
            local = storage.local_dir_for(run_dir, "wandb") if wandb_dir is None else epath.Path(wandb_dir)
            local.mkdir(parents=True, exist_ok=True)
            self._wandb = _start_wandb(epath.Path(run_dir) / "wandb_id", start_step, project=wandb_project,
                                       name=name, dir=str(local), config=config, mode=wandb_mode,
                                       tags=tags or None)

    def advance(self, steps: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(steps)

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Writes `metrics` (arrays or numbers; None kept as null) for `step`; returns the plain record."""
        record = {"step": int(step)}
        record.update({k: (None if v is None else _number(v)) for k, v in metrics.items()})
        if not self.enabled:
            return record
        line = json.dumps(record)
        if self._file is not None:
            self._file.write(line + "\n")
            self._file.flush()
        else:
            self._lines.append(line)
            self._unflushed = True
            if self._clock() - self._last_flush >= self.flush_seconds:
                self.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=step)
        if self._progress is not None:
            self._progress.show(record)
        return record

    def flush(self) -> None:
        """Makes every line logged so far durable (an object store: one rewrite, when there are new lines)."""
        if self._file is not None:
            self._file.flush()
        elif self._unflushed:
            storage.write_text(self.path, "".join(line + "\n" for line in self._lines))
            self._unflushed = False
        self._last_flush = self._clock()

    def close(self, flush: bool = True) -> None:
        """Ends the writer; `flush=False` leaves metrics.jsonl as it is (the run directory is no longer ours)."""
        if self._progress is not None:
            self._progress.close()
        if self.enabled and flush:
            self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(id_file: epath.Path, start_step: int, **init: Any) -> Any:
    """The run directory's wandb run: a new one, or the one `id_file` names rewound to `start_step`.

    A run resumed from the checkpoint at step S logs S+1, S+2, ... again, while wandb keeps what it logged
    past S and ignores steps below its current one: its charts would keep the abandoned trajectory. So a
    resumed run rewinds (`resume_from="<id>?_step=S"`: history after S dropped, logging continues at S+1;
    S = 0 for a restart that found no checkpoint), which wandb records in the run's branch point (offline
    files included). Where the server refuses a rewind (a preview feature on some accounts), the run
    continues the same id with a warning, as before.
    """
    import wandb

    run_id = (storage.read_text_if_exists(id_file) or "").strip()
    if not run_id:
        run_id = secrets.token_hex(4)
        storage.write_text(id_file, run_id)
        return wandb.init(id=run_id, **init)
    try:
        return wandb.init(resume_from=f"{run_id}?_step={start_step}", **init)
    except wandb.errors.Error as error:
        import logging

        logging.getLogger(__name__).warning("wandb did not rewind run %s to step %d (%s); continuing it as it is: "
                                            "its charts may show steps after %d twice", run_id, start_step,
                                            error, start_step)
        return wandb.init(id=run_id, resume="allow", **init)
