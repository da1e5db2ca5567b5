"""Causal attention (trainer/attention.py) against a float64 NumPy statement of softmax attention and its
gradient; causality; the model and the sharded trainer steps with each implementation."""

import dataclasses
from pathlib import Path

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sophia_jax

from trainer.attention import attention, cudnn_attention, naive_attention, resolve_implementation
from trainer.config import TrainConfig, TrainerConfig, load_config
from trainer.optim import SophiaGConfig
from trainer.models import GPTNeoX, ModelConfig, loss_fn
from trainer.sharding import MeshConfig, make_mesh
from trainer.steps import Trainer

HAS_GPU = any(d.platform in ("gpu", "cuda") for d in jax.devices())
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="cuDNN attention needs a GPU (JAX sees none)")
IMPLEMENTATIONS = ["naive", "blockwise", pytest.param("cudnn", marks=needs_gpu)]


def reference(q, k, v, w=None):
    """softmax(q k^T / sqrt(d), future keys excluded) v in float64, for q, k, v [batch, position, heads, d];
    with `w` also the gradients of sum(w * output) with respect to q, k and v, by hand:
    dV = P^T W, dP = W V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K / sqrt(d), dK = dS^T Q / sqrt(d)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T, D = q.shape[1], q.shape[3]
    s = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = np.einsum("bnqk,bknd->bqnd", p, v)
    if w is None:
        return out
    w = np.asarray(w, np.float64)
    dv = np.einsum("bnqk,bqnd->bknd", p, w)
    dp = np.einsum("bqnd,bknd->bnqk", w, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = np.einsum("bnqk,bknd->bqnd", ds, k) / np.sqrt(D)
    dk = np.einsum("bnqk,bqnd->bknd", ds, q) / np.sqrt(D)
    return out, (dq, dk, dv)


def qkv(shape, dtype, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape) * s for s in (scale, scale, 1.0))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def run(implementation: str, q, k, v, block_size: int, w):
    """(output, gradients of sum(w * output) wrt q, k, v) of one implementation, jitted."""
    fn = lambda q, k, v: attention(q, k, v, implementation, block_size=block_size)  # noqa: E731
    out = jax.jit(fn)(q, k, v)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(w * fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))(q, k, v)
    return out, grads


# (position, block): a single block, whole multiples, non-multiples, a block longer than the sequence.
LENGTHS = [(16, 16), (32, 8), (13, 4), (29, 8), (5, 8)]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("length, block", LENGTHS)
def test_float32_output_and_gradients_match_the_reference(implementation, length, block):
    if implementation == "cudnn":
        pytest.skip("cuDNN has no float32 attention")
    q, k, v = qkv((2, length, 3, 16), jnp.float32, seed=length)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    out, grads = run(implementation, q, k, v, block, w)
    ref_out, ref_grads = reference(q, k, v, w)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    np.testing.assert_allclose(out, ref_out, atol=2e-6, rtol=1e-5)
    for name, g, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-5 * np.abs(ref).max(), rtol=1e-4, err_msg=f"d{name}")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("length, block", [(64, 16), (50, 16)])
def test_bfloat16_output_and_gradients_match_the_reference_loosely(implementation, length, block):
    """bf16 inputs (the reference sees the same rounded values): errors of bf16's 8 bits in the weights,
    the output and the backward's operands, about 1% of each array's scale."""
    q, k, v = qkv((2, length, 4, 64), jnp.bfloat16, seed=length)
    w = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)
    out, grads = run(implementation, q, k, v, block, w)
    ref_out, ref_grads = reference(q, k, v, w)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    np.testing.assert_allclose(np.asarray(out, np.float64), ref_out, atol=2e-2)
    for name, g, ref in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g, np.float64), ref, atol=2e-2 * np.abs(ref).max(), err_msg=f"d{name}")


@pytest.mark.parametrize("implementation", ["naive", "blockwise"])
def test_bf16_scores_are_not_rounded_to_bf16(implementation):
    """bf16 q, k whose dot products need more than bf16's 8 significant bits: the scores must be
    accumulated and kept in float32. Rounding them to bf16 (then casting) moves the output by ~0.08
    here; the float32 scores leave only the bf16 rounding of the weights and output (~0.012)."""
    q, k, v = qkv((2, 64, 2, 64), jnp.bfloat16, scale=3.0)
    out = np.asarray(attention(q, k, v, implementation, block_size=16), np.float64)
    np.testing.assert_allclose(out, reference(q, k, v), atol=0.03)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_the_future_does_not_reach_the_past(implementation):
    """Changing the keys and values after position t changes no output at or before t (exactly), and
    changes every later one; t sits inside a block, so the diagonal block's mask is what holds."""
    dtype = jnp.bfloat16 if implementation == "cudnn" else jnp.float32
    q, k, v = qkv((2, 24, 2, 16), dtype)
    t = 10  # blocks of 8: position 10 is inside the second block
    noise = qkv((2, 24, 2, 16), dtype, seed=5)
    k2, v2 = k.at[:, t + 1:].set(noise[1][:, t + 1:]), v.at[:, t + 1:].set(noise[2][:, t + 1:])
    a = np.asarray(attention(q, k, v, implementation, block_size=8), np.float32)
    b = np.asarray(attention(q, k2, v2, implementation, block_size=8), np.float32)
    np.testing.assert_array_equal(a[:, : t + 1], b[:, : t + 1])
    assert np.abs(a[:, t + 1:] - b[:, t + 1:]).max(axis=-1).min() > 0


