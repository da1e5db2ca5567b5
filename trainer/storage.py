"""Where a run's files live: a local directory or an object store URL (gs://bucket/prefix), alike.

Paths are `etils.epath` paths (what orbax uses; gs:// goes through fsspec's gcsfs). Object stores differ
from a disk in ways the trainer must respect:
  - there are no directories: nothing to create (gcsfs's makedirs would even create a missing bucket);
  - an object is written whole (an upload is atomic) and cannot be appended to: a file that grows is
    rewritten (see trainer/metrics.py);
  - fsspec's `isfile`/`isdir` answer False when the storage cannot be reached, which would read an outage
    as "missing": existence is decided by reading and catching FileNotFoundError only;
  - gcsfs caches directory listings, which other hosts' and tensorstore's writes do not invalidate:
    `configure()` turns that cache off before the first gs:// access;
  - gcsfs (2026.x) by default asks the Storage Control API (gRPC) for each bucket's layout before it
    touches the bucket, to support zonal and hierarchical-namespace buckets; a failed lookup is not
    cached, logs a warning and is retried for up to 60 s on every call. The trainer gains nothing from it
    (its arrays go through tensorstore's JSON API, which has no zonal-bucket support, and a
    hierarchical-namespace bucket works through the JSON API too), so `configure()` keeps gcsfs's JSON API
    filesystem unless GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is set explicitly.
"""

from __future__ import annotations

import os
import re
import sys
import uuid
from pathlib import Path

from etils import epath

__all__ = ["StorageError", "configure", "describe", "is_remote", "local_dir_for", "make_dirs", "read_text_if_exists",
           "write_text"]


class StorageError(OSError):
    """A file or object could not be read or written for a reason that says nothing about its contents
    (network, permissions, an outage); the message names the path and what to do."""


def describe(error: BaseException) -> str:
    """`Type: first line of the message` (300 characters at most), for one-line error messages."""
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first}"


def configure() -> None:
    """Turns off gcsfs's directory-listing cache (it would hide checkpoints that tensorstore or another
    host wrote, or still list one set aside) and its bucket-layout probe (GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT
    false unless set: see the module docstring). Call before the first gs:// access of the process."""
    import fsspec

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # read when gcsfs is imported
    if "gcsfs" in sys.modules and os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"].lower() not in ("true", "1"):
        import gcsfs.core  # imported before this call: name the JSON API filesystem explicitly

        for protocol in ("gs", "gcs"):
            fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is an object store URL (gs://..., s3://...) rather than a local path."""
    return "://" in str(path)


def make_dirs(path: epath.Path) -> None:
    """Creates a local directory and its parents; nothing for an object store (no directories there)."""
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)


def read_text_if_exists(path: epath.Path) -> str | None:
    """The file's text, or None when it does not exist. Any other failure (an outage, no permission) raises:
    it never reads as "missing"."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def write_text(path: epath.Path, text: str) -> None:
    """Replaces the file's content at once: locally through a temporary file and an atomic rename; on an
    object store with one upload (readers see the old object or the new one, never a part)."""
    if is_remote(path):
        path.write_text(text)
        return
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def local_dir_for(run_dir: str | os.PathLike, purpose: str) -> Path:
    """A local directory for tools that need a disk (wandb): the run directory itself when it is local,
    else `~/.cache/sophia-jax/<purpose>/gs/<bucket>/<prefix>` ($XDG_CACHE_HOME honoured): the same on every
    restart on this machine, and no "gs:" directory anywhere."""
    if not is_remote(run_dir):
        return Path(run_dir)
    scheme, _, rest = str(run_dir).partition("://")
    parts = [re.sub(r"[^A-Za-z0-9._-]", "_", p) for p in rest.split("/") if p not in ("", ".", "..")]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sophia-jax"
    return cache.joinpath(purpose, scheme, *parts)
