"""The stages of a run on a Cloud TPU slice, each a few gcloud calls: ask for the slice (a TPU VM, or a queued
resource that creates one when there is capacity), read its state, install this checkout on every worker,
launch sophia-train detached on all of them, read each worker's job, delete the slice.

The command line is infra/cli.py (`sophia-tpu`); the babysitter that chains the stages through preemptions
is infra/babysit.py. Everything here takes a `Gcloud` (infra/gcloud.py), which prints the commands instead
of running them under --dry-run.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from infra import remote
from infra.gcloud import Call, Gcloud, GcloudError, log
from trainer.aot import SLICE_TOPOLOGY

__all__ = ["GONE", "LaunchSpec", "Node", "READY", "SliceSpec", "TpuError", "UsageError", "check_config",
           "check_fit_tools", "check_launch", "check_type", "create",
           "delete", "describe", "fit_check", "hosts", "job_states", "launch", "logs", "queued_state", "request",
           "retryable", "setup", "slice_state", "stop", "wait_ready"]

READY = "READY"
ACTIVE = "ACTIVE"  # a queued resource whose node exists
GONE = "GONE"  # no such VM (or queued resource): the babysitter asks for one
RECREATE_STATES = ("PREEMPTED", "TERMINATED", "FAILED", "SUSPENDED")  # deleted and asked for again
WAIT_STATES = ("CREATING", "STARTING", "RESTARTING", "REPAIRING", "WAITING_FOR_RESOURCES", "PROVISIONING",
               "ACCEPTED", "SUSPENDING", "DELETING", ACTIVE)  # becoming something else by themselves
DEFAULT_VERSION = "tpu-ubuntu2204-base"  # the TPU VM runtime for v4 and older (REFERENCE.md §6)
CORES_PER_HOST = 8  # a v3 host: 4 chips x 2 cores

# gcloud failures that may pass by themselves: no capacity (or quota) right now, a server error, a lost ssh
# connection (ssh's exit status 255). Anything else (permissions, a bad flag, a missing zone) stops at once.
_CAPACITY = re.compile(r"RESOURCE_EXHAUSTED|no more capacity|ZONE_RESOURCE_POOL_EXHAUSTED|stockout|"
                       r"insufficient capacity|quota", re.IGNORECASE)
_TRANSIENT = re.compile(r"\b(UNAVAILABLE|INTERNAL|DEADLINE_EXCEEDED|ABORTED|UNKNOWN|5\d\d)\b|backend error|"
                        r"timed? ?out|connection (reset|refused|closed)|try again", re.IGNORECASE)


class UsageError(ValueError):
    """Bad arguments: nothing was run. Exit status 2."""


class TpuError(RuntimeError):
    """The slice or the job is not in the state asked for (or a check failed). Exit status 1."""


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """What `request` asks for: a TPU VM named `name` of `accelerator_type` (e.g. v3-128), directly
    (`tpu-vm create`) or as a queued resource of the same name (`queued`, with `valid_until`: how long the
    request may wait for capacity, e.g. 6h). `create_flags` are passed to the create command as they are
    (--network, --subnetwork, --service-account, --scopes)."""

    name: str
    accelerator_type: str
    version: str = DEFAULT_VERSION
    spot: bool = False
    preemptible: bool = False
    queued: bool = False
    valid_until: str | None = None
    create_flags: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return "queued resource" if self.queued else "TPU VM"


@dataclasses.dataclass(frozen=True)
class LaunchSpec:
    """What `launch` starts: sophia-train with `config` (a local file), `run_dir` and dotted overrides."""

    config: str
    run_dir: str
    overrides: tuple[str, ...] = ()
    env_names: tuple[str, ...] = ()

    @property
    def run_id(self) -> str:
        return self.run_dir.rstrip("/").rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Node:
    """A TPU VM as `gcloud ... describe --format json` shows it; `workers` counts its network endpoints."""

    state: str
    accelerator_type: str
    workers: int


def hosts(accelerator_type: str) -> int:
    """Workers (hosts) of a v3 slice: one per 8 cores (what a dry run assumes; a real slice is described)."""
    return int(accelerator_type.split("-")[1]) // CORES_PER_HOST


def check_type(accelerator_type: str) -> str:
    if accelerator_type not in SLICE_TOPOLOGY:
        raise UsageError(f"--type {accelerator_type}: use a TPU v3 slice, one of {', '.join(SLICE_TOPOLOGY)}")
    return accelerator_type


def check_launch(spec: LaunchSpec) -> None:
    if not Path(spec.config).is_file():
        raise UsageError(f"--config {spec.config}: no such file; pass the run's YAML (e.g. configs/neox_1_5b.yaml)")
    if not re.match(r"^gs://[^/]+/.+", spec.run_dir) or not remote.RUN_ID.match(spec.run_id):
        raise UsageError(f"--run_dir {spec.run_dir!r}: use gs://BUCKET/runs/ID (hosts of a pod share no disk; "
                         "ID of letters, digits, '.', '_', '-')")


def check_fit_tools() -> None:
    """The fit check compiles the steps for the TPU on this machine: libtpu must import here."""
    try:
        importlib.import_module("libtpu")
    except ImportError as error:
        raise UsageError(f"the fit check compiles the run for the slice here and needs libtpu, which does not import "
                         f"({error}): pip install -e \".[tpu]\" here, or pass --skip-fit-check") from None


def retryable(error: GcloudError) -> bool:
    """Whether a gcloud failure may pass by itself (see _CAPACITY and _TRANSIENT)."""
    text = error.stderr or error.message
    return error.returncode == 255 or bool(_CAPACITY.search(text) or _TRANSIENT.search(text))


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sophia-tpu"


# ---------------------------------------------------------------------------------------- the slice
def _not_found(result) -> bool:
    return result.returncode != 0 and "NOT_FOUND" in result.stderr


def _describe(gc: Gcloud, argv: list[str]) -> str | None:
    """A describe's output; None when the resource does not exist, and under dry run (the command printed)."""
    result = gc.run(argv, capture=True, check=False)
    if gc.dry_run or _not_found(result):
        return None
    if result.returncode:
        raise GcloudError(argv, result.returncode, result.stderr)
    return result.stdout