def test_auto_picks_by_platform_and_bad_names_are_refused():
    assert resolve_implementation("auto", "gpu", jnp.bfloat16) == "cudnn"
    assert resolve_implementation("auto", "gpu", jnp.float32) == "blockwise"  # cuDNN has no float32
    assert resolve_implementation("auto", "tpu", jnp.bfloat16) == "blockwise"
    assert resolve_implementation("auto", "cpu", jnp.float32) == "blockwise"
    assert resolve_implementation("naive", "gpu", jnp.bfloat16) == "naive"
    with pytest.raises(ValueError, match="model.attention='flash'; use one of auto, cudnn, blockwise, naive"):
        resolve_implementation("flash", "cpu", jnp.float32)
    with pytest.raises(ValueError, match="model.attention='flash'; use one of"):
        ModelConfig(attention="flash")
    with pytest.raises(ValueError, match="attention_block_size=0"):
        ModelConfig(attention_block_size=0)


@pytest.mark.skipif(HAS_GPU, reason="checks the error off-GPU")
def test_cudnn_off_gpu_says_so():
    q, k, v = qkv((1, 8, 2, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="model.attention='cudnn' needs a GPU, but JAX sees cpu"):
        cudnn_attention(q, k, v)


@pytest.mark.parametrize("implementation", ["naive", "blockwise"])
def test_second_order_forward_over_reverse_matches_finite_differences_of_the_reference(implementation):
    """Hessian-vector products (forward-over-reverse, as Sophia-H's Hutchinson estimator and jax.hessian
    take them) through each custom VJP, against central differences of the float64 NumPy gradient."""
    q, k, v = qkv((2, 13, 2, 8), jnp.float32, seed=3)
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    u = tuple(jnp.asarray(rng.standard_normal(q.shape), jnp.float32) for _ in range(3))
    f = lambda q, k, v: jnp.sum(w * attention(q, k, v, implementation, block_size=4))  # noqa: E731
    _, hvp = jax.jit(lambda x, t: jax.jvp(jax.grad(f, argnums=(0, 1, 2)), x, t))((q, k, v), u)
    e = 1e-5
    plus = reference(*(np.float64(a) + e * np.float64(b) for a, b in zip((q, k, v), u)), w)[1]
    minus = reference(*(np.float64(a) - e * np.float64(b) for a, b in zip((q, k, v), u)), w)[1]
    for name, got, hi, lo in zip("qkv", hvp, plus, minus):
        want = (hi - lo) / (2 * e)
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=1e-3, err_msg=f"H u, d{name}")


def test_sophia_h_and_jax_hessian_through_the_model_with_every_cpu_attention():
    """hutchinson (Sophia-H) and jax.hessian through GPT-NeoX, naive and blockwise attention: both run
    (the naive custom VJP used to refuse forward-over-reverse) and agree (independent backward rules;
    tolerances relative to each leaf's scale), and the Hessian is symmetric."""
    config = ModelConfig(vocab_size=61, seq_len=12, hidden_dim=16, num_layers=2, num_heads=2,
                         compute_dtype="float32", attention_block_size=8)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 13)), jnp.int32)
    estimates, hessians = {}, {}
    for implementation in ("naive", "blockwise"):
        model = GPTNeoX.init(dataclasses.replace(config, attention=implementation), key=jax.random.PRNGKey(1))
        estimator = sophia_jax.hutchinson(lambda m, tokens: loss_fn(m, tokens))
        estimates[implementation] = jax.jit(estimator)(model, jax.random.PRNGKey(2), tokens=tokens)
        bias = model.ln_f.bias

        def loss_of_bias(b, model=model, bias=bias):
            return loss_fn(eqx.tree_at(lambda m: m.ln_f.bias, model, hax.named(b, bias.axes)), tokens)

        hessians[implementation] = np.asarray(jax.jit(jax.hessian(loss_of_bias))(bias.array))
    for a, b in zip(jax.tree.leaves(estimates["blockwise"]), jax.tree.leaves(estimates["naive"])):
        assert np.all(np.isfinite(a)) and np.abs(b).max() > 0
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=1e-3)
    np.testing.assert_allclose(hessians["blockwise"], hessians["naive"], atol=1e-5 * np.abs(hessians["naive"]).max())
    np.testing.assert_allclose(hessians["naive"], hessians["naive"].T, atol=1e-6 * np.abs(hessians["naive"]).max())
    assert np.abs(hessians["naive"]).max() > 0


