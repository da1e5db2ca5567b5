"""sophia-tpu (infra/): the gcloud command lines of every stage, against a fake gcloud (tests/fakes/gcloud)
that records each call (argv and stdin apart) and plays scripted answers, and dry runs. The bash that runs
on the workers is tests/test_worker_scripts.py, the babysitter's decisions tests/test_babysit.py, a whole
pod, emulated, tests/test_pod.py.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from infra import remote
from infra.babysit import job_verdict
from infra.cli import main

ROOT = Path(__file__).resolve().parent.parent
FAKES = Path(__file__).resolve().parent / "fakes"
CONFIG_1_5B = str(ROOT / "configs" / "neox_1_5b.yaml")
CONFIG_6_6B = str(ROOT / "configs" / "neox_6_6b.yaml")
ZONE = "us-zone1-a"
SECRET = "s3cr3t-value"


def tpu_vm(*args: str) -> list[str]:
    """The argv gcloud must get (after "gcloud") for `gcloud compute tpus tpu-vm ARGS --zone ZONE`."""
    return ["compute", "tpus", "tpu-vm", *args, "--zone", ZONE]


DESCRIBE = tpu_vm("describe", "t1", "--format", "json")
NOT_FOUND = ("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'projects/p/locations/z/nodes/t1' "
             "was not found\n")


def say(stdout: str = "", stderr: str = "", exit: int = 0) -> dict:
    return {"stdout": stdout, "stderr": stderr, "exit": exit}


def node(state: str, accelerator_type: str = "v3-8", workers: int | None = None) -> dict:
    """What `tpu-vm describe --format json` prints for a node (the fields sophia-tpu reads)."""
    workers = int(accelerator_type.split("-")[1]) // 8 if workers is None else workers
    return say(json.dumps({"name": "projects/p/locations/z/nodes/t1", "state": state,
                           "acceleratorType": accelerator_type,
                           "networkEndpoints": [{"ipAddress": f"10.0.0.{i}", "port": 8470} for i in range(workers)]}))


def job(worker: int, state: str, code: str = "-", run: str = "r1") -> str:
    """A worker's line of `sophia-tpu status` output on the VM."""
    return f"sophia-job host=h{worker} worker={worker} run={run} state={state} code={code}\n"


class Fake:
    """The fake gcloud's files: its script, and what it recorded."""

    def __init__(self, directory: Path):
        self.log, self.stdin, self.script_file = (directory / "calls.jsonl", directory / "stdin.jsonl",
                                                  directory / "script.json")
        self.cache = directory / "cache" / "sophia-tpu"

    def script(self, responses: dict) -> None:
        self.script_file.write_text(json.dumps(responses))

    def calls(self) -> list[list[str]]:
        return [json.loads(line)["argv"] for line in self.log.read_text().splitlines()] if self.log.exists() else []

    def stdins(self) -> list[str]:
        records = [json.loads(line) for line in self.stdin.read_text().splitlines()]
        return [r["stdin"] for r in sorted(records, key=lambda r: r["call"])]


@pytest.fixture
def fake(tmp_path, monkeypatch) -> Fake:
    f = Fake(tmp_path)
    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(f.log))
    monkeypatch.setenv("FAKE_GCLOUD_STDIN", str(f.stdin))
    monkeypatch.setenv("FAKE_GCLOUD_SCRIPT", str(f.script_file))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return f


@pytest.fixture
def libtpu_importable(tmp_path, monkeypatch) -> None:
    """An importable stand-in for libtpu on this process's path where none is installed (CI installs only
    `.[test]`): for tests of what comes after the fit check's libtpu requirement, which
    test_plan_launch_and_babysit_need_libtpu_here_for_the_fit_check tests itself."""
    if importlib.util.find_spec("libtpu") is None:
        stand_in = tmp_path / "stand-in" / "libtpu"
        stand_in.mkdir(parents=True)
        (stand_in / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(stand_in.parent))


