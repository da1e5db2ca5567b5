"""Causal softmax attention on plain arrays [batch, position, heads, head_size].

`naive_attention` is the readable reference: it builds the [position, position] scores.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["naive_attention"]


def naive_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_size) + causal mask) v, materialising the float32 scores
    [batch, heads, position, key_position]. q, k, v: [batch, position, heads, head_size]; returns q's shape
    and dtype."""
    T, D = q.shape[1], q.shape[3]
    # float32 accumulation and output: a bf16 result would round the scores to 8 significant bits.
    scores = jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(D)
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]  # [position, key_position]
    scores = jnp.where(causal, scores, -1e9)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", weights, v)
