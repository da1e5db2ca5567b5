"""One writer per run directory: `<run_dir>/lease.json`, taken by a run before it changes anything there.

Two runs started into one run directory would interleave metrics.jsonl, overwrite each other's config.yaml
and set aside checkpoints the other one is writing. So process 0 of a run takes the directory's lease
before anything there changes, renews it while the run lives and releases it at the end; every process of
the run follows process 0's verdict (`take`).

    lease.json: {"owner": {"host": ..., "pid": ..., "started": ..., "run": <random id>},
                 "renewed": <unix time>, "released": false}

The file changes only by compare-and-swap on the version last read:
  - locally it is created exclusively (a hard link of a complete temporary file, which fails when the lease
    exists, as O_EXCL does, and is never seen half-written); a renewal, takeover or release replaces it (a
    rename) under an flock on `.lease.lock` after checking that it is still the version read;
  - on gs:// it is an object created with ifGenerationMatch=0 and replaced with ifGenerationMatch=<the
    generation read>, through google-cloud-storage (a gcsfs dependency: gcsfs itself writes no
    generation-matched replacement).

A run that finds the lease held watches it: renewed meanwhile (its owner lives) -> LeaseHeld, naming the
owner; not renewed for `timeout` seconds (its owner died without releasing it: a SIGKILL, a lost host) ->
taken over, with a warning. A released lease is taken at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Protocol

import jax
import numpy as np
from etils import epath

from trainer import storage

__all__ = ["Lease", "LeaseHeld", "LeaseLost", "take"]

logger = logging.getLogger(__name__)

NAME = "lease.json"
RENEW_SECONDS = 5.0  # how often the holder renews (a tenth of the timeout when that is shorter)
_MESSAGE_BYTES = 1024  # how much of a refusal process 0 shares with the other processes


class LeaseHeld(ValueError):
    """Another run, alive, holds the run directory (exit status 2: pick another --run_dir, or stop it)."""


class LeaseLost(ValueError):
    """Another run took the run directory over while this one ran (it had not renewed for the timeout)."""


def _describe(record: dict[str, Any]) -> str:
    owner = record.get("owner", {})
    return (f"run {owner.get('run', '?')} (host {owner.get('host', '?')}, pid {owner.get('pid', '?')}, "
            f"started {owner.get('started', '?')})")


# ------------------------------------------------------------------------------------ the two stores
class _Store(Protocol):
    """The lease file with compare-and-swap on a version (any value that changes with every write)."""

    where: str

    def create(self, text: str) -> Any | None:
        """Creates the file if absent; its version, or None when it exists."""

    def read(self) -> tuple[str, Any, float] | None:
        """(text, version, seconds since it was written) or None when absent."""

    def replace(self, text: str, version: Any) -> Any | None:
        """Writes `text` if the file is still at `version`; the new version, or None when it changed."""


class _LocalStore:
    def __init__(self, path: epath.Path):
        self.path, self.where = os.fspath(path), os.fspath(path)
        self._lock = os.path.join(os.path.dirname(self.path), ".lease.lock")

    def create(self, text: str) -> Any | None:
        tmp = f"{self.path}.{secrets.token_hex(4)}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)  # exclusive like O_EXCL, and never seen half-written
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return text

    def read(self) -> tuple[str, Any, float] | None:
        try:
            with open(self.path) as f:
                text = f.read()
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        return text, text, age  # every write holds a new `renewed` time and nonce: the text is the version

    def replace(self, text: str, version: Any) -> Any | None:
        with open(self._lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            if current is None or current[1] != version:
                return None
            storage.write_text(epath.Path(self.path), text)
            return text


class _GcsStore:
    def __init__(self, path: epath.Path):
        from google.cloud import storage as gcs

        bucket, _, self._name = os.fspath(path).removeprefix("gs://").partition("/")
        self.where = f"gs://{bucket}/{self._name}"
        self._bucket = gcs.Client().bucket(bucket)  # credentials as gcsfs and tensorstore find them

    def create(self, text: str) -> Any | None:
        return self._write(text, 0)

    def read(self) -> tuple[str, Any, float] | None:
        from google.api_core import exceptions

        blob = self._bucket.get_blob(self._name)
        if blob is None:
            return None
        try:
            text = blob.download_as_text(if_generation_match=blob.generation)
        except (exceptions.PreconditionFailed, exceptions.NotFound):
            return self.read()  # replaced (or released and gone) between the two calls: read it again
        age = (datetime.now(timezone.utc) - blob.updated).total_seconds()
        return text, blob.generation, age

    def replace(self, text: str, version: Any) -> Any | None:
        return self._write(text, version)

    def _write(self, text: str, generation: int) -> int | None:
        from google.api_core import exceptions

        blob = self._bucket.blob(self._name)
        try:
            blob.upload_from_string(text, content_type="application/json", if_generation_match=generation)
        except exceptions.PreconditionFailed:
            return None
        return blob.generation


def _store(run_dir: epath.Path) -> _Store:
    path = run_dir / NAME
    if not storage.is_remote(run_dir):
        return _LocalStore(path)
    if not os.fspath(run_dir).startswith("gs://"):
        raise ValueError(f"run_dir {run_dir}: only local directories and gs:// are supported")
    return _GcsStore(path)


# ----------------------------------------------------------------------------------------- the lease
class Lease:
    """A run directory's lease, held by this process (see the module docstring); renewed by a thread.

    Args:
      run_dir: the run directory.
      timeout: seconds without renewal after which another run may take the lease over.
      clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, run_dir: str | os.PathLike, timeout: float, clock: Callable[[], float] = time.monotonic):
        self.store, self.timeout, self._clock = _store(epath.Path(run_dir)), timeout, clock
        self.renew_every = min(RENEW_SECONDS, timeout / 10)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                      "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "run": secrets.token_hex(6), "boot": _boot_id(), "ticks": _start_ticks(os.getpid())}
        self._version: Any = None
        self._watched: tuple[Any, float] | None = None  # (the holder's version, when this run first saw it)
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _text(self, released: bool = False) -> str:
        return json.dumps({"owner": self.owner, "renewed": time.time(), "released": released,
                           "nonce": secrets.token_hex(4)}) + "\n"

    def acquire(self, poll: float | None = None) -> None:
        """Takes the lease, waiting while a holder may still renew it (`attempt` until it says so).

        Raises:
          LeaseHeld: its holder renewed it while this run watched (it is alive).
        """
        while not self.attempt():
            time.sleep(self.renew_every / 2 if poll is None else poll)

    def attempt(self) -> bool:
        """One look at the lease: True once taken (and renewing has started), False while its holder has
        neither renewed it nor let `timeout` pass since this run first saw it: call again after a pause.

        Raises:
          LeaseHeld: its holder renewed it since the first look (it is alive).
        """
        while True:
            self._version = self.store.create(self._text())
            if self._version is not None:
                break
            current = self.store.read()
            if current is None:
                continue  # released and removed meanwhile: create it again
            text, version, age = current
            record = _parse(text)
            released = bool(record.get("released"))
            if not released and self._watched is not None and version != self._watched[0]:
                raise LeaseHeld(f"{os.path.dirname(self.store.where)} is in use by {_describe(record)}, which "
                                f"renewed its lease ({self.store.where}) a moment ago: wait for it to end or stop "
                                "it, or use another --run_dir")
            if self._watched is None:
                self._watched = (version, self._clock())
                if not released and age < self.timeout:
                    logger.info("%s holds the lease of %s (renewed %.0f s ago): waiting up to %.0f s to see "
                                "whether it is alive", _describe(record), os.path.dirname(self.store.where), age,
                                self.timeout - age)
            dead = not released and _died_here(record.get("owner", {}))
            if not (released or dead or age >= self.timeout or self._clock() - self._watched[1] >= self.timeout):
                return False
            self._version = self.store.replace(self._text(), version)
            if self._version is None:
                self._watched = None  # another run wrote it first: look again
                continue
            if dead:
                logger.warning("took over the lease of %s from %s, which is no longer running on this machine",
                               os.path.dirname(self.store.where), _describe(record))
            elif not released:
                logger.warning("took over the lease of %s from %s: not renewed for %.0f s (its run died)",
                               os.path.dirname(self.store.where), _describe(record), max(age, self.timeout))
            break
        self._thread = threading.Thread(target=self._renew_loop, name="sophia-lease", daemon=True)
        self._thread.start()
        return True

    @property
    def lost(self) -> str | None:
        """None while the lease holds; else who took it over."""
        return self._lost

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                version = self.store.replace(self._text(), self._version)
            except Exception as error:  # an outage: keep trying; the timeout leaves room for several tries
                logger.warning("could not renew the lease %s (%s); trying again", self.store.where,
                               storage.describe(error))
                continue
            if version is None:
                current = self.store.read()
                self._lost = _describe(_parse(current[0])) if current else "nobody (it was removed)"
                logger.error("lost the lease of %s to %s", os.path.dirname(self.store.where), self._lost)
                return
            self._version = version

    def release(self) -> None:
        """Stops renewing and marks the lease released (unless another run holds it now)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._version is not None and self._lost is None:
            with contextlib.suppress(Exception):  # the run is over either way; a stale lease times out
                self.store.replace(self._text(released=True), self._version)
            self._version = None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat), or None where that is unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _died_here(owner: dict[str, Any]) -> bool:
    """Whether `owner` ran on this machine since its last boot and is gone (its pid absent, or reused by a
    process that started at another time): then its lease need not time out. Anywhere else: False."""
    boot = _boot_id()
    if boot is None or owner.get("boot") != boot or owner.get("host") != socket.gethostname():
        return False
    ticks = _start_ticks(int(owner.get("pid", -1)))
    return ticks is None or ticks != owner.get("ticks")


def _parse(text: str) -> dict[str, Any]:
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


class _Follower:
    """What a process other than 0 holds: process 0's lease, decided there."""

    lost = None

    def release(self) -> None:
        pass


