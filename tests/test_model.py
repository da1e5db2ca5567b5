"""GPT-NeoX (trainer/model.py): shapes, causality, rotary dims, parallel residual, size formulas, loss mask."""

import dataclasses

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.model import (
    GPTNeoX,
    ModelConfig,
    apply_rotary,
    flops_per_token,
    logits_fn,
    loss_fn,
    num_params,
    token_losses,
)

CONFIG = ModelConfig(vocab_size=300, seq_len=16, hidden_dim=64, num_layers=2, num_heads=4, compute_dtype="float32")


@pytest.fixture(scope="module")
def model() -> GPTNeoX:
    return GPTNeoX.init(CONFIG, key=jax.random.PRNGKey(0))


def _tokens(batch: int = 2, length: int = CONFIG.seq_len + 1, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, CONFIG.vocab_size)


def _named(tokens: jax.Array) -> hax.NamedArray:
    return hax.named(tokens, ("batch", "position"))


def test_shapes_and_padded_vocab(model):
    logits = model(_named(_tokens()[:, :-1]))
    assert [(a.name, a.size) for a in logits.axes] == [("batch", 2), ("position", 16), ("vocab", 384)]
    assert logits.dtype == jnp.float32
    probs = jax.nn.softmax(logits.array, axis=-1)
    assert float(probs[..., CONFIG.vocab_size:].sum()) == 0.0  # padded ids are never predicted
    plain, mask = logits_fn(model, _tokens())
    assert plain.shape == (2, 16, 384) and mask.shape == (2, 16)
    np.testing.assert_array_equal(plain, logits.array)


def test_causality(model):
    tokens = _tokens(batch=1)[:, :-1]
    t = 9
    perturbed = tokens.at[0, t].set((tokens[0, t] + 1) % CONFIG.vocab_size)
    a, b = model(_named(tokens)).array, model(_named(perturbed)).array
    np.testing.assert_array_equal(a[:, :t], b[:, :t])  # the past does not see the future
    assert np.abs(a[:, t:] - b[:, t:]).max(axis=-1).min() > 0  # every later position does


def test_rotary_touches_exactly_rotary_pct_of_head_dims():
    assert CONFIG.rotary_dim == int(CONFIG.head_size * 0.25) == 4
    x = hax.random.normal(jax.random.PRNGKey(2), (hax.Axis("position", 8), hax.Axis("heads", 2), CONFIG.HeadSize))
    y = apply_rotary(x, CONFIG.rotary_dim, CONFIG.rotary_base)
    xa, ya = x.rearrange(("position", "heads", "head_size")).array, y.rearrange(("position", "heads", "head_size")).array
    r = CONFIG.rotary_dim
    np.testing.assert_array_equal(xa[..., r:], ya[..., r:])  # the other 75% pass through
    np.testing.assert_allclose(ya[0], xa[0], atol=1e-6)  # position 0: rotation by angle 0
    assert np.abs(ya[1:, :, :r] - xa[1:, :, :r]).min() > 0  # every rotary dim moves at later positions
    # A rotation: the norm of each pair (i, i + r/2) is kept, and dot products depend only on the offset.
    half = r // 2
    pairs = lambda a: a[..., :half] ** 2 + a[..., half:r] ** 2  # noqa: E731
    np.testing.assert_allclose(pairs(ya), pairs(xa), rtol=1e-5)
    q = hax.named(jnp.broadcast_to(xa[0], xa.shape), ("position", "heads", "head_size"))
    k = hax.named(jnp.broadcast_to(xa[1], xa.shape), ("position", "heads", "head_size"))
    rq, rk = (apply_rotary(v, r, CONFIG.rotary_base).array[..., :r] for v in (q, k))
    dot = lambda i, j: np.sum(rq[i] * rk[j], axis=-1)  # noqa: E731
    np.testing.assert_allclose(dot(3, 1), dot(6, 4), rtol=1e-5)
    np.testing.assert_allclose(dot(2, 2), dot(7, 7), rtol=1e-5)


def _zero(module, where):
    return eqx.tree_at(where, module, replace_fn=lambda a: a * 0)


def test_parallel_residual(model):
    """block(x) - x = attn-only residual + mlp-only residual: each branch reads ln(x), not the other's output."""
    block = model.layers.get_layer(0)
    x = hax.random.normal(jax.random.PRNGKey(3), (hax.Axis("batch", 2), hax.Axis("position", 8), CONFIG.Embed))
    no_mlp = _zero(block, lambda b: (b.mlp.down.weight, b.mlp.down.bias))
    no_attn = _zero(block, lambda b: (b.attn.out.weight, b.attn.out.bias))
    full, attn_only, mlp_only = block(x), no_mlp(x), no_attn(x)
    assert float(hax.abs(attn_only - x).max().array) > 1e-3 and float(hax.abs(mlp_only - x).max().array) > 1e-3
    np.testing.assert_allclose((full - x).array, ((attn_only - x) + (mlp_only - x)).array, atol=1e-5)


