"""Diagonal Hessian estimators for Sophia: Gauss-Newton-Bartlett (Sophia-G) and Hutchinson (Sophia-H).

Each factory returns a `hessian_fn(params, key, **extra_args)` suitable for `scale_by_sophia`. The
function it wraps (`logits_fn`, `loss_fn`) is called with the extra arguments its signature names.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sophia_jax._arguments import check_callable, check_number, keyword_picker
from sophia_jax.microbatches import accumulate
from sophia_jax.transform import HessianFn, at_least_float32

__all__ = ["ChunkedLogits", "gauss_newton_bartlett", "hutchinson", "sample_labels"]

_SAMPLE_GROUP = 16  # on CPU, the positions whose labels are drawn together (see sample_labels)


class ChunkedLogits(NamedTuple):
    """What a `logits_fn` may return instead of logits: the hidden states and the output projection, so
    that `gauss_newton_bartlett` builds the logits `chunk` positions at a time (under `lax.scan` and
    `jax.checkpoint`) and the float32 `[..., T, V]` logits and their gradient never exist whole. Same
    labels and the same estimate as returning `project(hidden)` (see `sample_labels`)."""

    hidden: jax.Array  # [..., T, D]: what the output projection reads (e.g. the final hidden states).
    project: Callable[[jax.Array], jax.Array]  # hidden [..., C, D] -> logits [..., C, V]; may close over params.
    mask: jax.Array | None = None  # [..., T], 0/1: the positions that count (None: all).
    chunk: int = 0  # positions per chunk (the last one may be shorter); 0 or >= T: all at once.


def _require_key(key: jax.Array | None) -> jax.Array:
    if key is None:
        raise TypeError(
            "a Sophia hessian_fn was called without a PRNG key. Under optax.inject_hyperparams, callables "
            "are taken for schedules: use optax.inject_hyperparams(sophia_jax.sophia_g, "
            "static_args=('hessian_fn',))(...)."
        )
    return key


def _check_mask(mask: jax.Array, leading: tuple[int, ...], what: str) -> None:
    if mask.shape != leading:
        raise ValueError(f"logits_fn's mask has shape {mask.shape}, expected the {what} leading shape {leading} "
                         "(one 0/1 entry per predicted position).")


def _split_logits_and_mask(output: Any) -> tuple[jax.Array, jax.Array | None]:
    if isinstance(output, tuple):
        if len(output) != 2:
            raise ValueError(
                f"logits_fn returned a tuple of {len(output)} items; return logits [..., V], "
                "(logits [..., V], mask [...]) or a sophia_jax.ChunkedLogits."
            )
        logits, mask = output
        _check_mask(mask, logits.shape[:-1], "logits'")
        return logits, mask
    return output, None


def sample_labels(logits: jax.Array, key: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Labels `y ~ Categorical(softmax(logits))` for logits `[..., T, V]`, as the GNB estimator draws them.

    Gumbel-max, `argmax(logits + g)`, with the noise `g` of position t (all leading rows at once, shape
    `[..., V]`) drawn from `fold_in(key, t)`: a label depends on its position's index, not on how the
    positions are grouped, so a chunked estimate samples exactly the labels of the whole one.

    Args:
      logits: `[..., T, V]` (no gradient flows through the sampling).
      key: a PRNG key.
      positions: int `[T]`, the index of each of the T positions (default `arange(T)`).

    Returns:
      int32 `[..., T]`.
    """
    logits = jax.lax.stop_gradient(logits)
    positions = jnp.arange(logits.shape[-2]) if positions is None else positions
    # The same numbers two ways (XLA's memory analysis of a sampled-label gradient, float32 [8, 2048, 25216]
    # logits in chunks of 512): one elementwise expression over all positions, which XLA for TPU fuses into
    # the argmax (0.23 GiB of temporaries) but XLA for CPU materializes (2.24 GiB); on CPU a loop over
    # groups of positions keeps one group's noise at a time (1.08 GiB).
    return jax.lax.platform_dependent(logits, key, positions, cpu=_labels_by_group, default=_labels_at_once)


def _gumbel(key: jax.Array, position: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jax.random.gumbel(jax.random.fold_in(key, position), shape, dtype)


def _labels_at_once(logits: jax.Array, key: jax.Array, positions: jax.Array) -> jax.Array:
    shape = logits.shape[:-2] + logits.shape[-1:]
    noise = jax.vmap(lambda t: _gumbel(key, t, shape, logits.dtype))(positions)  # [T, ..., V]
    return jnp.argmax(logits + jnp.moveaxis(noise, 0, -2), axis=-1).astype(jnp.int32)


def _labels_by_group(logits: jax.Array, key: jax.Array, positions: jax.Array) -> jax.Array:
    shape = logits.shape[:-2] + logits.shape[-1:]

    def position(i: jax.Array) -> jax.Array:  # the labels [...] of the i-th position
        row = jax.lax.dynamic_index_in_dim(logits, i, axis=logits.ndim - 2, keepdims=False)
        return jnp.argmax(row + _gumbel(key, positions[i], shape, logits.dtype), axis=-1).astype(jnp.int32)

    T = logits.shape[-2]
    return jnp.moveaxis(jax.lax.map(position, jnp.arange(T), batch_size=min(T, _SAMPLE_GROUP)), 0, -1)


def _sampled_loss_sum(logits: jax.Array, mask: jax.Array | None, key: jax.Array,
                      positions: jax.Array) -> jax.Array:
    """The summed cross-entropy of logits `[..., T, V]` against labels sampled from them."""
    logits = logits.astype(at_least_float32(logits.dtype))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, sample_labels(logits, key, positions))
    return jnp.sum(losses if mask is None else losses * mask.astype(losses.dtype))


