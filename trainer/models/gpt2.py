"""GPT-2 in haliax + equinox, top to bottom: attention, MLP, block, model, size.

As nanoGPT's model.py in the official Sophia release and levanter's gpt2 (the seed's 1.5B run) define it:
token embedding wte plus learned position embedding wpe (seq_len positions); pre-LN sequential blocks
`x = x + attn(ln1(x))`, `x = x + mlp(ln2(x))`; a final ln_f; LayerNorm eps 1e-5; MLP 4x with GELU's tanh
approximation (HF's "gelu_new"); attention scale 1/sqrt(head_size), divided further by layer index + 1 with
`scale_attn_by_inverse_layer_idx` (the index is scanned with the layers); the output head is wte itself
(tied, no bias). `bias` switches the biases of every linear layer and LayerNorm (nanoGPT's flag).

Init as nanoGPT: normal(0, 0.02) for the linear layers and both embeddings, normal(0, 0.02 / sqrt(2 *
num_layers)) for the two residual projections (attention out, MLP down), zero biases. (levanter instead
uses haliax's default 1/sqrt(fan_in) truncated normal for the linear layers and 0.01 for wpe.)
"""

from __future__ import annotations

import math

import equinox as eqx
import haliax as hax
import haliax.nn as hnn
import jax
import jax.numpy as jnp
from haliax import Axis, NamedArray

from trainer.models.common import (
    ModelConfig,
    cast_floating,
    causal_attention,
    fold_layers,
    gelu,
    head_logits,
    layer_norm,
)

__all__ = ["GPT2", "TiedHead", "num_params"]

INIT_STD = 0.02  # nanoGPT's (and GPT-2's) initializer range


def _linear(In, Out, config: ModelConfig, key: jax.Array, std: float = INIT_STD) -> hnn.Linear:
    """A Linear In -> Out with weight ~ normal(0, std) (haliax's own init is a truncated 1/sqrt(fan_in))."""
    linear = hnn.Linear.init(In, Out, key=key, use_bias=config.bias)
    return eqx.tree_at(lambda m: m.weight, linear, hax.random.normal(key, linear.weight.axes) * std)


def _embedding(Vocab: Axis, config: ModelConfig, key: jax.Array) -> hnn.Embedding:
    """An Embedding [Vocab, embed] with weight ~ normal(0, 0.02)."""
    return hnn.Embedding(hax.random.normal(key, (Vocab, config.Embed)) * INIT_STD, Vocab, config.Embed)


def _layer_norm_module(config: ModelConfig) -> hnn.LayerNorm:
    return hnn.LayerNorm.init(config.Embed, eps=config.layer_norm_eps, use_bias=config.bias)


def _residual_std(config: ModelConfig) -> float:
    return INIT_STD / math.sqrt(2 * config.num_layers)


class Attention(eqx.Module):
    """Causal multi-head self-attention, no position encoding of its own (wpe is added to the input)."""

    config: ModelConfig = eqx.field(static=True)
    qkv: hnn.Linear  # embed -> (qkv=3, heads, head_size); HF's c_attn
    out: hnn.Linear  # (heads, head_size) -> embed; HF's attn.c_proj

    @staticmethod
    def init(config: ModelConfig, *, key: jax.Array) -> Attention:
        k_qkv, k_out = jax.random.split(key)
        qkv = _linear(config.Embed, (Axis("qkv", 3), config.Heads, config.HeadSize), config, k_qkv)
        out = _linear((config.Heads, config.HeadSize), config.Embed, config, k_out, _residual_std(config))
        return Attention(config, qkv, out)

    def __call__(self, x: NamedArray, layer: NamedArray) -> NamedArray:
        q, k, v = self.qkv(x).unbind("qkv")
        if self.config.scale_attn_by_inverse_layer_idx:  # scores / (layer + 1), applied to q as levanter does
            q = q / (layer + 1).astype(q.dtype)
        return self.out(causal_attention(q, k, v, self.config))


class MLP(eqx.Module):
    """embed -> mlp (GELU, tanh approximation) -> embed."""

    up: hnn.Linear  # HF's c_fc
    down: hnn.Linear  # HF's mlp.c_proj

    @staticmethod
    def init(config: ModelConfig, *, key: jax.Array) -> MLP:
        k_up, k_down = jax.random.split(key)
        return MLP(_linear(config.Embed, config.Mlp, config, k_up),
                   _linear(config.Mlp, config.Embed, config, k_down, _residual_std(config)))

    def __call__(self, x: NamedArray) -> NamedArray:
        return self.down(gelu(self.up(x), approximate=True))


