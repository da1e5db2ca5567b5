"""The models (trainer/models/): GPT-NeoX and GPT-2 shapes, causality, rotary dims, the parallel (NeoX) and
sequential (GPT-2) residuals, GPT-2's tied head, learned positions and init scales, size formulas, loss mask,
remat, chunked loss and bf16 matmuls for both. (Parity with transformers: tests/test_hf.py.)"""

import dataclasses

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.models import (
    GPT2,
    GPTNeoX,
    ModelConfig,
    apply_rotary,
    flops_per_token,
    init_model,
    logits_fn,
    loss_fn,
    num_params,
    token_losses,
)
from trainer.models.common import layer_norm

CONFIG = ModelConfig(vocab_size=300, seq_len=16, hidden_dim=64, num_layers=2, num_heads=4, compute_dtype="float32")
GPT2_CONFIG = dataclasses.replace(CONFIG, arch="gpt2", scale_attn_by_inverse_layer_idx=True)
CONFIGS = {"neox": CONFIG, "gpt2": GPT2_CONFIG}


@pytest.fixture(scope="module")
def model() -> GPTNeoX:
    return GPTNeoX.init(CONFIG, key=jax.random.PRNGKey(0))


@pytest.fixture(scope="module", params=["neox", "gpt2"])
def any_model(request):
    """The test model of each architecture."""
    return init_model(CONFIGS[request.param], key=jax.random.PRNGKey(0))


def _tokens(batch: int = 2, length: int = CONFIG.seq_len + 1, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, CONFIG.vocab_size)


def _named(tokens: jax.Array) -> hax.NamedArray:
    return hax.named(tokens, ("batch", "position"))


def test_shapes_and_padded_vocab(any_model):
    model = any_model
    logits = model(_named(_tokens()[:, :-1]))
    assert [(a.name, a.size) for a in logits.axes] == [("batch", 2), ("position", 16), ("vocab", 384)]
    assert logits.dtype == jnp.float32
    probs = jax.nn.softmax(logits.array, axis=-1)
    assert float(probs[..., CONFIG.vocab_size:].sum()) == 0.0  # padded ids are never predicted
    plain, mask = logits_fn(model, _tokens())
    assert plain.shape == (2, 16, 384) and mask.shape == (2, 16)
    np.testing.assert_array_equal(plain, logits.array)


def test_causality(any_model):
    model = any_model
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


def test_sequential_residual_gpt2():
    """A GPT-2 block is h = x + attn(ln1(x)), then h + mlp(ln2(h)): the MLP reads the attention's output
    (NeoX's parallel form would give x + attn(ln1(x)) + mlp(ln2(x)) instead)."""
    model = init_model(GPT2_CONFIG, key=jax.random.PRNGKey(0))
    block, layer = model.layers.get_layer(1), hax.named(jnp.int32(1), ())
    x = hax.random.normal(jax.random.PRNGKey(3), (hax.Axis("batch", 2), hax.Axis("position", 8), CONFIG.Embed))
    h = _zero(block, lambda b: (b.mlp.down.weight, b.mlp.down.bias))(x, layer)  # x + attn(ln1(x))
    assert float(hax.abs(h - x).max().array) > 1e-3
    expected = h + block.mlp(layer_norm(block.ln2, h))
    np.testing.assert_allclose(block(x, layer).array, expected.array, atol=1e-6)
    parallel = h + block.mlp(layer_norm(block.ln2, x))
    assert float(hax.abs(block(x, layer) - parallel).max().array) > 1e-4


def test_gpt2_head_is_the_input_embedding():
    """Tied: no head leaf; logits = ln_f(x) . wte, so a change to wte's row j moves logit column j (and
    the embedding of token j); learned positions: wpe has seq_len rows, and a longer input is refused."""
    model = init_model(GPT2_CONFIG, key=jax.random.PRNGKey(0))
    assert not hasattr(model, "head") and model.pos_embed.weight.axes == (GPT2_CONFIG.Pos, GPT2_CONFIG.Embed)
    tokens = _named(_tokens()[:, :-1])
    x, _ = model.hidden(tokens)
    wte = model.embed.weight.rearrange(("vocab", "embed")).array
    x = x.rearrange(("batch", "position", "embed")).array
    expected = jnp.einsum("bpe,ve->bpv", x, wte)[..., :CONFIG.vocab_size]
    np.testing.assert_allclose(model(tokens).array[..., :CONFIG.vocab_size], expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="17 positions, but a GPT-2 learns model.seq_len=16 position embeddings"):
        model(_named(_tokens(length=17)))


