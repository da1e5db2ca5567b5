"""What every model family shares: the config, the layers (rotary, LayerNorm, GELU, causal attention, the
scanned layer stack) and the loss.

A family (trainer/models/neox.py, gpt2.py) is an equinox Module with `init(config, *, key)`,
`__call__(tokens) -> logits` and `hidden(tokens) -> (x, head)`; everything below works on any of them
through `hidden`, so the trainer, the Sophia-G estimator and the checkpoints never ask which one it is.

Shapes are named (`batch`, `position`, `embed`, `heads`, `head_size`, `mlp`, `vocab`, `layers`), so a
sharding is a table from these names to mesh axes (trainer/sharding.py), not per-array specs. Params are
stored in `param_dtype` (float32) and cast to `compute_dtype` (bfloat16) for the forward; LayerNorm
statistics, the attention softmax and the loss are computed in float32. The vocabulary is padded to a
multiple of `vocab_multiple`; the padded columns get logit -1e9, so they are never predicted or sampled.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import haliax as hax
import haliax.nn as hnn
import jax
import jax.numpy as jnp
from haliax import Axis, NamedArray

from trainer.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS, attention

__all__ = [
    "ARCHITECTURES",
    "PADDED_LOGIT",
    "REMAT_POLICIES",
    "LanguageModel",
    "ModelConfig",
    "apply_rotary",
    "cast_floating",
    "causal_attention",
    "fold_layers",
    "gelu",
    "head_logits",
    "layer_norm",
    "logits_fn",
    "loss_fn",
    "split_tokens",
    "token_losses",
]

ARCHITECTURES = ("neox", "gpt2")
PADDED_LOGIT = -1e9  # logit of the padded vocabulary columns: exp() is exactly 0 in float32
# model.remat -> the jax.checkpoint policy of one scanned layer (None: no jax.checkpoint at all).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # the projections, not q.k
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture, shape and numerics of the model (`--model.*`)."""

    arch: str = "neox"
    """"neox": GPT-NeoX (rotary on rotary_pct of each head, parallel residual x + attn(ln1(x)) +
    mlp(ln2(x)), exact GELU, untied output head). "gpt2": GPT-2 as nanoGPT and levanter define it (learned
    positions, seq_len of them; sequential residual x + attn(ln1(x)), then + mlp(ln2(x)); GELU with the tanh
    approximation; the output head tied to the input embedding)."""
    seq_len: int = 256
    """Tokens per training sequence (NeoX's rotary positions are relative; GPT-2 learns exactly seq_len)."""
    hidden_dim: int = 256
    """Width d of the residual stream (`embed` axis)."""
    num_layers: int = 4
    """Number of transformer blocks (stacked on the `layers` axis and scanned)."""
    num_heads: int = 4
    """Attention heads; hidden_dim must be a multiple of it."""
    mlp_ratio: int = 4
    """MLP width as a multiple of hidden_dim (NeoX and GPT-2: 4)."""
    rotary_pct: float = 0.25
    """neox: fraction of each head's dims that get the rotary embedding (NeoX: 0.25); the rest get none."""
    rotary_base: float = 10000.0
    """neox: base of the rotary frequencies."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    bias: bool = True
    """gpt2: biases in the linear layers and LayerNorms (nanoGPT's `bias`; its released small config sets
    false). GPT-NeoX always has them."""
    scale_attn_by_inverse_layer_idx: bool = False
    """gpt2: divide layer i's attention scores by i + 1 as well (levanter's and HF's flag; the seed's 1.5B
    run sets it)."""
    vocab_size: int | None = None
    """Token ids the data can hold; None = take it from the dataset (or from init_from's config.json).
    Padded up to `vocab_multiple`."""
    vocab_multiple: int = 128
    """The embedding and head have vocab_size rounded up to a multiple of this (MXU/TPU friendly)."""
    init_from: str | None = None
    """A local Hugging Face checkpoint directory (config.json + model.safetensors: a GPTNeoXForCausalLM such
    as a downloaded Pythia, or a GPT2LMHeadModel) to start a fresh run from; its config.json must match this
    model's architecture fields. Ignored when the run resumes from its own checkpoint."""
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
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch={self.arch!r}; use one of {', '.join(ARCHITECTURES)}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"model.hidden_dim={self.hidden_dim} is not a multiple of model.num_heads="
                             f"{self.num_heads}; pick a head count that divides it")
        if self.arch == "neox":
            rotary = self.rotary_dim
            if not 0 <= self.rotary_pct <= 1 or rotary % 2:
                raise ValueError(f"model.rotary_pct={self.rotary_pct} gives {rotary} rotary dims of "
                                 f"head_size={self.head_size}; use a fraction in [0, 1] giving an even count")
            for name, plain in (("bias", True), ("scale_attn_by_inverse_layer_idx", False)):
                if getattr(self, name) != plain:
                    raise ValueError(f"model.{name}={getattr(self, name)} is a GPT-2 option; GPT-NeoX has "
                                     f"{str(plain).lower()} (set model.arch gpt2, or drop it)")
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
        return int(self.head_size * self.rotary_pct) if self.arch == "neox" else 0

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
    Pos = property(lambda self: Axis("position", self.seq_len))