@pytest.fixture
def repo(tmp_path) -> tuple[Path, str]:
    """A git checkout with one committed file; (its path, HEAD)."""
    path = tmp_path / "repo"
    path.mkdir()
    (path / "README.md").write_text("sophia\n")

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True, text=True).stdout

    git("init", "-q")
    git("add", "README.md")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "init")
    return path, git("rev-parse", "HEAD").strip()


def sophia_tpu(capfd, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capfd.readouterr()
    return code, out, err


def bash_argv(line: str) -> list[str]:
    """The argv bash runs for a printed command line (bash's own parser: an independent check)."""
    out = subprocess.run(["bash", "-c", "printf '%s\\0' " + line], check=True, capture_output=True, text=True).stdout
    return out.split("\0")[:-1]


# ------------------------------------------------------------------------------------------ create
def test_create_polls_describe_until_ready_and_logs_with_timestamps(fake, capfd):
    fake.script({"describe": [node("CREATING", "v3-32"), node("CREATING", "v3-32"), node("READY", "v3-32")]})
    code, out, err = sophia_tpu(capfd, "create", "t1", "--zone", ZONE, "--type", "v3-32", "--spot", "--poll", "0.001")
    assert code == 0, err
    assert fake.calls() == [tpu_vm("create", "t1", "--accelerator-type", "v3-32", "--version", "tpu-ubuntu2204-base",
                                   "--spot"), DESCRIBE, DESCRIBE, DESCRIBE]
    lines = err.splitlines()
    assert len(lines) >= 3 and all(
        len(x) > 20 and x[4] == "-" and x[13] == ":" and x[20:].startswith("sophia-tpu: ") for x in lines), err


def test_create_reports_a_failed_state(fake, capfd):
    fake.script({"describe": [node("CREATING"), node("FAILED")]})
    code, out, err = sophia_tpu(capfd, "create", "t1", "--zone", ZONE, "--type", "v3-8", "--poll", "0.001")
    assert code == 1
    assert "sophia-tpu: TPU VM t1 is FAILED instead of READY" in err
    assert len(fake.calls()) == 3


def test_create_gives_up_after_the_timeout(fake, capfd):
    fake.script({"describe": [node("CREATING")]})
    code, out, err = sophia_tpu(capfd, "create", "t1", "--zone", ZONE, "--type", "v3-8", "--timeout", "0")
    assert code == 1
    assert "TPU VM t1 is still CREATING after 0 s (--timeout)" in err


def test_a_failing_gcloud_stops_at_once_with_its_message(fake, capfd):
    message = "ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: no more capacity in zone us-zone1-a"
    fake.script({"create": [say(stderr=message + "\n", exit=1)]})
    code, out, err = sophia_tpu(capfd, "create", "t1", "--zone", ZONE, "--type", "v3-128", "--preemptible",
                                "--project", "proj")
    assert code == 1
    assert err.count(message) == 2  # as gcloud printed it, and in sophia-tpu's own last line
    assert err.splitlines()[-1].startswith("sophia-tpu: gcloud compute tpus tpu-vm create")
    assert fake.calls() == [["compute", "tpus", "tpu-vm", "create", "t1", "--accelerator-type", "v3-128", "--version",
                             "tpu-ubuntu2204-base", "--preemptible", "--zone", ZONE, "--project", "proj"]]


# ------------------------------------------------------------------------------ setup and launch
def test_setup_copies_an_archive_of_head_and_installs_it_on_every_worker(fake, repo, capfd):
    path, commit = repo
    code, out, err = sophia_tpu(capfd, "setup", "t1", "--zone", ZONE, "--repo", str(path))
    assert code == 0, err
    archive = f"sophia-jax-{commit[:12]}.tar.gz"
    scp, ssh = fake.calls()
    assert scp == tpu_vm("scp", str(fake.cache / archive), f"t1:{archive}", "--worker=all", "--quiet")
    assert ssh[:9] == ["compute", "tpus", "tpu-vm", "ssh", "t1", "--worker=all", "--quiet", "--command",
                       remote.setup_script(commit, archive, "python3.11")]
    with tarfile.open(fake.cache / archive) as tar:
        assert tar.extractfile("README.md").read() == b"sophia\n"


def requirement_names(extra: str, extras: dict[str, list[str]]) -> set[str]:
    """The distributions `pip install ".[extra]"` asks for (this project's self-references followed)."""
    names = set()
    for requirement in extras[extra]:
        name = re.split(r"[<>=!~;\s]", requirement, maxsplit=1)[0]
        own = re.fullmatch(r"sophia-jax\[([\w,]+)\]", name)
        names |= (set().union(*(requirement_names(e, extras) for e in own.group(1).split(","))) if own
                  else {name})
    return names


def test_the_extra_setup_installs_on_the_workers_brings_the_whole_trainer():
    """Each worker runs sophia-train (and launch's fit check runs sophia-aot): what setup installs must hold
    every [train] requirement and libtpu."""
    script = remote.setup_script("c" * 40, "a.tar.gz", "python3.11")
    [extra] = re.findall(r'pip install -q -e "\$src\[(\w+)\]"', script)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = requirement_names(extra, extras)
    assert requirement_names("train", extras) <= installed and "jax[tpu]" in installed, installed


def test_setup_refuses_uncommitted_changes_unless_allowed(fake, repo, capfd):
    path, commit = repo
    (path / "README.md").write_text("changed\n")
    code, out, err = sophia_tpu(capfd, "setup", "t1", "--zone", ZONE, "--repo", str(path))
    assert code == 2
    assert "has uncommitted changes (README.md); commit them, or pass --allow-dirty" in err
    assert fake.calls() == []
    code, out, err = sophia_tpu(capfd, "setup", "t1", "--zone", ZONE, "--repo", str(path), "--allow-dirty")
    assert code == 0, err
    with tarfile.open(fake.cache / f"sophia-jax-{commit[:12]}.tar.gz") as tar:  # HEAD, without the change
        assert tar.extractfile("README.md").read() == b"sophia\n"


def test_launch_feeds_the_secret_on_each_workers_stdin_only(fake, capfd, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    fake.script({"describe": [node("READY", "v3-32")]})
    code, out, err = sophia_tpu(capfd, "launch", "t1", "--zone", ZONE, "--config", CONFIG_6_6B,
                                "--run_dir", "gs://b/runs/r1", "--skip-fit-check", "--optimizer.rho", "0.1",
                                "--data.cache", "gs://b/pile")
    assert code == 0, err
    staged = fake.cache / "runs" / "r1" / "config.yaml"
    calls = fake.calls()
    assert calls[:2] == [DESCRIBE, tpu_vm("scp", str(staged), "t1:sophia-run-r1.yaml", "--worker=all", "--quiet")]
    ssh = calls[2:]
    assert sorted(c[5] for c in ssh) == ["--worker=0", "--worker=1", "--worker=2", "--worker=3"]  # 4 endpoints
    for c in ssh:
        assert c[:5] == ["compute", "tpus", "tpu-vm", "ssh", "t1"] and c[6:8] == ["--quiet", "--command"]
        assert c[9:] == ["--zone", ZONE]
        assert c[8].startswith("# sophia-tpu launch r1 worker " + c[5][-1])
        assert "--run_dir gs://b/runs/r1 --optimizer.rho 0.1 --data.cache gs://b/pile" in c[8]
    expected = [f"WANDB_API_KEY={SECRET}\n{remote.ENV_END}\n" if c[3] == "ssh" else "" for c in calls]
    assert fake.stdins() == expected
    assert SECRET not in fake.log.read_text() and SECRET not in out + err
    assert all(SECRET not in f.read_text() for f in fake.cache.rglob("*") if f.is_file())
    # the 6.6B config, base chain resolved: its own width, the 1.5B file's sequence length
    values = yaml.safe_load(staged.read_text())
    assert "base" not in values and values["model"]["hidden_dim"] == 4096 and values["model"]["seq_len"] == 2048


def test_launch_refuses_a_vm_that_is_not_ready(fake, capfd):
    fake.script({"describe": [node("CREATING")]})
    code, out, err = sophia_tpu(capfd, "launch", "t1", "--zone", ZONE, "--config", CONFIG_1_5B, "--run_dir",
                                "gs://b/runs/r1", "--skip-fit-check", "--data.cache", "gs://b/pile")
    assert code == 1 and "sophia-tpu: TPU VM t1 is CREATING, not READY" in err
    assert fake.calls() == [DESCRIBE]


def test_launch_stops_before_anything_when_the_fit_check_fails(fake, capfd, libtpu_importable):
    # A v3-8 has 8 cores, which a model axis of 3 does not divide: sophia-aot exits 2 (with libtpu or without).
    code, out, err = sophia_tpu(capfd, "launch", "t1", "--zone", ZONE, "--type", "v3-8", "--config", CONFIG_1_5B,
                                "--run_dir", "gs://b/runs/r1", "--mesh.model", "3", "--data.cache", "gs://b/pile")
    assert code == 1
    assert "sophia-tpu: the fit check failed (sophia-aot exit status 2" in err and "nothing was started" in err
    assert fake.calls() == []


@pytest.mark.parametrize("args, message", [
    (["--env", "SOPHIA_TEST_UNSET"], "--env SOPHIA_TEST_UNSET: SOPHIA_TEST_UNSET is not set in this environment"),
    (["--optimizer.rhoo", "1"], "unknown config key(s): optimizer.rhoo"),
    (["stray"], "launch: unexpected argument 'stray'"),
    (["--type", "v3-48"], "--type v3-48: use a TPU v3 slice, one of v3-8, v3-32"),
    ([], "data.cache is gs://YOUR_BUCKET/pile-neox, a placeholder; pass --data.cache gs://BUCKET/"),
])
def test_launch_refuses_bad_arguments_before_calling_anything(fake, capfd, args, message):
    slice_ = [] if "--type" in args else ["--type", "v3-8"]
    code, out, err = sophia_tpu(capfd, "launch", "t1", "--zone", ZONE, "--config", CONFIG_1_5B,
                                "--run_dir", "gs://b/runs/r1", "--skip-fit-check", *slice_, *args)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert fake.calls() == []


def test_plan_prints_create_setup_launch_and_calls_nothing(fake, repo, capfd, monkeypatch, libtpu_importable):
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    path, commit = repo
    code, out, err = sophia_tpu(capfd, "plan", "t1", "--zone", ZONE, "--type", "v3-128", "--spot", "--config",
                                CONFIG_1_5B, "--run_dir", "gs://b/runs/r1", "--repo", str(path),
                                "--trainer.wandb", "online", "--data.cache", "gs://b/pile")
    assert code == 0, err
    assert not fake.log.exists() and SECRET not in out + err
    comments = [x for x in out.splitlines() if x.startswith("#")]
    commands = [bash_argv(x) for x in out.splitlines() if not x.startswith("#")]
    archive = f"sophia-jax-{commit[:12]}.tar.gz"
    gcloud = lambda *args: ["gcloud", *tpu_vm(*args)]  # noqa: E731
    assert commands[:4] == [
        gcloud("create", "t1", "--accelerator-type", "v3-128", "--version", "tpu-ubuntu2204-base", "--spot"),
        ["gcloud", *DESCRIBE],
        ["git", "-C", str(path), "archive", "--format=tar.gz", "-o", str(fake.cache / archive), commit],
        gcloud("scp", str(fake.cache / archive), f"t1:{archive}", "--worker=all", "--quiet"),
    ]
    assert commands[4] == gcloud("ssh", "t1", "--worker=all", "--quiet", "--command",
                                 remote.setup_script(commit, archive, "python3.11"))
    assert commands[5] == [sys.executable, "-m", "trainer.aot", "--config", CONFIG_1_5B, "--topology", "v3:8x8",
                           "--trainer.wandb", "online", "--data.cache", "gs://b/pile"]
    assert commands[6] == gcloud("scp", str(fake.cache / "runs" / "r1" / "config.yaml"), "t1:sophia-run-r1.yaml",
                                 "--worker=all", "--quiet")
    assert len(commands) == 7 + 16  # one launch ssh per worker of a v3-128
    for i, c in enumerate(commands[7:]):
        assert c[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "t1", f"--worker={i}", "--quiet"]
        assert c[9].startswith(f"# sophia-tpu launch r1 worker {i}\n") and "WANDB_API_KEY) export" in c[9]
    assert any("WANDB_API_KEY" in x and "stdin" in x for x in comments)
    assert not fake.cache.exists()  # a dry run writes nothing: the archive and the config are only named


def test_create_passes_network_flags_and_ssh_takes_iap(fake, capfd):
    fake.script({"describe": [node("READY", "v3-32")], "ssh:sophia-tpu status": [say(job(0, "running"))]})
    code, out, err = sophia_tpu(capfd, "create", "t1", "--zone", ZONE, "--type", "v3-32", "--network", "net",
                                "--subnetwork", "sub", "--service-account", "sa@p.iam.gserviceaccount.com",
                                "--scopes", "cloud-platform")
    assert code == 0, err
    assert fake.calls()[0] == tpu_vm("create", "t1", "--accelerator-type", "v3-32", "--version",
                                     "tpu-ubuntu2204-base", "--network", "net", "--subnetwork", "sub",
                                     "--service-account", "sa@p.iam.gserviceaccount.com", "--scopes",
                                     "cloud-platform")
    code, out, err = sophia_tpu(capfd, "status", "t1", "--zone", ZONE, "--internal-ip", "--tunnel-through-iap")
    assert code == 0, err
    ssh = fake.calls()[-1]
    assert ssh[3] == "ssh" and ssh[-4:] == ["--internal-ip", "--tunnel-through-iap", "--zone", ZONE]


# ------------------------------------------------------------------------------ queued resources
def qr(*args: str) -> list[str]:
    return ["compute", "tpus", "queued-resources", *args, "--zone", ZONE]


def test_create_queued_waits_for_active_then_ready(fake, capfd):
    fake.script({"qr-describe": [say("WAITING_FOR_RESOURCES\n"), say("PROVISIONING\n"), say("ACTIVE\n")],
                 "describe": [node("CREATING"), node("READY")]})
    code, out, err = sophia_tpu(capfd, "create", "t1", "--zone", ZONE, "--type", "v3-8", "--spot", "--queued",
                                "--valid-until-duration", "6h", "--poll", "0.001")
    assert code == 0, err
    state = qr("describe", "t1", "--format", "value(state.state)")
    assert fake.calls() == [qr("create", "t1", "--node-id", "t1", "--accelerator-type", "v3-8", "--runtime-version",
                               "tpu-ubuntu2204-base", "--spot", "--valid-until-duration", "6h"),
                            state, state, state, DESCRIBE, state, DESCRIBE]
    assert "queued resource t1 is WAITING_FOR_RESOURCES" in err and "queued resource t1 is READY" in err


def test_queued_status_and_delete(fake, capfd):
    fake.script({"qr-describe": [say("SUSPENDED\n")]})
    code, out, err = sophia_tpu(capfd, "status", "t1", "--zone", ZONE, "--queued")
    assert code == 0 and out == "t1 (us-zone1-a): SUSPENDED\n", err
    code, out, err = sophia_tpu(capfd, "delete", "t1", "--zone", ZONE, "--queued", "--yes")
    assert code == 0, err
    assert fake.calls()[-1] == qr("delete", "t1", "--force", "--quiet")


@pytest.mark.parametrize("args, message", [
    (["--queued", "--preemptible"], "--queued --preemptible: a queued resource asks for --spot capacity"),
    (["--valid-until-duration", "6h"], "--valid-until-duration is a queued resource's: add --queued"),
])
def test_queued_flags_are_checked(fake, capfd, args, message):
    code, out, err = sophia_tpu(capfd, "create", "t1", "--zone", ZONE, "--type", "v3-8", *args)
    assert code == 2 and message in err and fake.calls() == []


# ------------------------------------------------------------------------- status, logs, delete
def test_status_prints_the_vm_state_each_workers_job_and_the_runs_progress(fake, capfd, tmp_path):
    run_dir = tmp_path / "run"  # a local run directory stands in for gs:// (infra/progress.py reads both)
    (run_dir / "checkpoints" / "10").mkdir(parents=True)
    (run_dir / "checkpoints" / "20.orbax-checkpoint-tmp-5").mkdir()  # a save in progress: not a checkpoint
    (run_dir / "config.yaml").write_text("trainer:\n  num_train_steps: 100\n")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 11, "train/loss": 3.5}) + "\n" + json.dumps(
        {"step": 12, "train/loss": 3.25, "throughput/tokens_per_second": 12345.6}) + "\n" + '{"step": 13, "tr')
    fake.script({"describe": [node("READY", "v3-32", workers=2)],
                 "ssh:sophia-tpu status": [say(job(1, "exited", "0") + job(0, "running"))]})
    code, out, err = sophia_tpu(capfd, "status", "t1", "--zone", ZONE, "--run_dir", str(run_dir))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[:3] == ["t1 (us-zone1-a): READY (v3-32, 2 workers)", "  worker 0 h0: run r1 running",
                         "  worker 1 h1: run r1 exited (exit status 0)"]
    assert re.fullmatch(rf"  run {run_dir}: step 12 of 100, loss 3\.25, 12,346 tokens/s, last line \d+ s ago; "
                        r"newest checkpoint 10", lines[3]), lines[3]
    assert fake.calls() == [DESCRIBE, tpu_vm("ssh", "t1", "--worker=all", "--quiet", "--command",
                                             remote.status_script())]


