"""`sophia-train` as several JAX processes (2 local processes x 4 CPU devices, a localhost coordinator,
gloo collectives) against one process with 8 devices: the same losses and params, each process reading
only its own half of every batch, one SIGTERM stopping both at the same step, and the resume finishing
the run. Time-based checkpoints and the run directory's lease are decided once, on process 0, for both.
Also: the multi-process settings are validated with one-line errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from gcs import free_port
from test_trainer import assert_params_close
from trainer.checkpoint import CheckpointConfig, Checkpointer
from trainer.config import build_config
from trainer.data.corpus import EmbeddedCorpus, build_embedded
from trainer.data.loader import BatchLoader, ReadCount, TokenDataset
from trainer.sharding import MeshConfig, distributed_args, make_mesh
from trainer.steps import Trainer

STEPS = 10
READS = re.compile(r"process (\d) of (\d) read train (\d+) sequences \(digest ([0-9a-f]{16})\) in rows \[(\d+), (\d+)\) "
                   r"of each batch of 16 and \[(\d+), (\d+)\) of each Hessian batch of 8; validation (\d+) sequences "
                   r"\(digest ([0-9a-f]{16})\)")


def command(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    # k = 3: Hessian refreshes on steps 3, 6, 9; evaluation on 5 and 10; checkpoints only at a stop and the end.
    return [sys.executable, "-m", "trainer.train", "--run_dir", str(run_dir),
            "--trainer.num_train_steps", str(STEPS), "--trainer.log_every", "1", "--trainer.eval_every", "5",
            "--trainer.eval_batches", "2", "--trainer.global_batch", "16", "--trainer.progress", "false",
            "--model.hidden_dim", "32", "--model.num_layers", "2", "--model.num_heads", "4", "--model.seq_len", "32",
            "--optimizer.update_interval", "3", "--optimizer.warmup", "3", "--optimizer.learning_rate", "3e-3",
            "--optimizer.hessian_batch_fraction", "0.5", "--checkpoint.every_steps", "null",
            "--checkpoint.every_minutes", "null",  # the reads are counted without the batches read ahead
            "--data.embedded_dir", str(corpus), "--data.embedded.max_bytes", "300000",
            "--data.embedded.vocab_size", "384", *extra]


def env(devices: int, compile_cache_env: dict[str, str]) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    out.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices), WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               **compile_cache_env)
    return out


def start_processes(run_dir: Path, corpus: Path, compile_cache_env: dict[str, str],
                    *extra: str) -> list[subprocess.Popen]:
    """Process 0 and process 1 of one run, 4 CPU devices each, meeting at a localhost coordinator."""
    port = free_port()
    return [subprocess.Popen(command(run_dir, corpus, "--mesh.coordinator_address", f"127.0.0.1:{port}",
                                     "--mesh.num_processes", "2", "--mesh.process_id", str(i), *extra),
                             env=env(4, compile_cache_env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
            for i in range(2)]


def finish(processes: list[subprocess.Popen], timeout: float = 900) -> list[str]:
    """Each process's stderr once all have exited (all killed if one hangs)."""
    try:
        return [p.communicate(timeout=timeout)[1] for p in processes]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.communicate()


def reads(stderr: str) -> dict:
    match = READS.search(stderr)
    assert match, stderr[-3000:]
    g = match.groups()
    return {"process": int(g[0]), "count": int(g[1]), "train": int(g[2]), "digest": int(g[3], 16),
            "rows": (int(g[4]), int(g[5])), "hessian_rows": (int(g[6]), int(g[7])), "validation": int(g[8]),
            "validation_digest": int(g[9], 16)}


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_params(run_dir: Path, trainer: Trainer):
    checkpointer = Checkpointer(run_dir / "checkpoints", CheckpointConfig(async_save=False))
    state, _ = checkpointer.restore(STEPS, trainer.abstract_state())  # onto this process's 8 devices
    checkpointer.close()
    return state.params


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


