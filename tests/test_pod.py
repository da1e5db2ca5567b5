"""The local pod: `sophia-tpu babysit` drives a Sophia-G run on a Cloud TPU emulated on this machine
(tests/tpu_cloud.py behind tests/fakes/tpu_cloud/gcloud) to the end, through every fault a spot slice
brings, with the run directory on fake-gcs-server:

  - no capacity on create, twice; the VM preempted while CREATING; a transient describe error; ssh's exit
    status 255 during setup;
  - a preemption mid-run (SIGTERM to every process of the slice, then PREEMPTED);
  - a host crash mid-run (SIGKILL to one worker's processes: its peer must not wait forever - JAX's
    coordination service ends it after `mesh.heartbeat_timeout_seconds` - so that the babysitter can relaunch);
  - time-based checkpoints every 3 s throughout.

The slice has 2 workers of 4 CPU devices each, real JAX processes meeting at a localhost coordinator
(gloo); each worker is a directory used as its HOME, `setup` unpacks this checkout's archive there and
pip-installs it offline into a prepared venv (the emulator's image: a venv whose .pth adds this machine's
installed packages, PIP_NO_INDEX=1, no build isolation). Nothing else is stubbed.

Checked: babysit exits 0; the final state is bit for bit that of an uninterrupted run in the same layout (2
processes x 4 devices); every step's loss is within 1e-3 of one uninterrupted process with 8 devices (its
params depart from the 2 x 4 runs' by Sophia's round-off sign flips, printed); metrics.jsonl holds every step
exactly once; no checkpoint was set aside; the secret passed with --env appears in no file, argv or log.
The timeline of faults and babysitter actions is written to timeline.txt in the test's directory (and
printed with -s). Slow (about 10 minutes on 2 shared cores): `python -m pytest -q -m slow tests/test_pod.py -s`.
"""

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
import yaml

from gcs import free_port, serving
from test_multiprocess import finish
from tpu_cloud import Cloud, Image
from trainer.checkpoint import CheckpointConfig, Checkpointer
from trainer.config import build_config
from trainer.data.corpus import EmbeddedCorpus, build_embedded
from trainer.sharding import MeshConfig, make_mesh
from trainer.steps import Trainer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FAKE = Path(__file__).resolve().parent / "fakes" / "tpu_cloud"
STEPS = 30
RUN_DIR = "gs://bucket/runs/pod"
SECRET = "pod-" + secrets.token_hex(12)  # made here: in no file, not even this one
CONFIG = f"""# the local pod's run: a tiny GPT-NeoX, Sophia-G with a Hessian refresh every 3 steps
model: {{hidden_dim: 32, num_layers: 2, num_heads: 4, seq_len: 32}}
optimizer: {{type: sophia_g, update_interval: 3, warmup: 3, learning_rate: 3.0e-3, hessian_batch_fraction: 0.5}}
trainer: {{num_train_steps: {STEPS}, log_every: 1, eval_every: 15, eval_batches: 2, global_batch: 16,
          progress: false}}
checkpoint: {{every_steps: 10, every_minutes: 0.05, decide_every: 5, keep: 2, keep_every: 10, lease_minutes: 0.25}}
mesh: {{heartbeat_timeout_seconds: 10}}
data: {{cache: gs://bucket/cache, prefetch: 0}}
"""


def working_tree_repo(tmp: Path) -> Path:
    """A git repository whose HEAD is this checkout's working tree as it is (what setup installs is HEAD)."""
    repo = tmp / "repo"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard", "-z"], check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    git = ["git", "-C", str(repo), "-c", "user.name=pod", "-c", "user.email=pod@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "the working tree"], check=True)
    return repo


