"""`sophia-train` end to end, as a user runs it: killed with SIGKILL at step boundaries and mid-save,
stopped with SIGTERM, resumed each time; the result is bit-identical to one uninterrupted run.
Also: a damaged latest checkpoint is skipped, a changed shape is refused, wandb offline keeps its run id."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from runs import assert_same_final_state, final_state
from trainer.checkpoint import Checkpointer
from trainer.metrics import MetricsWriter

STEPS = 40
TIMING = ("throughput/tokens_per_second", "throughput/mfu")  # wall-clock: differs between any two runs


def command(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "trainer.train", "--run_dir", str(run_dir),
            "--trainer.num_train_steps", str(STEPS), "--trainer.log_every", "1", "--trainer.eval_every", "20",
            "--trainer.eval_batches", "2", "--trainer.global_batch", "8", "--trainer.progress", "false",
            "--model.hidden_dim", "32", "--model.num_layers", "2", "--model.num_heads", "4", "--model.seq_len", "32",
            "--optimizer.update_interval", "4", "--optimizer.warmup", "4",
            "--checkpoint.every_steps", "5", "--checkpoint.every_minutes", "null",
            "--data.embedded_dir", str(corpus), "--data.embedded.max_bytes", "300000",
            "--data.embedded.vocab_size", "384", *extra]


@pytest.fixture(scope="module")
def env(compile_cache_env) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out.update(JAX_PLATFORMS="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **compile_cache_env)
    return out


def run(env: dict[str, str], run_dir: Path, corpus: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, corpus, *extra), env=env, capture_output=True, text=True, timeout=600)


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def assert_identical(run_dir: Path, reference: Path) -> None:
    assert records(run_dir) == records(reference)  # every step once, same values
    assert_same_final_state(run_dir, reference, STEPS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, corpus, env) -> Path:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = run(env, run_dir, corpus)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in records(run_dir)] == list(range(1, STEPS + 1))
    resolved = (run_dir / "config.yaml").read_text()
    assert "vocab_size: 384" in resolved and "hidden_dim: 32" in resolved  # the resolved config
    return run_dir


def wait_for(predicate, process: subprocess.Popen, timeout: float = 300, poll: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point not reached"
        time.sleep(poll)


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1])["step"] if lines else 0


def saved(run_dir: Path, step: int) -> bool:
    return (run_dir / "checkpoints" / str(step) / "extras").is_dir()


def saving(run_dir: Path) -> bool:
    directory = run_dir / "checkpoints"
    return directory.is_dir() and any("tmp" in p.name for p in directory.iterdir())


def test_sigkill_at_step_boundaries_and_mid_save_then_resume_is_bit_exact(tmp_path, corpus, straight, env):
    run_dir = tmp_path / "run"
    kill_points = [lambda: last_step(run_dir) >= 7 and saved(run_dir, 5),
                   lambda: last_step(run_dir) >= 18 and saved(run_dir, 15),
                   lambda: last_step(run_dir) >= 21 and saving(run_dir)]
    for i, point in enumerate(kill_points):
        process = subprocess.Popen(command(run_dir, corpus), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        wait_for(point, process)
        process.send_signal(signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL
        if i:
            assert "resuming from" in stderr, stderr[-2000:]
        if i == 2:  # killed mid-save: the unfinished step directory is there, and not a checkpoint
            assert saving(run_dir)
    result = run(env, run_dir, corpus)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    assert_identical(run_dir, straight)


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_sigterm_saves_and_exits_0_then_resume_is_bit_exact(tmp_path, corpus, straight, env):
    run_dir = tmp_path / "run"
    for stop_at in (9, 23):
        process = subprocess.Popen(command(run_dir, corpus), env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
        wait_for(lambda: last_step(run_dir) >= stop_at, process)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-3000:]
        saved = Checkpointer(run_dir / "checkpoints").steps()[-1]
        assert f"SIGTERM received: saved step {saved}" in stderr
        assert saved >= stop_at  # the step it stopped at (or a policy save just after)
        assert last_step(run_dir) <= saved
    result = run(env, run_dir, corpus)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_identical(run_dir, straight)


def test_damaged_latest_checkpoint_is_skipped_and_a_changed_shape_refused(tmp_path, corpus, straight, env):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    assert Checkpointer(run_dir / "checkpoints").steps() == [35, 40]  # keep: the last 2
    for path in (run_dir / "checkpoints" / "40" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 1000:
            path.write_bytes(b"\0" * 7)  # torn array data
    result = run(env, run_dir, corpus)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is damaged" in result.stderr and "resuming from" in result.stderr
    assert "checkpoints/35" in result.stderr
    assert (run_dir / "checkpoints" / "40.unrestorable").is_dir()  # set aside, then step 40 saved anew
    assert_identical(run_dir, straight)

    result = run(env, run_dir, corpus, "--model.hidden_dim", "64")
    assert result.returncode == 2
    assert "model.hidden_dim: checkpoint has 32, this run has 64" in result.stderr


def test_resume_from_names_a_step_directory(tmp_path, corpus, straight, env):
    result = run(env, tmp_path / "fork", corpus, "--resume_from", str(straight / "checkpoints" / "35"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from" in result.stderr
    state, _ = final_state(tmp_path / "fork", STEPS)
    ref_state, _ = final_state(straight, STEPS)
    for leaf, ref in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))
    assert [r["step"] for r in records(tmp_path / "fork")] == list(range(36, STEPS + 1))


def test_wandb_offline_resumes_the_same_run_id(tmp_path):
    config = {"optimizer": {"type": "sophia_g"}}
    first = MetricsWriter(tmp_path, config=config, total_steps=4, wandb_mode="offline", name="tiny-a",
                          tags=["sophia", "tiny"], progress=False)
    first.log(1, {"train/loss": 3.0})
    run_id = first._wandb.id
    assert first._wandb.name == "tiny-a" and set(first._wandb.tags) == {"sophia", "tiny"}
    assert first._wandb.config["optimizer"] == {"type": "sophia_g"}  # the run config, logged once at init
    first.close()
    second = MetricsWriter(tmp_path, config=config, total_steps=4, start_step=1, wandb_mode="offline",
                           progress=False)
    second.log(2, {"train/loss": 2.5})
    assert second._wandb.id == run_id
    second.close()
    # Each session wrote its own offline directory, and both hold the one run's records (wandb names the
    # directories by start time, with a "-1" suffix for a second one within the same second, so the record
    # file's name is what is checked).
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all([p.name for p in r.glob("run-*.wandb")] == [f"run-{run_id}.wandb"] for r in runs)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# ------------------------------------------------- issue 17: resume_from, one writer, fresh restarts
def test_a_relaunch_continues_from_its_own_checkpoints_not_resume_from(tmp_path, corpus, straight, env):
    """`resume_from` applies only while the run directory has no checkpoint of its own: the relaunch after a
    preemption (the same command, `resume_from` included, as sophia-tpu relaunches it) continues from the
    run's newest step and sets nothing aside."""
    fork = tmp_path / "fork"
    again = command(fork, corpus, "--resume_from", str(straight / "checkpoints" / "35"))
    process = subprocess.Popen(again, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: last_step(fork) >= 37, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-3000:]
    own = Checkpointer(fork / "checkpoints").steps()
    assert own and own[-1] >= 37
    result = subprocess.run(again, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if own[-1] < STEPS:
        assert f"resuming from {fork / 'checkpoints'}/{own[-1]}" in result.stderr, result.stderr[-3000:]
    assert "applies only to a run directory without any" in result.stderr
    assert not [p.name for p in (fork / "checkpoints").iterdir() if "unrestorable" in p.name]
    assert records(fork) == records(straight)[35:]  # steps 36..40, once each, the same values
    assert_same_final_state(fork, straight, STEPS)


def test_a_second_run_into_a_run_directory_exits_2_naming_the_first(tmp_path, corpus, straight, env):
    """The same command started twice at once: the run that takes the lease first trains as if alone; the
    other watches the lease (renewed every 5 s), sees it renewed, and exits 2 naming the holder, having
    changed nothing. (Started together, so that neither can finish before the other reaches the lease, which
    each takes right after its imports.)"""
    run_dir = tmp_path / "run"
    runs = [subprocess.Popen(command(run_dir, corpus), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    try:
        stderrs = [process.communicate(timeout=600)[1] for process in runs]
    finally:
        for process in runs:
            process.kill()
            process.wait()
    assert sorted(process.returncode for process in runs) == [0, 2], [e[-2000:] for e in stderrs]
    winner, loser = (0, 1) if runs[0].returncode == 0 else (1, 0)
    [line] = [x for x in stderrs[loser].splitlines() if x.startswith("sophia-train:")]
    assert f"sophia-train: {run_dir} is in use by run " in line and f"pid {runs[winner].pid}, started " in line, line
    assert_identical(run_dir, straight)  # every step once, the winner's checkpoints
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if "unrestorable" in p.name]
    assert json.loads((run_dir / "lease.json").read_text())["released"]


def test_a_restart_that_finds_no_checkpoint_starts_metrics_afresh(tmp_path, corpus, straight, env):
    """Killed before its first checkpoint (step 5), a run starts again from step 0: metrics.jsonl must not
    keep the killed attempt's lines (steps 1, 2, 3, 1, 2, 3, 4, ...)."""
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(run_dir, corpus), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    wait_for(lambda: last_step(run_dir) >= 3, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert not (run_dir / "checkpoints").exists() or not Checkpointer(run_dir / "checkpoints").steps()
    result = run(env, run_dir, corpus)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_identical(run_dir, straight)
    assert "a fresh start: dropped the" in result.stderr


def test_wandb_is_rewound_to_the_step_a_run_resumes_from(tmp_path):
    """Resumed from its checkpoint at step 5 after logging 8 steps, a run logs 6..10 again. wandb ignores steps
    below its current one, so without a rewind its charts would keep the abandoned 6..8 while metrics.jsonl
    holds the new ones; a restart that found no checkpoint rewinds to 0. What a wandb server holds after
    syncing the offline files must equal metrics.jsonl."""
    from trainer.checkpoint import trim_metrics
    from wandb_files import served_history

    def session(start: int, stop: int, offset: float) -> None:
        writer = MetricsWriter(tmp_path, config={}, total_steps=10, start_step=start, wandb_mode="offline",
                               progress=False)
        for step in range(start + 1, stop + 1):
            writer.log(step, {"train/loss": offset + step})
        writer.close()

    session(0, 8, 0.0)
    trim_metrics(tmp_path / "metrics.jsonl", 5)  # what resume() does for the checkpoint at step 5
    session(5, 10, 100.0)
    logged = {json.loads(line)["step"]: json.loads(line)["train/loss"]
              for line in (tmp_path / "metrics.jsonl").read_text().splitlines()}
    assert logged == {**{s: float(s) for s in range(1, 6)}, **{s: 100.0 + s for s in range(6, 11)}}
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    assert served_history(files, "train/loss") == logged

    trim_metrics(tmp_path / "metrics.jsonl", 0)  # a restart that found no checkpoint
    session(0, 3, 200.0)
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert served_history(files, "train/loss") == {s: 200.0 + s for s in range(1, 4)}


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_a_run_stalled_past_its_lease_stops_once_another_run_took_it_over(tmp_path, corpus, env):
    """Paused (SIGSTOP) longer than checkpoint.lease_minutes, a run loses its run directory to the run that
    took the lease over; continued, it stops at its next decision step without saving (exit 2, one line)
    and leaves the new holder's lease alone."""
    from trainer.lease import Lease

    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(run_dir, corpus, "--checkpoint.lease_minutes", "0.05",
                                       "--checkpoint.decide_every", "1", "--trainer.num_train_steps", "400"),
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: last_step(run_dir) >= 3, process)
        os.kill(process.pid, signal.SIGSTOP)
        try:
            taker = Lease(run_dir, 3.0)
            taker.acquire()  # not renewed for 3 s: taken over
        finally:
            os.kill(process.pid, signal.SIGCONT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 2, stderr[-3000:]
    [line] = [x for x in stderr.splitlines() if x.startswith("sophia-train:")]
    assert f"without saving it: run {taker.owner['run']} (host " in line and "took over the lease of" in line
    assert last_step(run_dir) < 400
    lease = json.loads((run_dir / "lease.json").read_text())
    assert lease["owner"]["run"] == taker.owner["run"] and not lease["released"]
    taker.release()