def describe(gc: Gcloud, name: str) -> Node | None:
    """The TPU VM, or None when it does not exist (and under dry run, where the command is printed)."""
    out = _describe(gc, gc.tpu_vm("describe", name, "--format", "json"))
    if out is None:
        return None
    node = json.loads(out)
    return Node(node.get("state", "UNKNOWN"), node.get("acceleratorType", "").rpartition("/")[2],
                max(1, len(node.get("networkEndpoints") or [])))


def queued_state(gc: Gcloud, name: str) -> str | None:
    """The queued resource's state (WAITING_FOR_RESOURCES, ACTIVE, ...), or None when there is none."""
    out = _describe(gc, gc.queued("describe", name, "--format", "value(state.state)"))
    return None if out is None else out.strip() or "UNKNOWN"


def slice_state(gc: Gcloud, spec: SliceSpec) -> tuple[str, Node | None]:
    """(state, node): the VM's state (GONE when there is none); for a queued resource its own state until it
    is ACTIVE, then its node's."""
    if spec.queued:
        state = queued_state(gc, spec.name)
        if state != ACTIVE:
            return state or GONE, None
    node = describe(gc, spec.name)
    if node is None:
        return (ACTIVE if spec.queued else GONE), None
    return node.state, node


def request(gc: Gcloud, spec: SliceSpec) -> None:
    """Asks for the slice: `tpu-vm create`, or `queued-resources create` with a node of the same name."""
    kind = ", spot" if spec.spot else ", preemptible" if spec.preemptible else ""
    log.info("asking for %s %s (%s, %s%s)", spec.kind, spec.name, spec.accelerator_type, spec.version, kind)
    if spec.queued:
        flags = ["--spot"] if spec.spot else []
        flags += ["--valid-until-duration", spec.valid_until] if spec.valid_until else []
        gc.run(gc.queued("create", spec.name, "--node-id", spec.name, "--accelerator-type", spec.accelerator_type,
                         "--runtime-version", spec.version, *flags, *spec.create_flags))
    else:
        flags = ["--spot"] if spec.spot else ["--preemptible"] if spec.preemptible else []
        gc.run(gc.tpu_vm("create", spec.name, "--accelerator-type", spec.accelerator_type, "--version",
                         spec.version, *flags, *spec.create_flags))


def wait_ready(gc: Gcloud, spec: SliceSpec, *, timeout: float, poll: float) -> Node:
    """Polls the slice every `poll` s until READY; TpuError on a state that will not become READY, or after
    `timeout` s."""
    if gc.dry_run:
        slice_state(gc, spec)
        gc.note(f"(the describe above repeats every {poll:g} s until READY, for up to {timeout:g} s)")
        return Node(READY, spec.accelerator_type, hosts(spec.accelerator_type))
    deadline, last = time.monotonic() + timeout, None
    while True:
        state, node = slice_state(gc, spec)
        if state != last:
            log.info("%s %s is %s", spec.kind, spec.name, state)
            last = state
        if state == READY and node is not None:
            return node
        if state not in WAIT_STATES:
            raise TpuError(f"{spec.kind} {spec.name} is {state} instead of READY; delete it and create it again")
        if time.monotonic() >= deadline:
            raise TpuError(f"{spec.kind} {spec.name} is still {state} after {timeout:g} s (--timeout); check the "
                           f"console or `sophia-tpu status {spec.name} --zone {gc.zone}`")
        time.sleep(poll)