def reads_of_one_process(corpus: Path) -> dict:
    """What one process reads in the run of `command`, restated from the data order's definition: all rows
    of the train batches of steps 1-10 (seed 0), of the Hessian batches of the refreshes on steps 3, 6, 9
    (seed 1), and the first eval_batches x 16 validation sequences at each of the 2 evaluations."""
    cache = build_embedded(EmbeddedCorpus(vocab_size=384, max_bytes=300_000), corpus)
    train, validation = TokenDataset(cache, "train"), TokenDataset(cache, "validation")
    count, val_count = ReadCount(), ReadCount()
    batches = BatchLoader(train, seq_len=32, global_batch=16, seed=0, prefetch=0)
    hessian = BatchLoader(train, seq_len=32, global_batch=8, seed=1, prefetch=0)
    for step in range(STEPS):
        count.add(batches.sequence_indices(step))
    for refresh in range(STEPS // 3):
        count.add(hessian.sequence_indices(refresh))
    for _ in range(2):
        val_count.add(np.arange(min(validation.num_sequences(32), 2 * 16)))
    return {"rows": (0, 16), "train": count.sequences, "digest": count.digest, "validation": val_count.sequences,
            "validation_digest": val_count.digest}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, compile_cache_env) -> tuple[Path, dict]:
    """The run in one process with 8 devices (which does not log its reads), and what it read."""
    run_dir = tmp_path_factory.mktemp("one-process") / "run"
    result = subprocess.run(command(run_dir, corpus), env=env(8, compile_cache_env), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0 of 1" not in result.stderr
    return run_dir, reads_of_one_process(corpus)


def wait_for_step(run_dir: Path, step: int, processes: list[subprocess.Popen], timeout: float = 600) -> None:
    path, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (path.exists() and any(line.endswith("}") and json.loads(line)["step"] >= step
                                     for line in path.read_text().splitlines())):
        assert all(p.poll() is None for p in processes), "a process ended before the signal point"
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.01)


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_two_processes_match_one_stop_together_and_read_only_their_rows(tmp_path, corpus, reference,
                                                                      compile_cache_env):
    ref_dir, ref_reads = reference
    run_dir = tmp_path / "run"

    # Session 1: a SIGTERM to process 1 alone (its host is preempted) stops both, at the same step.
    processes = start_processes(run_dir, corpus, compile_cache_env)
    try:
        wait_for_step(run_dir, 2, processes)
        processes[1].send_signal(signal.SIGTERM)
    finally:
        first = finish(processes)
    assert [p.returncode for p in processes] == [0, 0], first[0][-3000:] + first[1][-3000:]
    stopped = {int(m) for err in first for m in re.findall(r"received: saved step (\d+) to", err)}
    assert len(stopped) == 1 and all(re.search(r"received: saved step \d+", err) for err in first), first
    stop = stopped.pop()
    assert 2 <= stop < STEPS
    assert Checkpointer(run_dir / "checkpoints").steps() == [stop]
    assert [r["step"] for r in records(run_dir)] == list(range(1, stop + 1))

    # Session 2: both resume from that checkpoint and finish.
    processes = start_processes(run_dir, corpus, compile_cache_env)
    second = finish(processes)
    assert [p.returncode for p in processes] == [0, 0], second[0][-3000:] + second[1][-3000:]
    assert all(f"checkpoints/{stop}" in err and "resuming from" in err for err in second)

    # Only process 0 wrote the bookkeeping: each step logged once, the config it resolved.
    got, ref = records(run_dir), records(ref_dir)
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["mesh"]["process_id"] == 0 and config["mesh"]["num_processes"] == 2
    # The same run as one process: losses (float32 sums in another order) and params.
    np.testing.assert_allclose([r["train/loss"] for r in got], [r["train/loss"] for r in ref], rtol=1e-5)
    np.testing.assert_allclose([r["eval/loss"] for r in got if "eval/loss" in r],
                               [r["eval/loss"] for r in ref if "eval/loss" in r], rtol=1e-5)
    assert [r["optim/hessian_updates"] for r in got] == [s // 3 for s in range(1, STEPS + 1)]
    resolved = build_config(yaml.safe_load((ref_dir / "config.yaml").read_text()))
    trainer = Trainer(resolved, make_mesh(MeshConfig()))
    assert_params_close(final_params(run_dir, trainer), final_params(ref_dir, trainer), steps=STEPS)

    # Each process read only its rows: disjoint halves of every batch, together exactly what one process
    # read (counts and order-free digests of the sequence indices add up).
    per = [[reads(session[i]) for session in (first, second)] for i in range(2)]
    assert [(s["process"], s["count"]) for p in per for s in p] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert [p[0]["rows"] for p in per] == [(0, 8), (8, 16)] and ref_reads["rows"] == (0, 16)
    assert [p[0]["hessian_rows"] for p in per] == [(0, 4), (4, 8)]
    mask = (1 << 64) - 1
    for kind, digest in (("train", "digest"), ("validation", "validation_digest")):
        assert ref_reads[kind] > 0
        assert [sum(s[kind] for s in p) for p in per] == [ref_reads[kind] // 2] * 2
        assert sum(s[digest] for p in per for s in p) & mask == ref_reads[digest]


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_time_based_checkpoints_are_decided_once_for_both_processes(tmp_path, corpus, compile_cache_env):
    """Issue 17: each process read `checkpoint.every_minutes` off its own clock, so one waited in the save's
    barrier while the other trained on, and both hung. Saving every 1.2 s over 60 steps, logging every 10th
    (so that the hosts dispatch steps ahead at their own pace, as on a pod), both must finish; a hang fails
    the test at the timeout (the processes are killed)."""
    run_dir = tmp_path / "run"
    processes = start_processes(run_dir, corpus, compile_cache_env, "--trainer.num_train_steps", "60",
                                "--checkpoint.every_minutes", "0.02", "--trainer.eval_every", "0",
                                "--trainer.log_every", "10")
    errors = finish(processes, timeout=240)
    assert [p.returncode for p in processes] == [0, 0], errors[0][-3000:] + errors[1][-3000:]
    assert [r["step"] for r in records(run_dir)] == list(range(10, 61, 10))
    assert Checkpointer(run_dir / "checkpoints").steps()[-1] == 60


def test_both_processes_refuse_a_run_directory_another_live_run_holds(tmp_path, corpus, compile_cache_env):
    """The lease is taken by process 0 and its verdict shared: both processes exit 2 with the holder named,
    before either reads or writes anything in the run directory."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from trainer.lease import Lease; "
                               "Lease(sys.argv[1], 20).acquire(); print('held', flush=True); time.sleep(600)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        owner = json.loads((run_dir / "lease.json").read_text())["owner"]
        processes = start_processes(run_dir, corpus, compile_cache_env, "--checkpoint.lease_minutes", "0.33")
        errors = finish(processes, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert [p.returncode for p in processes] == [2, 2], errors
    for err in errors:
        assert f"sophia-train: {run_dir} is in use by run {owner['run']} (host {owner['host']}, pid {holder.pid}" \
            in err, err[-2000:]
    assert sorted(p.name for p in run_dir.iterdir()) == [".lease.lock", "lease.json"]  # the holder's; nothing else


def test_multi_process_settings_come_from_flags_or_environment_and_are_checked():
    assert distributed_args(MeshConfig(), {}) is None
    full = {"JAX_COORDINATOR_ADDRESS": "10.0.0.2:8476", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed_args(MeshConfig(), full) == {"coordinator_address": "10.0.0.2:8476", "num_processes": 4,
                                                    "process_id": 3}
    flags = MeshConfig(coordinator_address="h:1", num_processes=2, process_id=1)
    assert distributed_args(flags, full) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
    assert distributed_args(MeshConfig(distributed=True), {}) == {}  # a TPU VM: JAX finds all three
    assert distributed_args(MeshConfig(), {"SOPHIA_DISTRIBUTED": "1", "JAX_PROCESS_ID": "2"}) == {"process_id": 2}
    for config, environ, message in [
        (MeshConfig(num_processes=2), {}, "--mesh.num_processes set but not --mesh.coordinator_address (or "
                                          "JAX_COORDINATOR_ADDRESS), --mesh.process_id (or JAX_PROCESS_ID)"),
        (MeshConfig(), {"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_COORDINATOR_ADDRESS set but not"),
        (MeshConfig(coordinator_address="h:1", num_processes=2, process_id=2), {},
         "--mesh.process_id=2 is out of range: give each process an id in [0, 2)"),
        (MeshConfig(), {**full, "JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID=-1 is out of range"),
        (MeshConfig(), {**full, "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
        (MeshConfig(coordinator_address="h", num_processes=1, process_id=0), {},
         "--mesh.coordinator_address='h': use HOST:PORT"),
        (MeshConfig(coordinator_address="h:1", num_processes=0, process_id=0), {}, "--mesh.num_processes=0: use"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            distributed_args(config, environ)


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_a_crashed_host_ends_its_peer_instead_of_hanging_it(tmp_path, corpus, compile_cache_env):
    """A host crash (SIGKILL to process 1 mid-run) leaves process 0 blocked in a collective that will never
    complete; JAX's coordination service, missing process 1's heartbeats for mesh.heartbeat_timeout_seconds,
    must end process 0 (non-zero) so that the babysitter sees the job failed and relaunches it."""
    run_dir = tmp_path / "run"
    processes = start_processes(run_dir, corpus, compile_cache_env, "--mesh.heartbeat_timeout_seconds", "10")
    try:
        wait_for_step(run_dir, 2, processes)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        stderr = processes[0].communicate(timeout=180)[1]  # a hang fails here (TimeoutExpired)
        waited = time.monotonic() - killed
    finally:
        finish(processes, timeout=10)
    assert processes[0].returncode != 0, stderr[-3000:]
    assert last_logged(run_dir) < STEPS, stderr[-3000:]
    print(f"process 0 ended {waited:.1f} s after process 1 was killed (exit status {processes[0].returncode})")


def last_logged(run_dir: Path) -> int:
    return max((r["step"] for r in records(run_dir)), default=0) if (run_dir / "metrics.jsonl").exists() else 0
