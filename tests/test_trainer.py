"""The train step (trainer/train.py): sharded == unsharded, gradient accumulation, the Hessian schedule,
a short Sophia-G run, restore onto another mesh, config errors."""

import dataclasses
import json
import re
from pathlib import Path

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sophia_jax
from trainer.checkpoint import CheckpointConfig, Checkpointer
from trainer.config import TrainConfig, TrainerConfig, load_config
from trainer.data.config import DataConfig
from trainer.data.corpus import EmbeddedCorpus
from trainer.models import ModelConfig, loss_fn
from trainer.optim import OPTIMIZERS, SophiaGConfig
from trainer.sharding import MeshConfig, make_mesh
from trainer.steps import Batch, Trainer
from trainer.train import main, run_loop, setup

# heads 4, mlp 128 and vocab 256 divide a model axis of 2; a batch of 16 divides data*fsdp up to 8.
MODEL = ModelConfig(vocab_size=250, seq_len=16, hidden_dim=32, num_layers=2, num_heads=4, compute_dtype="float32")
OPT = SophiaGConfig(learning_rate=3e-3, warmup=0, update_interval=2, hessian_batch_fraction=0.5)
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
        state, metrics = trainer.step(state, batch_on(trainer, train[i], hess[i]), i + 1)
        losses.append(float(metrics["train/loss"]))
    return state, losses


def batch_on(trainer: Trainer, tokens: np.ndarray, hessian_tokens: np.ndarray | None = None) -> Batch:
    put = lambda x: None if x is None else jax.device_put(x, trainer.batch_sharding)  # noqa: E731
    return Batch(put(tokens), put(hessian_tokens))


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


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_microbatched_hessian_step_sharded_equals_one_device():
    """optimizer.hessian_microbatches=2: the scanned GNB estimate on a (2,2,2) mesh, with its FSDP-sharded
    accumulator, folds the same h into the state as on one device."""
    config = dataclasses.replace(CONFIG, optimizer=dataclasses.replace(OPT, hessian_microbatches=2))
    hs = []
    for mesh in [(1, 1, 1), (2, 2, 2)]:
        trainer = trainer_on(config, mesh)
        batch = jax.device_put(batches(1, batch=trainer.hessian_batch, seed=5)[0], trainer.batch_sharding)
        with trainer._context():
            state, metrics = trainer._hessian_jit(trainer.init_state(), batch)
        assert int(metrics["optim/hessian_updates"]) == 1
        hs.append(without_key_bias(sophia_state(state.opt_state).h)[0])
    for a, b in zip(leaves(hs[1]), leaves(hs[0])):
        assert np.any(a != 0)
        np.testing.assert_allclose(a, b, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("mesh", [pytest.param((8, 1, 1), marks=pytest.mark.slow),
                                  pytest.param((2, 4, 1), marks=pytest.mark.slow), (2, 2, 2)])
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


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
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
    s4, m4 = trainer.step(trainer.init_state(), batch_on(trainer, batch), 1)
    s1, m1 = one.step(one.init_state(), batch_on(one, batch), 1)
    np.testing.assert_allclose(m4["optim/grad_norm"], m1["optim/grad_norm"], rtol=1e-5)
    for a, b in zip(leaves(s4.opt_state), leaves(s1.opt_state)):
        np.testing.assert_allclose(a, b, atol=2e-6 * np.abs(b).max(), rtol=1e-4)


def poison(params):
    """params with the final LayerNorm's bias NaN (every gradient becomes NaN), and that bias unpoisoned."""
    bias = params.ln_f.bias
    return eqx.tree_at(lambda m: m.ln_f.bias, params, bias * jnp.nan), jax.tree.map(jnp.copy, bias)


def counts(opt_state) -> dict[str, int]:
    """Every step counter inside the optimizer state (the schedule's, Sophia's / Adam's), by path."""
    return {jax.tree_util.keystr(path): int(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
            if jax.tree_util.keystr(path).endswith(".count")}


def test_non_finite_gradient_drops_the_update_and_keeps_params_and_moments():
    trainer = trainer_on(CONFIG, (1, 1, 1))
    state, _ = run_steps(trainer, 2)
    params, clean_bias = poison(state.params)
    before = sophia_state(state.opt_state)
    mu, h = leaves(before.mu), leaves(before.h)
    # A NaN parameter makes every gradient NaN: the step keeps the old params (incl. the NaN) and m, h.
    after, metrics = trainer.step(state._replace(params=params), batch_on(trainer, batches(1)[0]), 3)
    assert int(metrics["optim/skipped_steps"]) == 1 and int(after.step) == 3
    assert np.isnan(np.asarray(after.params.ln_f.bias.array)).all()
    for a, b in zip(leaves(sophia_state(after.opt_state).mu) + leaves(sophia_state(after.opt_state).h), mu + h):
        np.testing.assert_array_equal(a, b)
    assert set(counts(after.opt_state).values()) == {3}


@pytest.mark.parametrize("mode", ["separate", pytest.param("cond", marks=pytest.mark.slow)])
def test_a_skipped_step_keeps_every_counter_on_the_step_and_logs_the_applied_lr(mode):
    """After a skipped step the schedule, Sophia's k-cadence and the loop agree: the logged lr is the one
    the next steps apply, and h is refreshed on steps k, 2k (not one step late)."""
    config = dataclasses.replace(CONFIG, optimizer=dataclasses.replace(OPT, warmup=8, update_interval=5,
                                                                      hessian_mode=mode))
    trainer = trainer_on(config, (1, 1, 1))
    train, hess = batches(10), batches(10, batch=trainer.hessian_batch, seed=1)
    state, updates = trainer.init_state(), []
    for step in range(1, 11):
        if step == 3:
            params, clean_bias = poison(state.params)
            state = state._replace(params=params)
        bias = np.asarray(state.params.ln_f.bias.array)
        state, metrics = trainer.step(state, batch_on(trainer, train[step - 1], hess[step - 1]), step)
        if step == 3:
            state = state._replace(params=eqx.tree_at(lambda m: m.ln_f.bias, state.params, clean_bias))
        updates.append(int(metrics["optim/hessian_updates"]))
        if step < 5 and step != 3:
            # h = 0 before the first refresh, so an unclipped coordinate does not exist: a bias (not decayed)
            # moves by exactly the learning rate applied.
            moved = np.abs(np.asarray(state.params.ln_f.bias.array) - bias)
            np.testing.assert_allclose(moved, float(metrics["lr"]), rtol=1e-4)
            assert float(metrics["lr"]) == pytest.approx(float(trainer.schedule(step - 1)))
    assert int(metrics["optim/skipped_steps"]) == 1
    assert updates == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2]  # refreshed on steps 5 and 10
    assert int(state.step) == 10 and set(counts(state.opt_state).values()) == {10}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("corpus"))