def _whole(logits: jax.Array, mask: jax.Array | None, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sampled-label loss sum, N) of logits `[..., T, V]` built at once (`[V]`: one position)."""
    if logits.ndim == 1:
        logits, mask = logits[None], None if mask is None else mask[None]
    count = jnp.asarray(logits[..., 0].size, jnp.float32) if mask is None else jnp.sum(mask, dtype=jnp.float32)
    return _sampled_loss_sum(logits, mask, key, jnp.arange(logits.shape[-2])), count


def _chunked(out: ChunkedLogits, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sampled-label loss sum, N) of `out`, its logits built `out.chunk` positions at a time."""
    hidden, mask, chunk = out.hidden, out.mask, out.chunk
    *lead, T, D = hidden.shape
    if mask is not None:
        _check_mask(mask, tuple(lead) + (T,), "hidden states'")
    if not chunk or chunk >= T:
        return _whole(out.project(hidden), mask, key)
    n = -(-T // chunk)
    pad = [(0, 0)] * len(lead) + [(0, n * chunk - T)]
    weights = jnp.ones((*lead, T), jnp.float32) if mask is None else mask.astype(jnp.float32)
    xs = jnp.moveaxis(jnp.pad(hidden, pad + [(0, 0)]).reshape(*lead, n, chunk, D), -3, 0)  # [n, ..., C, D]
    ws = jnp.moveaxis(jnp.pad(weights, pad).reshape(*lead, n, chunk), -2, 0)  # [n, ..., C]; padding weighs 0
    positions = jnp.arange(n * chunk).reshape(n, chunk)
    dtype = at_least_float32(hidden.dtype)

    @jax.checkpoint  # the backward pass rebuilds each chunk's logits instead of keeping them
    def step(total: jax.Array, chunk_inputs: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        x, w, t = chunk_inputs
        return total + _sampled_loss_sum(out.project(x), w, key, t).astype(dtype), None

    total, _ = jax.lax.scan(step, jnp.zeros([], dtype), (xs, ws, positions))
    return total, jnp.sum(weights)


def gauss_newton_bartlett(
    logits_fn: Callable[..., Any],
    *,
    max_grad_norm: float | None = None,
    microbatches: int = 1,
    constrain_grads: Callable[[Any], Any] | None = None,
) -> HessianFn:
    """The Gauss-Newton-Bartlett estimator of Sophia-G.

    Samples labels from the model's own predictions, `y_hat ~ Categorical(logits)` (`sample_labels`),
    takes `g_s`, the gradient of the mean cross-entropy against `y_hat` over the N unmasked positions, and
    returns `N * g_s * g_s`: an unbiased estimate of the diagonal of the Gauss-Newton matrix of the mean
    loss (the sampled-label per-position gradients have mean zero, so the factor N undoes the 1/N**2 of
    squaring their mean).

    Args:
      logits_fn: `logits_fn(params, **kwargs)` returning logits `[..., V]`, a pair `(logits, mask)` where
        `mask` (same leading shape, 0/1) marks the positions that count, e.g. `(logits, tokens != pad_id)`,
        or a `ChunkedLogits` (hidden states, the output projection, mask, chunk length) to bound the
        memory of the logits. Its keyword parameters are filled from the estimator call's extra arguments
        (those of `update`), by name: it gets exactly those it names (all with `**kwargs`), and one it names
        that the call did not supply is a TypeError, even when it has a default (so a `loss_mask=` passed
        for a `mask` parameter cannot leave the padding counted). Under jit with sharded inputs, N and the
        mean are over the whole global batch. The axis before the vocabulary is the position axis.
      max_grad_norm: clip `g_s` to this global norm (> 0) before squaring (the official loop clips at 1.0,
        like the training gradient); None leaves it unclipped.
      microbatches: M > 1 bounds the activation memory: every array argument of `logits_fn` is split along
        its leading (batch) axis into M microbatches (`sophia_jax.microbatches.accumulate`: microbatch i
        takes rows i, i+M, i+2M, ..., so each one spans every data shard), the sums of their sampled-label
        losses are differentiated one at a time under `lax.scan`, and `g_s` is their sum over the total N:
        the same estimator, with microbatch i's labels sampled with `fold_in(key, i)`. Leading axes must be
        divisible by M.
      constrain_grads: applied to the gradient accumulator at each microbatch, e.g. a
        `with_sharding_constraint` to the parameters' shardings, so that an FSDP-sharded model does not
        get a replicated accumulator.

    Returns:
      `hessian_fn(params, key, **extra_args) -> h_hat`, a pytree like params. `hessian_fn.with_stats`
      takes the same arguments and returns `(h_hat, stats)` (`hessian_fn.stat_names`): `grad_norm`, the
      global norm of `g_s` before the clip; `clipped`, 1.0 when the clip shrank it; `positions`, N (the
      official recipe clips `g_s` to the training clip's norm, which at small batches can shrink h by
      (max_grad_norm / grad_norm)**2).
    """
    check_callable("gauss_newton_bartlett", "logits_fn", logits_fn)
    check_callable("gauss_newton_bartlett", "constrain_grads", constrain_grads, optional=True)
    check_number("gauss_newton_bartlett", "max_grad_norm", max_grad_norm, lambda v: v > 0,
                 "use a positive norm, or None for no clipping")
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"gauss_newton_bartlett: microbatches={microbatches!r}; use an integer >= 1")
    pick = keyword_picker(logits_fn, "logits_fn", positional=1)
    clip = None if max_grad_norm is None else optax.clip_by_global_norm(max_grad_norm)

    def sampled_label_loss_sum(p: optax.Params, key: jax.Array, args: dict) -> tuple[jax.Array, jax.Array]:
        out = logits_fn(p, **args)
        if isinstance(out, ChunkedLogits):
            return _chunked(out, key)
        return _whole(*_split_logits_and_mask(out), key)

    grad_fn = jax.grad(sampled_label_loss_sum, has_aux=True)

    def with_stats(params: optax.Params, key: jax.Array | None = None,
                   **extra_args: Any) -> tuple[optax.Updates, dict[str, jax.Array]]:
        key = _require_key(key)
        args = pick(extra_args)

        def microbatch(i: jax.Array, args: dict) -> tuple[optax.Updates, jax.Array]:
            return grad_fn(params, key if microbatches == 1 else jax.random.fold_in(key, i), args)

        constrain_sum = None if constrain_grads is None else lambda gn: (constrain_grads(gn[0]), gn[1])
        g, n = accumulate(microbatch, args, microbatches, constrain=constrain_sum)
        g = jax.tree.map(lambda x: x / jnp.maximum(n, 1).astype(x.dtype), g)
        norm = optax.tree.norm(g)
        clipped = jnp.zeros([], jnp.float32) if clip is None else (norm > max_grad_norm).astype(jnp.float32)
        if clip is not None:
            g, _ = clip.update(g, clip.init(g))

        def square(x: jax.Array) -> jax.Array:  # in float32 or wider: N is too large for bfloat16
            wide = x.astype(at_least_float32(x.dtype))
            return (n.astype(wide.dtype) * wide * wide).astype(x.dtype)

        h_hat = jax.tree.map(square, g)
        return h_hat, {"grad_norm": norm.astype(jnp.float32), "clipped": clipped, "positions": n}

    def hessian_fn(params: optax.Params, key: jax.Array | None = None, **extra_args: Any) -> optax.Updates:
        return with_stats(params, key, **extra_args)[0]

    hessian_fn.with_stats = with_stats
    hessian_fn.stat_names = ("grad_norm", "clipped", "positions")
    return hessian_fn


def hutchinson(
    loss_fn: Callable[..., jax.Array],
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
) -> HessianFn:
    """Hutchinson's estimator of the Hessian diagonal, `u * (H u)`, for Sophia-H.

    `E[u * Hu] = diag(H)` for any u with independent zero-mean unit-variance entries; Rademacher u has
    the lower variance. `Hu` is a forward-over-reverse Hessian-vector product (one extra
    forward-and-backward's worth of work).

    Args:
      loss_fn: `loss_fn(params, **kwargs)` returning a scalar; its keyword parameters are filled from the
        estimator call's extra arguments by name, as for `gauss_newton_bartlett`'s `logits_fn`.
      distribution: "rademacher" (entries +-1) or "gaussian" (standard normal).

    Returns:
      `hessian_fn(params, key, **extra_args) -> h_hat`, a pytree like params. Its entries can be
      negative; `scale_by_sophia` uses `max(rho*h, 0)` in its denominator.
    """
    check_callable("hutchinson", "loss_fn", loss_fn)
    samplers = {"rademacher": jax.random.rademacher, "gaussian": jax.random.normal}
    if distribution not in samplers:
        raise ValueError(f"hutchinson: distribution={distribution!r}; choose 'rademacher' or 'gaussian'.")
    sampler = samplers[distribution]
    pick = keyword_picker(loss_fn, "loss_fn", positional=1)

    def hessian_fn(params: optax.Params, key: jax.Array | None = None, **extra_args: Any) -> optax.Updates:
        key = _require_key(key)
        args = pick(extra_args)

        def loss(p: optax.Params) -> jax.Array:
            return loss_fn(p, **args)

        u = optax.tree.random_like(key, params, sampler=sampler)
        _, hu = jax.jvp(jax.grad(loss), (params,), (u,))
        return jax.tree.map(jnp.multiply, u, hu)

    return hessian_fn
