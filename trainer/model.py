"""GPT-NeoX in haliax + equinox, top to bottom: config, rotary, attention, MLP, block, model, loss.

Shapes are named (`batch`, `position`, `embed`, `heads`, `head_size`, `mlp`, `vocab`, `layers`), so a
sharding is a table from these names to mesh axes (trainer/sharding.py), not per-array specs.

Architecture (Black et al. 2022, as in the Sophia paper's NeoX runs): rotary position embedding on the
first `rotary_pct` of each head's dims; parallel residual `x + attn(ln1(x)) + mlp(ln2(x))`; LayerNorm
with bias (eps 1e-5); GELU MLP; biased projections; untied input embedding and output head; the
vocabulary padded to a multiple of 128 (padded columns get logit -1e9, so they are never predicted or
sampled); layers stacked and scanned (`haliax.nn.Stacked`), optionally rematerialised. Causal attention
is one of trainer/attention.py's implementations (`attention`: cuDNN's fused kernel, blockwise, naive).
Params are stored in `param_dtype` (float32) and cast to `compute_dtype` (bfloat16) for the forward;
LayerNorm statistics, softmax and the loss are computed in float32.
"""

from __future__ import annotations

import dataclasses
import math

import equinox as eqx
import haliax as hax
import haliax.nn as hnn
import jax
import jax.numpy as jnp
from haliax import Axis, NamedArray

from trainer.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS, attention

__all__ = [
    "GPTNeoX",
    "ModelConfig",
    "REMAT_POLICIES",
    "apply_rotary",
    "flops_per_token",
    "logits_fn",
    "loss_fn",
    "num_params",
    "token_losses",
]