def tiny_run(tmp_path, corpus_dir, **optimizer) -> TrainConfig:
    return TrainConfig(
        model=dataclasses.replace(MODEL, vocab_size=None, seq_len=32, hidden_dim=64),
        optimizer=dataclasses.replace(OPT, learning_rate=3e-3, warmup=3, update_interval=10, **optimizer),
        trainer=TrainerConfig(num_train_steps=40, global_batch=16, log_every=1, eval_every=40, eval_batches=2,
                              progress=False),
        data=DataConfig(embedded=EmbeddedCorpus(vocab_size=512, max_bytes=400_000), embedded_dir=corpus_dir,
                        prefetch=1),
        checkpoint=CheckpointConfig(every_steps=None, every_minutes=None),
        run_dir=str(tmp_path / "run"),
    )


@pytest.mark.parametrize("mode", ["separate", pytest.param("cond", marks=pytest.mark.slow)])
def test_short_sophia_run_learns_and_refreshes_h_exactly_on_steps_k_2k(tmp_path, corpus_dir, mode):
    config = tiny_run(tmp_path, corpus_dir, hessian_mode=mode)
    run_loop(setup(config))
    records = [eval(line.replace("null", "None")) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 41))
    # h_t changes exactly when it is refreshed: after steps 10, 20, 30, 40 and at no other step.
    assert [r["optim/hessian_updates"] for r in records] == [s // 10 for s in range(1, 41)]
    norms = [r["optim/hessian_norm"] for r in records]
    changed = [s for s in range(2, 41) if norms[s - 1] != norms[s - 2]]
    assert changed == [10, 20, 30, 40] and norms[0] == 0.0
    losses = [r["train/loss"] for r in records]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    assert all(0 < r["optim/win_rate"] <= 1 for r in records[10:])  # once h is set, not all clipped
    groups = {key for key in records[-1] if key.startswith("optim/win_rate/")}
    assert groups == {f"optim/win_rate/{g}" for g in ("embedding", "attention", "mlp", "norm", "head")}
    if mode == "separate":  # the estimator's own numbers, on the refresh steps
        refreshes = [r for r in records if "optim/hessian_grad_norm" in r]
        assert [r["step"] for r in refreshes] == [10, 20, 30, 40]
        assert all(r["optim/hessian_grad_norm"] > 0 and r["optim/hessian_grad_clipped"] in (0, 1) for r in refreshes)
    assert records[-1]["eval/loss"] < losses[0]


@pytest.mark.parametrize("optimizer", ["adamw", "lion"])
def test_baselines_run_through_the_same_config(tmp_path, corpus_dir, optimizer):
    config = tiny_run(tmp_path, corpus_dir)
    config = dataclasses.replace(config, optimizer=OPTIMIZERS[optimizer](
        learning_rate=3e-3 if optimizer == "adamw" else 3e-4, weight_decay=0.2, warmup=3),
        trainer=dataclasses.replace(config.trainer, num_train_steps=20))
    run = setup(config)
    initial = float(run.trainer.eval_loss(run.state.params, run.eval_batches))
    # optax.adamw's bias correction raises a Python float to an int32 count (optax's code, not ours), which
    # strict promotion refuses; users run with JAX's default, standard promotion.
    promotion = "standard" if optimizer == "adamw" else "strict"
    with jax.numpy_dtype_promotion(promotion):
        record = run_loop(run)
    assert "optim/win_rate" not in record
    assert record["eval/loss"] < initial - 0.2, (initial, record["eval/loss"])


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
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
    a, ma = saved_on.step(state, batch_on(saved_on, batch), 3)
    b, mb = restored_on.step(restored, batch_on(restored_on, batch), 3)
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


def test_config_values_of_the_wrong_type_or_range_are_refused():
    for argv, message in [
        (["--trainer.num_train_steps", "true"], "trainer.num_train_steps=True: expected an integer"),
        (["--optimizer.rho", "abc"], "optimizer.rho='abc': expected a number"),
        (["--model.compute_dtype", "float16"], "model.compute_dtype='float16'; use 'bfloat16' or 'float32'"),
        (["--optimizer.learning_rate", "-1"], "optimizer.learning_rate=-1.0; use a positive learning rate"),
        (["--optimizer.b2", "1.0"], "optimizer.b2=1.0; use an EMA rate in [0, 1)"),
        (["--optimizer.rho", "0"], "optimizer.rho=0.0; use a positive rho"),
        (["--optimizer.eps", "-1e-8"], "optimizer.eps=-1e-08; use a value >= 0"),
        (["--optimizer.weight_decay", "-0.1"], "optimizer.weight_decay=-0.1; use a value >= 0"),
        (["--optimizer.update_interval", "0"], "optimizer.update_interval=0; use k >= 1"),
        (["--optimizer.hessian_batch_fraction", "1.5"], "hessian_batch_fraction=1.5; use a fraction in (0, 1]"),
        (["--optimizer.type", "adamw", "--optimizer.rho", "0.1"], "unknown config key(s): optimizer.rho"),
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            load_config(argv)


def test_switching_optimizer_type_keeps_the_schedule_and_takes_the_new_defaults():
    config, _ = load_config(["--optimizer.type", "adamw"])
    assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.eps) == (0.9, 0.95, 1e-8)
    assert config.optimizer.learning_rate == 2e-3  # neox_tiny's, kept
    config, _ = load_config(["--config", "configs/neox_125m_adamw.yaml"])
    assert config.optimizer.type == "adamw" and config.optimizer.weight_decay == 0.1
    assert config.optimizer.warmup == 2000  # from neox_125m.yaml through gpt2_small.yaml
    for path in sorted(Path("configs").glob("*.yaml")):  # every shipped config loads
        load_config(["--config", str(path)])


def test_help_lists_every_key_with_its_value_and_doc(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--optimizer.rho FLOAT  (now: 0.05)" in out and "tune so optim/win_rate stays" in out
    assert "--trainer.eval_batch_size INT|null  (now: null)" in out
    assert "with --optimizer.type adamw" in out and "--data.embedded.vocab_size INT" in out
    assert main(["-h", "--optimizer.type", "lion"]) == 0
    assert "--optimizer.type STR  (now: lion)" in capsys.readouterr().out


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
    err = capsys.readouterr().err
    assert "does not divide 8 devices" in err
    assert "Unable to initialize backend" not in err and len(err.strip().splitlines()) == 1  # only our line


def write_cache(root, splits: dict[str, np.ndarray], vocab_size: int) -> str:
    """A token cache written by hand from the documented format (trainer/data/format.py)."""
    (root / "shards").mkdir(parents=True)
    index = {"format": "sophia-jax-token-cache", "version": 1, "dtype": "uint16", "vocab_size": vocab_size,
             "eos_id": 0, "tokenizer": "tokenizer.json", "splits": {}}
    for split, tokens in splits.items():
        tokens.astype(np.uint16).tofile(root / "shards" / f"{split}.bin")
        index["splits"][split] = {"num_tokens": int(tokens.size), "num_documents": 1, "shards": [
            {"path": f"shards/{split}.bin", "num_tokens": int(tokens.size), "num_documents": 1}]}
    (root / "tokenizer.json").write_text("{}")
    (root / "index.json").write_text(json.dumps(index))
    return str(root)


def test_evaluation_covers_a_validation_split_smaller_than_one_train_batch(tmp_path):
    seq, rng = MODEL.seq_len, np.random.default_rng(7)
    val = rng.integers(0, 250, 5 * seq + 1)  # 5 sequences, against a train batch of 16
    cache = write_cache(tmp_path / "cache", {"train": rng.integers(0, 250, 64 * seq + 1), "validation": val}, 250)
    config = dataclasses.replace(CONFIG, data=DataConfig(cache=cache), run_dir=str(tmp_path / "run"),
                                 mesh=MeshConfig(data=2, fsdp=4), checkpoint=CheckpointConfig(every_steps=None))
    run = setup(config)
    assert run.eval_batches.num_sequences == 5 and len(run.eval_batches) == 1
    got = float(run.trainer.eval_loss(run.state.params, run.eval_batches))
    tokens = np.stack([val[i * seq: i * seq + seq + 1] for i in range(5)]).astype(np.int32)
    want = float(loss_fn(jax.device_get(run.state.params), jnp.asarray(tokens)))  # the mean over all 5, unsharded
    assert got == pytest.approx(want, rel=1e-5)
    run.checkpointer.close()
    run.loader.close()


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_auto_microbatches_are_the_fewest_whose_compiled_step_fits():
    """trainer.microbatches / optimizer.hessian_microbatches 'auto' against direct measurements: the chosen
    count's compiled step fits the budget and the next fewer does not."""
    from trainer.fit import FILL, fit_microbatches, peak_bytes

    config = dataclasses.replace(CONFIG, trainer=dataclasses.replace(CONFIG.trainer, microbatches="auto"),
                                 optimizer=dataclasses.replace(OPT, hessian_microbatches="auto"))
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, model=1), jax.devices()[:2])

    def need(train: int, hessian: int, which: str) -> int:
        c = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, microbatches=train),
                                optimizer=dataclasses.replace(OPT, hessian_microbatches=hessian))
        return peak_bytes(Trainer(c, mesh).lower(which).compile().memory_analysis(), "cpu")

    whole, halves = need(1, 1, "train"), need(2, 1, "train")
    assert whole > halves  # activations scale with the microbatch
    limit = (whole + halves) / 2 / FILL  # room for 8 rows per microbatch, not 16
    fitted = fit_microbatches(config, mesh, limit_bytes=limit, log=lambda _: None)
    assert fitted.trainer.microbatches == 2
    hessian = fitted.optimizer.hessian_microbatches  # the Hessian batch (8 rows) fits whole under this limit
    assert hessian == 1 and need(2, hessian, "hessian") <= FILL * limit
    with pytest.raises(ValueError, match="even microbatches of 2 sequences need"):
        fit_microbatches(config, mesh, limit_bytes=1000, log=lambda _: None)
    on_cpu = fit_microbatches(config, mesh, log=lambda _: None)  # no memory limit known: 1
    assert (on_cpu.trainer.microbatches, on_cpu.optimizer.hessian_microbatches) == (1, 1)


