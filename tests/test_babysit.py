"""The babysitter's decisions (infra/babysit.py) against the replaying fake gcloud (tests/fakes/gcloud), with
the run directory on fake-gcs-server (its newest checkpoint tells progress): capacity errors, transient
describe and ssh failures, preemptions while creating and while running, job failures counted until the run
makes progress, preemption notices that exit non-zero, queued resources, and the time budget."""


import fsspec
import pytest

from gcs import serving
from infra.babysit import Backoff, Policy, babysit
from infra.gcloud import Gcloud
from infra.tpu import LaunchSpec, SliceSpec
from test_infra import CONFIG_1_5B, NOT_FOUND, ZONE, fake, job, node, qr, repo, say, sophia_tpu  # noqa: F401

RUN_DIR = "gs://b/runs/r1"
CAPACITY = ("ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: There is no more capacity in the zone "
            f"{ZONE}\n")
FAST = ("--poll", "0.001", "--backoff-min", "0.001", "--backoff-max", "0.002")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("gcs"), buckets=("b",))


@pytest.fixture
def run_dir(server):
    """gs://b/runs/r1, emptied; `save(step)` finalizes a checkpoint there as orbax does (its commit marker)."""
    fs = fsspec.filesystem("gs", use_listings_cache=False)
    if fs.exists("b/runs/r1"):
        fs.rm("b/runs/r1", recursive=True)
    return lambda step: fs.pipe(f"b/runs/r1/checkpoints/{step}/commit_success.txt", b"")


def args(path, *extra: str, queued: bool = False) -> list[str]:
    kind = ["--queued", "--spot"] if queued else ["--preemptible"]
    return ["babysit", "t1", "--zone", ZONE, "--type", "v3-8", *kind, "--config", CONFIG_1_5B, "--run_dir", RUN_DIR,
            "--repo", str(path), "--skip-fit-check", "--data.cache", "gs://b/pile", *FAST, *extra]


def stages(calls: list[list[str]]) -> list[str]:
    """Each call named by what it does: its verb, or for a script over ssh the script's name (setup, launch,
    status, logs); queued-resources verbs with a qr- prefix."""
    named = []
    for c in calls:
        verb = c[3]
        if verb == "ssh":
            verb = c[8].splitlines()[0].split()[2]  # "# sophia-tpu launch ..." -> launch
        named.append(("qr-" if c[2] == "queued-resources" else "") + verb)
    return named


SETUP_AND_LAUNCH = ["scp", "setup", "scp", "launch"]


def test_recreates_after_each_preemption_until_the_run_finishes(fake, repo, capfd, run_dir):
    path, _ = repo
    fake.script({
        "describe": [node("READY"), node("PREEMPTED"), say(stderr=NOT_FOUND, exit=1), node("CREATING"), node("READY"),
                     node("READY")],
        "ssh:sophia-tpu status": [say(job(0, "running")), say(""), say(job(0, "exited", "0"))],
    })
    code, out, err = sophia_tpu(capfd, *args(path))
    assert code == 0, err
    assert stages(fake.calls()) == ["describe", "status", "describe", "delete", "describe", "create", "describe",
                                    "describe", "status", *SETUP_AND_LAUNCH, "describe", "status"]
    assert "TPU VM t1 is PREEMPTED: deleting it to ask for it again (recreation 1)" in err
    assert "run r1 finished (0 preemption(s), 1 recreation(s), 0 relaunch(es) after failures)" in err


