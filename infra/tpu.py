"""`sophia-tpu`: create a Cloud TPU VM slice, install this checkout on every worker, launch and watch a run.

    sophia-tpu create NAME --zone Z --type v3-128 [--spot | --preemptible] [--version V] [--project P]
    sophia-tpu setup NAME --zone Z [--allow-dirty] [--repo DIR] [--python python3.11]
    sophia-tpu launch NAME --zone Z --config FILE --run_dir gs://BUCKET/runs/ID [--env NAME] [--dotted.key VALUE]
    sophia-tpu status NAME --zone Z
    sophia-tpu logs NAME --zone Z [--worker N] [--lines K]
    sophia-tpu delete NAME --zone Z [--yes]
    sophia-tpu babysit NAME --zone Z --type v3-128 --config FILE --run_dir gs://... [--retries N] [--poll S]
    sophia-tpu plan NAME --zone Z --type v3-128 --config FILE --run_dir gs://...   (create, setup, launch: printed)

Every subcommand takes --dry-run (print the exact commands, one per line, run nothing) and --project.
Arguments are checked before anything runs (exit 2, `sophia-tpu: ...`); a failing gcloud stops at once
with its own message (exit 1). Every action is logged to stderr with a timestamp.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from infra import remote
from infra.gcloud import Call, Gcloud, GcloudError, log
from trainer.aot import SLICE_TOPOLOGY

__all__ = ["LaunchSpec", "SliceSpec", "TpuError", "UsageError", "create", "delete", "describe_state", "fit_check",
           "hosts", "job_states", "launch", "logs", "main", "setup", "status", "wait_ready"]

READY = "READY"
GONE_STATES = ("PREEMPTED", "TERMINATED")  # a VM in these states is deleted and created again
FAILED_STATES = ("FAILED", "PREEMPTED", "TERMINATED", "STOPPED")  # not going to become READY by waiting
DEFAULT_VERSION = "tpu-ubuntu2204-base"  # the TPU VM runtime for v4 and older (REFERENCE.md §6)
CORES_PER_HOST = 8  # a v3 host: 4 chips x 2 cores


class UsageError(ValueError):
    """Bad arguments: nothing was run. Exit status 2."""


class TpuError(RuntimeError):
    """The VM or the job is not in the state asked for (or a check failed). Exit status 1."""


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """What `create` makes: a TPU VM named `name` of `accelerator_type` (e.g. v3-128)."""

    name: str
    accelerator_type: str
    version: str = DEFAULT_VERSION
    spot: bool = False
    preemptible: bool = False


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


def hosts(accelerator_type: str) -> int:
    """Workers (hosts) of a v3 slice: one per 8 cores."""
    return int(accelerator_type.split("-")[1]) // CORES_PER_HOST


def _check_type(accelerator_type: str) -> str:
    if accelerator_type not in SLICE_TOPOLOGY:
        raise UsageError(f"--type {accelerator_type}: use a TPU v3 slice, one of {', '.join(SLICE_TOPOLOGY)}")
    return accelerator_type


def _check_launch(spec: LaunchSpec) -> None:
    if not Path(spec.config).is_file():
        raise UsageError(f"--config {spec.config}: no such file; pass the run's YAML (e.g. configs/neox_1_5b.yaml)")
    if not re.match(r"^gs://[^/]+/.+", spec.run_dir) or not remote.RUN_ID.match(spec.run_id):
        raise UsageError(f"--run_dir {spec.run_dir!r}: use gs://BUCKET/runs/ID (hosts of a pod share no disk; "
                         "ID of letters, digits, '.', '_', '-')")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "sophia-tpu"


# ------------------------------------------------------------------------------------------------ the VM
def describe_state(gc: Gcloud, name: str) -> str | None:
    """The VM's state (READY, CREATING, PREEMPTED, ...), or None when it does not exist."""
    result = gc.run(gc.tpu_vm("describe", name, "--format", "value(state)"), capture=True, check=False)
    if result.returncode and "NOT_FOUND" in result.stderr:
        return None
    if result.returncode:
        raise GcloudError(gc.tpu_vm("describe", name), result.returncode, result.stderr)
    return result.stdout.strip()


def wait_ready(gc: Gcloud, name: str, *, timeout: float, poll: float) -> None:
    """Polls the VM's state every `poll` s until READY; TpuError on a failed state or after `timeout` s."""
    if gc.dry_run:
        gc.run(gc.tpu_vm("describe", name, "--format", "value(state)"))
        gc.note(f"(the describe above repeats every {poll:g} s until READY, for up to {timeout:g} s)")
        return
    deadline, last = time.monotonic() + timeout, None
    while True:
        state = describe_state(gc, name)
        if state != last:
            log.info("TPU VM %s is %s", name, state or "not found")
            last = state
        if state == READY:
            return
        if state is None or state in FAILED_STATES:
            raise TpuError(f"TPU VM {name} is {state or 'gone'} instead of READY; delete it and create it again")
        if time.monotonic() >= deadline:
            raise TpuError(f"TPU VM {name} is still {state} after {timeout:g} s (--timeout); check the console "
                           f"or `sophia-tpu status {name} --zone {gc.zone}`")
        time.sleep(poll)