# ------------------------------------------------------------------------------------------ the default run
def default_config(tmp_path, corpus_dir, **trainer) -> TrainConfig:
    """configs/neox_tiny.yaml as `sophia-train` runs it with no arguments (its model, batch, Hessian fraction
    and mesh), on a smaller embedded corpus and for fewer steps."""
    config, _ = load_config([])
    return dataclasses.replace(
        config, run_dir=str(tmp_path / "run"),
        trainer=dataclasses.replace(config.trainer, progress=False, **trainer),
        data=DataConfig(embedded=EmbeddedCorpus(vocab_size=512, max_bytes=400_000), embedded_dir=corpus_dir))


@pytest.mark.parametrize("devices, hessian_batch", [(1, 4), (2, 4), (4, 4), (8, 8)])
def test_the_default_config_splits_its_batches_over_1_to_8_devices(tmp_path, corpus_dir, devices, hessian_batch):
    """The Hessian batch of 16 x 0.25 = 4 sequences is rounded up to a multiple of the data devices (8 on 8)."""
    config = default_config(tmp_path, corpus_dir)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=512))
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:devices]))
    assert (dict(trainer.mesh.shape), trainer.hessian_batch) == ({"data": 1, "fsdp": devices, "model": 1},
                                                                 hessian_batch)