# ------------------------------------------------------------------------------------------ in the trainer
MODEL = ModelConfig(vocab_size=250, seq_len=20, hidden_dim=32, num_layers=2, num_heads=4, compute_dtype="float32",
                    attention_block_size=8)  # 20 = 2 blocks of 8 + a padded one
OPT = SophiaGConfig(learning_rate=3e-3, warmup=0, update_interval=1, hessian_batch_fraction=0.5)


def one_step(model: ModelConfig, mesh: tuple[int, int, int]):
    """(loss, gradient, Sophia's h after one Hessian step) on `mesh`, from the same init and batches."""
    data, fsdp, tp = mesh
    config = TrainConfig(model=model, optimizer=OPT, trainer=TrainerConfig(num_train_steps=2, global_batch=8))
    trainer = Trainer(config, make_mesh(MeshConfig(data=data, fsdp=fsdp, model=tp), jax.devices()[: data * fsdp * tp]))
    rng = np.random.default_rng(0)
    batch, hessian_batch = (jax.device_put(rng.integers(0, model.vocab_size, (n, model.seq_len + 1), dtype=np.int32),
                                           trainer.batch_sharding) for n in (8, 4))
    state = trainer.init_state()
    with trainer._context():
        loss, grads = jax.jit(trainer._loss_and_grads)(state.params, batch)
        state, _ = trainer._hessian_jit(state, hessian_batch)
    return float(loss), jax.device_get(grads), jax.device_get(sophia_h(state.opt_state))


def sophia_h(opt_state):
    is_sophia = lambda x: isinstance(x, sophia_jax.SophiaState)  # noqa: E731
    return next(x for x in jax.tree.leaves(opt_state, is_leaf=is_sophia) if is_sophia(x)).h


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_blockwise_in_the_sharded_scanned_rematerialised_trainer_equals_naive_on_one_device():
    """Blockwise attention with batch over data x fsdp and heads over model, inside the scanned layers,
    rematerialised, through the loss gradient and the GNB Hessian step: the loss, every gradient leaf
    and Sophia's h of naive attention on one device (float32; tolerances relative to each leaf's scale)."""
    ref_loss, ref_grads, ref_h = one_step(dataclasses.replace(MODEL, attention="naive"), (1, 1, 1))
    loss, grads, h = one_step(dataclasses.replace(MODEL, attention="blockwise", remat="full"), (2, 2, 2))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for name, tree, ref_tree in [("grad", grads, ref_grads), ("h", h, ref_h)]:
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(ref_tree)):
            assert np.abs(b).max() > 0
            np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=1e-3,
                                       err_msg=f"{name} {jax.tree_util.keystr(path)}")


# ------------------------------------------------------------------------------------------ memory
GIB = 2**30
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def train_step_memory(config: TrainConfig) -> float:
    """Temporaries (GiB) of the compiled train step on one device, from XLA's memory analysis."""
    trainer = Trainer(config, make_mesh(MeshConfig(), jax.devices()[:1]))
    return trainer.lower("train").compile().memory_analysis().temp_size_in_bytes / GIB


def test_neox_125m_at_16x2048_blockwise_needs_far_less_memory():
    """configs/neox_125m.yaml (Sophia-G, vocab 50277 -> 50432, remat none, loss_chunk 512) at 16 x 2048 on
    one device, compiled on the CPU (~20 s each, 0.5 GB of RAM): the train step's temporaries were
    107.0 GiB with naive attention (12 layers of [16, 12, 2048, 2048] float32 scores and weights kept
    for the backward pass) and 25.7 GiB with blockwise."""
    temps = {}
    for name in ("naive", "blockwise"):
        config, _ = load_config(["--config", str(CONFIGS / "neox_125m.yaml"), "--model.vocab_size", "50277",
                                 "--trainer.global_batch", "16", "--model.attention", name])
        temps[name] = train_step_memory(config)
    print(f"neox_125m 16 x 2048 train step temporaries (GiB): {temps}")
    assert temps["blockwise"] < temps["naive"] / 2, temps
