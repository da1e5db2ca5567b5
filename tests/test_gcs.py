"""A run directory and a token cache on gs://, against a real GCS API offline (fake-gcs-server, tests/gcs.py):
`sophia-train` killed mid-run and resumed matches a straight local run bit for bit; an outage while
resuming stops the run with CheckpointReadError's message and changes nothing; metrics.jsonl is rewritten
whole (GCS cannot append) and wandb keeps its files on a local disk; no local "gs:" directory appears."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest

from gcs import FakeGCS, serving
from runs import assert_same_final_state
from test_lease import (check_a_holder_paused_past_the_timeout_finds_its_lease_lost,
                        check_a_lease_from_another_machine_is_taken_after_the_timeout,
                        check_live_holder_is_named_and_a_killed_one_taken_over_at_once, holders)  # noqa: F401
from trainer.checkpoint import trim_metrics
from trainer.data.corpus import EmbeddedCorpus, build_embedded
from trainer.metrics import MetricsWriter
from trainer.plot import load_metrics

STEPS = 20
TIMING = ("throughput/tokens_per_second", "throughput/mfu")  # wall-clock: differs between any two runs
RUN = "gs://bucket/runs/tiny"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """fake-gcs-server with a bucket named `bucket`, its address in this process's environment."""
    yield from serving(tmp_path_factory.mktemp("gcs"))


@pytest.fixture(scope="module")
def local_cache(tmp_path_factory) -> str:
    return build_embedded(EmbeddedCorpus(vocab_size=384, max_bytes=300_000), tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def gs_cache(server, local_cache) -> str:
    """The same token cache, uploaded."""
    fs = fsspec.filesystem("gs")
    for path in Path(local_cache).rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"bucket/cache/{path.relative_to(local_cache)}")
    return "gs://bucket/cache"


def command(run_dir: str, cache: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer.train", "--run_dir", run_dir, "--data.cache", cache,
            "--trainer.num_train_steps", str(STEPS), "--trainer.log_every", "1", "--trainer.eval_every", "10",
            "--trainer.eval_batches", "2", "--trainer.global_batch", "8", "--trainer.progress", "false",
            "--model.hidden_dim", "32", "--model.num_layers", "2", "--model.num_heads", "4", "--model.seq_len", "32",
            "--optimizer.update_interval", "4", "--optimizer.warmup", "4",
            "--checkpoint.every_steps", "5", "--checkpoint.every_minutes", "null", *extra]


def env(server: FakeGCS, compile_cache_env: dict[str, str], home: Path) -> dict[str, str]:
    # What a user's environment holds: nothing about gcsfs's bucket-layout probe (the trainer decides).
    out = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    out.update(server.env())
    out.update(JAX_PLATFORMS="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", HOME=str(home),
               XDG_CACHE_HOME=str(home / ".cache"), **compile_cache_env)
    return out


def records(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in text.splitlines()]


def committed(fs, step: int) -> bool:
    """Whether orbax finalized step `step` on GCS (its commit marker is written last)."""
    return fs.exists(f"bucket/runs/tiny/checkpoints/{step}/commit_success.txt")