def test_the_default_run_trains_on_8_devices_and_says_it_rounds_the_hessian_batch(tmp_path, corpus_dir, caplog):
    config = default_config(tmp_path, corpus_dir, num_train_steps=2, eval_every=2)
    config = dataclasses.replace(config, optimizer=dataclasses.replace(config.optimizer, update_interval=2))
    with caplog.at_level("INFO", logger="sophia-train"):
        run = setup(config)
    assert run.trainer.mesh.size == 8 and run.hessian_loader.global_batch == 8
    assert ("the Hessian batch is 8 sequences, not 4 (optimizer.hessian_batch_fraction=0.25 of 16): rounded up to a "
            "multiple of the 8 data-parallel devices x optimizer.hessian_microbatches=1") in caplog.text
    record = run_loop(run)
    assert record["step"] == 2 and record["optim/hessian_updates"] == 1 and np.isfinite(record["eval/loss"])


def test_a_cache_without_a_validation_split_trains_without_evaluation(tmp_path):
    """eval_every 0 does not need the split; with evaluation on, the refusal names the two ways out."""
    rng = np.random.default_rng(3)
    cache = write_cache(tmp_path / "cache", {"train": rng.integers(0, 250, 64 * MODEL.seq_len + 1),
                                             "validation": np.zeros(0, np.int64)}, 250)
    config = dataclasses.replace(CONFIG, data=DataConfig(cache=cache), run_dir=str(tmp_path / "run"),
                                 checkpoint=CheckpointConfig(every_steps=None, every_minutes=None),
                                 trainer=dataclasses.replace(CONFIG.trainer, num_train_steps=2, eval_every=0,
                                                             progress=False))
    record = run_loop(setup(config))
    assert record["step"] == 2 and "eval/loss" not in record
    evaluating = dataclasses.replace(config, run_dir=str(tmp_path / "run2"),
                                     trainer=dataclasses.replace(config.trainer, eval_every=1))
    with pytest.raises(ValueError, match=re.escape("has no validation split to evaluate on: train without evaluation "
                                                   "(--trainer.eval_every 0), or rebuild the cache")):
        setup(evaluating)
