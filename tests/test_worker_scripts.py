"""The bash that runs on the TPU VM workers (infra/remote.py), run here by bash in a temporary HOME with a
stand-in sophia-train: detached jobs, their exit statuses and SIGTERMs, the environment on stdin, stopping,
and setup skipping an installed commit."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from infra import remote

SECRET = "s3cr3t-value"


@pytest.fixture
def home(tmp_path):
    """A worker's HOME with sophia-jax "installed"; kills the jobs it started when the test ends."""
    home = tmp_path / "home"
    (home / "sophia-jax" / "venv" / "bin").mkdir(parents=True)
    (home / "sophia-jax" / "src" / "abc").mkdir(parents=True)
    (home / "sophia-jax" / "current").symlink_to(home / "sophia-jax" / "src" / "abc")
    yield home
    for pidfile in home.glob("sophia-runs/*/pid"):
        try:
            os.killpg(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def trainer(home: Path, body: str) -> None:
    path = home / "sophia-jax" / "venv" / "bin" / "sophia-train"
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def bash(script: str, home: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], input=stdin, capture_output=True, text=True, timeout=120,
                          env={"HOME": str(home), "PATH": os.environ["PATH"]})


def wait_for(condition, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def launch_r(home: Path, run_id: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    (home / f"sophia-run-{run_id}.yaml").write_text("seed: 0\n")
    env = env or {}
    script = remote.launch_script(run_id, 0, f"gs://b/runs/{run_id}", ["--optimizer.rho", "0.1"], list(env),
                                  distributed=True)
    return bash(script, home, remote.env_payload(list(env), env))


def job_state(home: Path) -> dict[str, str]:
    [record] = remote.parse_job_lines(bash(remote.status_script(), home).stdout)
    return record


def test_all_scripts_are_valid_bash():
    for script in [remote.setup_script("abc", "a.tar.gz", "python3.11"), remote.setup_script("abc", "a", "/opt/py"),
                   remote.launch_script("r1", 0, "gs://b/r1", ["--a.b", "it's"], ["K"], distributed=True),
                   remote.status_script(), remote.log_script(5, "r1"), remote.log_script(5, follow=True),
                   remote.stop_script()]:
        result = subprocess.run(["bash", "-n"], input=script, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_launched_job_gets_the_secret_detaches_and_records_its_exit_status(home):
    trainer(home, 'echo "args: $* distributed=$SOPHIA_DISTRIBUTED"\n'
                  '[ "$WANDB_API_KEY" = s3cr3t-value ] && echo "the key arrived"\nexit 3\n')
    result = launch_r(home, "r1", {"WANDB_API_KEY": SECRET})
    assert result.returncode == 0, result.stderr
    run = home / "sophia-runs" / "r1"
    wait_for(lambda: (run / "exit_status").exists(), "the job's exit status")
    assert (run / "exit_status").read_text() == "3\n"
    log = (run / "worker.log").read_text()
    assert f"args: --config {run}/config.yaml --run_dir gs://b/runs/r1 --optimizer.rho 0.1 distributed=1" in log
    assert "the key arrived" in log
    assert (run / "config.yaml").read_text() == "seed: 0\n" and not (home / "sophia-run-r1.yaml").exists()
    assert {k: v for k, v in job_state(home).items() if k != "host"} == {
        "worker": "0", "run": "r1", "state": "exited", "code": "3", "run_dir": "gs://b/runs/r1"}
    written = [f for f in (home / "sophia-runs").rglob("*") if f.is_file()]  # all that launch and the job wrote
    assert len(written) >= 5 and all(SECRET not in f.read_text(errors="replace") for f in written)


def test_a_sigterm_is_recorded_and_a_new_launch_stops_the_running_job(home):
    trainer(home, 'trap "echo saved; exit 0" TERM\necho started\nsleep 600 & wait\n')
    assert launch_r(home, "r1").returncode == 0
    assert job_state(home)["state"] == "running"
    wait_for(lambda: "started" in (home / "sophia-runs" / "r1" / "worker.log").read_text(), "r1's trap")
    result = launch_r(home, "r2")  # r1 still runs: launch stops it (SIGTERM, it "saves"), then starts r2
    assert result.returncode == 0, result.stderr
    assert "stopping the job running as process group" in result.stdout
    r1 = home / "sophia-runs" / "r1"
    assert (r1 / "exit_status").read_text() == "0\n" and (r1 / "signal").exists()
    assert "saved" in (r1 / "worker.log").read_text()
    assert job_state(home)["run"] == "r2" and job_state(home)["state"] == "running"
    wait_for(lambda: "started" in (home / "sophia-runs" / "r2" / "worker.log").read_text(), "r2's trap")
    os.killpg(int((home / "sophia-runs" / "r2" / "pid").read_text()), signal.SIGTERM)  # a preemption notice
    wait_for(lambda: (home / "sophia-runs" / "r2" / "exit_status").exists(), "r2's exit status")
    assert {k: job_state(home)[k] for k in ("run", "state", "code")} == {"run": "r2", "state": "terminated",
                                                                          "code": "0"}


def test_launch_leaves_a_process_that_is_not_its_job_alone(home):
    other = subprocess.Popen(["sleep", "600"], start_new_session=True)  # a stale pid file may name any process
    try:
        (home / "sophia-runs" / "old").mkdir(parents=True)
        (home / "sophia-runs" / "old" / "pid").write_text(f"{other.pid}\n")
        trainer(home, "exit 0\n")
        assert launch_r(home, "r1").returncode == 0
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
        (home / "sophia-runs" / "old" / "pid").unlink()


def test_launch_refuses_a_cut_short_stdin_without_starting(home):
    trainer(home, "exit 0\n")
    (home / "sophia-run-r1.yaml").write_text("seed: 0\n")
    script = remote.launch_script("r1", 0, "gs://b/runs/r1", [], ["WANDB_API_KEY"], distributed=False)
    result = bash(script, home, "WANDB_API_KEY=abc\n")  # no end line: an ssh retry may have eaten it
    assert result.returncode == 3
    assert "stdin ended before the environment did" in result.stderr and "abc" not in result.stderr
    assert not (home / "sophia-runs" / "r1").exists()


def test_setup_script_skips_a_commit_that_is_installed(home):
    (home / "sophia-jax" / "current").unlink()
    src = home / "sophia-jax" / "src" / "c0ffee"
    src.mkdir(parents=True)
    (src / ".sophia-installed").touch()
    (home / "sophia-jax" / "current").symlink_to(src)
    python = home / "sophia-jax" / "venv" / "bin" / "python"
    python.write_text("#!/usr/bin/env bash\nexit 0\n")  # imports work
    python.chmod(0o755)
    (home / "a.tar.gz").write_text("unused")
    result = bash(remote.setup_script("c0ffee", "a.tar.gz", "python3.11"), home)
    assert result.returncode == 0, result.stderr
    assert "c0ffee is already installed" in result.stdout and not (home / "a.tar.gz").exists()
    result = bash(remote.setup_script("beef", "a.tar.gz", "python3.11"), home)  # not installed, archive gone
    assert result.returncode == 3 and "a.tar.gz is missing; run sophia-tpu setup again" in result.stderr


def test_stop_script_stops_the_running_job_and_returns_once_it_is_gone(home):
    trainer(home, 'trap "echo saved; exit 0" TERM\necho started\nsleep 600 & wait\n')
    assert launch_r(home, "r1").returncode == 0
    wait_for(lambda: "started" in (home / "sophia-runs" / "r1" / "worker.log").read_text(), "r1's trap")
    result = bash(remote.stop_script(), home)
    assert result.returncode == 0 and "sophia-stop" in result.stdout and "stopping the job" in result.stdout
    assert {k: job_state(home)[k] for k in ("state", "code")} == {"state": "terminated", "code": "0"}
    assert bash(remote.stop_script(), home).stdout == ""  # nothing left to stop