def test_param_count_formula_matches_leaves(model):
    assert num_params(CONFIG) == sum(leaf.size for leaf in jax.tree.leaves(model))
    # NeoX/GPT-2 small shape, by hand: 12 layers x (12 d^2 + 13 d) + final LN 2d + embed and head 2 V d.
    gpt2 = ModelConfig(vocab_size=50257, hidden_dim=768, num_layers=12, num_heads=12)
    d, V = 768, 50304
    assert gpt2.padded_vocab == V
    assert num_params(gpt2) == 12 * (12 * d * d + 13 * d) + 2 * d + 2 * V * d
    assert flops_per_token(gpt2, seq_len=1024) == 6 * (12 * (12 * d * d + 13 * d) + 2 * d + V * d) + 12 * 12 * d * 1024

    # Pythia-1.4B (GPT-NeoX, untied head, vocab 50277 padded to 50304) has 1,414,647,808 parameters as
    # published with the released weights.
    pythia = ModelConfig(vocab_size=50277, hidden_dim=2048, num_layers=24, num_heads=16)
    assert num_params(pythia) == 1_414_647_808


def test_loss_mask_matches_masked_mean(model):
    tokens = _tokens(batch=3)
    mask = jax.random.bernoulli(jax.random.PRNGKey(4), 0.6, (3, CONFIG.seq_len))
    logits = model(_named(tokens[:, :-1])).array
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    expected = jnp.sum(nll * mask.astype(nll.dtype)) / jnp.sum(mask.astype(nll.dtype))
    np.testing.assert_allclose(loss_fn(model, tokens, mask), expected, rtol=1e-5)
    losses, weights = token_losses(model, tokens, mask)
    assert float(weights.sum().array) == float(mask.sum())


def test_bf16_compute_over_f32_params():
    config = dataclasses.replace(CONFIG, compute_dtype="bfloat16")
    model = GPTNeoX.init(config, key=jax.random.PRNGKey(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(model)} == {jnp.dtype("float32")}
    tokens = _tokens()
    low, high = loss_fn(model, tokens), loss_fn(dataclasses.replace(model, config=CONFIG), tokens)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(low, high, rtol=2e-2)
    grads = jax.grad(loss_fn)(model, tokens)
    assert {leaf.dtype for leaf in jax.tree.leaves(grads)} == {jnp.dtype("float32")}


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_gives_the_same_gradients(model, remat):
    remat_model = GPTNeoX.init(dataclasses.replace(CONFIG, remat=remat), key=jax.random.PRNGKey(0))
    tokens = _tokens()
    g1, g2 = jax.grad(loss_fn)(model, tokens), jax.grad(loss_fn)(remat_model, tokens)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _reference_loss(model: GPTNeoX, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The masked mean cross-entropy written out from the whole logits: -log_softmax at the targets."""
    logits = model(_named(tokens[:, :-1])).array
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    mask = mask.astype(nll.dtype)
    return jnp.sum(nll * mask) / jnp.sum(mask)


@pytest.mark.parametrize("chunk", [4, 5, 16])  # divides seq_len 16, does not, the whole sequence
def test_chunked_loss_equals_the_whole_logits_loss(model, chunk):
    """model.loss_chunk: the same per-position losses, masked mean and gradient as the cross-entropy of
    the whole [batch, position, vocab] logits (float32)."""
    chunked = dataclasses.replace(model, config=dataclasses.replace(CONFIG, loss_chunk=chunk))
    tokens = _tokens(batch=3)
    mask = jax.random.bernoulli(jax.random.PRNGKey(4), 0.6, (3, CONFIG.seq_len))
    loss, grads = jax.value_and_grad(loss_fn)(chunked, tokens, mask)
    ref_loss, ref_grads = jax.value_and_grad(_reference_loss)(model, tokens, mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    losses, weights = token_losses(chunked, tokens, mask)
    whole, _ = token_losses(model, tokens, mask)
    assert [a.name for a in losses.axes] == ["batch", "position"]
    np.testing.assert_allclose(losses.array, whole.array, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(a, b, atol=1e-6 * np.abs(b).max(), rtol=1e-5)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="hidden_dim=65 is not a multiple of model.num_heads=4"):
        ModelConfig(hidden_dim=65, num_heads=4)
    with pytest.raises(ValueError, match="rotary_pct"):
        ModelConfig(hidden_dim=64, num_heads=4, rotary_pct=0.1)
    with pytest.raises(ValueError, match="model.remat=True; use one of none, full, save_dots"):
        ModelConfig(remat=True)
    with pytest.raises(ValueError, match="model.loss_chunk=-1"):
        ModelConfig(loss_chunk=-1)


def _dot_operand_dtypes(jaxpr) -> set[tuple[str, ...]]:
    """The operand dtypes of every dot_general in a jaxpr, nested jaxprs (scan, remat, custom_vjp) included."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    found = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.add(tuple(str(v.aval.dtype) for v in eqn.invars))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if isinstance(sub, (ClosedJaxpr, Jaxpr)):
                    found |= _dot_operand_dtypes(sub.jaxpr if isinstance(sub, ClosedJaxpr) else sub)
    return found


@pytest.mark.parametrize("attention, remat, loss_chunk", [("naive", "none", 0), ("blockwise", "full", 5)])
def test_bf16_step_runs_every_matmul_on_bf16_operands(attention, remat, loss_chunk):
    """compute_dtype bfloat16: no matmul of the loss or its gradient takes a float32 operand (XLA would run
    it in float32), even where an output is float32 (scores, logits) and its cotangent comes back float32."""
    config = dataclasses.replace(CONFIG, compute_dtype="bfloat16", attention=attention, remat=remat,
                                 loss_chunk=loss_chunk, attention_block_size=8)
    model = GPTNeoX.init(config, key=jax.random.PRNGKey(0))
    dtypes = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss_fn))(model, _tokens()).jaxpr)
    assert dtypes == {("bfloat16", "bfloat16")}, dtypes
