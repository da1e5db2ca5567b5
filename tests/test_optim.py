"""The run's learning-rate schedule against a NumPy restatement of its definition, and its decay mask."""

import jax
import numpy as np
import pytest

from trainer.models import GPTNeoX, ModelConfig, init_model
from trainer.optim import SophiaGConfig, lr_schedule, weight_decay_mask


def expected_lr(t: np.ndarray, peak: float, floor_ratio: float, warmup: int, total: int) -> np.ndarray:
    """The README's schedule for the 0-based step t of `total`: lr * (t+1)/warmup for t < warmup (so step
    warmup - 1 applies the peak), then a cosine from the peak to floor_ratio * lr, which the last step
    (t = total - 1) applies; past the end, the floor."""
    floor = peak * floor_ratio
    peak_at = max(warmup - 1, 0)
    progress = np.clip((t - peak_at) / max(total - 1 - peak_at, 1), 0, 1)
    cosine = floor + 0.5 * (peak - floor) * (1 + np.cos(np.pi * progress))
    return np.where(t < warmup, peak * (t + 1) / max(warmup, 1), cosine)


@pytest.mark.parametrize("warmup, total, warmup_steps", [(0, 50, 0), (1, 50, 1), (2, 50, 2), (10, 50, 10),
                                                         (0.1, 200, 20), (0.05, 20, 1), (3, 20, 3)])
def test_warmup_then_cosine_to_min_lr_ratio_on_the_last_step(warmup, total, warmup_steps):
    config = SophiaGConfig(learning_rate=6e-4, min_lr_ratio=0.05, warmup=warmup)
    schedule = lr_schedule(config, total)
    t = np.arange(total + 5)  # past the end it stays at the floor
    got = np.array([float(schedule(i)) for i in t])
    np.testing.assert_allclose(got, expected_lr(t, 6e-4, 0.05, warmup_steps, total), rtol=1e-5, atol=1e-12)
    assert got[0] > 0 and got.max() == pytest.approx(6e-4, rel=1e-6)
    # The last step (count total - 1) applies exactly min_lr_ratio of the peak, and the one before more.
    assert got[total - 1] == pytest.approx(0.05 * 6e-4, rel=1e-6) and got[total - 2] > got[total - 1]


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_weight_decay_mask_spares_norms_biases_and_embeddings(decay_embeddings):
    model = GPTNeoX.init(ModelConfig(vocab_size=64, seq_len=8, hidden_dim=16, num_layers=2, num_heads=2),
                         key=jax.random.PRNGKey(0))
    mask = weight_decay_mask(model, decay_embeddings)
    flags = {jax.tree_util.keystr(path): flag for path, flag in jax.tree_util.tree_leaves_with_path(mask)}
    assert len(flags) == len(jax.tree.leaves(model))
    for path, flag in flags.items():
        spared = "bias" in path or any(n in path for n in (".ln1", ".ln2", ".ln_f")) or (
            ".embed" in path and not decay_embeddings)
        assert flag == (not spared), path
    assert sum(flags.values()) >= 5  # qkv, out, mlp in/out weights and the head decay


@pytest.mark.parametrize("bias", [True, False])
def test_gpt2_decays_the_linear_weights_only_as_nanogpt(bias):
    """nanoGPT's configure_optimizers: Linear weights decay; biases, LayerNorms and both embeddings (the tied
    wte, which is also the head, and wpe) do not."""
    model = init_model(ModelConfig(arch="gpt2", vocab_size=64, seq_len=8, hidden_dim=16, num_layers=2, num_heads=2,
                                   bias=bias), key=jax.random.PRNGKey(0))
    mask = weight_decay_mask(model)
    decayed = {jax.tree_util.keystr(path[:-1]) for path, flag in jax.tree_util.tree_leaves_with_path(mask) if flag}
    assert decayed == {f".layers.stacked.{m}.weight" for m in ("attn.qkv", "attn.out", "mlp.up", "mlp.down")}
    assert len(jax.tree.leaves(mask)) == (16 if bias else 9)  # wte, wpe, 3 LayerNorms, 4 linear weights
