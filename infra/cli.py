"""`sophia-tpu`: create a Cloud TPU slice, install this checkout on every worker, launch and watch a run.

    sophia-tpu create NAME --zone Z --type v3-128 [--spot | --preemptible] [--queued [--valid-until-duration 6h]]
    sophia-tpu setup NAME --zone Z [--allow-dirty] [--repo DIR] [--python python3.11]
    sophia-tpu launch NAME --zone Z --config FILE --run_dir gs://BUCKET/runs/ID [--type T] [--env NAME] [--a.b V]
    sophia-tpu status NAME --zone Z [--queued] [--run_dir gs://...]
    sophia-tpu logs NAME --zone Z [--worker N] [--lines K] [--follow]
    sophia-tpu delete NAME --zone Z [--queued] [--yes]
    sophia-tpu babysit NAME --zone Z --type v3-128 --config FILE --run_dir gs://... [--queued] [--retries N]
                       [--max-hours H] [--poll S]
    sophia-tpu plan NAME --zone Z --type v3-128 --config FILE --run_dir gs://...   (create, setup, launch: printed)

Every subcommand takes --dry-run (print the exact commands, one per line, run nothing, write nothing) and
--project; ssh and scp take --internal-ip and --tunnel-through-iap, create --network, --subnetwork,
--service-account and --scopes. Arguments are checked before anything runs (exit 2, `sophia-tpu: ...`);
launch, babysit and plan check that the fit check can run here (libtpu) before anything is created. A
failing gcloud stops with its own message (exit 1). Every action is logged to stderr with a timestamp.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from infra import progress, remote, tpu
from infra.babysit import Policy, babysit
from infra.gcloud import Gcloud, GcloudError, log
from infra.tpu import LaunchSpec, SliceSpec, TpuError, UsageError

__all__ = ["main", "status"]

REPO = Path(__file__).resolve().parent.parent
_CREATE_FLAGS = ("network", "subnetwork", "service_account", "scopes")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"sophia-tpu: {message} (see sophia-tpu --help)\n")


def _parser() -> argparse.ArgumentParser:
    def group(*adders) -> argparse.ArgumentParser:
        p = _Parser(add_help=False, allow_abbrev=False)
        for add in adders:
            add(p)
        return p

    def common(p):
        p.add_argument("name", metavar="NAME", help="the TPU VM (and, with --queued, its queued resource)")
        p.add_argument("--zone", required=True, help="its zone, e.g. europe-west4-a")
        p.add_argument("--project", help="its project (default: gcloud's configured one)")
        p.add_argument("--dry-run", action="store_true", help="print the exact commands instead of running them")
        p.add_argument("--internal-ip", action="store_true", help="ssh/scp to the workers' internal IPs")
        p.add_argument("--tunnel-through-iap", action="store_true", help="ssh/scp through Identity-Aware Proxy")

    def queued(p):
        p.add_argument("--queued", action="store_true", help="a queued resource of that name (with its node)")

    def slice_(p):
        p.add_argument("--type", required=True, help="accelerator type: v3-8, v3-32, v3-64, v3-128, v3-256, v3-512")
        kind = p.add_mutually_exclusive_group()
        kind.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, may be preempted)")
        kind.add_argument("--preemptible", action="store_true", help="a preemptible VM (not with --queued)")
        p.add_argument("--version", default=tpu.DEFAULT_VERSION, help=f"runtime (default {tpu.DEFAULT_VERSION})")
        p.add_argument("--timeout", type=float, default=1800, help="seconds create waits for READY")
        p.add_argument("--valid-until-duration", metavar="D",
                       help="--queued: how long the request may wait for capacity, e.g. 6h")
        for flag in _CREATE_FLAGS:
            p.add_argument(f"--{flag.replace('_', '-')}", help=f"passed to the create command ({flag})")

    def install(p):
        p.add_argument("--repo", type=Path, default=REPO, help="the sophia-jax git checkout to install (default: "
                                                               "this one)")
        p.add_argument("--allow-dirty", action="store_true", help="install HEAD despite uncommitted changes")
        p.add_argument("--python", default="python3.11", help="the python the workers' venv is made with")

    def run(p):
        p.add_argument("--config", required=True, help="the run's YAML (a local file; copied to the workers)")
        p.add_argument("--run_dir", required=True, help="gs://BUCKET/runs/ID: the same on every worker")
        p.add_argument("--env", action="append", metavar="NAME",
                       help="pass this environment variable to the job (repeatable; default WANDB_API_KEY if set)")
        p.add_argument("--skip-fit-check", action="store_true", help="do not compile the steps for the slice first")

    base = group(common)
    parser = _Parser(prog="sophia-tpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add = lambda name, parents, help: sub.add_parser(name, parents=parents, help=help, allow_abbrev=False)  # noqa: E731
    p = add("create", [base, group(queued, slice_)], "create a TPU VM (or a queued resource) and wait for READY")
    p.add_argument("--poll", type=float, default=10, help="seconds between state checks")
    add("setup", [base, group(install)], "install this checkout's HEAD on every worker")
    p = add("launch", [base, group(run)], "start sophia-train detached on every worker")
    p.add_argument("--type", help="accelerator type (default: gcloud describe's)")
    p = add("status", [base, group(queued)], "the slice's state, each worker's job and the run's progress")
    p.add_argument("--run_dir", help="read the run's progress here (default: the run_dir of the workers' job)")
    p = add("logs", [base], "the last lines of a worker's job log")
    p.add_argument("--worker", type=int, default=0, help="which worker (default 0)")
    p.add_argument("--lines", type=int, default=100, help="how many lines (default 100)")
    p.add_argument("--follow", action="store_true", help="then keep printing what is appended (Ctrl-C ends)")
    p = add("delete", [base, group(queued)], "delete the TPU VM (or the queued resource and its node)")
    p.add_argument("--yes", action="store_true", help="do not ask first")
    p = add("babysit", [base, group(queued, slice_, install, run)],
            "keep the run going through preemptions and capacity shortages until it finishes")
    p.add_argument("--retries", type=int, default=3, help="relaunches after failures of the job itself without a "
                                                          "newer checkpoint (default 3)")
    p.add_argument("--poll", type=float, default=60, help="seconds between looks at the slice (default 60)")
    p.add_argument("--max-hours", type=float, help="give up after this long (default: never)")
    p.add_argument("--backoff-min", type=float, default=30, help="first wait after a passing gcloud failure (30 s)")
    p.add_argument("--backoff-max", type=float, default=600, help="longest such wait (600 s)")
    p = add("plan", [base, group(queued, slice_, install, run)], "print the create, setup and launch commands")
    p.add_argument("--poll", type=float, default=10, help="seconds between state checks")
    return parser


def _overrides(command: str, extra: list[str]) -> tuple[str, ...]:
    """The dotted `--section.key VALUE` arguments argparse did not know, checked for shape."""
    runs = command in ("launch", "babysit", "plan")
    for i, arg in enumerate(extra):
        is_key = arg.startswith("--") and "." in arg.partition("=")[0]
        is_value = i > 0 and extra[i - 1].startswith("--") and "=" not in extra[i - 1] and not arg.startswith("--")
        if not runs or not (is_key or is_value):
            raise UsageError(f"{command}: unexpected argument {arg!r}"
                             + ("; config overrides are --section.key VALUE" if runs else ""))
    return tuple(extra)


def _env_names(args: argparse.Namespace) -> tuple[str, ...]:
    names = args.env if args.env is not None else [n for n in ("WANDB_API_KEY",) if n in os.environ]
    for name in names:
        if not remote.ENV_NAME.match(name):
            raise UsageError(f"--env {name!r}: not an environment variable name")
        if name not in os.environ:
            raise UsageError(f"--env {name}: {name} is not set in this environment; export it or drop --env {name}")
    return tuple(dict.fromkeys(names))


def _slice_spec(args: argparse.Namespace) -> SliceSpec:
    if getattr(args, "type", None) is None:  # status and delete: only the name and the kind matter
        return SliceSpec(args.name, "", queued=getattr(args, "queued", False))
    if args.queued and args.preemptible:
        raise UsageError("--queued --preemptible: a queued resource asks for --spot capacity (or none: on-demand); "
                         "preemptible VMs come from tpu-vm create (drop --queued)")
    if args.valid_until_duration and not args.queued:
        raise UsageError("--valid-until-duration is a queued resource's: add --queued")
    flags = []
    for flag in _CREATE_FLAGS:
        if getattr(args, flag):
            flags += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    return SliceSpec(args.name, tpu.check_type(args.type), args.version, args.spot, args.preemptible, args.queued,
                     args.valid_until_duration, tuple(flags))


def _confirm(question: str) -> bool:
    print(question + " [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def status(gc: Gcloud, spec: SliceSpec, run_dir: str | None = None) -> None:
    """Prints the slice's state, each worker's job when READY, and the run's progress read from its run_dir."""
    state, node = tpu.slice_state(gc, spec)
    if gc.dry_run:
        tpu.job_states(gc, spec.name)
        gc.note(f"then the run's progress is read from {run_dir or 'the run_dir of the job'} (metrics.jsonl, "
                "config.yaml, checkpoints/)")
        return
    shape = f" ({node.accelerator_type}, {node.workers} worker{'s' * (node.workers > 1)})" if node else ""
    print(f"{spec.name} ({gc.zone}): {'not found' if state == tpu.GONE else state}{shape}", flush=True)
    records = []
    if state == tpu.READY:
        records = sorted(tpu.job_states(gc, spec.name), key=lambda r: r.get("worker", ""))
        for r in records:
            code = "" if r.get("code", "-") == "-" else f" (exit status {r['code']})"
            print(f"  worker {r.get('worker')} {r.get('host')}: run {r.get('run')} {r.get('state')}{code}", flush=True)
    dirs = sorted({r.get("run_dir") for r in records} - {None, "-"})
    run_dir = run_dir or (dirs[0] if len(dirs) == 1 else None)
    if run_dir is not None:
        try:
            summary = progress.read(run_dir).summary()
        except Exception as error:  # the state above is still worth printing
            summary = f"could not read it ({type(error).__name__}: {error})"
        print(f"  run {run_dir}: {summary}", flush=True)