class Watcher(threading.Thread):
    """Injects the mid-run faults when the run has got far enough (read from the bucket, as a person would)."""

    def __init__(self, cloud: Cloud, babysitter: subprocess.Popen):
        super().__init__(daemon=True)
        self.cloud, self.babysitter, self.error = cloud, babysitter, None
        self.fs = fsspec.filesystem("gs", use_listings_cache=False)

    def progress(self) -> tuple[int, int]:
        """(the last step in metrics.jsonl, the newest committed checkpoint), 0 for none."""
        try:
            lines = self.fs.cat("bucket/runs/pod/metrics.jsonl").decode().splitlines()
        except FileNotFoundError:
            lines = []
        steps = [json.loads(x)["step"] for x in lines if x.endswith("}")]
        markers = self.fs.glob("bucket/runs/pod/checkpoints/*/commit_success.txt")
        committed = [int(p.rsplit("/", 2)[-2]) for p in markers]
        return max(steps, default=0), max(committed, default=0)

    def wait_for(self, step: int, checkpoint: int) -> None:
        while self.babysitter.poll() is None:
            last, newest = self.progress()
            if last >= step and newest >= checkpoint:
                return
            time.sleep(0.5)
        raise RuntimeError("the babysitter ended before the fault could be injected")

    def run(self) -> None:
        try:
            self.wait_for(8, 5)  # a time-based checkpoint, then the preemption
            self.cloud.preempt("t1", grace=60)
            self.wait_for(18, 15)
            self.cloud.kill_worker("t1", 1)
        except Exception as error:  # noqa: BLE001 - reported by the test
            self.error = error


def timeline(cloud: Cloud, log: str, start: float) -> list[str]:
    """The faults and what the babysitter did, in time order (seconds since the babysitter started)."""
    keep = re.compile(r"asking for|deleting|gcloud failed|relaunching|: (running|failed|stopped|finished|absent) \(|"
                      r"installing .* on every worker|launching run|waiting$|started on|finished|count starts over|"
                      r"stopping what is left")
    rows, last_verdict = [], None
    for line in log.splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) sophia-tpu: (.*)", line)
        if not (m and keep.search(m.group(2))):
            continue
        verdict = re.match(r"run \S+: (\w+) \(", m.group(2))
        if verdict and verdict.group(1) == last_verdict:
            continue  # one line per change of the job's verdict
        last_verdict = verdict.group(1) if verdict else None
        when = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp()
        rows.append((when, f"babysitter  {m.group(2)[:220]}"))
    for event in cloud.events():
        if event["event"] == "fault":
            rows.append((event["time"], f"FAULT       {event['fault']}: {event.get('detail', '')[:160]}"))
        elif event["event"] == "node":
            rows.append((event["time"], f"slice       {event['name']} {event['state']} {event.get('detail', '')}"))
    return [f"{when - start:7.1f} s  {text}" for when, text in sorted(rows)]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    yield from serving(tmp_path_factory.mktemp("gcs"))


