"""What wandb recorded offline: the records of its `run-<id>.wandb` files (wandb's transaction log: a 7-byte
`:W&B` header, then LevelDB-log framed protobuf `Record`s in 32 KiB blocks), read without wandb's own
reader (wandb 0.31 ships none in Python), and the history a wandb server would hold after syncing them."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

__all__ = ["records", "served_history"]

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    """The protobuf records of one .wandb file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    pos, out, pending = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if kind == 0:
            pos += left
            continue
        pending += data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _history(record: wandb_internal_pb2.Record) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}


def served_history(sessions: list[Path], metric: str) -> dict[int, float]:
    """{step: metric} as wandb keeps it after the sessions' files are synced to one run, in the order the
    sessions started (their run records' start times): a
    session whose run record names a branch point (`resume_from`) first drops the steps after that point;
    one that just resumes (`resume="allow"`) continues after the run's last step, wandb dropping any
    step below it (steps must increase)."""
    history: dict[int, float] = {}
    logs = [records(path) for path in sessions]
    runs = [next(r.run for r in recs if r.WhichOneof("record_type") == "run") for recs in logs]
    for run, recs in sorted(zip(runs, logs), key=lambda pair: pair[0].start_time.ToNanoseconds()):
        if run.branch_point.run:
            history = {s: v for s, v in history.items() if s <= run.branch_point.value}
        last = max(history, default=0)
        for r in recs:
            if r.WhichOneof("record_type") == "history":
                row = _history(r)
                step = int(row["_step"])
                if metric in row and (run.branch_point.run or step > last):
                    history[step] = row[metric]
    return history