def create(gc: Gcloud, spec: SliceSpec, *, timeout: float, poll: float) -> Node:
    """`request`, then `wait_ready`."""
    request(gc, spec)
    node = wait_ready(gc, spec, timeout=timeout, poll=poll)
    if not gc.dry_run:
        log.info("%s %s is READY (%d workers)", spec.kind, spec.name, node.workers)
    return node


def delete(gc: Gcloud, spec: SliceSpec) -> None:
    """Deletes the TPU VM, or the queued resource with its node (no question asked; the CLI asks)."""
    log.info("deleting %s %s", spec.kind, spec.name)
    if spec.queued:
        gc.run(gc.queued("delete", spec.name, "--force", "--quiet"))
    else:
        gc.run(gc.tpu_vm("delete", spec.name, "--quiet"))


# ------------------------------------------------------------------------------------ install and run
def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if result.returncode:
        raise UsageError(f"{repo} is not a git checkout of sophia-jax (git: {result.stderr.strip()}); pass --repo DIR")
    return result.stdout


def setup(gc: Gcloud, name: str, *, repo: Path, allow_dirty: bool = False, python: str = "python3.11") -> str:
    """Installs `repo`'s HEAD commit with the tpu extra into ~/sophia-jax/venv on every worker.

    Packs HEAD with `git archive` (into ~/.cache/sophia-tpu; nothing is written under dry run), copies it to
    all workers, and runs `remote.setup_script` on them, which skips a commit already installed. Refuses
    uncommitted changes to tracked files unless `allow_dirty` (HEAD is installed then, without them).
    Returns the commit.
    """
    top = Path(_git(repo, "rev-parse", "--show-toplevel").strip())
    dirty = _git(top, "status", "--porcelain", "--untracked-files=no").splitlines()
    if dirty and not allow_dirty:
        files = ", ".join(line[3:] for line in dirty[:5]) + (", ..." if len(dirty) > 5 else "")
        raise UsageError(f"{top} has uncommitted changes ({files}); commit them, or pass --allow-dirty to install "
                         "HEAD without them")
    if dirty:
        log.warning("installing HEAD without the uncommitted changes to %d file(s) (--allow-dirty)", len(dirty))
    commit = _git(top, "rev-parse", "HEAD").strip()
    archive = f"sophia-jax-{commit[:12]}.tar.gz"
    local = _cache_dir() / archive
    if not gc.dry_run:
        local.parent.mkdir(parents=True, exist_ok=True)
    log.info("installing %s at %s on every worker of %s", top, commit[:12], name)
    gc.run(["git", "-C", str(top), "archive", "--format=tar.gz", "-o", str(local), commit])
    gc.run(gc.tpu_vm("scp", str(local), f"{name}:{archive}", "--worker=all", "--quiet"))
    gc.run(gc.tpu_vm("ssh", name, "--worker=all", "--quiet", "--command",
                     remote.setup_script(commit, archive, python)))
    if not gc.dry_run:
        log.info("%s is installed on %s", commit[:12], name)
    return commit


def check_config(spec: LaunchSpec) -> None:
    """Refuses a config or overrides the trainer would refuse (unknown keys, bad values), writing nothing."""
    _stage_config(Gcloud("-", dry_run=True), spec)


def _stage_config(gc: Gcloud, spec: LaunchSpec) -> Path:
    """The config with its `base:` chain resolved, written where scp takes it from (not under dry run); the
    config and the overrides are checked (unknown keys and bad values are refused) on the way."""
    import yaml

    from trainer.config import load_config, read_yaml  # jax and the model load with it: only launch pays

    try:
        config, _ = load_config(["--config", spec.config, *spec.overrides])
        values = read_yaml(spec.config)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"{spec.config}: {error}") from None
    if "YOUR_BUCKET" in str(config.data.cache):
        raise UsageError(f"data.cache is {config.data.cache}, a placeholder; pass --data.cache gs://BUCKET/... "
                         "(the token cache built by sophia-data)")
    staged = _cache_dir() / "runs" / spec.run_id / "config.yaml"
    if not gc.dry_run:
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.write_text(f"# {spec.config} with its base: chain resolved (sophia-tpu launch)\n"
                          + yaml.safe_dump(values, sort_keys=False))
    return staged


