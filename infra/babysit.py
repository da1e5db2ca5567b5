"""`sophia-tpu babysit`: keeps one run going on a preemptible TPU VM until it finishes.

Every `poll` seconds:

    VM state            what the babysitter does
    gone / PREEMPTED /  delete it (unless gone), create it again, set it up, launch the run: sophia-train
    TERMINATED          resumes from the newest checkpoint under run_dir by itself
    READY               look at the job on every worker (`job_verdict`):
                          running   -> nothing
                          finished  -> stop, exit 0 (every worker exited 0 and no SIGTERM stopped it)
                          stopped   -> launch again (a SIGTERM stopped it: a preemption notice)
                          absent    -> set up and launch (nothing of this run on the VM yet)
                          failed    -> launch again; after `retries` such relaunches give up: exit 1,
                                       naming the failure, with the last lines of the worker's log
                          busy      -> exit 1: another run is running on the VM
    STOPPED             exit 1 (someone stopped it: start or delete it)
    anything else       wait (CREATING, STARTING, REPAIRING, ...)
"""

from __future__ import annotations

import time
from pathlib import Path

from infra import tpu
from infra.gcloud import Gcloud, GcloudError, log

__all__ = ["SSH_FAILURES", "babysit", "job_verdict"]

SSH_FAILURES = 3  # consecutive failed job checks on a READY VM before giving up


def job_verdict(records: list[dict[str, str]], run_id: str, workers: int) -> tuple[str, str]:
    """What the workers' job records (`remote.status_script`) say about `run_id`.

    Returns:
      (verdict, detail): verdict is one of failed, running, stopped, finished, busy, absent (see the
      module docstring); detail says which worker did what.
    """
    ours = [r for r in records if r.get("run") == run_id]
    others = [r for r in records if r.get("run") not in (run_id, "-") and r.get("state") == "running"]
    failed = [r for r in ours if r.get("state") == "died" or (r.get("state") == "exited" and r.get("code") != "0")]
    if failed:
        return "failed", "; ".join(
            f"worker {r.get('worker')} ({r.get('host')}) " + ("died without an exit status" if r["state"] == "died"
                                                              else f"exited with status {r.get('code')}")
            for r in failed)
    if any(r.get("state") == "running" for r in ours):
        return "running", f"running on {sum(r.get('state') == 'running' for r in ours)} of {workers} workers"
    if others:
        return "busy", f"run {others[0].get('run')} is running on worker {others[0].get('worker')}"
    if any(r.get("state") == "terminated" for r in ours):
        return "stopped", "stopped by SIGTERM (it saved a checkpoint)"
    if len(ours) == workers and all(r.get("state") == "exited" for r in ours):
        return "finished", f"all {workers} workers exited with status 0"
    return "absent", f"{len(ours)} of {workers} workers have run {run_id}"


def babysit(gc: Gcloud, slice_spec: tpu.SliceSpec, spec: tpu.LaunchSpec, *, repo: Path, allow_dirty: bool = False,
            python: str = "python3.11", retries: int = 3, poll: float = 60, timeout: float = 1800,
            check_fit: bool = True) -> int:
    """Runs the loop of the module docstring; returns 0 when the run finished.

    Raises:
      TpuError: the job failed more than `retries` times, another run holds the VM, or the VM is STOPPED.
      GcloudError: a gcloud call other than a job check failed (the babysitter stops at once).
    """
    name, run_id, workers = slice_spec.name, spec.run_id, tpu.hosts(slice_spec.accelerator_type)
    log.info("babysitting run %s on %s (%s, %d workers): a check every %g s, up to %d relaunches after failures",
             run_id, name, slice_spec.accelerator_type, workers, poll, retries)
    if check_fit:
        tpu.fit_check(gc, spec, slice_spec.accelerator_type)

    def start(install: bool) -> None:
        if install:
            tpu.setup(gc, name, repo=repo, allow_dirty=allow_dirty, python=python)
        tpu.launch(gc, name, spec, accelerator_type=slice_spec.accelerator_type, check_fit=False)

    failures = recreations = ssh_failures = 0
    while True:
        state = tpu.describe_state(gc, name)
        if state is None or state in tpu.GONE_STATES:
            recreations += 1
            log.info("TPU VM %s is %s: recreating it (recreation %d), then setup and launch; the run resumes from "
                     "its newest checkpoint", name, state or "gone", recreations)
            if state is not None:
                tpu.delete(gc, name)
            tpu.create(gc, slice_spec, timeout=timeout, poll=poll)
            start(install=True)
        elif state == tpu.READY:
            try:
                records = tpu.job_states(gc, name)
                ssh_failures = 0
            except GcloudError as error:
                ssh_failures += 1
                if ssh_failures >= SSH_FAILURES:
                    raise
                log.warning("could not check the job (%s); trying again in %g s", error.message, poll)
                time.sleep(poll)
                continue
            verdict, detail = job_verdict(records, run_id, workers)
            log.info("run %s: %s (%s)", run_id, verdict, detail)
            if verdict == "finished":
                log.info("run %s finished; the VM is left as it is (sophia-tpu delete %s --zone %s)", run_id, name,
                         gc.zone)
                return 0
            if verdict == "busy":
                raise tpu.TpuError(f"{detail} on {name}; stop it (or use another VM) before babysitting {run_id}")
            if verdict == "failed":
                failures += 1
                if failures > retries:
                    worker = next((r.get("worker") for r in records if r.get("run") == run_id
                                   and r.get("state") != "running"), "0")
                    tail = _log_tail(gc, name, int(worker) if worker.isdigit() else 0, run_id)
                    raise tpu.TpuError(f"run {run_id} failed {failures} times (--retries {retries}); the last "
                                       f"failure: {detail}. The last lines of worker {worker}'s log:\n{tail}")
                log.info("relaunching run %s (relaunch %d of at most %d after failures)", run_id, failures, retries)
                start(install=False)
            elif verdict == "stopped":
                start(install=False)
            elif verdict == "absent":
                start(install=True)
        elif state == "STOPPED":
            raise tpu.TpuError(f"TPU VM {name} is STOPPED; start it (gcloud compute tpus tpu-vm start) or delete it, "
                               "then babysit again")
        else:
            log.info("TPU VM %s is %s: waiting", name, state)
        time.sleep(poll)


def _log_tail(gc: Gcloud, name: str, worker: int, run_id: str, lines: int = 30) -> str:
    try:
        return tpu.logs(gc, name, worker=worker, lines=lines, run_id=run_id, capture=True).rstrip()
    except GcloudError as error:
        return f"(could not read it: {error.message})"