def no_gs_directory(*roots: Path) -> bool:
    return not any(p.name.startswith("gs:") for root in roots for p in root.rglob("*"))


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_gs_run_killed_resumed_and_through_an_outage_matches_a_local_run_bit_for_bit(
        tmp_path, server, local_cache, gs_cache, compile_cache_env):
    work, home = tmp_path / "cwd", tmp_path / "home"
    work.mkdir(), home.mkdir()
    environ = env(server, compile_cache_env, home)

    def run(run_dir: str, cache: str) -> subprocess.CompletedProcess:
        return subprocess.run(command(run_dir, cache), env=environ, cwd=work, capture_output=True, text=True,
                              timeout=900)

    straight = str(tmp_path / "local-run")
    result = run(straight, local_cache)
    assert result.returncode == 0, result.stderr[-3000:]

    # Killed (SIGKILL) once checkpoint 10 is committed on GCS, mid-run.
    fs = fsspec.filesystem("gs", use_listings_cache=False)
    process = subprocess.Popen(command(RUN, gs_cache), env=environ, cwd=work, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 600
        while not committed(fs, 10):
            assert process.poll() is None, process.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "checkpoint 10 was not committed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    assert process.returncode == -signal.SIGKILL
    before = sorted(fs.find("bucket/runs/tiny"))
    metrics_before = fs.cat("bucket/runs/tiny/metrics.jsonl")
    assert committed(fs, 10) and not committed(fs, STEPS)
    assert [r["step"] for r in records(metrics_before.decode())][:10] == list(range(1, 11))  # flushed at the save

    # The storage is down while the run resumes: it stops, saying why, and changes nothing.
    server.stop()
    try:
        result = run(RUN, gs_cache)
    finally:
        server.start()
    assert result.returncode == 2, result.stderr[-3000:]
    # The run directory's lease is the first thing a run reads there (trainer/lease.py).
    [line] = [x for x in result.stderr.splitlines() if x.startswith("sophia-train:")]
    assert line.startswith("sophia-train: could not take the lease gs://bucket/runs/tiny/lease.json ("), line
    assert "nothing was changed" in line, line
    assert sorted(fs.find("bucket/runs/tiny")) == before  # every step, the metrics, the config: all still there
    assert fs.cat("bucket/runs/tiny/metrics.jsonl") == metrics_before

    # Back up: the resumed run finishes, and it is the local run exactly.
    result = run(RUN, gs_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from gs://bucket/runs/tiny/checkpoints/" in result.stderr
    assert "bucket type" not in result.stderr and "gcsfs" not in result.stderr  # no bucket-layout probe
    local_records = records(Path(straight, "metrics.jsonl").read_text())
    assert records(fs.cat("bucket/runs/tiny/metrics.jsonl").decode()) == local_records
    assert "vocab_size: 384" in fs.cat("bucket/runs/tiny/config.yaml").decode()
    assert_same_final_state(RUN, straight, STEPS)
    assert no_gs_directory(work, home, Path(straight))


def test_metrics_on_gs_are_rewritten_whole_and_trimmed_and_wandb_stays_local(tmp_path, server, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    fs, run_dir, now = fsspec.filesystem("gs", use_listings_cache=False), "gs://bucket/runs/writer", [0.0]
    path = "bucket/runs/writer/metrics.jsonl"

    def steps() -> list[int]:
        return [json.loads(line)["step"] for line in fs.cat(path).decode().splitlines()] if fs.exists(path) else []

    writer = MetricsWriter(run_dir, config={"seed": 0}, total_steps=5, wandb_mode="offline", progress=False,
                           flush_seconds=10.0, clock=lambda: now[0])
    writer.log(1, {"train/loss": 3.0})
    assert steps() == []  # kept until flush_seconds have passed
    now[0] = 10.0
    writer.log(2, {"train/loss": 2.9})
    assert steps() == [1, 2]
    writer.log(3, {"train/loss": 2.8})
    writer.flush()  # as before a checkpoint
    assert steps() == [1, 2, 3]
    writer.log(4, {"train/loss": 2.7})
    run_id = writer._wandb.id
    writer.close()
    assert steps() == [1, 2, 3, 4]
    assert fs.cat("bucket/runs/writer/wandb_id").decode() == run_id
    local = tmp_path / "cache" / "sophia-jax" / "wandb" / "gs" / "bucket" / "runs" / "writer" / "wandb"
    assert any(local.glob(f"offline-run-*-{run_id}"))

    assert trim_metrics(f"{run_dir}/metrics.jsonl", 2) == 2  # resuming from step 2
    second = MetricsWriter(run_dir, config={"seed": 0}, total_steps=5, start_step=2, wandb_mode="offline",
                           progress=False, flush_seconds=10.0, clock=lambda: now[0])
    second.log(3, {"train/loss": 2.5})
    assert second._wandb.id == run_id  # the same wandb run continues
    second.close()
    assert steps() == [1, 2, 3]
    assert [r["step"] for r in load_metrics(run_dir)] == [1, 2, 3]  # sophia-plot reads gs:// too
    assert no_gs_directory(tmp_path)


# ------------------------------------------------------------------ what the trainer sets for gcsfs
PROBE = """import os, sys, time
import fsspec
from trainer import storage
storage.configure()
from etils import epath
path = epath.Path("gs://bucket/probe/" + sys.argv[1])
start = time.monotonic()
for i in range(3):
    path.write_text(str(i))
    assert path.read_text() == str(i) and path.exists()
print(type(fsspec.filesystem("gs")).__name__, round(time.monotonic() - start, 1))
"""


@pytest.mark.parametrize("setting", [None, "true"])
def test_the_trainers_gcsfs_configuration_against_the_emulator(server, setting, tmp_path):
    """Without GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT (users' default) storage.configure() keeps gcsfs's JSON API
    filesystem: no bucket-layout probe, no warning. Set to true by the user, it is respected (the
    experimental filesystem, whose failed probe against this emulator is retried for up to 60 s per call;
    only its class is checked here, after one call)."""
    environ = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    if setting is None:
        result = subprocess.run([sys.executable, "-c", PROBE, "a"], env=environ, capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        name, seconds = result.stdout.split()
        assert name == "GCSFileSystem" and float(seconds) < 30 and result.stderr == "", result.stderr[-2000:]
    else:
        environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = setting
        code = ("import fsspec\nfrom trainer import storage\nstorage.configure()\n"
                "print(type(fsspec.filesystem('gs')).__name__)")
        result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)
        assert result.stdout.strip() == "ExtendedGcsFileSystem", result.stderr[-2000:]


# ------------------------------------------------------------- the run directory's lease on gs://
# The checks of tests/test_lease.py with the lease an object: created with ifGenerationMatch=0 and replaced
# with ifGenerationMatch=<generation> (fake-gcs-server enforces both, as GCS does).
def test_lease_on_gs_live_holder_named_killed_one_taken_over(server, holders):
    check_live_holder_is_named_and_a_killed_one_taken_over_at_once("gs://bucket/leases/a", holders)


def test_lease_on_gs_from_another_machine_taken_after_the_timeout(server, caplog):
    fs = fsspec.filesystem("gs", use_listings_cache=False)
    check_a_lease_from_another_machine_is_taken_after_the_timeout(
        "gs://bucket/leases/b", lambda text: fs.pipe("bucket/leases/b/lease.json", text.encode()), caplog)


def test_lease_on_gs_paused_holder_finds_it_lost(server, holders):
    check_a_holder_paused_past_the_timeout_finds_its_lease_lost("gs://bucket/leases/c", holders)
