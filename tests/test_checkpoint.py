"""Checkpoint policy, cross-mesh restore, fallback past damaged checkpoints, resume checks, signals, plots."""

import json
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sophia_jax
from trainer import plot
from trainer.checkpoint import (
    CheckpointConfig, Checkpointer, CheckpointReadError, PreemptionGuard, check_resumable, read_extras, resume,
    trim_metrics)


def _train_state(mesh, spec):
    params = {"w": jnp.arange(64.0).reshape(8, 8), "b": jnp.ones(8)}
    opt = sophia_jax.sophia_g(1e-2, hessian_fn=lambda p, key: jax.tree.map(jnp.square, p), update_interval=1)
    opt_state = opt.init(params)
    _, opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt_state, params)  # h, key, count move
    state = {"params": params, "opt_state": opt_state, "step": jnp.array(1), "key": jax.random.PRNGKey(7)}
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, spec if a.ndim == 2 else P()), state)
    return jax.device_put(state, shardings)


def _abstract(state, mesh, spec):
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec if a.ndim == 2 else P())),
        state)


def test_round_trip_onto_a_different_mesh(tmp_path):
    saved_mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
    state = _train_state(saved_mesh, P("data", None))
    ckpt = Checkpointer(tmp_path, CheckpointConfig())
    ckpt.save(1, state, {"loader": {"step": 1, "seed": 0}})
    ckpt.wait()

    other_mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    restored, extras = Checkpointer(tmp_path).restore(1, _abstract(state, other_mesh, P("model", "data")))
    assert extras == {"loader": {"step": 1, "seed": 0}}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert a.dtype == b.dtype
    assert restored["params"]["w"].sharding.spec == P("model", "data")
    assert isinstance(restored["opt_state"][0], sophia_jax.SophiaState)
    assert read_extras(tmp_path / "1")["loader"]["step"] == 1


def test_policy_saves_by_steps_and_minutes_and_keeps_latest_plus_every_mth(tmp_path):
    now = [0.0]
    ckpt = Checkpointer(tmp_path, CheckpointConfig(every_steps=4, every_minutes=1.0, keep=2, keep_every=5,
                                                   async_save=False), clock=lambda: now[0])
    assert [s for s in range(1, 9) if ckpt.due_by_steps(s)] == [4, 8] and not ckpt.due_by_time()
    now[0] = 61.0
    assert ckpt.due_by_time()  # a minute passed since the last save
    for step in range(1, 13):
        ckpt.save(step, {"x": jnp.full(2, float(step))}, {})
    ckpt.wait()
    assert ckpt.steps() == [5, 10, 11, 12]
    assert not ckpt.due_by_time()  # the clock restarted at the last save


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    for step in (10, 20):
        ckpt.save(step, {"x": jnp.full(4, float(step))}, {"step": step})
    ckpt.wait()
    shutil.rmtree(tmp_path / "20" / "state" / "d")  # lose the array data of the newest checkpoint
    (tmp_path / "30.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save leaves only a temp dir
    abstract = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
    with caplog.at_level(logging.WARNING):
        step, state, extras = Checkpointer(tmp_path).restore_latest(abstract)
    assert (step, extras) == (10, {"step": 10})
    np.testing.assert_array_equal(state["x"], 10.0)
    assert any("is damaged" in r.message for r in caplog.records)


def _two_checkpoints(directory):
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False))
    for step in (10, 20):
        ckpt.save(step, {"x": jnp.full(4, float(step))}, {"config": {"seed": 0}, "loader": {"step": step}})
    ckpt.close()
    return {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}


def test_a_read_error_is_not_damage_it_stops_and_changes_nothing(tmp_path):
    """An I/O error says nothing about a checkpoint: falling back would roll the run back and set the
    newest (maybe good) checkpoint aside. Here the kernel itself fails the read: the newest extras file is
    a link to /proc/self/mem, whose first page is never mapped (EIO)."""
    directory = tmp_path / "checkpoints"
    abstract = _two_checkpoints(directory)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 21)))
    extras = directory / "20" / "extras" / "metadata"
    extras.unlink()
    os.symlink("/proc/self/mem", extras)
    with pytest.raises(CheckpointReadError, match=r"checkpoints/20 \(OSError: .*Input/output error.*nothing was changed"):
        Checkpointer(directory).restore_latest(abstract)
    with pytest.raises(CheckpointReadError, match="nothing was changed"):
        resume(Checkpointer(directory), abstract, {"seed": 0}, ["seed"], metrics_path=metrics)
    assert sorted(p.name for p in directory.iterdir()) == ["10", "20"]  # nothing set aside
    assert Checkpointer(directory).steps() == [10, 20]
    assert len(metrics.read_text().splitlines()) == 20  # nor trimmed


