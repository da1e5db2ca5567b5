"""`sophia-tpu babysit`: keeps one run going on spot/preemptible TPU capacity until it finishes.

Every `poll` seconds it reads the slice's state (infra/tpu.py `slice_state`) and acts:

    slice state                    what the babysitter does
    gone                           ask for it (tpu-vm create, or a queued resource)
    PREEMPTED / TERMINATED /       delete it, then ask for it again; the run resumes from the newest
    FAILED / SUSPENDED             checkpoint under run_dir by itself once relaunched
    CREATING, WAITING_FOR_...,     wait
    PROVISIONING, ...
    READY                          look at the job on every worker (`job_verdict`):
                                     absent    -> set up this checkout and launch the run
                                     running   -> nothing (the run's progress is logged)
                                     finished  -> stop, exit 0 (every worker exited 0, no SIGTERM)
                                     stopped   -> a SIGTERM stopped it (a preemption notice; its exit status
                                                  does not matter): look once more (the slice usually
                                                  goes next), then launch again, counted as a preemption
                                     failed    -> stop what is left of it on every worker and
                                                  launch again, counted against `retries`; the count starts
                                                  over once the run saved a newer checkpoint than at the last
                                                  failure. Past `retries`: exit 1 with the worker's log tail
                                     busy      -> exit 1: another run is running on the slice
    STOPPED                        exit 1 (someone stopped it: start or delete it)

A gcloud call that fails for a reason that may pass (no capacity, a server error, ssh's exit status 255)
is tried again after a capped, jittered, doubling wait (`Backoff`), each wait logged; any other failure
stops the babysitter at once. Nothing ends the babysitting but the run's end, a failure that will not
pass, or `max_hours` (when set) running out, after which the slice is left as it is.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable
from pathlib import Path

from infra import progress, tpu
from infra.gcloud import Gcloud, GcloudError, log

__all__ = ["Backoff", "Policy", "babysit", "job_verdict"]

SSH_FAILURES = 3  # consecutive failed job checks on a READY slice before it is treated as broken (recreated)


@dataclasses.dataclass(frozen=True)
class Policy:
    """How the babysitter waits and when it gives up (`sophia-tpu babysit --poll ... --max-hours ...`)."""

    poll: float = 60.0
    """Seconds between looks at the slice."""
    retries: int = 3
    """Relaunches after failures of the job itself (reset by a newer checkpoint)."""
    max_hours: float | None = None
    """Give up (exit 1, the slice left as it is) after this long; None: never."""
    backoff_min: float = 30.0
    """The first wait after a gcloud failure that may pass; each further one doubles..."""
    backoff_max: float = 600.0
    """...up to this; each wait is drawn from [half, all] of it (jitter)."""


class Backoff:
    """Capped, jittered, doubling waits between tries of something that failed for a passing reason."""

    def __init__(self, policy: Policy, rng: Callable[[], float] = random.random):
        self.policy, self.rng, self.attempt = policy, rng, 0

    def next(self) -> float:
        cap = min(self.policy.backoff_max, self.policy.backoff_min * 2 ** self.attempt)
        self.attempt += 1
        return cap * (0.5 + 0.5 * self.rng())

    def reset(self) -> None:
        self.attempt = 0


def job_verdict(records: list[dict[str, str]], run_id: str, workers: int) -> tuple[str, str]:
    """What the workers' job records (`remote.status_script`) say about `run_id`.

    Returns:
      (verdict, detail): verdict is one of failed, running, stopped, finished, busy, absent (see the
      module docstring); detail says which worker did what.
    """
    ours = [r for r in records if r.get("run") == run_id]
    others = [r for r in records if r.get("run") not in (run_id, "-") and r.get("state") == "running"]
    if any(r.get("state") == "terminated" for r in ours) and not any(r.get("state") == "running" for r in ours):
        codes = sorted({r.get("code", "-") for r in ours if r.get("state") == "terminated"})
        return "stopped", f"stopped by SIGTERM (a preemption notice; exit status {', '.join(codes)})"
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
    if len(ours) == workers and all(r.get("state") == "exited" for r in ours):
        return "finished", f"all {workers} workers exited with status 0"
    return "absent", f"{len(ours)} of {workers} workers have run {run_id}"


class _Babysitter:
    """The loop of the module docstring, its counters and clock."""

    def __init__(self, gc: Gcloud, slice_spec: tpu.SliceSpec, spec: tpu.LaunchSpec, *, repo: Path,
                 allow_dirty: bool, python: str, policy: Policy, clock: Callable[[], float],
                 sleep: Callable[[float], None], rng: Callable[[], float]):
        self.gc, self.slice, self.spec, self.policy = gc, slice_spec, spec, policy
        self.repo, self.allow_dirty, self.python = repo, allow_dirty, python
        self.clock, self.sleep = clock, sleep
        self.backoff = Backoff(policy, rng)
        self.start = clock()
        self.failures = self.preemptions = self.recreations = self.ssh_failures = 0
        self.stop_seen = False  # a stopped job seen once on a READY slice (its preemption may follow)
        self.checkpoint_at_failure = self._checkpoint()

    def _checkpoint(self) -> int | None:
        try:
            return progress.newest_checkpoint(self.spec.run_dir)
        except Exception as error:  # the run directory is the trainer's; the babysitter only reads it
            log.warning("could not read the newest checkpoint of %s (%s)", self.spec.run_dir, error)
            return None

    def _wait(self, seconds: float, why: str) -> None:
        if self.policy.max_hours is not None:
            left = self.policy.max_hours * 3600 - (self.clock() - self.start)
            if left < seconds:
                raise tpu.TpuError(f"gave up after {(self.clock() - self.start) / 3600:.2f} h (--max-hours "
                                   f"{self.policy.max_hours:g}) while {why}; {self.slice.kind} {self.slice.name} "
                                   "is left as it is")
        self.sleep(seconds)

    def run(self) -> int:
        name, run_id = self.slice.name, self.spec.run_id
        log.info("babysitting run %s on %s %s (%s): a look every %g s, up to %d relaunches after failures%s",
                 run_id, self.slice.kind, name, self.slice.accelerator_type, self.policy.poll, self.policy.retries,
                 "" if self.policy.max_hours is None else f", for at most {self.policy.max_hours:g} h")
        while True:
            try:
                done = self._step()
            except GcloudError as error:
                if not tpu.retryable(error):
                    raise
                wait = self.backoff.next()
                log.warning("gcloud failed for a reason that may pass (%s); trying again in %.0f s (try %d)",
                            error.message.splitlines()[0], wait, self.backoff.attempt + 1)
                self._wait(wait, f"gcloud kept failing ({error.message.splitlines()[0]})")
                continue
            if done:
                return 0
            self._wait(self.policy.poll, "the run was not finished")

    def _step(self) -> bool:
        """One look at the slice and what it calls for; True once the run finished."""
        state, node = tpu.slice_state(self.gc, self.slice)
        if state == tpu.GONE:
            log.info("%s %s does not exist: asking for it", self.slice.kind, self.slice.name)
            tpu.request(self.gc, self.slice)
        elif state in tpu.RECREATE_STATES:
            self.recreations += 1
            log.info("%s %s is %s: deleting it to ask for it again (recreation %d); the run resumes from its "
                     "newest checkpoint", self.slice.kind, self.slice.name, state, self.recreations)
            tpu.delete(self.gc, self.slice)
        elif state == tpu.READY and node is not None:
            return self._ready(node)
        elif state == "STOPPED":
            raise tpu.TpuError(f"TPU VM {self.slice.name} is STOPPED; start it (gcloud compute tpus tpu-vm start) or "
                               "delete it, then babysit again")
        else:
            log.info("%s %s is %s: waiting", self.slice.kind, self.slice.name, state)
        return False

    def _ready(self, node: tpu.Node) -> bool:
        try:
            records = tpu.job_states(self.gc, self.slice.name)
            self.ssh_failures = 0
        except GcloudError as error:
            self.ssh_failures += 1
            if self.ssh_failures < SSH_FAILURES or not tpu.retryable(error):
                raise
            log.warning("%d job checks in a row failed (%s): deleting %s %s to ask for it again", self.ssh_failures,
                        error.message.splitlines()[0], self.slice.kind, self.slice.name)
            self.ssh_failures = 0
            tpu.delete(self.gc, self.slice)
            return False
        verdict, detail = job_verdict(records, self.spec.run_id, node.workers)
        log.info("run %s: %s (%s)%s", self.spec.run_id, verdict, detail, self._progress())
        if verdict == "finished":
            log.info("run %s finished (%d preemption(s), %d recreation(s), %d relaunch(es) after failures); the "
                     "slice is left as it is (sophia-tpu delete %s --zone %s%s)", self.spec.run_id, self.preemptions,
                     self.recreations, self.failures, self.slice.name, self.gc.zone,
                     " --queued" if self.slice.queued else "")
            return True
        if verdict == "busy":
            raise tpu.TpuError(f"{detail} on {self.slice.name}; stop it (or use another slice) before babysitting "
                               f"{self.spec.run_id}")
        if verdict != "stopped":
            self.stop_seen = False
        if verdict == "running":
            self.backoff.reset()
        elif verdict == "absent":
            tpu.setup(self.gc, self.slice.name, repo=self.repo, allow_dirty=self.allow_dirty, python=self.python)
            self._launch(node)
        elif verdict == "stopped" and not self.stop_seen:
            self.stop_seen = True  # a preemption notice comes before the slice goes: look once more first
            log.info("run %s was stopped by a preemption notice: looking at the slice again in %g s before "
                     "relaunching it", self.spec.run_id, self.policy.poll)
        elif verdict == "stopped":
            self.preemptions += 1
            log.info("relaunching run %s after a preemption notice (preemption %d)", self.spec.run_id,
                     self.preemptions)
            self._launch(node)
        elif verdict == "failed":
            self._failed(records, detail)
            tpu.stop(self.gc, self.slice.name)  # the survivors of a lost host, hung in a collective
            self._launch(node)
        return False

    def _progress(self) -> str:
        try:
            return f"; {progress.read(self.spec.run_dir).summary()}"
        except Exception as error:
            return f"; progress unknown ({error})"

    def _failed(self, records: list[dict[str, str]], detail: str) -> None:
        newest = self._checkpoint()
        if newest is not None and (self.checkpoint_at_failure is None or newest > self.checkpoint_at_failure):
            if self.failures:
                log.info("run %s saved checkpoint %d since its last failure: the failure count starts over",
                         self.spec.run_id, newest)
            self.failures = 0
        self.checkpoint_at_failure = newest
        self.failures += 1
        if self.failures > self.policy.retries:
            worker = next((r.get("worker") for r in records if r.get("run") == self.spec.run_id
                           and r.get("state") != "running"), "0")
            tail = _log_tail(self.gc, self.slice.name, int(worker) if worker.isdigit() else 0, self.spec.run_id)
            raise tpu.TpuError(f"run {self.spec.run_id} failed {self.failures} times without a newer checkpoint "
                               f"(--retries {self.policy.retries}); the last failure: {detail}. The last lines of "
                               f"worker {worker}'s log:\n{tail}")
        log.info("relaunching run %s (relaunch %d of at most %d after failures without progress)", self.spec.run_id,
                 self.failures, self.policy.retries)

    def _launch(self, node: tpu.Node) -> None:
        tpu.launch(self.gc, self.slice.name, self.spec, workers=node.workers, check_fit=False)


def babysit(gc: Gcloud, slice_spec: tpu.SliceSpec, spec: tpu.LaunchSpec, *, repo: Path, allow_dirty: bool = False,
            python: str = "python3.11", policy: Policy = Policy(), check_fit: bool = True,
            clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
            rng: Callable[[], float] = random.random) -> int:
    """Runs the loop of the module docstring (under dry run: prints its first round); returns 0 when the run
    finished.

    Raises:
      TpuError: the job failed more than `retries` times without progress, another run holds the slice, the VM
        is STOPPED, or `max_hours` ran out.
      GcloudError: a gcloud call failed for a reason that will not pass.
    """
    if check_fit:
        tpu.fit_check(gc, spec, slice_spec.accelerator_type)
    if gc.dry_run:
        return _dry_run(gc, slice_spec, spec, repo=repo, allow_dirty=allow_dirty, python=python, policy=policy)
    return _Babysitter(gc, slice_spec, spec, repo=repo, allow_dirty=allow_dirty, python=python, policy=policy,
                       clock=clock, sleep=sleep, rng=rng).run()


def _dry_run(gc: Gcloud, slice_spec: tpu.SliceSpec, spec: tpu.LaunchSpec, *, repo: Path, allow_dirty: bool,
             python: str, policy: Policy) -> int:
    gc.note(f"babysit looks at {slice_spec.kind} {slice_spec.name} every {policy.poll:g} s; its first round for a "
            "slice that does not exist yet:")
    tpu.slice_state(gc, slice_spec)
    tpu.request(gc, slice_spec)
    node = tpu.wait_ready(gc, slice_spec, timeout=float("inf"), poll=policy.poll)
    tpu.setup(gc, slice_spec.name, repo=repo, allow_dirty=allow_dirty, python=python)
    tpu.launch(gc, slice_spec.name, spec, workers=node.workers, check_fit=False)
    gc.note("then every poll: the describe above and this job check on every worker:")
    tpu.job_states(gc, slice_spec.name)
    budget = "no time limit" if policy.max_hours is None else f"--max-hours {policy.max_hours:g}"
    gc.note(f"a preempted, failed or suspended slice is deleted and asked for again; a gcloud failure that may pass "
            f"(no capacity, a server error, ssh exit 255) is tried again after {policy.backoff_min:g}-"
            f"{policy.backoff_max:g} s (doubling, jittered), within {budget}; the job's own failures count against "
            f"--retries {policy.retries}, reset by a newer checkpoint")
    return 0


def _log_tail(gc: Gcloud, name: str, worker: int, run_id: str, lines: int = 30) -> str:
    try:
        return tpu.logs(gc, name, worker=worker, lines=lines, run_id=run_id, capture=True).rstrip()
    except GcloudError as error:
        return f"(could not read it: {error.message})"