def create(gc: Gcloud, spec: SliceSpec, *, timeout: float, poll: float) -> None:
    """`gcloud compute tpus tpu-vm create`, then waits until the VM is READY."""
    log.info("creating TPU VM %s (%s, %s%s)", spec.name, spec.accelerator_type, spec.version,
             ", spot" if spec.spot else ", preemptible" if spec.preemptible else "")
    flags = ["--spot"] if spec.spot else ["--preemptible"] if spec.preemptible else []
    gc.run(gc.tpu_vm("create", spec.name, "--accelerator-type", spec.accelerator_type, "--version", spec.version,
                     *flags))
    wait_ready(gc, spec.name, timeout=timeout, poll=poll)
    if not gc.dry_run:
        log.info("TPU VM %s is READY", spec.name)


def delete(gc: Gcloud, name: str) -> None:
    """`gcloud compute tpus tpu-vm delete` (no question asked; the CLI asks unless --yes)."""
    log.info("deleting TPU VM %s", name)
    gc.run(gc.tpu_vm("delete", name, "--quiet"))


# ------------------------------------------------------------------------------------ install and run
def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if result.returncode:
        raise UsageError(f"{repo} is not a git checkout of sophia-jax (git: {result.stderr.strip()}); pass --repo DIR")
    return result.stdout