def fit_check(gc: Gcloud, spec: LaunchSpec, accelerator_type: str) -> None:
    """`sophia-aot` for the slice's topology in a subprocess (its memory goes back when it exits)."""
    topology = SLICE_TOPOLOGY[accelerator_type]
    log.info("checking that the run's steps fit a %s (%s) core: sophia-aot, a few minutes", accelerator_type,
             topology)
    try:
        gc.run([sys.executable, "-m", "trainer.aot", "--config", spec.config, "--topology", topology,
                *spec.overrides])
    except GcloudError as error:
        raise TpuError(f"the fit check failed (sophia-aot exit status {error.returncode}: {error.message}); nothing "
                       "was started: change the config, or pass --skip-fit-check to launch anyway") from None


def launch(gc: Gcloud, name: str, spec: LaunchSpec, *, workers: int, accelerator_type: str | None = None,
           check_fit: bool = True, environ: Mapping[str, str] | None = None) -> None:
    """Starts sophia-train detached on every worker of `name`, all with the same run_dir.

    The config goes by scp; the environment variables `spec.env_names` go on each worker's ssh stdin,
    one ssh per worker (gcloud's --worker=all shares one stdin among its workers), never in argv, a
    file or the output. A sophia job still running on the VM is stopped first (it saves on SIGTERM).

    Args:
      gc: the gcloud runner.
      name: the TPU VM.
      spec: config, run_dir, overrides and environment variable names.
      workers: the VM's workers (`describe`; under dry run `hosts` of the type).
      accelerator_type: e.g. v3-128, for the fit check (None: no fit check).
      check_fit: compile the steps for the slice first (`fit_check`) and stop if they do not fit.
      environ: where the variables' values come from (default: os.environ).
    """
    check_launch(spec)
    try:
        payload = remote.env_payload(spec.env_names, os.environ if environ is None else environ)
    except ValueError as error:
        raise UsageError(str(error)) from None
    staged = _stage_config(gc, spec)
    if check_fit and accelerator_type is not None:
        fit_check(gc, spec, check_type(accelerator_type))
    log.info("launching run %s on %d worker(s) of %s: sophia-train --config %s --run_dir %s %s", spec.run_id,
             workers, name, spec.config, spec.run_dir, " ".join(spec.overrides))
    gc.run(gc.tpu_vm("scp", str(staged), f"{name}:sophia-run-{spec.run_id}.yaml", "--worker=all", "--quiet"))
    if spec.env_names:
        gc.note(f"each ssh below reads {', '.join(spec.env_names)} from your environment on its stdin (not shown)")
    calls = [Call(gc.tpu_vm("ssh", name, f"--worker={i}", "--quiet", "--command",
                            remote.launch_script(spec.run_id, i, spec.run_dir, spec.overrides, spec.env_names,
                                                 distributed=workers > 1)),
                  stdin=payload, label=f"worker {i}") for i in range(workers)]
    gc.run_parallel(calls)
    if not gc.dry_run:
        log.info("run %s started on %d worker(s); follow it with `sophia-tpu logs %s --zone %s --follow`",
                 spec.run_id, workers, name, gc.zone)


def stop(gc: Gcloud, name: str) -> None:
    """Stops the sophia jobs on every worker and waits until they are gone: before a relaunch after a host
    failure, so that no new process meets a survivor's coordination service (or its collectives)."""
    log.info("stopping what is left of the job on every worker of %s", name)
    gc.run(gc.tpu_vm("ssh", name, "--worker=all", "--quiet", "--command", remote.stop_script()))


def job_states(gc: Gcloud, name: str) -> list[dict[str, str]]:
    """One record per worker: host, worker, run, state (none/running/exited/terminated/died), code, run_dir."""
    result = gc.run(gc.tpu_vm("ssh", name, "--worker=all", "--quiet", "--command", remote.status_script()),
                    capture=True)
    return remote.parse_job_lines(result.stdout)


def logs(gc: Gcloud, name: str, *, worker: int = 0, lines: int = 100, run_id: str | None = None,
         follow: bool = False, capture: bool = False) -> str:
    """The last `lines` lines of a worker's job log (printed unless `capture`); `follow` keeps printing
    what is appended until interrupted."""
    result = gc.run(gc.tpu_vm("ssh", name, f"--worker={worker}", "--quiet", "--command",
                              remote.log_script(lines, run_id, follow=follow)), capture=capture)
    return result.stdout
