"""Durable training state: orbax checkpoints, the save policy, resuming a run, and preemption signals.

A checkpoint is one orbax step directory under `<run_dir>/checkpoints/` holding
  state/   the train state pytree (params, optimizer state with m, h, count and the Hessian key, the
           training key, the step), written by tensorstore, each host writing only its own shards;
  extras/  JSON: the data-loader position, the resolved config and anything else the trainer adds.
orbax finalizes a step only when every host has finished (a rename locally, a commit marker on gs://),
so a crash mid-save never replaces the last complete checkpoint. Paths are `etils.epath` paths (what
orbax uses): local directories and gs:// alike (trainer/storage.py). Every process takes part in saving
and restoring; only process 0 sets checkpoints aside and trims metrics.jsonl.

Resuming (`resume`) skips a finalized checkpoint only when it is provably damaged (its files are
missing, truncated or undecodable); any other failure to read it (an I/O, permission or network error)
stops the run with the reason and changes nothing, because that checkpoint may be good.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from trainer import storage

__all__ = [
    "CheckpointConfig",
    "CheckpointDamaged",
    "CheckpointReadError",
    "Checkpointer",
    "PreemptionGuard",
    "Resumed",
    "check_resumable",
    "failure_reason",
    "is_damage",
    "read_extras",
    "resume",
    "trim_metrics",
]

logger = logging.getLogger(__name__)
_preservation = ocp.checkpoint_managers.preservation_policy


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to keep (`--checkpoint.*`)."""

    every_steps: int | None = 1000
    """Save when the step is a multiple of this (None: never by step count)."""
    every_minutes: float | None = 30.0
    """Save when this many minutes have passed since the last save (None: never by time)."""
    keep: int = 2
    """Keep the latest `keep` checkpoints..."""
    keep_every: int | None = None
    """...plus, forever, those whose step is a multiple of this (None: none)."""
    async_save: bool = True
    """Write in a background thread; the step loop only waits for the device-to-host copy."""
    decide_every: int = 10
    """Every this many steps process 0 reads its clock and every process follows it: whether `every_minutes`
    has passed, whether the run directory's lease still holds (one small host collective on a pod)."""
    lease_minutes: float = 3.0
    """A run directory's lease (trainer/lease.py) not renewed for this long is taken over: its run died.
    The running run renews it every 5 s (a tenth of this when shorter)."""

    def __post_init__(self) -> None:
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep={self.keep}; keep at least the latest checkpoint (>= 1)")
        for name in ("every_steps", "keep_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"checkpoint.{name}={value}; use a positive step count or null")
        if self.decide_every < 1:
            raise ValueError(f"checkpoint.decide_every={self.decide_every}; use a positive step count")
        if not self.lease_minutes > 0:
            raise ValueError(f"checkpoint.lease_minutes={self.lease_minutes}; use a positive number of minutes")


class Checkpointer:
    """Saves and restores `(state, extras)` pairs in `directory` under a `CheckpointConfig` policy."""

    def __init__(self, directory: str | os.PathLike, config: CheckpointConfig = CheckpointConfig(),
                 clock: Callable[[], float] = time.monotonic):
        directory = epath.Path(directory)
        self.directory = directory if "://" in str(directory) else directory.absolute()
        self.config = config
        self._clock = clock
        self._last_save = clock()
        policies = [_preservation.LatestN(config.keep)]
        if config.keep_every:
            policies.append(_preservation.EveryNSteps(config.keep_every))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_preservation.AnyPreservationPolicy(policies),
            enable_async_checkpointing=config.async_save,
        )
        try:  # lists the directory: an unreachable storage stops here, before anything changes
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "extras"))
        except Exception as error:
            raise CheckpointReadError(self.directory, error, listing=True) from error

    def due_by_steps(self, step: int) -> bool:
        """Whether `every_steps` asks for a checkpoint after `step` (the same answer on every process)."""
        return self.config.every_steps is not None and step % self.config.every_steps == 0

    def due_by_time(self) -> bool:
        """Whether `every_minutes` have passed since this process's last save, by its own clock: with several
        processes only process 0's answer counts, shared with the others (trainer/train.py)."""
        minutes = self.config.every_minutes
        return minutes is not None and self._clock() - self._last_save >= 60 * minutes

    def save(self, step: int, state: Any, extras: Mapping[str, Any]) -> None:
        """Starts saving (asynchronously unless configured otherwise); returns once arrays are on the host."""
        if step in self._manager.all_steps():
            return  # already saved (e.g. a preemption save right after a policy save)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), extras=ocp.args.JsonSave(dict(extras)))
        self._manager.save(step, args=args, force=True)
        self._last_save = self._clock()

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first. Raises CheckpointReadError when the directory
        cannot be listed (an outage must not read as "no checkpoints")."""
        try:
            self._manager.reload()
            return sorted(self._manager.all_steps())
        except Exception as error:
            raise CheckpointReadError(self.directory, error, listing=True) from error

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """The state (laid out as `abstract_state`'s shardings, which may differ from the saved ones) and extras."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), extras=ocp.args.JsonRestore())
        with _event_loops_that_finish_their_reads():
            restored = self._manager.restore(step, args=args)
        return restored["state"], dict(restored["extras"])

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest checkpoint that restores, skipping provably damaged ones with a warning; None if
        there is none. Raises CheckpointReadError, changing nothing, when one cannot be read for another
        reason (storage, permissions, network)."""
        found = self._restore_newest(abstract_state, self.steps())
        return None if found is None else found[:3]

    def _restore_newest(self, abstract_state: Any,
                        steps: list[int]) -> tuple[int, Any, dict[str, Any], list[int]] | None:
        """`restore_latest` over `steps`, also returning the steps it found damaged (None when all are)."""
        damaged = []
        for step in reversed(steps):
            try:
                return (step, *self.restore_agreed(step, abstract_state), damaged)
            except CheckpointDamaged as error:
                logger.warning("checkpoint %s/%d is damaged (%s); trying the one before it",
                               self.directory, step, failure_reason(error))
                damaged.append(step)
        return None

    def restore_agreed(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """`restore(step)`, with every process agreeing on the outcome so that all resume from the same step:
        each says how its own restore went and all follow the worst. Raises CheckpointReadError when it
        could not be read anywhere for a reason other than damage, CheckpointDamaged when it is damaged
        anywhere (and no read error occurred)."""
        error = None
        try:
            state, extras = self.restore(step, abstract_state)
        except Exception as e:
            error = e
        outcome = _agree(_RESTORED if error is None else _DAMAGED if is_damage(error) else _READ_ERROR)
        path = self.directory / str(step)
        if outcome == _READ_ERROR:
            raise CheckpointReadError(path, error or RuntimeError("another process could not read it")) from error
        if outcome == _DAMAGED:
            raise CheckpointDamaged(f"checkpoint {path} is damaged") from (
                error or RuntimeError("another process found it damaged"))
        return state, extras

    def set_aside(self, damaged: list[int], step: int) -> None:
        """Renames the checkpoints `damaged` (each found damaged by every process; never one that restores) to
        `<step>.unrestorable`, so that the run resuming from `step` can save those steps again."""
        newer = sorted(damaged)
        if newer and jax.process_index() == 0:
            for s in newer:
                path, n = self.directory / str(s), 0
                target = self.directory / f"{s}.unrestorable"
                while target.exists():  # set aside before, by an earlier resume
                    n += 1
                    target = self.directory / f"{s}.unrestorable.{n}"
                path.rename(target)
                logger.warning("set aside %s as %s (resuming from step %d)", path, target.name, step)
        if newer:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sophia-jax: checkpoints set aside")
            self._manager.reload()

    def wait(self) -> None:
        """Blocks until every started save is complete on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


# Outcomes of one restore attempt, ordered by severity (the processes follow the largest).
_RESTORED, _DAMAGED, _READ_ERROR = 0, 1, 2


def _agree(outcome: int) -> int:
    """The most severe outcome over all processes (this one's alone in a single-process run)."""
    if jax.process_count() == 1:
        return outcome
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int32(outcome))))


