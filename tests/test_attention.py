"""Causal attention (trainer/attention.py) against a float64 NumPy statement of softmax attention."""

import jax.numpy as jnp
import numpy as np

from trainer.attention import naive_attention


def reference(q, k, v) -> np.ndarray:
    """softmax(q k^T / sqrt(d), future keys excluded) v in float64; q, k, v [batch, position, heads, d]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T, D = q.shape[1], q.shape[3]
    s = np.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(D)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bnqk,bknd->bqnd", p, v)


def qkv(shape, dtype, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(shape) * s for s in (scale, scale, 1.0))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def test_naive_bf16_scores_are_not_rounded_to_bf16():
    """bf16 q, k whose dot products need more than bf16's 8 significant bits: the scores must be
    accumulated and kept in float32. Rounding them to bf16 (then casting) moves the output by ~0.09
    here; the float32 scores leave only the bf16 rounding of the weights and output (~0.012)."""
    q, k, v = qkv((2, 64, 2, 64), jnp.bfloat16, scale=3.0)
    out = np.asarray(naive_attention(q, k, v), np.float64)
    np.testing.assert_allclose(out, reference(q, k, v), atol=0.03)
