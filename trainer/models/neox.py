"""GPT-NeoX in haliax + equinox, top to bottom: attention, MLP, block, model, size.

Architecture (Black et al. 2022, as in the Sophia paper's NeoX runs and Pythia): rotary position embedding
on the first `rotary_pct` of each head's dims; parallel residual `x + attn(ln1(x)) + mlp(ln2(x))`;
LayerNorm with bias (eps 1e-5); exact GELU MLP; biased projections; untied input embedding and output
head; layers stacked and scanned (`haliax.nn.Stacked`), optionally rematerialised. The layers, the
attention and the loss are trainer/models/common.py's.
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
    apply_rotary,
    cast_floating,
    causal_attention,
    fold_layers,
    gelu,
    head_logits,
    layer_norm,
)

__all__ = ["GPTNeoX", "num_params"]


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
        return self.out(causal_attention(q, k, v, c))


class MLP(eqx.Module):
    """embed -> mlp (exact GELU) -> embed, biased."""

    up: hnn.Linear
    down: hnn.Linear

    @staticmethod
    def init(config: ModelConfig, *, key: jax.Array) -> MLP:
        k_up, k_down = jax.random.split(key)
        up = hnn.Linear.init(config.Embed, config.Mlp, key=k_up)
        down = hnn.Linear.init(config.Mlp, config.Embed, key=k_down, init_scale=1 / math.sqrt(2 * config.num_layers))
        return MLP(up, down)

    def __call__(self, x: NamedArray) -> NamedArray:
        return self.down(gelu(self.up(x), approximate=False))


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
        return x + block.attn(layer_norm(block.ln1, x)) + block.mlp(layer_norm(block.ln2, x))


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
        return cast_floating(GPTNeoX(config, embed, layers, ln_f, head), jnp.dtype(config.param_dtype))

    def __call__(self, tokens: NamedArray) -> NamedArray:
        x, head = self.hidden(tokens)
        return head_logits(head, x, self.config.vocab_size)

    def hidden(self, tokens: NamedArray) -> tuple[NamedArray, hnn.Linear]:
        """(final hidden states [batch, position, embed] after ln_f, the output head), both in the
        compute dtype; `head_logits(head, x, vocab_size)` of them is the model's output."""
        model = cast_floating(self, jnp.dtype(self.config.compute_dtype))
        embed, ln_f, head = hax.shard((model.embed, model.ln_f, model.head))  # gathered as in Block
        x = hax.shard(embed.embed(tokens))
        x = fold_layers(model.layers, x, self.config)
        return layer_norm(ln_f, x), head


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