PADDED_LOGIT = -1e9  # logit of the padded vocabulary columns: exp() is exactly 0 in float32
# model.remat -> the jax.checkpoint policy of one scanned layer (None: no jax.checkpoint at all).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the projections, not q.k
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a GPT-NeoX (`--model.*`)."""

    seq_len: int = 256
    """Tokens per training sequence (the model has no fixed maximum; rotary positions are relative)."""
    hidden_dim: int = 256
    """Width d of the residual stream (`embed` axis)."""
    num_layers: int = 4
    """Number of transformer blocks (stacked on the `layers` axis and scanned)."""
    num_heads: int = 4
    """Attention heads; hidden_dim must be a multiple of it."""
    mlp_ratio: int = 4
    """MLP width as a multiple of hidden_dim (NeoX: 4)."""
    rotary_pct: float = 0.25
    """Fraction of each head's dims that get the rotary embedding (NeoX: 0.25); the rest get none."""
    rotary_base: float = 10000.0
    """Base of the rotary frequencies."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    vocab_size: int | None = None
    """Token ids the data can hold; None = take it from the dataset. Padded up to `vocab_multiple`."""
    vocab_multiple: int = 128
    """The embedding and head have vocab_size rounded up to a multiple of this (MXU/TPU friendly)."""
    remat: str = "none"
    """What each scanned layer keeps for the backward pass (jax.checkpoint policy; see REMAT_POLICIES):
    "none" keeps every activation; "full" keeps only the layer's input and recomputes the rest (one
    more forward pass of the layers); "save_dots" keeps the outputs of the projection matmuls and
    recomputes the cheap elementwise work and the attention."""
    attention: str = "auto"
    """Causal attention implementation (trainer/attention.py): "cudnn" (GPU's fused kernel, bf16/fp16),
    "blockwise" (flash-style in plain JAX: no [seq, seq] tensor), "naive" (the readable reference, which
    builds and keeps float32 [batch, heads, seq, seq] scores) or "auto" (cudnn on GPU, else blockwise)."""
    attention_block_size: int = 512
    """Query and key block length of the blockwise attention (min(it, seq_len) is used)."""
    loss_chunk: int = 0
    """Positions per step of the cross-entropy: the loss scans over chunks of this many positions,
    building each chunk's float32 logits and rebuilding them in the backward pass, so the
    [batch, seq_len, vocab] logits and their gradient never exist whole (costs one more forward pass of
    the output head). 0 = the whole sequence at once. `logits_fn` (the Sophia-G estimator) is unchunked."""
    compute_dtype: str = "bfloat16"
    """dtype of the matmuls and activations ("bfloat16" or "float32")."""
    param_dtype: str = "float32"
    """dtype the params (and so the optimizer's m and h) are stored in."""

    def __post_init__(self) -> None:
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"model.hidden_dim={self.hidden_dim} is not a multiple of model.num_heads="
                             f"{self.num_heads}; pick a head count that divides it")
        rotary = self.rotary_dim
        if not 0 <= self.rotary_pct <= 1 or rotary % 2:
            raise ValueError(f"model.rotary_pct={self.rotary_pct} gives {rotary} rotary dims of "
                             f"head_size={self.head_size}; use a fraction in [0, 1] giving an even count")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; use one of {', '.join(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"model.attention={self.attention!r}; use one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk={self.loss_chunk}; use 0 (whole sequence) or a positive chunk length")
        for name in ("seq_len", "num_layers", "mlp_ratio", "vocab_multiple", "attention_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}={getattr(self, name)} must be >= 1")
        for name in ("compute_dtype", "param_dtype"):
            if getattr(self, name) not in ("bfloat16", "float32"):
                raise ValueError(f"model.{name}={getattr(self, name)!r}; use 'bfloat16' or 'float32'")

    @property
    def head_size(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.rotary_pct)

    @property
    def padded_vocab(self) -> int:
        if self.vocab_size is None:
            raise ValueError("model.vocab_size is unset; set it or let the trainer take it from the dataset")
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    # Named axes. `batch` and `position` come from the data.
    Embed = property(lambda self: Axis("embed", self.hidden_dim))
    Heads = property(lambda self: Axis("heads", self.num_heads))
    HeadSize = property(lambda self: Axis("head_size", self.head_size))
    Mlp = property(lambda self: Axis("mlp", self.hidden_dim * self.mlp_ratio))
    Layers = property(lambda self: Axis("layers", self.num_layers))
    Vocab = property(lambda self: Axis("vocab", self.padded_vocab))


# ------------------------------------------------------------------------------------------ rotary
def apply_rotary(x: NamedArray, rotary_dim: int, base: float) -> NamedArray:
    """Rotates pairs (i, i + rotary_dim/2) of the first `rotary_dim` head dims by angle pos * base**(-2i/r).

    x: [..., position, head_size]. Dims from `rotary_dim` on pass through unchanged (NeoX's partial rotary).
    """
    if rotary_dim == 0:
        return x
    Pos, HeadSize = x.resolve_axis("position"), x.resolve_axis("head_size")
    half = rotary_dim // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2 / rotary_dim)
    angles = jnp.arange(Pos.size, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [position, half]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    arr = x.rearrange((..., Pos, HeadSize)).array
    x1, x2, rest = arr[..., :half], arr[..., half:rotary_dim], arr[..., rotary_dim:]
    x1f, x2f = x1.astype(jnp.float32), x2.astype(jnp.float32)
    rotated = jnp.concatenate([x1f * cos - x2f * sin, x2f * cos + x1f * sin], axis=-1).astype(arr.dtype)
    out = jnp.concatenate([rotated, rest], axis=-1)
    return hax.named(out, x.rearrange((..., Pos, HeadSize)).axes).rearrange(x.axes)


# ------------------------------------------------------------------------------------------ layers
@jax.checkpoint
def _layer_norm(norm: hnn.LayerNorm, x: NamedArray) -> NamedArray:
    """LayerNorm with float32 statistics whatever the compute dtype. Rematerialised: the backward pass
    recomputes the float32 intermediates from x rather than keeping them (they would be ~16 float32
    [batch, position, embed] arrays per layer, more than all the bf16 activations of a layer together)."""
    return _cast_floating(norm, jnp.float32)(x.astype(jnp.float32)).astype(x.dtype)


@jax.checkpoint
def _gelu(x: NamedArray) -> NamedArray:
    """Exact GELU, rematerialised: only its input is kept for the backward pass, not erf's intermediates."""
    return hnn.gelu(x, approximate=False)


class Attention(eqx.Module):
    """Causal multi-head self-attention with partial rotary embeddings."""

    config: ModelConfig = eqx.field(static=True)
    qkv: hnn.Linear  # embed -> (qkv=3, heads, head_size), with bias
    out: hnn.Linear  # (heads, head_size) -> embed, with bias

    @staticmethod
    def init(config: ModelConfig, *, key: jax.Array) -> Attention:
        k_qkv, k_out = jax.random.split(key)
        Qkv = Axis("qkv", 3)
        qkv = hnn.Linear.init(config.Embed, (Qkv, config.Heads, config.HeadSize), key=k_qkv)
        out = hnn.Linear.init((config.Heads, config.HeadSize), config.Embed, key=k_out,
                              init_scale=1 / math.sqrt(2 * config.num_layers))
        return Attention(config, qkv, out)

    def __call__(self, x: NamedArray) -> NamedArray:
        c = self.config
        q, k, v = self.qkv(x).unbind("qkv")
        q = apply_rotary(q, c.rotary_dim, c.rotary_base)
        k = apply_rotary(k, c.rotary_dim, c.rotary_base)
        axes = ("batch", "position", "heads", "head_size")
        q, k, v = (a.rearrange(axes) for a in (q, k, v))
        out = attention(q.array, k.array, v.array, c.attention, block_size=c.attention_block_size)
        return self.out(hax.named(out, q.axes))


class MLP(eqx.Module):
    """embed -> mlp (GELU) -> embed, biased."""

    up: hnn.Linear
    down: hnn.Linear

    @staticmethod
    def init(config: ModelConfig, *, key: jax.Array) -> MLP:
        k_up, k_down = jax.random.split(key)
        up = hnn.Linear.init(config.Embed, config.Mlp, key=k_up)
        down = hnn.Linear.init(config.Mlp, config.Embed, key=k_down, init_scale=1 / math.sqrt(2 * config.num_layers))
        return MLP(up, down)

    def __call__(self, x: NamedArray) -> NamedArray:
        return self.down(_gelu(self.up(x)))


class Block(eqx.Module):
    """One NeoX layer with the parallel residual: x + attn(ln1(x)) + mlp(ln2(x))."""

    ln1: hnn.LayerNorm
    ln2: hnn.LayerNorm
    attn: Attention
    mlp: MLP

    @staticmethod
    def init(config: ModelConfig, *, key: jax.Array) -> Block:
        k_attn, k_mlp = jax.random.split(key)
        ln = lambda: hnn.LayerNorm.init(config.Embed, eps=config.layer_norm_eps)  # noqa: E731
        return Block(ln(), ln(), Attention.init(config, key=k_attn), MLP.init(config, key=k_mlp))

    def __call__(self, x: NamedArray) -> NamedArray:
        # Under a compute axis mapping (trainer/sharding.py): gather this layer's FSDP-sharded weights
        # and lay the activations out by batch. Without one (single device) both are no-ops.
        block, x = hax.shard((self, x))
        return x + block.attn(_layer_norm(block.ln1, x)) + block.mlp(_layer_norm(block.ln2, x))


class GPTNeoX(eqx.Module):
    """Token ids [batch, position] -> logits [batch, position, vocab] (float32, padded columns -1e9)."""

    config: ModelConfig = eqx.field(static=True)
    embed: hnn.Embedding  # [vocab, embed]
    layers: hnn.Stacked[Block]  # every leaf has a leading `layers` axis
    ln_f: hnn.LayerNorm
    head: hnn.Linear  # embed -> vocab, no bias (untied from `embed`)

    @staticmethod
    def init(config: ModelConfig, *, key: jax.Array) -> GPTNeoX:
        k_embed, k_layers, k_head = jax.random.split(key, 3)
        embed = hnn.Embedding.init(config.Vocab, config.Embed, key=k_embed, init_scale=0.02)
        layers = hnn.Stacked.init(config.Layers, Block)(  # remat is applied in `hidden`
            config, key=jax.random.split(k_layers, config.num_layers))
        ln_f = hnn.LayerNorm.init(config.Embed, eps=config.layer_norm_eps)
        head = hnn.Linear.init(config.Embed, config.Vocab, key=k_head, use_bias=False)
        model = GPTNeoX(config, embed, layers, ln_f, head)
        dtype = jnp.dtype(config.param_dtype)
        return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, model)

    def __call__(self, tokens: NamedArray) -> NamedArray:
        x, head = self.hidden(tokens)
        return _logits(head, x, self.config.vocab_size)

    def hidden(self, tokens: NamedArray) -> tuple[NamedArray, hnn.Linear]:
        """(final hidden states [batch, position, embed] after ln_f, the output head), both in the
        compute dtype; `_logits(head, x, vocab_size)` of them is the model's output."""
        model = _cast_floating(self, jnp.dtype(self.config.compute_dtype))
        embed, ln_f, head = hax.shard((model.embed, model.ln_f, model.head))  # gathered as in Block
        x = hax.shard(embed.embed(tokens))
        layer = lambda block, x: block(x)  # noqa: E731
        policy = REMAT_POLICIES[self.config.remat]
        if policy is not None:
            layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)  # in a scan CSE cannot cross
        x = model.layers.fold_via(layer)(x)
        return _layer_norm(ln_f, x), head


def _cast_floating(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


# ------------------------------------------------------------------------------------------ loss
def _split(tokens: jax.Array) -> tuple[NamedArray, NamedArray]:
    """int32 [batch, seq_len+1] -> inputs, targets [batch, position] (targets shifted by one)."""
    Batch, Pos = Axis("batch", tokens.shape[0]), Axis("position", tokens.shape[1] - 1)
    return hax.named(tokens[:, :-1], (Batch, Pos)), hax.named(tokens[:, 1:], (Batch, Pos))


def _logits(head: hnn.Linear, x: NamedArray, vocab_size: int) -> NamedArray:
    """float32 logits [..., vocab] of hidden states x; the padded vocabulary columns hold PADDED_LOGIT."""
    logits = head(x).astype(jnp.float32)
    return hax.where(hax.arange(logits.resolve_axis("vocab")) < vocab_size, logits, PADDED_LOGIT)


def _cross_entropy(logits: NamedArray, targets: NamedArray) -> NamedArray:
    """-log softmax(logits)[target] per position: logsumexp over vocab minus the target's logit."""
    return hax.nn.logsumexp(logits, axis="vocab") - hax.take(logits, "vocab", targets)


def _chunked_cross_entropy(head: hnn.Linear, x: NamedArray, targets: NamedArray, vocab_size: int,
                           chunk: int) -> NamedArray:
    """`_cross_entropy(_logits(head, x), targets)` [batch, position], computed `chunk` positions at a time
    (lax.scan, the sequence zero-padded to a multiple): each step builds only its own [batch, chunk,
    vocab] logits, and jax.checkpoint makes the backward pass rebuild them rather than keep them."""
    x = x.rearrange(("batch", "position", "embed"))
    Batch, Pos, Embed = x.axes
    n = -(-Pos.size // chunk)
    pad = n * chunk - Pos.size
    xs = jnp.pad(x.array, ((0, 0), (0, pad), (0, 0))).reshape(Batch.size, n, chunk, Embed.size).swapaxes(0, 1)
    ts = jnp.pad(targets.rearrange((Batch, Pos)).array, ((0, 0), (0, pad))).reshape(Batch.size, n, chunk).swapaxes(0, 1)
    Chunk = Pos.resize(chunk)

    @jax.checkpoint
    def step(_, chunk_inputs):
        x_c, t_c = chunk_inputs
        logits = _logits(head, hax.named(x_c, (Batch, Chunk, Embed)), vocab_size)
        return None, _cross_entropy(logits, hax.named(t_c, (Batch, Chunk))).rearrange((Batch, Chunk)).array

    _, losses = jax.lax.scan(step, None, (xs, ts))  # [n, batch, chunk]
    return hax.named(losses.swapaxes(0, 1).reshape(Batch.size, n * chunk)[:, : Pos.size], (Batch, Pos))


def token_losses(model: GPTNeoX, tokens: jax.Array, mask: jax.Array | None = None) -> tuple[NamedArray, NamedArray]:
    """Per-position cross-entropy [batch, position] (float32) and the 0/1 mask of positions that count.

    `tokens` is int32 [batch, seq_len+1]; `mask` [batch, seq_len] marks the targets that count
    (0 for padding); None counts them all. With model.loss_chunk set, the logits are built that many
    positions at a time (the same numbers, without holding [batch, seq_len, vocab] float32 logits).
    """
    inputs, targets = _split(tokens)
    x, head = model.hidden(inputs)
    c = model.config
    if c.loss_chunk and c.loss_chunk < targets.resolve_axis("position").size:
        losses = _chunked_cross_entropy(head, x, targets, c.vocab_size, c.loss_chunk)
    else:
        losses = _cross_entropy(_logits(head, x, c.vocab_size), targets).rearrange(targets.axes)
    weights = hax.ones_like(losses) if mask is None else hax.named(mask.astype(jnp.float32), losses.axes)
    return losses * weights, weights


def loss_fn(model: GPTNeoX, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over the positions that count (a float32 scalar)."""
    losses, weights = token_losses(model, tokens, mask)
    return losses.sum().array / jnp.maximum(weights.sum().array, 1.0)


def logits_fn(model: GPTNeoX, tokens: jax.Array, mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`(logits [batch, position, vocab], mask [batch, position])` as plain arrays, for
    `sophia_jax.gauss_newton_bartlett`. Padded vocab columns hold -1e9, so labels are never sampled there."""
    inputs, _ = _split(tokens)
    logits = model(inputs).rearrange(("batch", "position", "vocab")).array
    weights = jnp.ones(logits.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    return logits, weights


# ------------------------------------------------------------------------------------------ size
def num_params(config: ModelConfig, *, include_embeddings: bool = True) -> int:
    """Closed-form parameter count (embedding and head each V*d; see tests for the check vs the leaves)."""
    d, f, L, V = config.hidden_dim, config.hidden_dim * config.mlp_ratio, config.num_layers, config.padded_vocab
    per_layer = (
        2 * 2 * d  # ln1, ln2 (weight + bias)
        + d * 3 * d + 3 * d  # qkv
        + d * d + d  # attention out
        + d * f + f + f * d + d  # mlp
    )
    total = L * per_layer + 2 * d  # + ln_f
    return total + (2 * V * d if include_embeddings else 0)


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 6*N + 12*L*d*S (PaLM appendix B).

    N counts the matmul params (all but the input embedding, which is a gather); the second term is the
    attention scores and weighted sum. Used for MFU; the Hessian step is not counted.
    """
    S = config.seq_len if seq_len is None else seq_len
    n_matmul = num_params(config, include_embeddings=False) + config.padded_vocab * config.hidden_dim
    return 6.0 * n_matmul + 12.0 * config.num_layers * config.hidden_dim * S
