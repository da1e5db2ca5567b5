"""Sophia-G inside the trainer (trainer/steps.py): the chunked estimator against the model's whole logits,
the estimator's statistics in hessian_mode 'cond', and the diagnostics computed on logged steps only."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sophia_jax
from trainer.config import TrainConfig, TrainerConfig
from trainer.models import ModelConfig, logits_fn
from trainer.optim import SophiaGConfig
from trainer.sharding import MeshConfig, make_mesh
from trainer.steps import Batch, Trainer

MODEL = ModelConfig(vocab_size=250, seq_len=16, hidden_dim=32, num_layers=2, num_heads=4, compute_dtype="float32")
OPT = SophiaGConfig(learning_rate=3e-3, warmup=0, update_interval=2, hessian_batch_fraction=0.5)


def make_trainer(model=MODEL, log_every=10, mesh=(1, 1, 1), **optimizer) -> Trainer:
    config = TrainConfig(model=model, optimizer=dataclasses.replace(OPT, **optimizer),
                         trainer=TrainerConfig(num_train_steps=20, global_batch=8, log_every=log_every))
    data, fsdp, tp = mesh
    return Trainer(config, make_mesh(MeshConfig(data=data, fsdp=fsdp, model=tp), jax.devices()[: data * fsdp * tp]))


def tokens(trainer: Trainer, rows: int, seed: int) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jax.device_put(rng.integers(0, MODEL.vocab_size, (rows, MODEL.seq_len + 1), dtype=np.int32),
                          trainer.batch_sharding)


def sophia(opt_state) -> sophia_jax.SophiaState:
    is_sophia = lambda x: isinstance(x, sophia_jax.SophiaState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_sophia) if is_sophia(x))


@pytest.mark.parametrize("loss_chunk, mesh", [pytest.param(5, (1, 1, 1), marks=pytest.mark.slow), (16, (1, 1, 1)),
                                             (5, (2, 2, 2))])
def test_the_chunked_hessian_step_equals_the_estimator_on_the_models_whole_logits(loss_chunk, mesh):
    """The trainer's estimator builds the logits model.loss_chunk positions at a time (16 = 3 chunks of 5 and
    one of 1); on the same key it samples the labels of, and folds in the h of, the GNB estimator over the
    model's whole [batch, position, vocab] logits (trainer.models.logits_fn), also sharded over 8 devices."""
    trainer = make_trainer(dataclasses.replace(MODEL, loss_chunk=loss_chunk), mesh=mesh)
    state, batch = trainer.init_state(), tokens(trainer, trainer.hessian_batch, seed=3)
    whole = sophia_jax.gauss_newton_bartlett(lambda model, tokens: logits_fn(model, tokens), max_grad_norm=1.0)
    key = jax.random.fold_in(state.key, state.step)
    want, stats = jax.jit(whole.with_stats)(jax.device_get(state.params), key, tokens=jax.device_get(batch))
    with trainer._context():
        after, metrics = trainer._hessian_jit(state, batch)  # donates state
    got = sophia(after.opt_state).h
    assert float(metrics["optim/hessian_grad_norm"]) == pytest.approx(float(stats["grad_norm"]), rel=1e-4)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        b = (1 - OPT.b2) * np.asarray(b)  # h = 0 before: the first fold is (1 - b2) h_hat
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max() + 1e-12, rtol=1e-3)
    assert max(float(np.abs(a).max()) for a in jax.tree.leaves(got)) > 0


def test_cond_mode_reports_the_estimators_gradient_norm_and_clip_on_refresh_steps():
    """hessian_mode 'cond': the estimator runs inside the update on the pre-update params with the key the
    SophiaState splits; its sampled-label gradient norm and clip flag come out on refresh steps only, equal
    to the estimator run on its own."""
    trainer = make_trainer(log_every=1, hessian_mode="cond")
    state = trainer.init_state()
    seen = []
    for step in range(1, 5):
        batch = Batch(tokens(trainer, 8, seed=step), tokens(trainer, trainer.hessian_batch, seed=10 + step))
        if trainer.hessian_due(step):  # before the step, which donates the state
            _, subkey = jax.random.split(sophia(state.opt_state).key)
            with trainer._context():
                _, stats = jax.jit(trainer.estimator.with_stats)(state.params, subkey, tokens=batch.hessian_tokens)
        state, metrics = trainer.step(state, batch, step)
        seen.append("optim/hessian_grad_norm" in metrics)
        if trainer.hessian_due(step):
            assert float(metrics["optim/hessian_grad_norm"]) == pytest.approx(float(stats["grad_norm"]), rel=1e-4)
            assert float(metrics["optim/hessian_grad_clipped"]) == float(stats["clipped"])
    assert seen == [False, True, False, True]


def test_diagnostics_on_logged_steps_only_and_the_win_rate_is_the_applied_clipping():
    """Every step reports the refresh counters; the diagnostics that read m and h (win rates, norms) come
    on the steps the loop logs (multiples of log_every, and the last), computed after the step's Hessian
    refresh; the win rate is still the clipping the step's update applied (the h before the refresh)."""
    trainer = make_trainer(log_every=4)
    state = trainer.init_state()
    for step in range(1, 5):
        batch = Batch(tokens(trainer, 8, seed=step), tokens(trainer, trainer.hessian_batch, seed=10 + step))
        if step == 4:  # the train step alone, from a copy of the state: the update's own clipping
            with trainer._context():
                copy = jax.tree.map(jnp.copy, state)
                only_update, _ = trainer._train_jit(copy, batch._replace(hessian_tokens=None))
            applied = sophia_jax.metrics(only_update.opt_state)["win_rate"]
        state, metrics = trainer.step(state, batch, step)
        assert int(metrics["optim/hessian_updates"]) == step // 2
        assert ("optim/win_rate" in metrics) == (step == 4) == ("optim/hessian_norm" in metrics)
    assert 0 < float(applied) < 1
    assert float(metrics["optim/win_rate"]) == pytest.approx(float(applied), abs=1e-6)
    assert float(metrics["optim/hessian_norm"]) == pytest.approx(float(sophia_jax.metrics(state.opt_state)[
        "hessian_norm"]), rel=1e-6)  # the h after the refresh
    assert [trainer.log_due(s) for s in (1, 4, 8, 19, 20)] == [False, True, True, False, True]


def test_the_hessian_step_builds_the_logits_a_chunk_at_a_time():
    """XLA's memory analysis of the compiled Hessian step (one device, 8 x 128 positions, vocabulary 16384:
    float32 logits of 64 MiB): with model.loss_chunk 16 the estimator keeps one chunk's logits at a time
    (measured 60 MiB of temporaries, 203 MiB unchunked; 263 MiB either way when the estimator ignored it)."""
    model = dataclasses.replace(MODEL, vocab_size=16384, seq_len=128)
    temps = {}
    for chunk in (0, 16):
        trainer = make_trainer(dataclasses.replace(model, loss_chunk=chunk), hessian_batch_fraction=1.0)
        temps[chunk] = trainer.lower("hessian").compile().memory_analysis().temp_size_in_bytes / 2**20
    print(f"Hessian step temporaries (MiB) by loss_chunk: {temps}")
    logits_mib = 8 * 128 * 16384 * 4 / 2**20
    assert temps[0] > 2 * logits_mib and temps[16] < logits_mib, temps
