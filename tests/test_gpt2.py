"""GPT-2 in the trainer: configs/gpt2_*.yaml build nanoGPT's GPT-2 (not a NeoX of its size); its sharded train
and Hessian steps on 8 CPU devices equal one device's; a checkpoint restores onto another mesh; the seed's
1.5B launch (configs/gpt2_1536_pile.yaml) fits a v3-128 core (libtpu, slow). Resuming a GPT-2 run through
sophia-train: tests/test_export.py."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from trainer import aot
from trainer.checkpoint import CheckpointConfig, Checkpointer
from trainer.config import TrainConfig, TrainerConfig, load_config
from trainer.models import GPT2, ModelConfig, num_params
from trainer.optim import SophiaGConfig
from trainer.sharding import MeshConfig, make_mesh
from trainer.steps import Batch, Trainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# No biases: GPT-2's key bias would have an exactly zero gradient (a score shift shared by all keys), which
# Sophia turns into sign(round-off) steps that differ between layouts (see tests/test_trainer.py).
MODEL = ModelConfig(arch="gpt2", vocab_size=250, seq_len=16, hidden_dim=32, num_layers=2, num_heads=4, bias=False,
                    scale_attn_by_inverse_layer_idx=True, compute_dtype="float32")
OPT = SophiaGConfig(learning_rate=3e-3, warmup=0, update_interval=2, hessian_batch_fraction=0.5)
CONFIG = TrainConfig(model=MODEL, optimizer=OPT, trainer=TrainerConfig(num_train_steps=4, global_batch=16))


@pytest.mark.parametrize("name, scale", [("gpt2_small", False), ("gpt2_small_adamw", False), ("gpt2_medium", True),
                                         ("gpt2_large_adamw", True)])
def test_the_gpt2_configs_build_nanogpts_gpt2(name, scale):
    """As the official release ran them: GPT-2 without biases (its released configs), the per-layer
    attention scale for medium and large, 1024 learned positions, the head tied (124M for small)."""
    config, _ = load_config(["--config", str(CONFIGS / f"{name}.yaml"), "--model.vocab_size", "50257"])
    model = config.model
    assert (model.arch, model.bias, model.seq_len) == ("gpt2", False, 1024)
    assert model.scale_attn_by_inverse_layer_idx == scale
    trainer = Trainer(config, make_mesh(MeshConfig(), jax.devices()[:1]))
    params = trainer.abstract_state().params
    assert isinstance(params, GPT2) and params.pos_embed.weight.array.shape == (1024, model.hidden_dim)
    if name == "gpt2_small":  # nanoGPT's 124M without biases: 12 x 12 d^2 + 25 LayerNorm weights d, wte, wpe
        d = 768
        assert num_params(model) == 12 * 12 * d * d + 25 * d + (50304 + 1024) * d
        assert sum(leaf.size for leaf in jax.tree.leaves(params)) == num_params(model)


def run_steps(mesh: tuple[int, int, int], steps: int = 4):
    data, fsdp, tp = mesh
    trainer = Trainer(CONFIG, make_mesh(MeshConfig(data=data, fsdp=fsdp, model=tp), jax.devices()[: data * fsdp * tp]))
    rng = np.random.default_rng(0)
    state, losses = trainer.init_state(), []
    for step in range(1, steps + 1):
        tokens, hessian = (jax.device_put(rng.integers(0, MODEL.vocab_size, (n, MODEL.seq_len + 1), dtype=np.int32),
                                          trainer.batch_sharding) for n in (16, 8))
        state, metrics = trainer.step(state, Batch(tokens, hessian), step)
        losses.append(float(metrics["train/loss"]))
    return trainer, state, losses


@pytest.fixture(scope="module")
def reference():
    return run_steps((1, 1, 1))


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_sharded_gpt2_steps_equal_one_device(reference):
    """4 steps with 2 Hessian refreshes on a (data 2, fsdp 2, model 2) mesh: the losses, params, m and h of
    one device (float32 sums in another order; Sophia's clipped step amplifies round-off where h is small:
    atol 3% of one step, as tests/test_trainer.py)."""
    _, ref_state, ref_losses = reference
    _, state, losses = run_steps((2, 2, 2))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(state)),
                            jax.tree.leaves(jax.device_get(ref_state))):
        np.testing.assert_allclose(a, b, atol=0.03 * OPT.learning_rate, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_a_gpt2_checkpoint_restores_onto_another_mesh(reference, tmp_path):
    """Saved from one device, restored onto (2, 2, 2): every leaf equal, laid out by the new mesh."""
    _, state, _ = reference
    checkpointer = Checkpointer(tmp_path, CheckpointConfig(async_save=False))
    checkpointer.save(4, state, {"note": "gpt2"})
    checkpointer.wait()
    other = Trainer(CONFIG, make_mesh(MeshConfig(data=2, fsdp=2, model=2), jax.devices()))
    restored, extras = checkpointer.restore(4, other.abstract_state())
    checkpointer.close()
    assert extras == {"note": "gpt2"}
    wte = restored.params.embed.weight.array
    assert len(wte.sharding.device_set) == 8 and wte.sharding.spec == P("model", "fsdp")  # vocab x embed
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


requires_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                     reason='libtpu is not installed (pip install -e ".[tpu]")')


@pytest.mark.slow
@requires_libtpu
def test_the_seeds_1_5b_gpt2_fits_a_v3_128_core(monkeypatch):
    """configs/gpt2_1536_pile.yaml compiled for a v3-128 (deviceless, ~4 min here): the train and Hessian
    steps each peak under a core's 15.48 GiB."""
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    report = aot.check_fit(["--config", str(CONFIGS / "gpt2_1536_pile.yaml")], "v3:8x8")
    assert report.cores == 128 and report.mesh == {"data": 1, "fsdp": 128, "model": 1}
    assert [fit.step for fit in report.steps] == ["train", "hessian"]
    for fit in report.steps:
        assert fit.error is None and 0 < fit.peak_gib < aot.V3_HBM_GIB, fit
    assert report.failures() == []
