"""The train step (trainer/train.py): sharded == unsharded, gradient accumulation, the Hessian schedule,
a short Sophia-G run, restore onto another mesh, config errors."""

import dataclasses

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sophia_jax
from trainer.checkpoint import CheckpointConfig, Checkpointer
from trainer.config import OptimizerConfig, TrainConfig, TrainerConfig, load_config
from trainer.data import DataConfig
from trainer.model import ModelConfig, loss_fn
from trainer.sharding import MeshConfig, make_mesh
from trainer.train import Trainer, main, setup, run_loop

# heads 4, mlp 128 and vocab 256 divide a model axis of 2; a batch of 16 divides data*fsdp up to 8.
MODEL = ModelConfig(vocab_size=250, seq_len=16, hidden_dim=32, num_layers=2, num_heads=4, compute_dtype="float32")
OPT = OptimizerConfig(type="sophia_g", learning_rate=3e-3, warmup=0, update_interval=2, hessian_batch_fraction=0.5)
CONFIG = TrainConfig(model=MODEL, optimizer=OPT, trainer=TrainerConfig(num_train_steps=4, global_batch=16))


def trainer_on(config: TrainConfig, mesh: tuple[int, int, int]) -> Trainer:
    data, fsdp, model = mesh
    devices = jax.devices()[: data * fsdp * model]
    return Trainer(config, make_mesh(MeshConfig(data=data, fsdp=fsdp, model=model), devices))


def batches(n: int, batch: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, MODEL.vocab_size, (batch, MODEL.seq_len + 1), dtype=np.int32) for _ in range(n)]


def run_steps(trainer: Trainer, steps: int, state=None):
    """`steps` train steps (with a Hessian step after every k-th), returning the state and per-step losses."""
    state = trainer.init_state() if state is None else state
    train, hess = batches(steps), batches(steps, batch=trainer.hessian_batch, seed=1)
    losses = []
    for i in range(steps):
        state, metrics = trainer.train_step(state, jax.device_put(train[i], trainer.batch_sharding))
        if trainer.hessian_due(i + 1):
            state, _ = trainer.hessian_step(state, jax.device_put(hess[i], trainer.batch_sharding))
        losses.append(float(metrics["train/loss"]))
    return state, losses


def sophia_state(opt_state) -> sophia_jax.SophiaState:
    is_sophia = lambda x: isinstance(x, sophia_jax.SophiaState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_sophia) if is_sophia(x))


def without_key_bias(model):
    """(model with the key part of the qkv bias zeroed, that part as an array)."""
    bias = model.layers.stacked.attn.qkv.bias
    k = np.asarray(bias["qkv", 1].array)
    zeroed = bias.at["qkv", 1].set(0.0)
    return eqx.tree_at(lambda m: m.layers.stacked.attn.qkv.bias, model, zeroed), k


def assert_params_close(params, ref_params, steps: int) -> None:
    """Params after `steps` Sophia steps computed with float32 sums in another order (another layout).

    The key bias has an exactly zero gradient (softmax ignores a score shift shared by all keys), so its
    m and h are round-off and Sophia's clipped step on it is sign(round-off): it may differ by up to
    2 lr per step, without changing the model's output. Compared apart. Elsewhere the step m / (rho h)
    divides by squares of single sampled gradients, which amplifies round-off where h is small:
    atol = 3% of one step (lr).
    """
    (params, k_bias), (ref_params, ref_k_bias) = without_key_bias(params), without_key_bias(ref_params)
    assert np.abs(k_bias - ref_k_bias).max() <= 2 * steps * OPT.learning_rate
    for a, b in zip(leaves(params), leaves(ref_params)):
        np.testing.assert_allclose(a, b, atol=0.03 * OPT.learning_rate, rtol=1e-4)


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def reference():
    """4 steps (2 Hessian refreshes) on one device."""
    return run_steps(trainer_on(CONFIG, (1, 1, 1)), 4)