def read_extras(step_dir: str | os.PathLike) -> dict[str, Any]:
    """The JSON extras of one checkpoint step directory, without restoring its arrays."""
    text = storage.read_text_if_exists(epath.Path(step_dir) / "extras" / "metadata")
    if text is None:
        raise FileNotFoundError(f"{step_dir} is not a complete sophia-jax checkpoint (no extras/metadata); "
                                "pass a step directory such as RUN_DIR/checkpoints/1000")
    return json.loads(text)


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any],
                    fields: Iterable[str] | Mapping[str, Any]) -> None:
    """Refuses to resume when a shape-relevant config field changed.

    Args:
      saved, current: nested config dicts (the checkpoint's and this run's).
      fields: dotted names ("model.num_layers") or section names ("model") whose values must match; as a
        mapping, each name's value is what a checkpoint written before that field existed is taken to have
        (e.g. {"model.arch": "neox"}: older runs were all GPT-NeoX).
    """
    older = fields if isinstance(fields, Mapping) else {}
    changed = []
    for field in fields:
        a, b = _lookup(saved, field, older.get(field)), _lookup(current, field)
        if a != b:
            changed.append(f"{field}: checkpoint has {a!r}, this run has {b!r}")
    if changed:
        raise ValueError("cannot resume: the config changed fields that shape the train state:\n  "
                         + "\n  ".join(changed)
                         + "\nrestore the old values, or start a fresh run in another --run_dir")