def test_status_of_a_vm_that_does_not_exist(fake, capfd):
    fake.script({"describe": [say(stderr=NOT_FOUND, exit=1)]})
    code, out, err = sophia_tpu(capfd, "status", "t1", "--zone", ZONE)
    assert code == 0 and out == "t1 (us-zone1-a): not found\n"
    assert fake.calls() == [DESCRIBE]


def test_logs_tails_one_workers_log_or_follows_it(fake, capfd):
    fake.script({"ssh:sophia-tpu logs": [say("step 7 loss 3.1\n")]})
    code, out, err = sophia_tpu(capfd, "logs", "t1", "--zone", ZONE, "--worker", "3", "--lines", "7")
    assert code == 0 and out == "step 7 loss 3.1\n"
    [ssh] = fake.calls()
    assert ssh[:8] == ["compute", "tpus", "tpu-vm", "ssh", "t1", "--worker=3", "--quiet", "--command"]
    assert 'tail -n 7 "$log"' in ssh[8] and 'log="$HOME/sophia-runs/current/worker.log"' in ssh[8]
    code, out, err = sophia_tpu(capfd, "logs", "t1", "--zone", ZONE, "--follow")
    assert code == 0 and 'tail -n 100 -F "$log"' in fake.calls()[-1][8]


def test_delete_asks_first_unless_yes(fake, capfd, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # nobody answers: not confirmed
    code, out, err = sophia_tpu(capfd, "delete", "t1", "--zone", ZONE)
    assert code == 1 and "t1 was not deleted (not confirmed; pass --yes" in err
    assert fake.calls() == []
    code, out, err = sophia_tpu(capfd, "delete", "t1", "--zone", ZONE, "--yes")
    assert code == 0
    assert fake.calls() == [tpu_vm("delete", "t1", "--quiet")]


# ------------------------------------------------------------------ dry runs: before money is spent
DRY_RUNS = {
    "create": ["--type", "v3-8", "--spot"],
    "setup": [],
    "launch": ["--config", CONFIG_1_5B, "--run_dir", "gs://b/runs/r1", "--data.cache", "gs://b/pile",
               "--skip-fit-check"],
    "status": [],
    "logs": ["--follow"],
    "delete": [],
    "babysit": ["--type", "v3-8", "--spot", "--config", CONFIG_1_5B, "--run_dir", "gs://b/runs/r1",
                "--data.cache", "gs://b/pile", "--skip-fit-check"],
    "plan": ["--type", "v3-8", "--queued", "--spot", "--config", CONFIG_1_5B, "--run_dir", "gs://b/runs/r1",
             "--data.cache", "gs://b/pile", "--skip-fit-check"],
}


@pytest.mark.parametrize("command", list(DRY_RUNS))
def test_every_subcommand_dry_runs_calling_and_writing_nothing(command, repo, tmp_path):
    """--dry-run (plan: always) prints commands bash can parse and runs none of them: a gcloud on PATH that
    would record a call is never run, and nothing appears under HOME (~/.cache included)."""
    path, commit = repo
    home = tmp_path / "home"
    home.mkdir()
    environ = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "WANDB_API_KEY")}
    environ.update(HOME=str(home), PATH=f"{FAKES}{os.pathsep}{os.environ['PATH']}",
                   FAKE_GCLOUD_LOG=str(tmp_path / "calls"), FAKE_GCLOUD_STDIN=str(tmp_path / "stdin"),
                   FAKE_GCLOUD_SCRIPT=str(tmp_path / "script"))
    install = ["--repo", str(path)] if command in ("setup", "babysit", "plan") else []
    result = subprocess.run([sys.executable, "-m", "infra.cli", command, "t1", "--zone", ZONE, "--dry-run",
                             *DRY_RUNS[command], *install], env=environ, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [x for x in result.stdout.splitlines() if not x.startswith("#")]
    assert lines and all(bash_argv(x) for x in lines)
    assert not (tmp_path / "calls").exists()
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == []
    if command == "launch":  # no --type: the describe, then one worker's launch
        assert [bash_argv(x)[:6] for x in lines][0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "t1"]
        assert sum("--worker=0" in x for x in lines) == 1
    if command == "babysit":
        stages = [bash_argv(x)[4] if x.startswith("gcloud") else bash_argv(x)[0] for x in lines]
        assert stages == ["describe", "create", "describe", "git", "scp", "ssh", "scp", "ssh", "ssh"]


def test_plan_launch_and_babysit_need_libtpu_here_for_the_fit_check(tmp_path, fake):
    """Without libtpu the fit check cannot compile for the TPU: said before anything is created."""
    shadow = tmp_path / "shadow" / "libtpu"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('libtpu is not installed (a test stand-in)')\n")
    environ = {**os.environ, "PYTHONPATH": f"{shadow.parent}{os.pathsep}{ROOT}"}
    for command in ("plan", "launch", "babysit"):
        result = subprocess.run([sys.executable, "-m", "infra.cli", command, "t1", "--zone", ZONE, "--type", "v3-8",
                                 "--config", CONFIG_1_5B, "--run_dir", "gs://b/runs/r1", "--data.cache", "gs://b/pile"],
                                env=environ, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and "the fit check compiles the run for the slice here and needs " \
            "libtpu" in result.stderr and "--skip-fit-check" in result.stderr
    assert fake.calls() == []


# ------------------------------------------------------------------------------- job records
@pytest.mark.parametrize("lines, workers, verdict", [
    ([job(0, "running"), job(1, "exited", "1")], 2, "failed"),  # one host gone: the others would hang
    ([job(0, "running"), job(1, "died")], 2, "failed"),
    ([job(0, "running"), job(1, "exited", "0")], 2, "running"),
    ([job(0, "terminated", "0"), job(1, "terminated", "0")], 2, "stopped"),  # SIGTERM: saved, not finished
    ([job(0, "terminated", "1"), job(1, "exited", "134")], 2, "stopped"),  # a non-zero exit after SIGTERM too
    ([job(0, "exited", "0"), job(1, "exited", "0")], 2, "finished"),
    ([job(0, "exited", "0")], 2, "absent"),
    (["sophia-job host=h0 worker=- run=- state=none code=- run_dir=-\n"], 1, "absent"),
    ([job(0, "running", run="other")], 1, "busy"),
    ([job(0, "exited", "0", run="other")], 1, "absent"),
])
def test_job_verdict(lines, workers, verdict):
    assert job_verdict(remote.parse_job_lines("".join(lines)), "r1", workers)[0] == verdict