class Block(eqx.Module):
    """One GPT-2 layer with the sequential pre-LN residual: x + attn(ln1(x)), then + mlp(ln2(.))."""

    ln1: hnn.LayerNorm
    attn: Attention
    ln2: hnn.LayerNorm
    mlp: MLP

    @staticmethod
    def init(config: ModelConfig, *, key: jax.Array) -> Block:
        k_attn, k_mlp = jax.random.split(key)
        return Block(_layer_norm_module(config), Attention.init(config, key=k_attn), _layer_norm_module(config),
                     MLP.init(config, key=k_mlp))

    def __call__(self, x: NamedArray, layer: NamedArray) -> NamedArray:
        """`layer`: this block's index (int32, no axes), scanned with the stacked weights."""
        block, x = hax.shard((self, x))  # as in trainer/models/neox.py's Block
        x = x + block.attn(layer_norm(block.ln1, x), layer)
        return x + block.mlp(layer_norm(block.ln2, x))


class TiedHead(eqx.Module):
    """The output head of a tied model: logits = x . wte over `embed`."""

    embed: hnn.Embedding

    def __call__(self, x: NamedArray) -> NamedArray:
        return self.embed.unembed(x)


class GPT2(eqx.Module):
    """Token ids [batch, position <= seq_len] -> logits [batch, position, vocab] (float32, padded columns -1e9)."""

    config: ModelConfig = eqx.field(static=True)
    embed: hnn.Embedding  # wte [vocab, embed], also the output head
    pos_embed: hnn.Embedding  # wpe [position = seq_len, embed]
    layers: hnn.Stacked[Block]  # every leaf has a leading `layers` axis
    ln_f: hnn.LayerNorm

    @staticmethod
    def init(config: ModelConfig, *, key: jax.Array) -> GPT2:
        k_embed, k_pos, k_layers = jax.random.split(key, 3)
        embed, pos_embed = _embedding(config.Vocab, config, k_embed), _embedding(config.Pos, config, k_pos)
        layers = hnn.Stacked.init(config.Layers, Block)(config, key=jax.random.split(k_layers, config.num_layers))
        model = GPT2(config, embed, pos_embed, layers, _layer_norm_module(config))
        return cast_floating(model, jnp.dtype(config.param_dtype))

    def __call__(self, tokens: NamedArray) -> NamedArray:
        x, head = self.hidden(tokens)
        return head_logits(head, x, self.config.vocab_size)

    def hidden(self, tokens: NamedArray) -> tuple[NamedArray, TiedHead]:
        """(final hidden states [batch, position, embed] after ln_f, the tied output head), both in the
        compute dtype; `head_logits(head, x, vocab_size)` of them is the model's output."""
        c = self.config
        Pos = tokens.resolve_axis("position")
        if Pos.size > c.seq_len:
            raise ValueError(f"{Pos.size} positions, but a GPT-2 learns model.seq_len={c.seq_len} position "
                             "embeddings; pass at most that many tokens")
        model = cast_floating(self, jnp.dtype(c.compute_dtype))
        embed, pos_embed, ln_f = hax.shard((model.embed, model.pos_embed, model.ln_f))  # gathered as in Block
        x = hax.shard(embed.embed(tokens) + pos_embed.embed(hax.arange(Pos)))
        x = fold_layers(model.layers, x, c, hax.arange(c.Layers, dtype=jnp.int32))
        return layer_norm(ln_f, x), TiedHead(embed)


def num_params(config: ModelConfig, *, include_embeddings: bool = True) -> int:
    """Closed-form parameter count: wte V*d (also the head) and wpe seq_len*d are the embeddings."""
    d, f, L = config.hidden_dim, config.hidden_dim * config.mlp_ratio, config.num_layers
    b = 1 if config.bias else 0
    per_layer = (
        2 * (d + b * d)  # ln1, ln2
        + d * 3 * d + b * 3 * d  # qkv
        + d * d + b * d  # attention out
        + d * f + b * f + f * d + b * d  # mlp
    )
    total = L * per_layer + d + b * d  # + ln_f
    return total + ((config.padded_vocab + config.seq_len) * d if include_embeddings else 0)