class LanguageModel(Protocol):
    """What the trainer needs of a model family (trainer/models/neox.py, gpt2.py)."""

    config: ModelConfig

    def __call__(self, tokens: NamedArray) -> NamedArray:
        """Token ids [batch, position] -> float32 logits [batch, position, vocab], padded columns -1e9."""

    def hidden(self, tokens: NamedArray) -> tuple[NamedArray, Any]:
        """(final hidden states [batch, position, embed] after the last LayerNorm, the output head), both in
        the compute dtype; `head_logits(head, x, vocab_size)` of them is the model's output."""


# ------------------------------------------------------------------------------------------ layers
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


@jax.checkpoint
def layer_norm(norm: hnn.LayerNorm, x: NamedArray) -> NamedArray:
    """LayerNorm with float32 statistics whatever the compute dtype. Rematerialised: the backward pass
    recomputes the float32 intermediates from x rather than keeping them (they would be ~16 float32
    [batch, position, embed] arrays per layer, more than all the bf16 activations of a layer together)."""
    return cast_floating(norm, jnp.float32)(x.astype(jnp.float32)).astype(x.dtype)


def gelu(x: NamedArray, approximate: bool) -> NamedArray:
    """GELU, exact (NeoX) or with the tanh approximation (GPT-2's `gelu_new`), rematerialised: only its
    input is kept for the backward pass, not erf's or tanh's intermediates."""
    return jax.checkpoint(lambda y: hnn.gelu(y, approximate=approximate))(x)


def cast_floating(tree: Any, dtype: Any) -> Any:
    """`tree` with every floating leaf cast to `dtype` (integer leaves as they are)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def causal_attention(q: NamedArray, k: NamedArray, v: NamedArray, config: ModelConfig) -> NamedArray:
    """softmax(q k^T / sqrt(head_size) + causal mask) v over [batch, position, heads, head_size], through
    the implementation `config.attention` names (trainer/attention.py); returns q's axes."""
    axes = ("batch", "position", "heads", "head_size")
    q, k, v = (a.rearrange(axes) for a in (q, k, v))
    out = attention(q.array, k.array, v.array, config.attention, block_size=config.attention_block_size)
    return hax.named(out, q.axes)


def fold_layers(layers: hnn.Stacked, x: NamedArray, config: ModelConfig, *scanned: NamedArray) -> NamedArray:
    """x through every block of `layers` (lax.scan over `layers`): `block(x, *per_layer)` where each of
    `scanned` has a `layers` axis and the block gets its own slice (e.g. the layer index). Each layer is
    rematerialised as `config.remat` says."""
    layer = lambda block, x, *per_layer: block(x, *per_layer)  # noqa: E731
    policy = REMAT_POLICIES[config.remat]
    if policy is not None:
        layer = jax.checkpoint(layer, policy=policy, prevent_cse=False)  # in a scan CSE cannot cross
    return layers.fold_via(layer)(x, *scanned)


