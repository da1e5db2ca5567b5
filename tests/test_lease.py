"""The run directory's lease (trainer/lease.py) in a local directory, each holder a real process: a live holder
is named and kept, a dead one (SIGKILL) is taken over at once on its machine, one that stopped renewing
elsewhere after the timeout, a released one at once; a holder that was paused past the timeout finds it
lost. tests/test_gcs.py runs the same checks on gs:// (fake-gcs-server)."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from trainer.lease import Lease, LeaseHeld

TIMEOUT = 2.0  # seconds; renewed every 0.2 s

HOLDER = """import sys, time
from trainer.lease import Lease
lease = Lease(sys.argv[1], float(sys.argv[2]))
lease.acquire()
print("held", lease.owner["run"], flush=True)
while lease.lost is None:
    time.sleep(0.05)
print("lost to", lease.lost, flush=True)
time.sleep(600)
"""


class Holder:
    """A process holding the lease of `run_dir` (killed at the end of the test)."""

    def __init__(self, run_dir: str, timeout: float = TIMEOUT):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, run_dir, str(timeout)], stdout=subprocess.PIPE,
                                        text=True)
        line = self.process.stdout.readline().split()
        assert line[:1] == ["held"], line
        self.run = line[1]

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


@pytest.fixture
def holders():
    started = []
    yield lambda run_dir, timeout=TIMEOUT: started.append(Holder(run_dir, timeout)) or started[-1]
    for holder in started:
        holder.close()


def read(run_dir: str) -> dict:
    """lease.json, through the same reader as the trainer's other files (local or gs://)."""
    from etils import epath

    return json.loads((epath.Path(run_dir) / "lease.json").read_text())


def check_live_holder_is_named_and_a_killed_one_taken_over_at_once(run_dir: str, holders) -> None:
    holder = holders(run_dir)
    start = time.monotonic()
    with pytest.raises(LeaseHeld, match=rf"is in use by run {holder.run} \(host \S+, pid {holder.process.pid}, "):
        Lease(run_dir, TIMEOUT).acquire()
    assert time.monotonic() - start < TIMEOUT  # it saw a renewal: no need to wait for the timeout
    holder.process.send_signal(signal.SIGKILL)
    holder.process.wait()
    lease = Lease(run_dir, TIMEOUT)
    start = time.monotonic()
    lease.acquire()  # the holder ran on this machine and its pid is gone: no need to wait either
    assert time.monotonic() - start < TIMEOUT / 2
    assert read(run_dir)["owner"]["run"] == lease.owner["run"]
    lease.release()
    assert read(run_dir)["released"] and read(run_dir)["owner"]["run"] == lease.owner["run"]
    again = Lease(run_dir, 60.0)
    start = time.monotonic()
    again.acquire()  # released: taken at once even with a long timeout
    assert time.monotonic() - start < 5 and read(run_dir)["owner"]["run"] == again.owner["run"]
    again.release()


def check_a_lease_from_another_machine_is_taken_after_the_timeout(run_dir: str, write, caplog) -> None:
    """An owner elsewhere cannot be checked: its lease is taken over once not renewed for the timeout."""
    foreign = {"owner": {"host": "tpu-worker-7", "pid": 4242, "started": "2026-01-01T00:00:00+00:00",
                         "run": "elsewhere", "boot": "another-boot", "ticks": 1}, "renewed": 0, "released": False}
    write(json.dumps(foreign))
    lease = Lease(run_dir, TIMEOUT)
    start = time.monotonic()
    with caplog.at_level(logging.INFO, logger="trainer.lease"):
        lease.acquire()
    waited = time.monotonic() - start
    assert TIMEOUT * 0.9 <= waited < TIMEOUT * 4, waited
    assert any("took over the lease" in r.message and "elsewhere (host tpu-worker-7, pid 4242" in r.message
               for r in caplog.records)
    assert read(run_dir)["owner"]["run"] == lease.owner["run"]
    lease.release()


def check_a_holder_paused_past_the_timeout_finds_its_lease_lost(run_dir: str, holders) -> None:
    holder = holders(run_dir)
    os.kill(holder.process.pid, signal.SIGSTOP)  # alive, but not renewing (a stalled host)
    try:
        lease = Lease(run_dir, TIMEOUT)
        lease.acquire()
    finally:
        os.kill(holder.process.pid, signal.SIGCONT)
    line = holder.process.stdout.readline()
    assert line.startswith(f"lost to run {lease.owner['run']} (host "), line
    assert lease.lost is None and read(run_dir)["owner"]["run"] == lease.owner["run"]
    lease.release()


def test_live_holder_is_named_and_a_killed_one_taken_over_at_once(tmp_path, holders):
    check_live_holder_is_named_and_a_killed_one_taken_over_at_once(str(tmp_path), holders)


def test_a_lease_from_another_machine_is_taken_after_the_timeout(tmp_path, caplog):
    check_a_lease_from_another_machine_is_taken_after_the_timeout(
        str(tmp_path), (tmp_path / "lease.json").write_text, caplog)


def test_a_holder_paused_past_the_timeout_finds_its_lease_lost(tmp_path, holders):
    check_a_holder_paused_past_the_timeout_finds_its_lease_lost(str(tmp_path), holders)