def test_babysit_takes_a_run_through_every_fault_of_a_spot_pod_to_the_end(tmp_path, gcs, compile_cache_env):
    # The token cache, built here and uploaded; the reference reads the same cache from disk.
    cache = build_embedded(EmbeddedCorpus(vocab_size=384, max_bytes=300_000), tmp_path / "corpus")
    fs = fsspec.filesystem("gs", use_listings_cache=False)
    for path in Path(cache).rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"bucket/cache/{path.relative_to(cache)}")
    config = tmp_path / "pod.yaml"
    config.write_text(CONFIG)
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("JAX_", "XLA_", "VIRTUAL_ENV", "PYTHON", "FAKE_", "WANDB_API_KEY"))}
    base_env.update(gcs.env(), **compile_cache_env, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    base_env.pop("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", None)

    # Uninterrupted: one process with 8 devices, and 2 processes x 4 devices (the pod's layout), local.
    reference, straight = tmp_path / "reference", tmp_path / "straight"
    train = [sys.executable, "-m", "trainer.train", "--config", str(config), "--data.cache", cache]
    cpu = {**base_env, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([*train, "--run_dir", str(reference)], env={**cpu, "JAX_NUM_CPU_DEVICES": "8"},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    port = free_port()
    pair = [subprocess.Popen([*train, "--run_dir", str(straight), "--mesh.coordinator_address", f"127.0.0.1:{port}",
                              "--mesh.num_processes", "2", "--mesh.process_id", str(i)],
                             env={**cpu, "JAX_NUM_CPU_DEVICES": "4"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for i in range(2)]
    errors = finish(pair, timeout=900)
    assert [p.returncode for p in pair] == [0, 0], errors[0][-3000:] + errors[1][-3000:]

    # The emulated cloud, its faults queued, and the babysitter.
    cloud = Cloud(tmp_path / "cloud")
    cloud.save_image(Image(env={**base_env, "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0",
                                "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
                           site_packages=[p for p in sys.path if p.endswith("site-packages")],
                           python=sys._base_executable, workers=2, devices=4))
    capacity = "ERROR: (gcloud.compute.tpus.tpu-vm.create) RESOURCE_EXHAUSTED: There is no more capacity in the zone\n"
    cloud.inject("create", capacity, times=2)
    cloud.inject("creating:preempt", "")
    cloud.inject("describe", "ERROR: (gcloud.compute.tpus.tpu-vm.describe) INTERNAL: an internal error occurred\n")
    cloud.inject("ssh:setup", "ssh: connect to host 127.0.0.1 port 22: Connection timed out\n", exit=255)
    home = tmp_path / "home"
    home.mkdir()
    babysit_env = {**base_env, "PATH": f"{FAKE}{os.pathsep}{os.environ['PATH']}", "FAKE_TPU_ROOT": str(cloud.root),
                   "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"), "WANDB_API_KEY": SECRET}
    log_path = tmp_path / "babysit.log"
    start = time.time()
    with open(log_path, "w") as log:
        babysitter = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "babysit", "t1", "--zone", "local-a", "--type", "v3-8", "--spot",
             "--config", str(config), "--run_dir", RUN_DIR, "--repo", str(working_tree_repo(tmp_path)),
             "--env", "WANDB_API_KEY", "--skip-fit-check", "--retries", "2", "--poll", "2", "--backoff-min", "1",
             "--backoff-max", "4", "--max-hours", "1"],
            env=babysit_env, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
        watcher = Watcher(cloud, babysitter)
        watcher.start()
        try:
            code = babysitter.wait(timeout=1800)
        finally:
            if babysitter.poll() is None:
                babysitter.kill()
                babysitter.wait()
            for name in ("t1",):  # nothing of the slice outlives the test
                cloud._signal(f"{name}/", 9)
    seconds = time.time() - start
    log_text = log_path.read_text()
    lines = timeline(cloud, log_text, start)
    (tmp_path / "timeline.txt").write_text("\n".join(lines) + f"\nbabysit: exit {code} after {seconds:.0f} s\n")
    print("\n".join(lines), f"\nbabysit: exit {code} after {seconds:.0f} s", sep="")
    assert watcher.error is None, watcher.error
    assert code == 0, log_text[-5000:]

    # Every step exactly once; nothing set aside; the params of one uninterrupted 8-device process.
    records = [json.loads(x) for x in fs.cat("bucket/runs/pod/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    names = fs.find("bucket/runs/pod")
    assert not [n for n in names if "unrestorable" in n]
    resolved = build_config(yaml.safe_load((reference / "config.yaml").read_text()))
    trainer = Trainer(resolved, make_mesh(MeshConfig()))

    def state(run_dir: str, step: int):
        checkpointer = Checkpointer(f"{run_dir}/checkpoints", CheckpointConfig(async_save=False))
        restored, _ = checkpointer.restore(step, trainer.abstract_state())
        checkpointer.close()
        return restored

    # The faults changed nothing: the pod's final state is the uninterrupted 2 x 4 run's, bit for bit.
    pod, two = state(RUN_DIR, STEPS), state(str(straight), STEPS)
    for a, b in zip(jax.tree.leaves(pod), jax.tree.leaves(two)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Against one process with 8 devices (float32 sums in another order): every step's loss within 1e-3.
    # Sophia's clipped steps turn round-off into sign flips that add up, so the uninterrupted 2 x 4 run (and
    # with it the pod) departs from 1 x 8 beyond the multi-process test's tolerance, which holds for that
    # test's 10-step schedule: the params are compared with the 2 x 4 run above; the departure is printed.
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["train/loss"] for r in records], [r["train/loss"] for r in ref], rtol=1e-3)
    for step in (10, STEPS):
        gaps = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(
            jax.tree.leaves(state(RUN_DIR, step).params), jax.tree.leaves(state(str(reference), step).params))]
        print(f"params after {step} steps, pod vs 1 x 8: largest difference {max(gaps):.3g}")

    # The faults happened and were handled as the timeline says.
    text = "\n".join(lines)
    assert text.count("FAULT       create: ") == 2
    assert "FAULT       ssh:setup" in text and "FAULT       describe" in text
    assert "FAULT       preemption" in text and "FAULT       host crash" in text
    assert re.search(r"finished \(\d+ preemption\(s\), [2-9] recreation\(s\), 1 relaunch\(es\) after failures\)",
                     log_text), log_text[-3000:]

    # The secret: in no file (the cloud's workers, logs and events, this HOME, the bucket), argv or log.
    assert SECRET not in log_text
    for root in (cloud.root, home, Path(gcs.root)):
        for path in root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert SECRET.encode() not in path.read_bytes(), path
