"""Calling gcloud (and the few local commands the TPU tooling runs): logged with a timestamp, printed
instead of run under --dry-run, and a failure turned into an exception carrying gcloud's own message.

    gc = Gcloud(zone="europe-west4-a", project=None, dry_run=False)
    gc.run(gc.tpu_vm("describe", "my-tpu", "--format", "value(state)"), capture=True).stdout

Standard error of every call is passed through as it arrives (prefixed when several run at once) and
kept for the error message. Nothing here ever logs a command's standard input: that is where secrets go.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

__all__ = ["Call", "Gcloud", "GcloudError", "Result", "log", "shell_line", "shell_quote"]

log = logging.getLogger("sophia-tpu")


def shell_quote(arg: str) -> str:
    """`arg` quoted for bash; an argument with newlines (a remote script) as $'...' so it stays on one line."""
    if "\n" not in arg:
        return shlex.quote(arg)
    escaped = arg.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\t", "\\t")
    return f"$'{escaped}'"


def shell_line(argv: Sequence[str]) -> str:
    """A command line bash runs as `argv`, on one line."""
    return " ".join(shell_quote(a) for a in argv)


def _short(argv: Sequence[str]) -> str:
    """`argv` for the log: a multi-line argument (a script) is named by its first line."""
    return " ".join(f"<script: {a.splitlines()[0]}>" if "\n" in a else shlex.quote(a) for a in argv)


@dataclasses.dataclass(frozen=True)
class Result:
    """What a command returned; stdout is "" unless it was captured."""

    returncode: int
    stdout: str
    stderr: str


@dataclasses.dataclass(frozen=True)
class Call:
    """One command of a parallel batch: its argv, what to feed its stdin, a label for its stderr lines."""

    argv: list[str]
    stdin: str | None = None
    label: str = ""


class GcloudError(RuntimeError):
    """A command exited non-zero; `message` is the ERROR lines of its stderr (else its last lines)."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str, label: str = ""):
        lines = [x.strip() for x in stderr.splitlines() if x.strip()]
        errors = [x for x in lines if x.startswith("ERROR")]
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr
        self.message = "\n".join(errors or lines[-5:]) or "(no message on stderr)"
        where = f" ({label})" if label else ""
        super().__init__(f"{' '.join(argv[:5])}{where} failed with exit status {returncode}: {self.message}")


def _tee(stream: IO[str], sink: list[str], prefix: str) -> None:
    for line in stream:
        sink.append(line)
        sys.stderr.write(prefix + line)
        sys.stderr.flush()


class Gcloud:
    """gcloud for one zone (and project), or a printer of its command lines under dry_run.

    Args:
      zone: every command's --zone.
      project: every command's --project; None = gcloud's configured one.
      dry_run: print each command line to stdout (shell-quoted, one per line) instead of running it.
      ssh_flags: added to every `tpu-vm ssh` and `scp` (--internal-ip, --tunnel-through-iap).
    """

    def __init__(self, zone: str, project: str | None = None, *, dry_run: bool = False,
                 ssh_flags: Sequence[str] = ()):
        self.zone, self.project, self.dry_run, self.ssh_flags = zone, project, dry_run, tuple(ssh_flags)

    def _scope(self) -> list[str]:
        return ["--zone", self.zone] + (["--project", self.project] if self.project else [])

    def tpu_vm(self, verb: str, *args: str) -> list[str]:
        """`gcloud compute tpus tpu-vm VERB ARGS [SSH FLAGS] --zone Z [--project P]`."""
        flags = list(self.ssh_flags) if verb in ("ssh", "scp") else []
        return ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, *flags, *self._scope()]

    def queued(self, verb: str, *args: str) -> list[str]:
        """`gcloud compute tpus queued-resources VERB ARGS --zone Z [--project P]`."""
        return ["gcloud", "compute", "tpus", "queued-resources", verb, *args, *self._scope()]

    def note(self, text: str) -> None:
        """A comment: a `# text` line among the printed commands under dry_run, else a log line."""
        if self.dry_run:
            print(f"# {text}", flush=True)
        else:
            log.info("%s", text)

    def run(self, argv: Sequence[str], *, stdin: str | None = None, capture: bool = False, check: bool = True,
            label: str = "") -> Result:
        """Runs `argv` (prints it under dry_run and returns success).

        Args:
          argv: the command.
          stdin: text fed to its standard input (never logged or printed); None = no input (/dev/null).
          capture: keep stdout and return it, instead of passing it through.
          check: raise GcloudError when it exits non-zero.
          label: prefix of its stderr lines.

        Returns:
          Its exit status, captured stdout and stderr.
        """
        return self.run_parallel([Call(list(argv), stdin, label)], capture=capture, check=check)[0]

    def run_parallel(self, calls: Sequence[Call], *, capture: bool = False, check: bool = True) -> list[Result]:
        """Runs `calls` at the same time and waits for all; raises GcloudError for the first that failed."""
        if self.dry_run:
            for call in calls:
                print(shell_line(call.argv), flush=True)
            return [Result(0, "", "") for _ in calls]
        running = []
        for call in calls:
            log.info("$ %s%s", _short(call.argv), " (stdin: the environment variables)" if call.stdin else "")
            try:
                process = subprocess.Popen(
                    call.argv, stdin=subprocess.DEVNULL if call.stdin is None else subprocess.PIPE,
                    stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE, text=True)
            except FileNotFoundError:
                raise GcloudError(call.argv, 127, f"ERROR: {call.argv[0]} is not on PATH; install it "
                                  "(Google Cloud SDK for gcloud) or fix PATH") from None
            err: list[str] = []
            prefix = f"[{call.label}] " if call.label else ""
            threads = [threading.Thread(target=_tee, args=(process.stderr, err, prefix), daemon=True)]
            if call.stdin is not None:
                threads.append(threading.Thread(target=_feed, args=(process.stdin, call.stdin), daemon=True))
            for t in threads:
                t.start()
            running.append((call, process, err, threads))
        results = []
        for call, process, err, threads in running:
            out = process.stdout.read() if capture else ""
            process.wait()
            for t in threads:
                t.join()
            results.append(Result(process.returncode, out, "".join(err)))
        if check:
            for (call, *_), result in zip(running, results):
                if result.returncode:
                    raise GcloudError(call.argv, result.returncode, result.stderr, call.label)
        return results


def _feed(pipe: IO[str], text: str) -> None:
    try:
        pipe.write(text)
        pipe.close()
    except BrokenPipeError:  # the command exited without reading it all; its exit status tells why
        pass
