"""The bash that runs on each TPU VM worker (through `gcloud ... ssh --command`), and how to read its answers.

Layout on every worker (hosts of a pod share no filesystem; each gets the same files):

    ~/sophia-jax/src/<commit>/        an unpacked `git archive` of the commit, `.sophia-installed` once done
    ~/sophia-jax/venv/                the venv it is installed into (`pip install -e ".[tpu]"`)
    ~/sophia-jax/current              -> the installed src/<commit>
    ~/sophia-runs/<run id>/           config.yaml, job.sh, worker.log, pid, worker, run_dir, and when the job
                                      ends exit_status (plus `signal` if a SIGTERM stopped it: a preemption
                                      notice)
    ~/sophia-runs/current             -> the run launched last

Every script's first line names it (`# sophia-tpu status`): the test double of gcloud answers by it.
The scripts assume the login shell is bash (as on Cloud TPU VM images).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

__all__ = ["ENV_END", "ENV_NAME", "RUN_ID", "env_payload", "launch_script", "log_script", "parse_job_lines",
           "setup_script", "status_script", "stop_script"]

ENV_END = "__sophia_tpu_env_end__"  # the line that ends the environment fed on stdin
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
STOP_WAIT_S = 300  # how long launch lets a running job save its checkpoint after SIGTERM before SIGKILL

# True when process $1 is a job.sh this tooling started (a pid file from before a reboot may name another).
_ALIVE = """alive() { [ -r "/proc/$1/cmdline" ] && grep -qa 'sophia-runs/.*/job\\.sh' "/proc/$1/cmdline"; }"""


def setup_script(commit: str, archive: str, python: str) -> str:
    """Installs the commit packed in ~/`archive` into ~/sophia-jax/venv with the tpu extra; does nothing
    when that commit is already installed and importable (so it may run again, e.g. on a recreated VM).

    `python` (e.g. python3.11; the trainer needs >= 3.11) makes the venv; a `python3.X` missing from the
    image is installed with apt-get (Ubuntu 22.04 ships 3.10).
    """
    q = shlex.quote
    if re.fullmatch(r"python3\.\d+", python):
        get_python = (f'  echo "sophia-setup $host: installing {python} with apt-get"\n'
                      "  apt() { sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq \"$@\"; }\n"
                      f"  apt update && apt install -y {python} {python}-venv")
    else:
        get_python = f'  fail "{python} is not on this worker; install it or pass another --python"'
    return f"""# sophia-tpu setup {commit}
set -euo pipefail
host=$(hostname)
fail() {{ echo "sophia-setup $host: $*" >&2; exit 3; }}
commit={q(commit)}
archive="$HOME"/{q(archive)}
root="$HOME/sophia-jax"
src="$root/src/$commit"
venv="$root/venv"
if [ -f "$src/.sophia-installed" ] && [ "$(readlink "$root/current" || true)" = "$src" ] \\
    && "$venv/bin/python" -c 'import sophia_jax, trainer.train' 2>/dev/null; then
  rm -f "$archive"
  echo "sophia-setup $host: $commit is already installed"
  exit 0
fi
[ -f "$archive" ] || fail "$archive is missing; run sophia-tpu setup again (it copies the archive first)"
if ! command -v {q(python)} >/dev/null; then
{get_python}
fi
rm -rf "$src.tmp" && mkdir -p "$src.tmp" && tar -xzf "$archive" -C "$src.tmp"
rm -rf "$src" && mv "$src.tmp" "$src"
[ -x "$venv/bin/python" ] || {q(python)} -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -e "$src[tpu]"
touch "$src/.sophia-installed"
ln -sfn "$src" "$root/current"
rm -f "$archive"
echo "sophia-setup $host: installed $commit into $venv"
"""


def _job_script(run_id: str, worker: int, run_dir: str, overrides: Sequence[str], distributed: bool) -> str:
    """The detached job: runs sophia-train, records its pid, and its exit status when it ends."""
    args = " ".join(shlex.quote(a) for a in ["--run_dir", run_dir, *overrides])
    env = "export SOPHIA_DISTRIBUTED=1  # jax.distributed.initialize(): one process per host\n" if distributed else ""
    return f"""#!/usr/bin/env bash