def test_microbatched_hessian_step_sharded_equals_one_device():
    """optimizer.hessian_microbatches=2: the scanned GNB estimate on a (2,2,2) mesh, with its FSDP-sharded
    accumulator, folds the same h into the state as on one device."""
    config = dataclasses.replace(CONFIG, optimizer=dataclasses.replace(OPT, hessian_microbatches=2))
    hs = []
    for mesh in [(1, 1, 1), (2, 2, 2)]:
        trainer = trainer_on(config, mesh)
        batch = jax.device_put(batches(1, batch=trainer.hessian_batch, seed=5)[0], trainer.batch_sharding)
        state, metrics = trainer.hessian_step(trainer.init_state(), batch)
        assert int(metrics["optim/hessian_updates"]) == 1
        hs.append(without_key_bias(sophia_state(state.opt_state).h)[0])
    for a, b in zip(leaves(hs[1]), leaves(hs[0])):
        assert np.any(a != 0)
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_steps_equal_one_device(reference, mesh):
    """Same losses, params, m and h as one device after 4 steps incl. 2 Hessian steps (k = 2)."""
    ref_state, ref_losses = reference
    trainer = trainer_on(CONFIG, mesh)
    state, losses = run_steps(trainer, 4)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert_params_close(state.params, ref_state.params, steps=4)
    sophia, ref_sophia = sophia_state(state.opt_state), sophia_state(ref_state.opt_state)
    assert int(sophia.hessian_updates) == 2
    for a, b in zip(leaves(without_key_bias(sophia.mu)[0]), leaves(without_key_bias(ref_sophia.mu)[0])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    for a, b in zip(leaves(without_key_bias(sophia.h)[0]), leaves(without_key_bias(ref_sophia.h)[0])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)
    # The state keeps its layout: params, m and h stay sharded as the parameter mapping says.
    # (The sharding tree is a prefix of the state: it has a leaf where the state has an empty None node.)
    moved = []

    def check(sharding, x):
        x = x.array if isinstance(x, hax.NamedArray) else x
        if x is not None and not x.sharding.is_equivalent_to(sharding, x.ndim):
            moved.append((x.shape, x.sharding.spec, sharding.spec))

    jax.tree.map(check, trainer.state_shardings, state)
    assert not moved
    if mesh[1] > 1:  # FSDP: the embedding's `embed` dim (and so m, h) is split over fsdp
        assert state.params.embed.weight.array.sharding.spec != jax.sharding.PartitionSpec()


def test_gradient_accumulation_equals_one_big_batch():
    """4 microbatches (lax.scan) give the gradient and loss of the whole batch at once (plain jax.grad)."""
    config = dataclasses.replace(CONFIG, trainer=dataclasses.replace(CONFIG.trainer, microbatches=4))
    trainer = trainer_on(config, (2, 2, 1))
    state = trainer.init_state()
    batch = batches(1)[0]
    with trainer._context():
        loss, grads = jax.jit(trainer._loss_and_grads)(state.params, jax.device_put(batch, trainer.batch_sharding))
    params = jax.device_get(state.params)
    ref_loss, ref_grads = jax.value_and_grad(loss_fn)(params, jnp.asarray(batch))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for a, b in zip(leaves(grads), leaves(ref_grads)):  # float32 sums in another order: 2e-6 of the scale
        np.testing.assert_allclose(a, b, atol=2e-6 * np.abs(b).max(), rtol=1e-4)
    # And a whole train step matches the one-microbatch step.
    one = trainer_on(CONFIG, (2, 2, 1))
    s4, m4 = trainer.train_step(trainer.init_state(), jax.device_put(batch, trainer.batch_sharding))
    s1, m1 = one.train_step(one.init_state(), jax.device_put(batch, one.batch_sharding))
    np.testing.assert_allclose(m4["optim/grad_norm"], m1["optim/grad_norm"], rtol=1e-5)
    for a, b in zip(leaves(s4.opt_state), leaves(s1.opt_state)):
        np.testing.assert_allclose(a, b, atol=2e-6 * np.abs(b).max(), rtol=1e-4)


def test_non_finite_gradient_skips_the_step_and_keeps_state_clean():
    trainer = trainer_on(CONFIG, (1, 1, 1))
    state, _ = run_steps(trainer, 2)
    before = leaves((state.params, state.opt_state))
    poisoned = jax.tree.map(lambda x: x, state)
    poisoned = poisoned._replace(params=dataclasses.replace(
        poisoned.params, ln_f=dataclasses.replace(poisoned.params.ln_f,
                                                  bias=poisoned.params.ln_f.bias * jnp.nan)))
    # A NaN parameter makes every gradient NaN: the step must keep the old params (incl. the NaN) and m, h.
    after, metrics = trainer.train_step(poisoned, jax.device_put(batches(1)[0], trainer.batch_sharding))
    assert int(metrics["optim/skipped_steps"]) == 1 and int(after.step) == 3
    for a, b in zip(leaves(after.opt_state), before[len(leaves(state.params)):]):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus"))


def tiny_run(tmp_path, corpus_dir, **optimizer) -> TrainConfig:
    return TrainConfig(
        model=dataclasses.replace(MODEL, vocab_size=None, seq_len=32, hidden_dim=64),
        optimizer=dataclasses.replace(OPT, learning_rate=3e-3, warmup=3, update_interval=10, **optimizer),
        trainer=TrainerConfig(num_train_steps=40, global_batch=16, log_every=1, eval_every=40, eval_batches=2,
                              progress=False),
        data=DataConfig(embedded_vocab_size=512, embedded_max_bytes=400_000, embedded_dir=corpus_dir, prefetch=1),
        checkpoint=CheckpointConfig(every_steps=None, every_minutes=None),
        run_dir=str(tmp_path / "run"),
    )


@pytest.mark.parametrize("mode", ["separate", "cond"])
def test_short_sophia_run_learns_and_refreshes_h_exactly_on_steps_k_2k(tmp_path, corpus_dir, mode):
    config = tiny_run(tmp_path, corpus_dir, hessian_mode=mode)
    run = setup(config)
    calls = []
    if mode == "separate":
        original = run.trainer.hessian_step
        run.trainer.hessian_step = lambda state, batch: (calls.append(int(state.step)), original(state, batch))[1]
    run_loop(run)
    records = [eval(line.replace("null", "None")) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 41))
    if mode == "separate":
        assert calls == [10, 20, 30, 40]  # after the train steps k, 2k, ... (the official loop's order)
    # h_t changes exactly when it is refreshed: after steps 10, 20, 30, 40 and at no other step.
    assert [r["optim/hessian_updates"] for r in records] == [s // 10 for s in range(1, 41)]
    norms = [r["optim/hessian_norm"] for r in records]
    changed = [s for s in range(2, 41) if norms[s - 1] != norms[s - 2]]
    assert changed == [10, 20, 30, 40] and norms[0] == 0.0
    losses = [r["train/loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert all(0 < r["optim/win_rate"] <= 1 for r in records[10:])  # once h is set, not all clipped
    assert records[-1]["eval/loss"] < losses[0]


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_baselines_run_through_the_same_config(tmp_path, corpus_dir, optimizer):
    config = tiny_run(tmp_path, corpus_dir)
    config = dataclasses.replace(config, optimizer=dataclasses.replace(
        config.optimizer, type=optimizer, learning_rate=3e-3 if optimizer == "adamw" else 3e-4),
        trainer=dataclasses.replace(config.trainer, num_train_steps=20))
    record = run_loop(setup(config))
    assert "optim/win_rate" not in record
    assert record["eval/loss"] < 6.0  # from ln(512) = 6.24 at init


def test_restore_onto_another_mesh_gives_the_same_params_and_continues(tmp_path):
    saved_on = trainer_on(CONFIG, (8, 1, 1))
    state, _ = run_steps(saved_on, 2)
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    checkpointer.save(2, state, {"note": "x"})
    checkpointer.close()
    restored_on = trainer_on(CONFIG, (2, 2, 2))
    step, restored, extras = Checkpointer(tmp_path).restore_latest(restored_on.abstract_state())
    assert step == 2 and extras == {"note": "x"}
    for a, b in zip(leaves(restored), leaves(state)):
        np.testing.assert_array_equal(a, b)  # resharding moves values; it does not change them
    up, restored_up = state.params.layers.stacked.mlp.up.weight.array, restored.params.layers.stacked.mlp.up.weight.array
    assert restored_up.sharding.shard_shape(up.shape) == (2, 64, 16) != up.sharding.shard_shape(up.shape)
    batch = batches(3)[2]
    a, ma = saved_on.train_step(state, jax.device_put(batch, saved_on.batch_sharding))
    b, mb = restored_on.train_step(restored, jax.device_put(batch, restored_on.batch_sharding))
    np.testing.assert_allclose(ma["train/loss"], mb["train/loss"], rtol=1e-6)
    assert_params_close(b.params, a.params, steps=1)


# ------------------------------------------------------------------------------------------ bad input
def test_unknown_config_key_is_named():
    with pytest.raises(ValueError, match=r"unknown config key\(s\): optimizer\.rhoo.*Valid keys under optimizer"):
        load_config(["--optimizer.rhoo", "0.05"])
    with pytest.raises(ValueError, match="unknown config key.*: modle"):
        load_config(["--modle.hidden_dim", "8"])
    config, name = load_config(["--optimizer.rho", "0.07", "--mesh.fsdp=2", "--seed", "3"])
    assert (config.optimizer.rho, config.mesh.fsdp, config.seed, name) == (0.07, 2, 3, "neox_tiny")


def test_mesh_that_does_not_divide_the_devices():
    with pytest.raises(ValueError, match=r"mesh data\*fsdp\*model = 3 \(without the -1\) does not divide 8"):
        MeshConfig(data=3).sizes(8)
    with pytest.raises(ValueError, match="= 2\\*2\\*1 = 4 but there are 8 devices"):
        MeshConfig(data=2, fsdp=2, model=1).sizes(8)


def test_batch_not_divisible_by_the_data_axis():
    config = dataclasses.replace(CONFIG, trainer=dataclasses.replace(CONFIG.trainer, global_batch=12))
    with pytest.raises(ValueError, match="microbatch of 12 sequences .* not divisible by the 8 data-parallel devices"):
        trainer_on(config, (8, 1, 1))


def test_cli_reports_config_errors_and_exits_2(capsys):
    assert main(["--optimizer.type", "sgd"]) == 2
    assert "optimizer.type='sgd'; use one of sophia_g, adamw, lion" in capsys.readouterr().err
    assert main(["--mesh.data", "3"]) == 2
    assert "does not divide 8 devices" in capsys.readouterr().err