# ------------------------------------------------------------------------------------------ loss
def split_tokens(tokens: jax.Array) -> tuple[NamedArray, NamedArray]:
    """int32 [batch, seq_len+1] -> inputs, targets [batch, position] (targets shifted by one)."""
    Batch, Pos = Axis("batch", tokens.shape[0]), Axis("position", tokens.shape[1] - 1)
    return hax.named(tokens[:, :-1], (Batch, Pos)), hax.named(tokens[:, 1:], (Batch, Pos))


def head_logits(head: Any, x: NamedArray, vocab_size: int) -> NamedArray:
    """float32 logits [..., vocab] of hidden states x through a model's output head (`model.hidden`'s
    second value, for any architecture); the padded vocabulary columns hold PADDED_LOGIT."""
    logits = head(x).astype(jnp.float32)
    return hax.where(hax.arange(logits.resolve_axis("vocab")) < vocab_size, logits, PADDED_LOGIT)


def _cross_entropy(logits: NamedArray, targets: NamedArray) -> NamedArray:
    """-log softmax(logits)[target] per position: logsumexp over vocab minus the target's logit."""
    return hax.nn.logsumexp(logits, axis="vocab") - hax.take(logits, "vocab", targets)


def _chunked_cross_entropy(head: Any, x: NamedArray, targets: NamedArray, vocab_size: int,
                           chunk: int) -> NamedArray:
    """`_cross_entropy(head_logits(head, x), targets)` [batch, position], computed `chunk` positions at a
    time (lax.scan, the sequence zero-padded to a multiple): each step builds only its own [batch, chunk,
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
        logits = head_logits(head, hax.named(x_c, (Batch, Chunk, Embed)), vocab_size)
        return None, _cross_entropy(logits, hax.named(t_c, (Batch, Chunk))).rearrange((Batch, Chunk)).array

    _, losses = jax.lax.scan(step, None, (xs, ts))  # [n, batch, chunk]
    return hax.named(losses.swapaxes(0, 1).reshape(Batch.size, n * chunk)[:, : Pos.size], (Batch, Pos))


def token_losses(model: LanguageModel, tokens: jax.Array,
                 mask: jax.Array | None = None) -> tuple[NamedArray, NamedArray]:
    """Per-position cross-entropy [batch, position] (float32) and the 0/1 mask of positions that count.

    `tokens` is int32 [batch, seq_len+1]; `mask` [batch, seq_len] marks the targets that count
    (0 for padding); None counts them all. With model.loss_chunk set, the logits are built that many
    positions at a time (the same numbers, without holding [batch, seq_len, vocab] float32 logits).
    """
    inputs, targets = split_tokens(tokens)
    x, head = model.hidden(inputs)
    c = model.config
    if c.loss_chunk and c.loss_chunk < targets.resolve_axis("position").size:
        losses = _chunked_cross_entropy(head, x, targets, c.vocab_size, c.loss_chunk)
    else:
        losses = _cross_entropy(head_logits(head, x, c.vocab_size), targets).rearrange(targets.axes)
    weights = hax.ones_like(losses) if mask is None else hax.named(mask.astype(jnp.float32), losses.axes)
    return losses * weights, weights


def loss_fn(model: LanguageModel, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean cross-entropy over the positions that count (a float32 scalar)."""
    losses, weights = token_losses(model, tokens, mask)
    return losses.sum().array / jnp.maximum(weights.sum().array, 1.0)


def logits_fn(model: LanguageModel, tokens: jax.Array,
              mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """`(logits [batch, position, vocab], mask [batch, position])` as plain arrays, for
    `sophia_jax.gauss_newton_bartlett`. Padded vocab columns hold -1e9, so labels are never sampled there."""
    inputs, _ = split_tokens(tokens)
    logits = model(inputs).rearrange(("batch", "position", "vocab")).array
    weights = jnp.ones(logits.shape[:-1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    return logits, weights
