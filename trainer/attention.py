"""Causal softmax attention on plain arrays [batch, position, heads, head_size], three ways.

- `naive_attention`: the readable reference. Builds the float32 [batch, heads, position, position] scores,
  and reverse-mode autodiff keeps them (and the weights) for the backward pass.
- `blockwise_attention`: flash-style attention in plain JAX, for TPU v3 (where the Pallas kernels do not
  run) and CPU. Queries and keys are cut into blocks; for each query block an online softmax runs over
  the key blocks at or before it (blocks wholly in the future are skipped, only the diagonal block is
  masked). Scores exist one [block, block] tile at a time. A custom VJP stores only the output and the
  per-query log-sum-exp and recomputes the tiles in the backward pass (FlashAttention-2, Dao 2023).
- `cudnn_attention`: cuDNN's fused kernel through `jax.nn.dot_product_attention` (GPU, bf16/fp16 only).

Every implementation accumulates the scores in float32 and keeps the softmax statistics in float32
whatever the compute dtype; the weights meet `v` in the compute dtype (as in the fused kernels).
`attention(q, k, v, implementation)` dispatches; "auto" picks by platform (`resolve_implementation`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = [
    "IMPLEMENTATIONS",
    "attention",
    "blockwise_attention",
    "cudnn_attention",
    "naive_attention",
    "resolve_implementation",
]

IMPLEMENTATIONS = ("auto", "cudnn", "blockwise", "naive")
# Score of a masked (future) key: exp(MASKED - max) is exactly 0 in float32, and a finite value keeps
# a row with every key masked (never the case here: each query sees key 0) free of NaN.
MASKED = -1e30


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto", *,
              block_size: int = 512, platform: str | None = None) -> jax.Array:
    """Causal softmax attention of q, k, v [batch, position, heads, head_size] (one dtype); returns
    [batch, position, heads, head_size] in that dtype. `implementation` is one of IMPLEMENTATIONS;
    "auto" is resolved for `platform` (default: JAX's default backend)."""
    name = resolve_implementation(implementation, platform or jax.default_backend(), q.dtype)
    if name == "naive":
        return naive_attention(q, k, v)
    if name == "blockwise":
        return blockwise_attention(q, k, v, block_size)
    return cudnn_attention(q, k, v)


def resolve_implementation(implementation: str, platform: str, dtype: jnp.dtype) -> str:
    """The implementation "auto" means on `platform` ("gpu"/"cuda", "tpu", "cpu") for `dtype`: cuDNN's
    fused kernel on GPU for bf16/fp16 (it has no float32), blockwise elsewhere. On CPU blockwise measured
    as fast as naive for the tiny default config (see the commit that set it) and it needs far less
    memory. Other names are checked and returned as they are."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}")
    if implementation != "auto":
        return implementation
    gpu = platform in ("gpu", "cuda")  # NVIDIA: cuDNN
    return "cudnn" if gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "blockwise"


# ------------------------------------------------------------------------------------------ naive
def naive_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(head_size) + causal mask) v, materialising the float32 scores
    [batch, heads, position, key_position]. q, k, v: [batch, position, heads, head_size]; returns q's shape
    and dtype."""
    T, D = q.shape[1], q.shape[3]
    scores = _dot_scores(q, k) / math.sqrt(D)
    causal = jnp.arange(T)[None, :] <= jnp.arange(T)[:, None]  # [position, key_position]
    scores = jnp.where(causal, scores, -1e9)
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bnqk,bknd->bqnd", weights, v)


def _scores_f32(q: jax.Array, k: jax.Array) -> jax.Array:
    return jnp.einsum("bqnd,bknd->bnqk", q, k, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _dot_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q . k per head, [batch, heads, position, key_position], accumulated and returned in float32 (a
    bf16 result would round the scores to 8 significant bits). Its backward casts the float32 cotangent
    to q's dtype first: autodiff would pair it with the bf16 operands, i.e. run float32 matmuls."""
    return _scores_f32(q, k)


def _dot_scores_fwd(q, k):
    # Plain JAX, not _dot_scores itself: forward-over-reverse (Hessian-vector products, jax.hessian)
    # differentiates this rule in forward mode, which a custom_vjp function refuses.
    return _scores_f32(q, k), (q, k)


def _dot_scores_bwd(residuals, d_scores):
    q, k = residuals
    ds = d_scores.astype(q.dtype)
    dq = jnp.einsum("bnqk,bknd->bqnd", ds, k, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bnqk,bqnd->bknd", ds, q, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype)


_dot_scores.defvjp(_dot_scores_fwd, _dot_scores_bwd)


# ------------------------------------------------------------------------------------------ cudnn
def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """cuDNN's fused causal attention (GPU only, bf16 or fp16), same contract as `naive_attention`."""
    platforms = {d.platform for d in jax.devices()}
    if "gpu" not in platforms and "cuda" not in platforms:
        raise ValueError(f"model.attention='cudnn' needs a GPU, but JAX sees {', '.join(sorted(platforms))}; "
                         "use 'blockwise' or 'auto'")
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"model.attention='cudnn' needs compute_dtype bfloat16 or float16, got {q.dtype}; "
                         "use 'blockwise' for float32")
    return jax.nn.dot_product_attention(q, k, v, scale=1 / math.sqrt(q.shape[3]), is_causal=True,
                                        implementation="cudnn")


# ------------------------------------------------------------------------------------------ blockwise
def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_size: int = 512) -> jax.Array:
    """Causal attention in [block, block] tiles with an online softmax and a recomputing backward pass;
    same contract as `naive_attention`. Blocks are min(block_size, position) long; a sequence that is not
    a multiple is padded at the end (padded keys lie in every real query's future, so the causal mask
    hides them; padded query rows are dropped)."""
    if block_size < 1:
        raise ValueError(f"model.attention_block_size={block_size}; use a positive block length")
    T = q.shape[1]
    size = min(block_size, T)
    blocks = -(-T // size)
    out = _blockwise(*(_to_blocks(a, size, blocks) for a in (q, k, v)))
    return _from_blocks(out, T)


def _to_blocks(x: jax.Array, size: int, blocks: int) -> jax.Array:
    """[batch, position, heads, d] -> [blocks, batch, heads, size, d], zero-padded at the end."""
    B, T, N, D = x.shape
    x = jnp.pad(x, ((0, 0), (0, blocks * size - T), (0, 0), (0, 0)))
    return x.reshape(B, blocks, size, N, D).transpose(1, 0, 3, 2, 4)


def _from_blocks(x: jax.Array, length: int) -> jax.Array:
    """The inverse of `_to_blocks`, padding dropped."""
    blocks, B, N, size, D = x.shape
    return x.transpose(1, 0, 3, 2, 4).reshape(B, blocks * size, N, D)[:, :length]


def _scores(q_i: jax.Array, k_j: jax.Array, diagonal: bool) -> jax.Array:
    """float32 scores [batch, heads, size, size] of query block i against key block j; on the diagonal
    block (i == j) the keys after each query are masked."""
    s = jnp.einsum("bnqd,bnkd->bnqk", q_i, k_j, preferred_element_type=jnp.float32) / math.sqrt(q_i.shape[-1])
    if diagonal:
        size = q_i.shape[2]
        s = jnp.where(jnp.tril(jnp.ones((size, size), bool)), s, MASKED)
    return s


@jax.custom_vjp
def _blockwise(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention over blocks [blocks, batch, heads, size, d] -> the output in the same layout."""
    return _blockwise_forward(q, k, v)[0]


def _blockwise_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(output [blocks, batch, heads, size, d] in q's dtype, float32 log-sum-exp [blocks, batch, heads, size])."""

    def query_block(_, xs):
        q_i, i = xs

        def key_block(j, carry, diagonal=False):
            acc, m, l = carry  # float32: unnormalised output, running max, running sum of exp
            s = _scores(q_i, k[j], diagonal)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            rescale = jnp.exp(m - m_new)  # 0 on the first block (m = -inf)
            l = rescale * l + p.sum(-1)
            pv = jnp.einsum("bnqk,bnkd->bnqd", p.astype(v.dtype), v[j], preferred_element_type=jnp.float32)
            return rescale[..., None] * acc + pv, m_new, l

        stats = q_i.shape[:-1]
        init = (jnp.zeros(q_i.shape, jnp.float32), jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32))
        carry = jax.lax.fori_loop(0, i, key_block, init)  # the key blocks before the diagonal: no mask
        acc, m, l = key_block(i, carry, diagonal=True)
        return None, ((acc / l[..., None]).astype(q.dtype), m + jnp.log(l))

    _, (out, lse) = jax.lax.scan(query_block, None, (q, jnp.arange(q.shape[0])))
    return out, lse


def _blockwise_fwd(q, k, v):
    out, lse = _blockwise_forward(q, k, v)
    return out, (q, k, v, out, lse)


def _blockwise_bwd(residuals, d_out):
    """FlashAttention-2's backward: for each key block j, the query blocks i >= j recompute
    p = exp(s - lse); dV_j += p^T dO_i, dS = p * (dO_i V_j^T - rowsum(dO_i * O_i)), dK_j += dS^T Q_i,
    dQ_i += dS K_j (dS scaled by 1/sqrt(d)). Accumulated in float32."""
    q, k, v, out, lse = residuals
    d_out = d_out.astype(q.dtype)
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [blocks, batch, heads, size]
    scale = 1 / math.sqrt(q.shape[-1])

    def key_block(dq, xs):
        k_j, v_j, j = xs

        def query_block(i, carry, diagonal=False):
            dq, dk_j, dv_j = carry
            q_i, do_i = q[i], d_out[i]
            p = jnp.exp(_scores(q_i, k_j, diagonal) - lse[i][..., None])
            dv_j = dv_j + jnp.einsum("bnqk,bnqd->bnkd", p.astype(q.dtype), do_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bnqd,bnkd->bnqk", do_i, v_j, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[i][..., None]) * scale).astype(q.dtype)
            dk_j = dk_j + jnp.einsum("bnqk,bnqd->bnkd", ds, q_i, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bnqk,bnkd->bnqd", ds, k_j, preferred_element_type=jnp.float32)
            return dq.at[i].add(dq_i), dk_j, dv_j

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        carry = query_block(j, (dq, zeros, zeros), diagonal=True)
        dq, dk_j, dv_j = jax.lax.fori_loop(j + 1, q.shape[0], query_block, carry)  # later query blocks: no mask
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), (k, v, jnp.arange(k.shape[0])))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)