def test_resume_skips_a_truncated_checkpoint_sets_it_aside_and_trims_the_metrics(tmp_path):
    directory = tmp_path / "checkpoints"
    abstract = _two_checkpoints(directory)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 21)))
    for path in (directory / "20" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 100:
            path.write_bytes(path.read_bytes()[:7])  # truncated array data
    resumed = resume(Checkpointer(directory), abstract, {"seed": 0}, ["seed"], metrics_path=metrics)
    assert resumed.step == 10 and resumed.extras["loader"] == {"step": 10}
    np.testing.assert_array_equal(resumed.state["x"], 10.0)
    assert sorted(p.name for p in directory.iterdir()) == ["10", "20.unrestorable"]
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == list(range(1, 11))
    with pytest.raises(ValueError, match="seed: checkpoint has 0, this run has 1"):
        resume(Checkpointer(directory), abstract, {"seed": 1}, ["seed"])


def test_damage_is_told_from_storage_errors():
    from trainer.checkpoint import is_damage

    assert is_damage(ValueError('OUT_OF_RANGE: Error reading "x/0": Requested byte range [0, 10) is not valid'))
    assert is_damage(ValueError("DATA_LOSS: Error decoding manifest"))
    assert is_damage(FileNotFoundError("extras/metadata"))
    assert is_damage(json.JSONDecodeError("Expecting value", "", 0))
    assert not is_damage(OSError(5, "Input/output error"))
    assert not is_damage(PermissionError(13, "Permission denied"))
    assert not is_damage(ValueError("UNAVAILABLE: Error reading gs://bucket/run/checkpoints/20: connection refused"))
    assert not is_damage(ValueError("DEADLINE_EXCEEDED: timed out"))
    assert not is_damage(RuntimeError("something nobody anticipated"))  # when in doubt, stop


def test_restore_latest_on_an_empty_directory_is_none(tmp_path):
    assert Checkpointer(tmp_path).restore_latest({"x": jax.ShapeDtypeStruct((1,), jnp.float32)}) is None


def test_check_resumable_names_the_changed_field():
    saved = {"model": {"num_layers": 4, "d_model": 128}, "optimizer": {"type": "sophia_g", "learning_rate": 1e-3}}
    current = {"model": {"num_layers": 6, "d_model": 128}, "optimizer": {"type": "sophia_g", "learning_rate": 5e-4}}
    check_resumable(saved, current, ["optimizer.type"])  # the learning rate may change
    with pytest.raises(ValueError, match=r"model: checkpoint has .*'num_layers': 4.*this run has .*'num_layers': 6"):
        check_resumable(saved, current, ["model", "optimizer.type"])



def test_a_field_older_checkpoints_lack_is_compared_as_the_value_they_had():
    older = {"model": {"num_layers": 4}}  # written before model.arch existed: a GPT-NeoX
    fields = {"model.num_layers": None, "model.arch": "neox"}
    check_resumable(older, {"model": {"num_layers": 4, "arch": "neox"}}, fields)
    with pytest.raises(ValueError, match=r"model.arch: checkpoint has 'neox', this run has 'gpt2'"):
        check_resumable(older, {"model": {"num_layers": 4, "arch": "gpt2"}}, fields)
    with pytest.raises(ValueError, match=r"model.num_layers: checkpoint has None, this run has 4"):
        check_resumable({"model": {}}, {"model": {"num_layers": 4, "arch": "neox"}}, fields)

def test_trim_metrics_drops_steps_after_the_checkpoint_and_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 8)) + '{"step": 8, "tr')
    assert trim_metrics(path, 5) == 3
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_preemption_guard_turns_sigterm_into_a_flag_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.should_stop(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.should_stop(1) and guard.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before


def test_plot_draws_each_run_s_curves(tmp_path):
    runs = []
    for name, scale in (("sophia", 1.0), ("adamw", 2.0)):
        run = tmp_path / name
        run.mkdir()
        lines = [{"step": s, "train/loss": scale / s, "optim/win_rate": 0.1 * s} for s in range(1, 6)]
        lines.append({"step": 5, "eval/loss": scale})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        runs.append(run)
    out = tmp_path / "curves.png"
    fig = plot.plot_runs(runs, out)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:4] == b"\x89PNG"
    loss_ax, eval_ax, win_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["sophia", "adamw"]
    np.testing.assert_allclose(loss_ax.lines[1].get_ydata(), [2.0 / s for s in range(1, 6)])
    np.testing.assert_allclose(eval_ax.lines[0].get_ydata(), [1.0])
    np.testing.assert_allclose(win_ax.lines[0].get_xdata(), [1, 2, 3, 4, 5])
    assert plot.main([str(r) for r in runs] + ["--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").exists()