def take(run_dir: str | os.PathLike, timeout: float) -> Lease | _Follower:
    """The run directory's lease for this run: process 0 takes it (`Lease.attempt`, looking again every
    half renewal interval while its holder may be alive) and shares each verdict with the other processes, which
    wait with it through one small broadcast per look (a single long wait would outlast the collectives'
    connect timeout).

    Raises:
      LeaseHeld: on every process, with process 0's message, when another run holds it.
      StorageError: on every process, when process 0 could not read or write the lease; nothing changed.
    """
    lease = None
    if jax.process_index() == 0:
        try:
            lease = Lease(run_dir, timeout)
        except Exception as error:
            lease = error
    while True:
        verdict = ""  # "" taken, "W" wait, "H..." held, "S..." storage error
        if isinstance(lease, Lease):
            try:
                verdict = "" if lease.attempt() else "W"
            except LeaseHeld as error:
                verdict = f"H{error}"
            except Exception as error:  # every process must reach the broadcast below
                verdict = f"S{_storage_message(run_dir, error)}"
        elif lease is not None:
            verdict = f"S{_storage_message(run_dir, lease)}"
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            raw = np.frombuffer(verdict.encode()[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0"), np.uint8)
            shared = np.asarray(multihost_utils.broadcast_one_to_all(raw))
            verdict = bytes(shared).rstrip(b"\0").decode(errors="replace")
        if verdict == "W":
            time.sleep(min(RENEW_SECONDS, timeout / 10) / 2)
            continue
        if verdict:
            raise (LeaseHeld if verdict[0] == "H" else storage.StorageError)(verdict[1:])
        return lease if lease is not None else _Follower()


def _storage_message(run_dir: str | os.PathLike, error: BaseException) -> str:
    return (f"could not take the lease {run_dir}/{NAME} ({storage.describe(error)}); nothing was changed: check "
            "the access to the run directory (or wait for the storage to recover) and run again")