def test_capacity_errors_transient_failures_and_a_preemption_while_creating_are_waited_out(fake, repo, capfd,
                                                                                           run_dir):
    """Issue 17: each of these made babysit exit 1 (after deleting the VM). Now each is retried after a logged,
    growing wait; a VM preempted while CREATING is deleted and asked for again."""
    path, _ = repo
    internal = "ERROR: (gcloud.compute.tpus.tpu-vm.describe) INTERNAL: an internal error occurred\n"
    fake.script({
        "create": [say(stderr=CAPACITY, exit=1), say(stderr=CAPACITY, exit=1), say()],
        "describe": [say(stderr=NOT_FOUND, exit=1), say(stderr=NOT_FOUND, exit=1), say(stderr=NOT_FOUND, exit=1),
                     node("CREATING"), node("PREEMPTED"), say(stderr=NOT_FOUND, exit=1), say(stderr=internal, exit=1),
                     node("READY")],
        "ssh:sophia-tpu setup": [say(stderr="ssh: connect to host 10.0.0.2 port 22: Connection timed out\n", exit=255),
                                 say()],
        "ssh:sophia-tpu status": [say(""), say(""), say(job(0, "exited", "0"))],
    })
    code, out, err = sophia_tpu(capfd, *args(path))
    assert code == 0, err
    assert stages(fake.calls()) == [
        "describe", "create", "describe", "create", "describe", "create",  # no capacity, twice
        "describe", "describe", "delete",  # CREATING, then PREEMPTED while creating
        "describe", "create", "describe",  # gone: asked again; a transient describe error
        "describe", "status", "scp", "setup",  # ssh exit 255 during setup
        "describe", "status", *SETUP_AND_LAUNCH, "describe", "status"]
    waits = [line for line in err.splitlines() if "gcloud failed for a reason that may pass" in line]
    assert len(waits) == 4 and all("trying again in" in line for line in waits)
    assert "RESOURCE_EXHAUSTED" in waits[0] and "INTERNAL" in waits[2] and "Connection timed out" in waits[3]


def test_a_failure_that_will_not_pass_stops_at_once(fake, repo, capfd, run_dir):
    path, _ = repo
    denied = "ERROR: (gcloud.compute.tpus.tpu-vm.create) PERMISSION_DENIED: tpu.nodes.create denied\n"
    fake.script({"describe": [say(stderr=NOT_FOUND, exit=1)], "create": [say(stderr=denied, exit=1)]})
    code, out, err = sophia_tpu(capfd, *args(path))
    assert code == 1 and "PERMISSION_DENIED" in err.splitlines()[-1]
    assert stages(fake.calls()) == ["describe", "create"]


def test_gives_up_when_the_job_fails_past_its_retries_without_progress(fake, repo, capfd, run_dir):
    path, _ = repo
    run_dir(10)  # the run had a checkpoint before; it never gets further
    fake.script({"describe": [node("READY")], "ssh:sophia-tpu status": [say(job(0, "exited", "1"))],
                 "ssh:sophia-tpu logs": [say("step 10 loss 3.2\nValueError: boom\n")]})
    code, out, err = sophia_tpu(capfd, *args(path, "--retries", "2"))
    assert code == 1
    calls = fake.calls()
    assert stages(calls).count("launch") == 2
    # before each relaunch, what is left of the job is stopped on every worker (a survivor hung in a collective)
    assert [s for s in stages(calls) if s in ("stop", "launch")] == ["stop", "launch", "stop", "launch"]
    assert ("run r1 failed 3 times without a newer checkpoint (--retries 2); the last failure: worker 0 (h0) exited "
            "with status 1") in err
    assert err.rstrip().endswith("step 10 loss 3.2\nValueError: boom")
    assert calls[-1][5] == "--worker=0" and 'log="$HOME/sophia-runs/r1/worker.log"' in calls[-1][8]


def test_failures_count_again_from_zero_once_the_run_saved_a_newer_checkpoint(fake, repo, run_dir):
    """Five failures with --retries 2, each after a newer checkpoint: never three in a row without progress."""
    path, _ = repo
    fake.script({"describe": [node("READY")],
                 "ssh:sophia-tpu status": [say(job(0, "exited", "1"))] * 5 + [say(job(0, "exited", "0"))]})
    saved = []

    def sleep(seconds: float) -> None:  # between two looks, the relaunched run saves a checkpoint
        saved.append(len(saved) + 1)
        run_dir(10 * saved[-1])

    gc = Gcloud(ZONE)
    code = babysit(gc, SliceSpec("t1", "v3-8", preemptible=True), LaunchSpec(CONFIG_1_5B, RUN_DIR, (
        "--data.cache", "gs://b/pile")), repo=path, policy=Policy(poll=0, retries=2), check_fit=False, sleep=sleep)
    assert code == 0
    assert stages(fake.calls()).count("launch") == 5


