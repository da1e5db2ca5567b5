"""Diagonal Hessian estimators for Sophia: Gauss-Newton-Bartlett (Sophia-G) and Hutchinson (Sophia-H).

Each factory returns a `hessian_fn(params, key, **extra_args)` suitable for `scale_by_sophia`.
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import jax
import jax.numpy as jnp
import optax

from sophia_jax.microbatches import accumulate
from sophia_jax.transform import HessianFn, at_least_float32

__all__ = ["gauss_newton_bartlett", "hutchinson"]


def _require_key(key: jax.Array | None) -> jax.Array:
    if key is None:
        raise TypeError(
            "a Sophia hessian_fn was called without a PRNG key. Under optax.inject_hyperparams, callables "
            "are taken for schedules: use optax.inject_hyperparams(sophia_jax.sophia_g, "
            "static_args=('hessian_fn',))(...)."
        )
    return key


def _split_logits_and_mask(output: Any) -> tuple[jax.Array, jax.Array]:
    if isinstance(output, tuple):
        if len(output) != 2:
            raise ValueError(
                f"logits_fn returned a tuple of {len(output)} items; return logits [..., V] or "
                "(logits [..., V], mask [...])."
            )
        logits, mask = output
        if mask.shape != logits.shape[:-1]:
            raise ValueError(
                f"logits_fn's mask has shape {mask.shape}, expected the logits' leading shape "
                f"{logits.shape[:-1]} (one 0/1 entry per predicted position)."
            )
        return logits, mask.astype(jnp.float32)
    return output, jnp.ones(output.shape[:-1], jnp.float32)


def gauss_newton_bartlett(
    logits_fn: Callable[..., Any],
    *,
    max_grad_norm: float | None = None,
    microbatches: int = 1,
    constrain_grads: Callable[[Any], Any] | None = None,
) -> HessianFn:
    """The Gauss-Newton-Bartlett estimator of Sophia-G.

    Samples labels from the model's own predictions, `y_hat ~ Categorical(logits)`, takes `g_s`, the
    gradient of the mean cross-entropy against `y_hat` over the N unmasked positions, and returns
    `N * g_s * g_s`: an unbiased estimate of the diagonal of the Gauss-Newton matrix of the mean loss
    (the sampled-label per-position gradients have mean zero, so the factor N undoes the 1/N**2 of
    squaring their mean).

    Args:
      logits_fn: `logits_fn(params, **extra_args)` returning logits `[..., V]`, or a pair
        `(logits, mask)` where `mask` (same leading shape, 0/1) marks the positions that count,
        e.g. `(logits, tokens != pad_id)`. It receives every extra keyword argument of the estimator
        call (so of `update`): name them all, or take `**_` for those meant for others. Under jit with sharded inputs, N and the mean are over the whole global batch.
      max_grad_norm: clip `g_s` to this global norm before squaring (the official loop clips at 1.0,
        like the training gradient); None leaves it unclipped.
      microbatches: M > 1 bounds the activation memory: every array in `extra_args` is split along its
        leading (batch) axis into M microbatches (`sophia_jax.microbatches.accumulate`: microbatch i
        takes rows i, i+M, i+2M, ..., so each one spans every data shard), the sums of their sampled-label losses are differentiated one at a time
        under `lax.scan`, and `g_s` is their sum over the total N: the same estimator, with microbatch i's
        labels sampled with `fold_in(key, i)`. Leading axes must be divisible by M.
      constrain_grads: applied to the gradient accumulator at each microbatch, e.g. a
        `with_sharding_constraint` to the parameters' shardings, so that an FSDP-sharded model does not
        get a replicated accumulator.

    Returns:
      `hessian_fn(params, key, **extra_args) -> h_hat`, a pytree like params. `hessian_fn.with_stats`
      takes the same arguments and returns `(h_hat, stats)`: `grad_norm`, the global norm of `g_s` before
      the clip; `clipped`, 1.0 when the clip shrank it; `positions`, N (the official recipe clips `g_s`
      to the training clip's norm, which at small batches can shrink h by (max_grad_norm / grad_norm)**2).
    """
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches} must be >= 1")
    clip = None if max_grad_norm is None else optax.clip_by_global_norm(max_grad_norm)

    def sampled_label_loss_sum(p: optax.Params, key: jax.Array, args: dict) -> tuple[jax.Array, jax.Array]:
        logits, mask = _split_logits_and_mask(logits_fn(p, **args))
        logits = logits.astype(at_least_float32(logits.dtype))
        labels = jax.random.categorical(key, jax.lax.stop_gradient(logits))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        return jnp.sum(losses * mask), jnp.sum(mask)

    grad_fn = jax.grad(sampled_label_loss_sum, has_aux=True)

    def with_stats(params: optax.Params, key: jax.Array | None = None,
                   **extra_args: Any) -> tuple[optax.Updates, dict[str, jax.Array]]:
        key = _require_key(key)

        def microbatch(i: jax.Array, args: dict) -> tuple[optax.Updates, jax.Array]:
            return grad_fn(params, key if microbatches == 1 else jax.random.fold_in(key, i), args)

        constrain_sum = None if constrain_grads is None else lambda gn: (constrain_grads(gn[0]), gn[1])
        g, n = accumulate(microbatch, extra_args, microbatches, constrain=constrain_sum)
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
      loss_fn: `loss_fn(params, **extra_args)` returning a scalar; it receives every extra keyword
        argument of the estimator call (take `**_` for those meant for others).
      distribution: "rademacher" (entries +-1) or "gaussian" (standard normal).

    Returns:
      `hessian_fn(params, key, **extra_args) -> h_hat`, a pytree like params. Its entries can be
      negative; `scale_by_sophia` uses `max(rho*h, 0)` in its denominator.
    """
    samplers = {"rademacher": jax.random.rademacher, "gaussian": jax.random.normal}
    if distribution not in samplers:
        raise ValueError(f"distribution={distribution!r}; choose 'rademacher' or 'gaussian'.")
    sampler = samplers[distribution]

    def hessian_fn(params: optax.Params, key: jax.Array | None = None, **extra_args: Any) -> optax.Updates:
        key = _require_key(key)

        def loss(p: optax.Params) -> jax.Array:
            return loss_fn(p, **extra_args)

        u = optax.tree.random_like(key, params, sampler=sampler)
        _, hu = jax.jvp(jax.grad(loss), (params,), (u,))
        return jax.tree.map(jnp.multiply, u, hu)

    return hessian_fn