def _dispatch(args: argparse.Namespace, extra: list[str]) -> int:
    ssh_flags = [f for f, on in (("--internal-ip", args.internal_ip), ("--tunnel-through-iap",
                                                                       args.tunnel_through_iap)) if on]
    gc = Gcloud(args.zone, args.project, dry_run=args.dry_run or args.command == "plan", ssh_flags=ssh_flags)
    overrides = _overrides(args.command, extra)
    for option in ("poll", "timeout", "retries", "lines", "worker", "max_hours", "backoff_min", "backoff_max"):
        if (getattr(args, option, None) or 0) < 0:
            raise UsageError(f"--{option.replace('_', '-')} {getattr(args, option)}: use a value >= 0")
    if args.command in ("launch", "babysit", "plan"):
        spec = LaunchSpec(args.config, args.run_dir, overrides, _env_names(args))
        tpu.check_launch(spec)
        if args.type is not None:
            tpu.check_type(args.type)
        tpu.check_config(spec)
        if not args.skip_fit_check:
            tpu.check_fit_tools()  # before anything is created or paid for
    if args.command in ("create", "status", "delete", "babysit", "plan"):
        slices = _slice_spec(args)
    if args.command == "create":
        tpu.create(gc, slices, timeout=args.timeout, poll=args.poll)
    elif args.command == "setup":
        tpu.setup(gc, args.name, repo=args.repo, allow_dirty=args.allow_dirty, python=args.python)
    elif args.command == "launch":
        _launch(gc, args, spec)
    elif args.command == "status":
        status(gc, slices, args.run_dir)
    elif args.command == "logs":
        tpu.logs(gc, args.name, worker=args.worker, lines=args.lines, follow=args.follow)
    elif args.command == "delete":
        if not (args.yes or gc.dry_run or _confirm(f"Delete {slices.kind} {args.name} in {args.zone}? It cannot be "
                                                   "undone.")):
            raise TpuError(f"{args.name} was not deleted (not confirmed; pass --yes to skip the question)")
        tpu.delete(gc, slices)
    elif args.command == "plan":
        node = tpu.create(gc, slices, timeout=args.timeout, poll=args.poll)
        tpu.setup(gc, args.name, repo=args.repo, allow_dirty=args.allow_dirty, python=args.python)
        tpu.launch(gc, args.name, spec, workers=node.workers, accelerator_type=args.type,
                   check_fit=not args.skip_fit_check)
    elif args.command == "babysit":
        policy = Policy(poll=args.poll, retries=args.retries, max_hours=args.max_hours, backoff_min=args.backoff_min,
                        backoff_max=args.backoff_max)
        return babysit(gc, slices, spec, repo=args.repo, allow_dirty=args.allow_dirty, python=args.python,
                       policy=policy, check_fit=not args.skip_fit_check)
    return 0