def test_gpt2_init_scales_are_nanogpts():
    """normal(0, 0.02) for the linear layers and both embeddings, 0.02 / sqrt(2 L) for the two residual
    projections, zero biases, unit LayerNorm scales (nanoGPT's _init_weights and c_proj init)."""
    config = dataclasses.replace(GPT2_CONFIG, num_layers=8, vocab_size=1000)
    model = init_model(config, key=jax.random.PRNGKey(0))
    blocks = model.layers.stacked
    residual = 0.02 / np.sqrt(2 * 8)
    for weight, std in [(model.embed.weight, 0.02), (model.pos_embed.weight, 0.02), (blocks.attn.qkv.weight, 0.02),
                        (blocks.mlp.up.weight, 0.02), (blocks.attn.out.weight, residual),
                        (blocks.mlp.down.weight, residual)]:
        values = np.asarray(weight.array)
        assert abs(values.std() / std - 1) < 0.05 and abs(values.mean()) < 0.05 * std, (weight.axes, values.std())
        assert np.abs(values).max() > 3.5 * std  # normal, not truncated at 3 std as haliax's default init
    for bias in (blocks.attn.qkv.bias, blocks.attn.out.bias, blocks.mlp.up.bias, blocks.mlp.down.bias, blocks.ln1.bias):
        assert not np.any(np.asarray(bias.array))
    assert np.all(np.asarray(blocks.ln1.weight.array) == 1) and np.all(np.asarray(model.ln_f.weight.array) == 1)


@pytest.mark.parametrize("config", [CONFIG, GPT2_CONFIG, dataclasses.replace(GPT2_CONFIG, bias=False)],
                         ids=["neox", "gpt2", "gpt2-nobias"])
def test_param_count_formula_matches_leaves(config):
    model = init_model(config, key=jax.random.PRNGKey(0))
    assert num_params(config) == sum(leaf.size for leaf in jax.tree.leaves(model))


def test_param_counts_of_published_models():
    # A NeoX of GPT-2 small's shape, by hand: 12 layers x (12 d^2 + 13 d) + final LN 2d + embed and head 2 V d.
    small = ModelConfig(vocab_size=50257, hidden_dim=768, num_layers=12, num_heads=12)
    d, V = 768, 50304
    assert small.padded_vocab == V
    assert num_params(small) == 12 * (12 * d * d + 13 * d) + 2 * d + 2 * V * d
    assert flops_per_token(small, seq_len=1024) == 6 * (12 * (12 * d * d + 13 * d) + 2 * d + V * d) + 12 * 12 * d * 1024

    # Pythia-1.4B (GPT-NeoX, untied head, vocab 50277 padded to 50304) has 1,414,647,808 parameters as
    # published with the released weights.
    pythia = ModelConfig(vocab_size=50277, hidden_dim=2048, num_layers=24, num_heads=16)
    assert num_params(pythia) == 1_414_647_808

    # GPT-2 small and XL as released (vocab 50257 unpadded, 1024 positions, tied head): 124,439,808 and
    # 1,557,611,200 parameters. The FLOPs count the tied head's matmul once, not wpe (a gather).
    gpt2 = ModelConfig(arch="gpt2", vocab_size=50257, vocab_multiple=1, seq_len=1024, hidden_dim=768, num_layers=12,
                       num_heads=12)
    assert num_params(gpt2) == 124_439_808
    xl = dataclasses.replace(gpt2, hidden_dim=1600, num_layers=48, num_heads=25)
    assert num_params(xl) == 1_557_611_200
    assert flops_per_token(gpt2) == 6 * (124_439_808 - 1024 * d) + 12 * 12 * d * 1024