def setup(gc: Gcloud, name: str, *, repo: Path, allow_dirty: bool = False, python: str = "python3.11") -> str:
    """Installs `repo`'s HEAD commit with the tpu extra into ~/sophia-jax/venv on every worker.

    Packs HEAD with `git archive`, copies it to all workers, and runs `remote.setup_script` on them,
    which skips a commit already installed. Refuses uncommitted changes to tracked files unless
    `allow_dirty` (HEAD is installed then, without them). Returns the commit.
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
    local.parent.mkdir(parents=True, exist_ok=True)
    log.info("installing %s at %s on every worker of %s", top, commit[:12], name)
    gc.run(["git", "-C", str(top), "archive", "--format=tar.gz", "-o", str(local), commit])
    gc.run(gc.tpu_vm("scp", str(local), f"{name}:{archive}", "--worker=all", "--quiet"))
    gc.run(gc.tpu_vm("ssh", name, "--worker=all", "--quiet", "--command",
                     remote.setup_script(commit, archive, python)))
    if not gc.dry_run:
        log.info("%s is installed on %s", commit[:12], name)
    return commit


def _stage_config(spec: LaunchSpec) -> Path:
    """The config with its `base:` chain resolved, written where scp takes it from; the config and the
    overrides are checked (unknown keys and bad values are refused) on the way."""
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


def launch(gc: Gcloud, name: str, spec: LaunchSpec, *, accelerator_type: str | None = None,
           check_fit: bool = True, environ: Mapping[str, str] | None = None) -> None:
    """Starts sophia-train detached on every worker of `name`, all with the same run_dir.

    The config goes by scp; the environment variables `spec.env_names` go on each worker's ssh stdin,
    one ssh per worker (gcloud's --worker=all shares one stdin among its workers), never in argv, a
    file or the output. A sophia job still running on the VM is stopped first (it saves on SIGTERM).

    Args:
      gc: the gcloud runner.
      name: the TPU VM.
      spec: config, run_dir, overrides and environment variable names.
      accelerator_type: e.g. v3-128; None = ask gcloud describe.
      check_fit: compile the steps for the slice first (`fit_check`) and stop if they do not fit.
      environ: where the variables' values come from (default: os.environ).
    """
    _check_launch(spec)
    try:
        payload = remote.env_payload(spec.env_names, os.environ if environ is None else environ)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if accelerator_type is None:
        if gc.dry_run:
            raise UsageError("launch --dry-run needs --type (it does not ask gcloud describe)")
        accelerator_type = gc.run(gc.tpu_vm("describe", name, "--format", "value(acceleratorType)"),
                                  capture=True).stdout.strip()
    _check_type(accelerator_type)
    n = hosts(accelerator_type)
    staged = _stage_config(spec)
    if check_fit:
        fit_check(gc, spec, accelerator_type)
    log.info("launching run %s on %d worker(s) of %s: sophia-train --config %s --run_dir %s %s", spec.run_id, n,
             name, spec.config, spec.run_dir, " ".join(spec.overrides))
    gc.run(gc.tpu_vm("scp", str(staged), f"{name}:sophia-run-{spec.run_id}.yaml", "--worker=all", "--quiet"))
    if spec.env_names:
        gc.note(f"each ssh below reads {', '.join(spec.env_names)} from your environment on its stdin (not shown)")
    calls = [Call(gc.tpu_vm("ssh", name, f"--worker={i}", "--quiet", "--command",
                            remote.launch_script(spec.run_id, i, spec.run_dir, spec.overrides, spec.env_names,
                                                 distributed=n > 1)),
                  stdin=payload, label=f"worker {i}") for i in range(n)]
    gc.run_parallel(calls)
    if not gc.dry_run:
        log.info("run %s started on %d worker(s); follow it with `sophia-tpu logs %s --zone %s`", spec.run_id, n,
                 name, gc.zone)


def job_states(gc: Gcloud, name: str) -> list[dict[str, str]]:
    """One record per worker: host, worker, run, state (none/running/exited/terminated/died), code."""
    result = gc.run(gc.tpu_vm("ssh", name, "--worker=all", "--quiet", "--command", remote.status_script()),
                    capture=True)
    return remote.parse_job_lines(result.stdout)


def status(gc: Gcloud, name: str) -> None:
    """Prints the VM's state and, when READY, each worker's job."""
    state = describe_state(gc, name)
    if gc.dry_run:
        job_states(gc, name)
        return
    print(f"{name} ({gc.zone}): {state or 'not found'}", flush=True)
    if state == READY:
        for r in sorted(job_states(gc, name), key=lambda r: r.get("worker", "")):
            code = "" if r.get("code", "-") == "-" else f" (exit status {r['code']})"
            print(f"  worker {r.get('worker')} {r.get('host')}: run {r.get('run')} {r.get('state')}{code}", flush=True)


def logs(gc: Gcloud, name: str, *, worker: int = 0, lines: int = 100, run_id: str | None = None,
         capture: bool = False) -> str:
    """The last `lines` lines of a worker's job log (printed unless `capture`)."""
    result = gc.run(gc.tpu_vm("ssh", name, f"--worker={worker}", "--quiet", "--command",
                              remote.log_script(lines, run_id)), capture=capture)
    return result.stdout


# ------------------------------------------------------------------------------------------- the CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"sophia-tpu: {message} (see sophia-tpu --help)\n")


def _parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False, allow_abbrev=False)
    common.add_argument("name", metavar="NAME", help="the TPU VM")
    common.add_argument("--zone", required=True, help="its zone, e.g. europe-west4-a")
    common.add_argument("--project", help="its project (default: gcloud's configured one)")
    common.add_argument("--dry-run", action="store_true", help="print the exact commands instead of running them")
    slice_ = _Parser(add_help=False, allow_abbrev=False)
    slice_.add_argument("--type", required=True, help="accelerator type: v3-8, v3-32, v3-64, v3-128, v3-256, v3-512")
    kind = slice_.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="a Spot VM (cheaper, may be preempted)")
    kind.add_argument("--preemptible", action="store_true", help="a preemptible VM (may be preempted)")
    slice_.add_argument("--version", default=DEFAULT_VERSION, help=f"TPU VM runtime (default {DEFAULT_VERSION})")
    slice_.add_argument("--timeout", type=float, default=1800, help="seconds to wait for READY after create")
    install = _Parser(add_help=False, allow_abbrev=False)
    install.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent,
                         help="the sophia-jax git checkout to install (default: this one)")
    install.add_argument("--allow-dirty", action="store_true", help="install HEAD despite uncommitted changes")
    install.add_argument("--python", default="python3.11", help="the python the workers' venv is made with")
    run = _Parser(add_help=False, allow_abbrev=False)
    run.add_argument("--config", required=True, help="the run's YAML (a local file; copied to the workers)")
    run.add_argument("--run_dir", required=True, help="gs://BUCKET/runs/ID: the same on every worker")
    run.add_argument("--env", action="append", metavar="NAME",
                     help="pass this environment variable to the job (repeatable; default WANDB_API_KEY if set)")
    run.add_argument("--skip-fit-check", action="store_true", help="do not compile the steps for the slice first")

    parser = _Parser(prog="sophia-tpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add = lambda name, parents, help: sub.add_parser(name, parents=parents, help=help, allow_abbrev=False)  # noqa: E731
    p = add("create", [common, slice_], "create a TPU VM and wait until it is READY")
    p.add_argument("--poll", type=float, default=10, help="seconds between state checks")
    add("setup", [common, install], "install this checkout's HEAD on every worker")
    p = add("launch", [common, run], "start sophia-train detached on every worker")
    p.add_argument("--type", help="accelerator type (default: ask gcloud describe)")
    add("status", [common], "the VM's state and each worker's job")
    p = add("logs", [common], "the last lines of a worker's job log")
    p.add_argument("--worker", type=int, default=0, help="which worker (default 0)")
    p.add_argument("--lines", type=int, default=100, help="how many lines (default 100)")
    p = add("delete", [common], "delete the TPU VM")
    p.add_argument("--yes", action="store_true", help="do not ask first")
    p = add("babysit", [common, slice_, install, run], "keep the run going through preemptions until it finishes")
    p.add_argument("--retries", type=int, default=3, help="relaunches after failures of the job itself")
    p.add_argument("--poll", type=float, default=60, help="seconds between checks")
    p = add("plan", [common, slice_, install, run], "print the create, setup and launch commands")
    p.add_argument("--poll", type=float, default=10, help="seconds between state checks")
    return parser


def _overrides(command: str, extra: list[str]) -> tuple[str, ...]:
    """The dotted `--section.key VALUE` arguments argparse did not know, checked for shape."""
    for i, arg in enumerate(extra):
        is_key = arg.startswith("--") and "." in arg.partition("=")[0]
        is_value = i > 0 and extra[i - 1].startswith("--") and "=" not in extra[i - 1] and not arg.startswith("--")
        if command not in ("launch", "babysit", "plan") or not (is_key or is_value):
            raise UsageError(f"{command}: unexpected argument {arg!r}"
                             + ("; config overrides are --section.key VALUE" if command in ("launch", "babysit",
                                                                                              "plan") else ""))
    return tuple(extra)


def _env_names(args: argparse.Namespace) -> tuple[str, ...]:
    names = args.env if args.env is not None else [n for n in ("WANDB_API_KEY",) if n in os.environ]
    for name in names:
        if not remote.ENV_NAME.match(name):
            raise UsageError(f"--env {name!r}: not an environment variable name")
        if name not in os.environ:
            raise UsageError(f"--env {name}: {name} is not set in this environment; export it or drop --env {name}")
    return tuple(dict.fromkeys(names))


def _confirm(question: str) -> bool:
    print(question + " [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _dispatch(args: argparse.Namespace, extra: list[str]) -> int:
    from infra.babysit import babysit

    gc = Gcloud(args.zone, args.project, dry_run=args.dry_run or args.command == "plan")
    overrides = _overrides(args.command, extra)
    for option in ("poll", "timeout", "retries", "lines", "worker"):
        if getattr(args, option, 0) < 0:
            raise UsageError(f"--{option} {getattr(args, option)}: use a value >= 0")
    if args.command in ("launch", "babysit", "plan"):
        spec = LaunchSpec(args.config, args.run_dir, overrides, _env_names(args))
        _check_launch(spec)
        if args.type is not None:
            _check_type(args.type)
    if args.command == "babysit" and args.dry_run:
        raise UsageError("babysit --dry-run would print only its first step; `sophia-tpu plan` prints the create, "
                         "setup and launch commands")
    if args.command in ("create", "babysit", "plan"):
        slices = SliceSpec(args.name, args.type, args.version, args.spot, args.preemptible)
    if args.command == "create":
        create(gc, slices, timeout=args.timeout, poll=args.poll)
    elif args.command == "setup":
        setup(gc, args.name, repo=args.repo, allow_dirty=args.allow_dirty, python=args.python)
    elif args.command == "launch":
        launch(gc, args.name, spec, accelerator_type=args.type, check_fit=not args.skip_fit_check)
    elif args.command == "status":
        status(gc, args.name)
    elif args.command == "logs":
        logs(gc, args.name, worker=args.worker, lines=args.lines)
    elif args.command == "delete":
        if not (args.yes or gc.dry_run or _confirm(f"Delete TPU VM {args.name} in {args.zone}? It cannot be undone.")):
            raise TpuError(f"{args.name} was not deleted (not confirmed; pass --yes to skip the question)")
        delete(gc, args.name)
    elif args.command == "plan":
        create(gc, slices, timeout=args.timeout, poll=args.poll)
        setup(gc, args.name, repo=args.repo, allow_dirty=args.allow_dirty, python=args.python)
        launch(gc, args.name, spec, accelerator_type=args.type, check_fit=not args.skip_fit_check)
    elif args.command == "babysit":
        return babysit(gc, slices, spec, repo=args.repo, allow_dirty=args.allow_dirty, python=args.python,
                       retries=args.retries, poll=args.poll, timeout=args.timeout,
                       check_fit=not args.skip_fit_check)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    args, extra = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    dry = " (dry run)" if args.dry_run or args.command == "plan" else ""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s sophia-tpu{dry}: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr, force=True)
    try:
        return _dispatch(args, extra)
    except UsageError as error:
        print(f"sophia-tpu: {error}", file=sys.stderr)
        return 2
    except (TpuError, GcloudError) as error:
        print(f"sophia-tpu: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # python -m infra.tpu: run the package's module, whose errors infra.babysit raises
    from infra.tpu import main as package_main

    sys.exit(package_main())