def _launch(gc: Gcloud, args: argparse.Namespace, spec: LaunchSpec) -> None:
    """launch: the fit check first when --type names the slice; then its workers from gcloud describe (under
    dry run from --type, or one worker shown)."""
    check_fit = not args.skip_fit_check
    if check_fit and args.type is not None:
        tpu.fit_check(gc, spec, args.type)  # before anything reads the slice
        check_fit = False
    if gc.dry_run:
        if args.type is None:
            tpu.describe(gc, args.name)
            gc.note("the slice's type and workers come from the describe above; shown for 1 worker (one ssh per "
                    "worker, each with its --worker=i), after the fit check for that type (pass --type to see both)")
        workers = 1 if args.type is None else tpu.hosts(args.type)
        tpu.launch(gc, args.name, spec, workers=workers, check_fit=False)
        return
    node = tpu.describe(gc, args.name)
    if node is None or node.state != tpu.READY:
        raise TpuError(f"TPU VM {args.name} is {'not found' if node is None else node.state}, not READY: create it "
                       f"(sophia-tpu create) or wait, then launch")
    if args.type is not None and args.type != node.accelerator_type:
        raise UsageError(f"--type {args.type}, but {args.name} is a {node.accelerator_type}")
    tpu.launch(gc, args.name, spec, workers=node.workers, accelerator_type=node.accelerator_type, check_fit=check_fit)


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    dry = " (dry run)" if args.dry_run or args.command == "plan" else ""
    # Its own INFO lines; the libraries' (gcsfs, google-auth, ...) from WARNING up.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s sophia-tpu{dry}: %(message)s",
                        datefmt="%Y-%m-%d %H:%M:%S", stream=sys.stderr, force=True)
    log.setLevel(logging.INFO)
    try:
        return _dispatch(args, extra)
    except UsageError as error:
        print(f"sophia-tpu: {error}", file=sys.stderr)
        return 2
    except (TpuError, GcloudError) as error:
        print(f"sophia-tpu: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sophia-tpu: interrupted; nothing on the slice was stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