def test_loss_mask_matches_masked_mean(model):
    tokens = _tokens(batch=3)
    mask = jax.random.bernoulli(jax.random.PRNGKey(4), 0.6, (3, CONFIG.seq_len))
    logits = model(_named(tokens[:, :-1])).array
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    expected = jnp.sum(nll * mask.astype(nll.dtype)) / jnp.sum(mask.astype(nll.dtype))
    np.testing.assert_allclose(loss_fn(model, tokens, mask), expected, rtol=1e-5)
    losses, weights = token_losses(model, tokens, mask)
    assert float(weights.sum().array) == float(mask.sum())


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
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
def test_remat_gives_the_same_gradients(any_model, remat):
    remat_model = init_model(dataclasses.replace(any_model.config, remat=remat), key=jax.random.PRNGKey(0))
    tokens = _tokens()
    g1, g2 = jax.grad(loss_fn)(any_model, tokens), jax.grad(loss_fn)(remat_model, tokens)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _reference_loss(model, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The masked mean cross-entropy written out from the whole logits: -log_softmax at the targets."""
    logits = model(_named(tokens[:, :-1])).array
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[:, 1:, None], -1)[..., 0]
    mask = mask.astype(nll.dtype)
    return jnp.sum(nll * mask) / jnp.sum(mask)


@pytest.mark.parametrize("chunk", [4, 5, 16])  # divides seq_len 16, does not, the whole sequence
def test_chunked_loss_equals_the_whole_logits_loss(any_model, chunk):
    """model.loss_chunk: the same per-position losses, masked mean and gradient as the cross-entropy of
    the whole [batch, position, vocab] logits (float32)."""
    model = any_model
    chunked = dataclasses.replace(model, config=dataclasses.replace(model.config, loss_chunk=chunk))
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
    with pytest.raises(ValueError, match="model.arch='llama'; use one of neox, gpt2"):
        ModelConfig(arch="llama")
    with pytest.raises(ValueError, match="model.bias=False is a GPT-2 option; GPT-NeoX has true"):
        ModelConfig(bias=False)
    with pytest.raises(ValueError, match="model.scale_attn_by_inverse_layer_idx=True is a GPT-2 option"):
        ModelConfig(scale_attn_by_inverse_layer_idx=True)
    ModelConfig(arch="gpt2", hidden_dim=64, num_heads=4, rotary_pct=0.1, bias=False)  # rotary is NeoX's only


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


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
@pytest.mark.parametrize("attention, remat, loss_chunk", [("naive", "none", 0), ("blockwise", "full", 5)])
def test_bf16_step_runs_every_matmul_on_bf16_operands(arch, attention, remat, loss_chunk):
    """compute_dtype bfloat16: no matmul of the loss or its gradient takes a float32 operand (XLA would run
    it in float32), even where an output is float32 (scores, logits) and its cotangent comes back float32."""
    config = dataclasses.replace(CONFIGS[arch], compute_dtype="bfloat16", attention=attention, remat=remat,
                                 loss_chunk=loss_chunk, attention_block_size=8)
    model = init_model(config, key=jax.random.PRNGKey(0))
    dtypes = _dot_operand_dtypes(jax.make_jaxpr(jax.grad(loss_fn))(model, _tokens()).jaxpr)
    assert dtypes == {("bfloat16", "bfloat16")}, dtypes


def test_gpt2_blockwise_attention_equals_naive():
    """GPT-2's attention (with its per-layer score scale) through either implementation, blocks of 5 over 16
    positions (a padded last block): the same loss and gradients (float32; tolerances relative to each
    leaf's scale, as tests/test_attention.py has them for NeoX in the trainer)."""
    models = [init_model(dataclasses.replace(GPT2_CONFIG, attention=a, attention_block_size=5),
                         key=jax.random.PRNGKey(0)) for a in ("naive", "blockwise")]
    tokens = _tokens()
    (l1, g1), (l2, g2) = (jax.value_and_grad(loss_fn)(m, tokens) for m in models)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max(), rtol=1e-3)