def test_a_preemption_notice_is_no_failure_even_with_a_non_zero_exit(fake, repo, capfd, run_dir):
    """A SIGTERM'd job is a preemption: the babysitter looks once more (the VM usually goes next), then
    relaunches, counting it as a preemption, not against --retries (0 here)."""
    path, _ = repo
    stopped = say(job(0, "terminated", "1"))
    fake.script({"describe": [node("READY")],
                 "ssh:sophia-tpu status": [stopped, stopped, say(job(0, "running")), stopped, stopped,
                                           say(job(0, "exited", "0"))]})
    code, out, err = sophia_tpu(capfd, *args(path, "--retries", "0"))
    assert code == 0, err
    assert stages(fake.calls()).count("launch") == 2
    assert "(2 preemption(s), 0 recreation(s), 0 relaunch(es) after failures)" in err


def test_repeated_job_check_failures_recreate_the_vm(fake, repo, capfd, run_dir):
    path, _ = repo
    lost = say(stderr="ssh: connect to host 10.0.0.2 port 22: Connection refused\n", exit=255)
    fake.script({"describe": [node("READY")] * 3 + [say(stderr=NOT_FOUND, exit=1), node("READY")],
                 "ssh:sophia-tpu status": [lost, lost, lost, say(job(0, "exited", "0"))]})
    code, out, err = sophia_tpu(capfd, *args(path))
    assert code == 0, err
    assert stages(fake.calls()) == ["describe", "status", "describe", "status", "describe", "status", "delete",
                                    "describe", "create", "describe", "status"]


def test_queued_resource_through_waiting_suspension_and_recreation(fake, repo, capfd, run_dir):
    path, _ = repo
    gone = say(stderr="ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: t1\n", exit=1)
    fake.script({
        "qr-describe": [gone, say("WAITING_FOR_RESOURCES\n"), say("PROVISIONING\n"), say("ACTIVE\n"), say("ACTIVE\n"),
                        say("SUSPENDED\n"), gone, say("ACTIVE\n")],
        "describe": [node("READY")],
        "ssh:sophia-tpu status": [say(""), say(job(0, "running")), say(""), say(job(0, "exited", "0"))],
    })
    code, out, err = sophia_tpu(capfd, *args(path, queued=True))
    assert code == 0, err
    assert stages(fake.calls()) == [
        "qr-describe", "qr-create", "qr-describe", "qr-describe", "qr-describe", "describe", "status",
        *SETUP_AND_LAUNCH, "qr-describe", "describe", "status", "qr-describe", "qr-delete", "qr-describe",
        "qr-create", "qr-describe", "describe", "status", *SETUP_AND_LAUNCH, "qr-describe", "describe", "status"]
    creates = [c for c in fake.calls() if c[2:4] == ["queued-resources", "create"]]
    assert creates[0] == qr("create", "t1", "--node-id", "t1", "--accelerator-type", "v3-8", "--runtime-version",
                            "tpu-ubuntu2204-base", "--spot")
    assert "queued resource t1 is SUSPENDED: deleting it" in err


def test_the_time_budget_ends_the_waiting(fake, repo, capfd, run_dir):
    path, _ = repo
    fake.script({"describe": [say(stderr=NOT_FOUND, exit=1)], "create": [say(stderr=CAPACITY, exit=1)]})
    code, out, err = sophia_tpu(capfd, *args(path, "--max-hours", "0.0001", "--backoff-min", "1"))
    assert code == 1
    assert "gave up after" in err and "(--max-hours 0.0001) while gcloud kept failing (ERROR: (gcloud.compute" in err
    assert "TPU VM t1 is left as it is" in err


def test_backoff_doubles_up_to_its_cap_with_jitter():
    policy = Policy(backoff_min=10, backoff_max=60)
    low, high = Backoff(policy, rng=lambda: 0.0), Backoff(policy, rng=lambda: 1.0)
    assert [low.next() for _ in range(5)] == [5, 10, 20, 30, 30]
    assert [high.next() for _ in range(5)] == [10, 20, 40, 60, 60]
    high.reset()
    assert high.next() == 10