def _lookup(tree: Mapping[str, Any], dotted: str, absent: Any = None) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return absent
        node = node[part]
    return node


def trim_metrics(path: str | os.PathLike, last_step: int) -> int:
    """Drops the lines of a metrics.jsonl file whose `step` is after `last_step` (written after the
    checkpoint a run resumes from), so the resumed run appends without duplicating steps.
    Returns the number of lines dropped; a torn last line (crash mid-write) is dropped too."""
    path = epath.Path(path)
    text = storage.read_text_if_exists(path)
    if text is None:
        return 0
    kept, dropped = [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if record.get("step", -1) > last_step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        storage.write_text(path, "".join(line + "\n" for line in kept))
    return dropped


# Failures that prove a finalized checkpoint damaged: its files are missing, truncated or undecodable
# (tensorstore's status codes, and Python's for the JSON parts). Anything else - an OSError such as EIO
# or EACCES, UNAVAILABLE, DEADLINE_EXCEEDED, PERMISSION_DENIED, UNAUTHENTICATED, ... - says nothing about
# the checkpoint's contents.
_DAMAGE_CODES = re.compile(r"\b(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|INVALID_ARGUMENT|FAILED_PRECONDITION):")
_TRANSIENT_CODES = re.compile(r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|PERMISSION_DENIED|UNAUTHENTICATED|"
                              r"RESOURCE_EXHAUSTED|ABORTED|CANCELLED|INTERNAL|UNKNOWN):")


def _chain(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    while error is not None and error not in out:
        out.append(error)
        error = error.__cause__ or error.__context__
    return out


def is_damage(error: BaseException) -> bool:
    """Whether a failure to restore a finalized checkpoint proves it damaged (so the run may fall back to
    an older one). I/O, permission and network errors do not: the checkpoint may be good."""
    chain = _chain(error)
    if any(_TRANSIENT_CODES.search(str(e)) for e in chain):
        return False
    for e in chain:
        if isinstance(e, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
            return True
        if isinstance(e, OSError):  # EIO, EACCES, ETIMEDOUT, ...: the storage, not the checkpoint
            return False
        if _DAMAGE_CODES.search(str(e)):
            return True
    return False


def failure_reason(error: BaseException) -> str:
    """Why a checkpoint could not be restored, in one readable line: the failure at the root (tensorstore's
    "OUT_OF_RANGE: Error reading ... in OCDBT database ...", a JSON decode error, an OSError), not orbax's
    wrapper around it, whose text holds a pybind11 method repr and a many-line TensorStore spec."""
    chain = _chain(error)
    for e in reversed(chain):  # the innermost first: the evidence is the root cause
        if (isinstance(e, (OSError, json.JSONDecodeError, UnicodeDecodeError)) or _DAMAGE_CODES.search(str(e))
                or _TRANSIENT_CODES.search(str(e))):
            return storage.describe(e).removeprefix("ValueError: ")
    return storage.describe(chain[-1])


class _LoopThatFinishesItsReads(asyncio.SelectorEventLoop):
    """An event loop that, when closed, first lets its unfinished tasks end.

    orbax runs a restore in a fresh event loop that it closes when the restore returns. When one array read
    fails (a damaged checkpoint) the restore fails at once while the other reads are still in flight;
    closing the loop under them leaves tasks that tensorstore later tries to wake on the closed loop
    ("RuntimeError: Event loop is closed", from its threads) or that are garbage-collected half-done
    ("Exception ignored in: <coroutine ... _read_array_index_and_device_put>" with the whole TensorStore
    spec): hundreds of traceback lines after the run's one-line error. Letting those reads finish (they
    end on their own, in success or in the same damage) before closing leaves nothing behind.
    """

    def close(self) -> None:
        if not self.is_closed() and not self.is_running():
            unfinished = [task for task in asyncio.all_tasks(self) if not task.done()]
            if unfinished:
                self.run_until_complete(asyncio.gather(*unfinished, return_exceptions=True))
        super().close()


class _FinishingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _LoopThatFinishesItsReads()


@contextlib.contextmanager
def _event_loops_that_finish_their_reads() -> Iterator[None]:
    """While active, the event loops asyncio creates (orbax's, for a restore) finish their tasks on close."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_FinishingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


class CheckpointDamaged(RuntimeError):
    """A finalized checkpoint is provably damaged (its `__cause__` says how): resuming may skip it."""


class CheckpointReadError(RuntimeError):
    """A checkpoint (or, with `listing`, the checkpoints directory) could not be read for a reason that says
    nothing about its contents; nothing changed."""

    def __init__(self, path: epath.Path, error: BaseException, listing: bool = False):
        self.path = path
        what = f"list the checkpoints in {path}" if listing else f"read checkpoint {path}"
        hint = "" if listing else (" If you know this checkpoint is damaged, rename it (e.g. to "
                                   f"{path.name}.damaged) and run again to resume from the one before it.")
        super().__init__(
            f"could not {what} ({failure_reason(error)}). This looks like a storage, "
            "permission or network problem, not a damaged checkpoint, so nothing was changed: fix the access (or "
            f"wait for the storage to recover) and run again.{hint}")


class Resumed(NamedTuple):
    """Where a run resumes: the step, the restored state and the checkpoint's extras."""

    step: int
    state: Any
    extras: dict[str, Any]
    source: epath.Path  # the step directory restored


def _source(checkpointer: Checkpointer, resume_from: str | None) -> tuple[Checkpointer, int | None]:
    """The checkpointer to resume from and the step asked for: `resume_from` names a step directory, a
    checkpoints directory or a run directory (its latest step); None means the run's own directory."""
    if resume_from is None:
        return checkpointer, None
    path = epath.Path(resume_from)  # exists(), not is_dir(): fsspec's is_dir reads an outage as "no"
    if path.name.isdigit() and (path / "extras").exists():
        return Checkpointer(path.parent, CheckpointConfig(async_save=False)), int(path.name)
    directory = path / "checkpoints" if (path / "checkpoints").exists() else path
    if not directory.exists():
        raise FileNotFoundError(f"--resume_from {str(path)!r} does not exist; pass a checkpoint step directory "
                                "(RUN_DIR/checkpoints/STEP) or a run directory")
    source = Checkpointer(directory, CheckpointConfig(async_save=False))
    if not source.steps():
        raise FileNotFoundError(f"--resume_from {str(path)!r} holds no complete checkpoint")
    return source, None


def resume(checkpointer: Checkpointer, abstract_state: Any, config: Mapping[str, Any], fields: Iterable[str], *,
           resume_from: str | None = None, metrics_path: str | os.PathLike | None = None) -> Resumed | None:
    """Restores the state a run continues from, or returns None for a fresh run.

    Finds the checkpoint: the newest in `checkpointer`'s directory (the run's own), else `resume_from`'s
    (which applies only while the run has no checkpoint of its own: a relaunch after a preemption continues
    from the run's newest step, never back at `resume_from`). Refuses a config whose `fields` differ from the
    checkpoint's (before reading any array), restores it onto `abstract_state`'s shardings (falling back past
    provably damaged ones, which are set aside so the resumed run can write those steps again; nothing else
    is) and trims `metrics_path` of the lines written after it - of every line for a fresh run, which
    follows only attempts that left no checkpoint. The data-loader position is `extras["loader"]`.

    Raises:
      ValueError: the config changed a field of `fields`, or no checkpoint restores.
      FileNotFoundError: `resume_from` names nothing usable.
      CheckpointReadError: a checkpoint could not be read for a reason other than damage; nothing changed.
    """
    fields = dict(fields) if isinstance(fields, Mapping) else list(fields)
    own = checkpointer.steps()
    if own and resume_from is not None:
        logger.info("%s holds checkpoints of its own (the newest: step %d): continuing from them; --resume_from %s "
                    "applies only to a run directory without any (to start again from it, use a new --run_dir)",
                    checkpointer.directory, own[-1], resume_from)
        resume_from = None
    source, wanted = _source(checkpointer, resume_from)
    try:
        steps = own if source is checkpointer else source.steps()
        if not steps:
            _trim(metrics_path, 0)
            return None
        newest = wanted if wanted is not None else steps[-1]
        try:  # before restoring, so that a changed shape is refused rather than read as damage
            saved = read_extras(source.directory / str(newest))["config"]
        except Exception as error:
            if not is_damage(error):
                raise CheckpointReadError(source.directory / str(newest), error) from error
            saved = None  # damaged: restoring falls back past it, with a warning
        if saved is not None:
            check_resumable(saved, config, fields)
        damaged: list[int] = []
        if wanted is not None:
            try:
                restored = (wanted, *source.restore_agreed(wanted, abstract_state))
            except CheckpointDamaged as error:
                raise ValueError(f"{error} ({failure_reason(error)}); pass another --resume_from") from error
        else:
            found = source._restore_newest(abstract_state, steps)
            if found is None:
                raise ValueError(f"none of the checkpoints in {source.directory} ({', '.join(map(str, steps))}) "
                                 "could be restored (see the warnings above); move them away or use another "
                                 "--run_dir")
            *restored, damaged = found
    finally:
        if source is not checkpointer:
            source.close()
    step, state, extras = restored
    check_resumable(extras["config"], config, fields)
    logger.info("resuming from %s/%d", source.directory, step)
    if source is checkpointer:
        checkpointer.set_aside(damaged, step)
    _trim(metrics_path, step)
    return Resumed(step, state, extras, source.directory / str(step))


def _trim(metrics_path: str | os.PathLike | None, step: int) -> None:
    """Process 0 drops the metrics lines after `step` (all of them for a fresh start at 0)."""
    if metrics_path is None or jax.process_index() != 0:
        return
    dropped = trim_metrics(metrics_path, step)
    if dropped and step == 0:
        logger.info("a fresh start: dropped the %d metrics line(s) of an earlier attempt that saved no checkpoint",
                    dropped)
    elif dropped:
        logger.info("dropped %d metrics line(s) written after step %d", dropped, step)


class PreemptionGuard:
    """Turns SIGTERM/SIGINT (a TPU preemption notice, Ctrl-C) into a stop that the step loop polls.

    The loop finishes its current step, saves and exits 0. A second signal while the first is pending
    restores the default behaviour (a second Ctrl-C kills).

    With several processes all must stop at the same step, so `should_stop(step)` asks JAX's preemption
    sync point (`multihost_utils.reached_preemption_sync_point`): `jax.distributed.initialize()` installs
    a SIGTERM handler (its preemption notifier) that tells the coordination service, which picks a step
    at which every process's `should_stop` returns True. That handler must stay in place - a Python
    SIGTERM handler would replace it and the notice would never leave this process (seen on CPU with
    jax 0.10.2: the processes ran on) - so the guard leaves SIGTERM alone and turns SIGINT into a SIGTERM
    to itself, which the notifier relays like a preemption.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._distributed = False

    def __enter__(self) -> PreemptionGuard:
        self._distributed = jax.process_count() > 1
        signals = (signal.SIGINT,) if self._distributed else (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # second signal: give up on a clean stop
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        if self._distributed:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier takes it to the coordination service

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step` (on several processes: the same answer on all of them)."""
        if self._distributed:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self.signal_name is not None