# sophia-tpu job: run {run_id}, worker {worker}. Written by sophia-tpu launch; runs detached (setsid nohup).
run="$HOME/sophia-runs/{run_id}"
echo $$ > "$run/pid"
# A SIGTERM (a preemption notice) reaches sophia-train too: it saves and exits 0, which is no finish. The
# trap runs once sophia-train has exited (bash defers it while a foreground command runs).
trap 'echo TERM > "$run/signal"' TERM
echo "=== $(date -u "+%F %T") UTC worker {worker} on $(hostname): sophia-train of $(readlink ~/sophia-jax/current)"
{env}cd "$run"
"$HOME/sophia-jax/venv/bin/sophia-train" --config "$run/config.yaml" {args}
status=$?
echo "=== $(date -u '+%F %T') UTC sophia-train exited with status $status"
echo "$status" > "$run/exit_status.tmp" && mv "$run/exit_status.tmp" "$run/exit_status"
"""


def _stop_jobs(who: str) -> str:
    """Bash that stops every sophia job running on the worker: SIGTERM to its process group (sophia-train
    saves a checkpoint and exits), SIGKILL after STOP_WAIT_S."""
    return f"""{_ALIVE}
for pidfile in "$HOME"/sophia-runs/*/pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  alive "$pid" || continue
  echo "{who} $host: stopping the job running as process group $pid (SIGTERM: it saves a checkpoint)"
  kill -TERM -- "-$pid" 2>/dev/null || true
  for _ in $(seq {STOP_WAIT_S}); do alive "$pid" || break; sleep 1; done
  if alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
done
"""


def stop_script() -> str:
    """Stops the sophia jobs running on a worker (see `_stop_jobs`); prints nothing when none runs."""
    return f"""# sophia-tpu stop
host=$(hostname)
{_stop_jobs("sophia-stop")}"""


def launch_script(run_id: str, worker: int, run_dir: str, overrides: Sequence[str], env_names: Sequence[str],
                  *, distributed: bool) -> str:
    """Starts the job of `run_id` detached on one worker; reads `env_names` from stdin (see `env_payload`).

    Stops a sophia job still running on the worker first (SIGTERM to its process group: sophia-train
    saves a checkpoint and exits; SIGKILL after STOP_WAIT_S). Moves ~/sophia-run-<run_id>.yaml (copied
    by scp) to the run's config.yaml.
    """
    if not RUN_ID.match(run_id) or any(not ENV_NAME.match(n) for n in env_names):
        raise ValueError(f"bad run id {run_id!r} or environment variable names {list(env_names)}")
    names = "|".join(env_names) or ENV_END  # a pattern no NAME=VALUE line matches when none are expected
    return f"""# sophia-tpu launch {run_id} worker {worker}
set -euo pipefail
host=$(hostname)
fail() {{ echo "sophia-launch $host: $*" >&2; exit 3; }}
run="$HOME/sophia-runs/{run_id}"
[ -x "$HOME/sophia-jax/venv/bin/sophia-train" ] || fail "sophia-jax is not installed here; run sophia-tpu setup first"
# The caller's environment variables come on stdin as NAME=VALUE lines, then an end line: they are
# exported to the job and never written to a file.
line=
while IFS= read -r line; do
  [ "$line" = {ENV_END} ] && break
  case "${{line%%=*}}" in
    {names}) export "$line" ;;
    *) fail "unexpected line on stdin (only {' '.join(env_names) or 'the end line'} expected)" ;;
  esac
done
[ "$line" = {ENV_END} ] || fail "stdin ended before the environment did (was ssh retried?); launch again"
{_stop_jobs("sophia-launch")}mkdir -p "$run"
[ -f "$HOME/sophia-run-{run_id}.yaml" ] || fail "~/sophia-run-{run_id}.yaml is missing; launch again (it copies it)"
mv -f "$HOME/sophia-run-{run_id}.yaml" "$run/config.yaml"
rm -f "$run/exit_status" "$run/signal" "$run/pid"
echo {worker} > "$run/worker"
echo {shlex.quote(run_dir)} > "$run/run_dir"
cat > "$run/job.sh" <<'SOPHIA_JOB'
{_job_script(run_id, worker, run_dir, overrides, distributed)}SOPHIA_JOB
ln -sfn "$run" "$HOME/sophia-runs/current"
setsid nohup bash "$run/job.sh" >> "$run/worker.log" 2>&1 < /dev/null &
for _ in $(seq 100); do [ -s "$run/pid" ] && break; sleep 0.1; done
[ -s "$run/pid" ] || fail "the job did not start; see $run/worker.log"
echo "sophia-launch $host: worker {worker} runs {run_id} as process group $(cat "$run/pid"), log $run/worker.log"
"""


def env_payload(env_names: Sequence[str], environ: Mapping[str, str]) -> str:
    """What launch feeds each worker's stdin: NAME=VALUE lines, then the end line.

    Raises:
      ValueError: a name not set in `environ`, or a value with a newline (the message never holds values).
    """
    lines = []
    for name in env_names:
        if name not in environ:
            raise ValueError(f"--env {name}: {name} is not set in this environment; export it or drop --env {name}")
        if "\n" in environ[name] or "\0" in environ[name]:
            raise ValueError(f"--env {name}: its value holds a newline or NUL, which cannot be passed on")
        lines.append(f"{name}={environ[name]}\n")
    return "".join(lines) + ENV_END + "\n"


def status_script() -> str:
    """Prints one `sophia-job host=H worker=W run=ID state=S code=C run_dir=D` line for the run launched last,
    where S is none (nothing launched), running, exited (C = exit status), terminated (stopped by SIGTERM;
    C = its exit status) or died (gone without an exit status: the machine restarted or it was SIGKILLed)."""
    return f"""# sophia-tpu status
host=$(hostname)
run=$(readlink "$HOME/sophia-runs/current" 2>/dev/null || true)
if [ -z "$run" ] || [ ! -d "$run" ]; then
  echo "sophia-job host=$host worker=- run=- state=none code=- run_dir=-"
  exit 0
fi
{_ALIVE}
worker=$(cat "$run/worker" 2>/dev/null || echo -)
code=-
if [ -f "$run/exit_status" ]; then
  code=$(cat "$run/exit_status")
  if [ -f "$run/signal" ]; then state=terminated; else state=exited; fi
elif [ -f "$run/pid" ] && alive "$(cat "$run/pid")"; then
  state=running
elif [ -f "$run/pid" ]; then
  state=died
else
  state=none
fi
run_dir=$(cat "$run/run_dir" 2>/dev/null || echo -)
echo "sophia-job host=$host worker=$worker run=$(basename "$run") state=$state code=$code run_dir=$run_dir"
"""


def log_script(lines: int, run_id: str | None = None, *, follow: bool = False) -> str:
    """Prints the last `lines` lines of the worker log of `run_id` (default: the run launched last); with
    `follow`, then what is appended (the log of a relaunch too) until the ssh session ends."""
    run = "current" if run_id is None else run_id
    return f"""# sophia-tpu logs
log="$HOME/sophia-runs/{run}/worker.log"
[ -f "$log" ] || {{ echo "sophia-logs $(hostname): no $log (no job launched here)" >&2; exit 3; }}
tail -n {int(lines)} {"-F " if follow else ""}"$log"
"""


def parse_job_lines(text: str) -> list[dict[str, str]]:
    """The `sophia-job k=v ...` lines of `status_script` output (from any number of workers)."""
    records = []
    for line in text.splitlines():
        if line.startswith("sophia-job "):
            records.append(dict(item.partition("=")[::2] for item in line.split()[1:]))
    return records
