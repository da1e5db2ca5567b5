"""Sophia as optax gradient transformations.

The update follows the official PyTorch SophiaG (Liu et al. 2023) step for step; see `scale_by_sophia`
for the exact order of operations and how the Hessian scale convention maps onto the official `bs`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from sophia_jax._arguments import check_callable, check_interval, check_number, keyword_picker

__all__ = [
    "HessianFn",
    "SophiaState",
    "metrics",
    "scale_by_sophia",
    "sophia_g",
    "sophia_h",
    "update_hessian",
]

HessianFn = Callable[..., optax.Updates]
"""`hessian_fn(params, key, **extra_args) -> h_hat`, one diagonal Hessian estimate shaped like params.

It is called with the extra keyword arguments of `update` that its signature names (all of them when it
takes `**kwargs`); those meant for other members of an `optax.chain` are not passed. A parameter it names
that the call did not supply is a TypeError, even when it has a default. An estimator may also carry
`with_stats(params, key, **extra_args) -> (h_hat, stats)` and `stat_names` (the keys of `stats`, float32
scalars, e.g. `gauss_newton_bartlett`'s): `scale_by_sophia` then keeps the latest refresh's stats.
"""


class SophiaState(NamedTuple):
    """State of `scale_by_sophia`. Only `mu` and `h` are shaped like params (so `optax.tree.map_params`
    casts or shards them like the params); every other field is a scalar or one small vector."""

    count: jax.Array  # int32 []: update calls made so far.
    mu: optax.Updates  # first moment m, like params, in mu_dtype (params' dtype when None).
    h: optax.Updates  # EMA of diagonal Hessian estimates h_hat, like params, in params' dtype.
    key: jax.Array  # uint32 [2]: PRNG key; split once per estimator call.
    hessian_updates: jax.Array  # int32 []: estimates folded into h.
    hessian_skips: jax.Array  # int32 []: non-finite estimates rejected (h kept its value).
    b2: jax.Array  # float []: the b2 of the latest update (or of init), for `update_hessian`.
    h_scale: jax.Array  # float []: what the latest update multiplied h by in its denominator: rho, or
    # rho / (1 - b2**n) with h_bias_correction (rho at init).
    eps: jax.Array  # float []: the eps of the latest update (or of init).
    clip_threshold: jax.Array  # float []: the clip threshold of the latest update; inf for no clipping.
    refreshed: jax.Array  # bool []: h was refreshed after the latest update (by that update's estimator
    # or by `update_hessian`); `applied_win_rates` then holds that update's clipping.
    applied_win_rates: jax.Array  # float32 [params leaves]: per leaf (jax.tree.leaves order) the fraction
    # of coordinates the latest update did not clip, recorded when h was first refreshed after it.
    hessian_stats: dict[str, jax.Array]  # float32 []: the latest estimate's `stat_names` (estimators with
    # `with_stats` passed as hessian_fn); empty otherwise.


def at_least_float32(dtype: Any) -> jnp.dtype:
    """`dtype` if it is float32 or wider (float64 under jax_enable_x64), else float32: Sophia's arithmetic
    never runs in bfloat16 whatever the storage dtype."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _ratio(m: jax.Array, h: jax.Array, h_scale: ArrayLike, eps: ArrayLike, dtype: Any) -> jax.Array:
    """m / (max(h_scale * h, 0) + eps) in `dtype` (float32 or wider): the preconditioned momentum."""
    denominator = jnp.maximum(jnp.asarray(h_scale).astype(dtype) * h.astype(dtype), 0) + jnp.asarray(eps).astype(dtype)
    return m.astype(dtype) / denominator


def _mean(x: jax.Array) -> jax.Array:
    """mean(x) in float32, over the last axis first: one float32 sum over 2**31+ entries would stall."""
    if x.ndim >= 2:
        return jnp.mean(jnp.mean(x, axis=-1, dtype=jnp.float32))
    return jnp.mean(x, dtype=jnp.float32)


def _unclipped_fractions(state: SophiaState) -> jax.Array:
    """float32 [leaves]: per leaf, the fraction of coordinates an update with the state's m, h and
    hyperparameters leaves unclipped, |ratio| < clip_threshold, computed as the update computes it."""
    fractions = []
    for m, h in zip(jax.tree.leaves(state.mu), jax.tree.leaves(state.h)):
        ratio = _ratio(m, h, state.h_scale, state.eps, at_least_float32(h.dtype))
        threshold = state.clip_threshold.astype(ratio.dtype)
        fractions.append(_mean(jnp.isinf(threshold) | (jnp.abs(ratio) < threshold)))
    return jnp.stack(fractions) if fractions else jnp.zeros([0], jnp.float32)


def _fold_estimate(state: SophiaState, h_hat: optax.Updates, b2: ArrayLike,
                   stats: dict[str, jax.Array] | None = None) -> SophiaState:
    """h <- b2*h + (1-b2)*h_hat when h_hat is all finite (otherwise keep h and count the skip); the first
    refresh after an update records the clipping that update applied, before h changes."""
    h_hat = optax.tree.cast_like(h_hat, state.h)
    finite = jnp.array(True)
    for leaf in jax.tree.leaves(h_hat):
        finite &= jnp.all(jnp.isfinite(leaf))
    refreshed = optax.tree.cast_like(optax.tree.update_moment(h_hat, state.h, b2, 1), state.h)
    applied = jnp.where(state.refreshed, state.applied_win_rates, _unclipped_fractions(state))
    state = state._replace(
        h=optax.tree.where(finite, refreshed, state.h),
        hessian_updates=state.hessian_updates + finite.astype(jnp.int32),
        hessian_skips=state.hessian_skips + (~finite).astype(jnp.int32),
        refreshed=state.refreshed | finite,
        applied_win_rates=applied,
    )
    if stats is not None and state.hessian_stats:
        state = state._replace(hessian_stats={k: jnp.asarray(stats[k]).astype(jnp.float32)
                                              for k in state.hessian_stats})
    return state


def _check_hyperparameters(where: str, b1: Any, b2: Any, rho: Any, eps: Any, clip_threshold: Any,
                           update_interval: Any) -> None:
    check_number(where, "b1", b1, lambda v: 0 <= v < 1, "use an EMA rate in [0, 1)")
    check_number(where, "b2", b2, lambda v: 0 <= v < 1, "use an EMA rate in [0, 1)")
    check_number(where, "rho", rho, lambda v: v > 0, "use a positive rho (larger clips fewer coordinates)")
    check_number(where, "eps", eps, lambda v: v >= 0, "use eps >= 0")
    check_number(where, "clip_threshold", clip_threshold, lambda v: v > 0, "use a positive threshold, or None")
    check_interval(where, update_interval)


def scale_by_sophia(
    b1: ArrayLike = 0.965,
    b2: ArrayLike = 0.99,
    rho: ArrayLike = 0.04,
    eps: ArrayLike = 1e-12,
    clip_threshold: ArrayLike | None = 1.0,
    update_interval: int = 10,
    hessian_fn: HessianFn | None = None,
    seed: int = 0,
    mu_dtype: Any | None = None,
    h_bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Scales updates by Sophia's clipped, Hessian-preconditioned momentum.

    One `update(grads, state, params, **extra_args)` call does, in this order:

    1. `m <- b1*m + (1-b1)*g` (no bias correction; m stored in `mu_dtype`);
    2. `u <- clip(m / (max(rho*h, 0) + eps), -clip_threshold, clip_threshold)`, with h from *before*
       this call's refresh (the `max` only matters for estimators that can go negative, e.g. Hutchinson).
       One elementwise pass per leaf: it reads g, m, h (and, after `optax.apply_updates`, p) and writes m
       (and p); the win rate is not computed here but by `metrics`, from the state;
    3. `count <- count + 1`;
    4. if `hessian_fn` is set and `count % update_interval == 0`: split the key and
       `h <- b2*h + (1-b2)*hessian_fn(params, subkey, **extra_args)`. The estimator runs inside
       `lax.cond`, so it is not evaluated on the other calls; a non-finite estimate is not folded in.

    The estimator sees the params the update is computed from; the official loop evaluates it one
    step later, after the params moved. For that exact ordering, and for speed at scale, run the
    estimator as its own jitted step after `optax.apply_updates` and fold it in with
    `update_hessian`: with `hessian_fn` compiled into a donated step, XLA copies h through the
    conditional on every call (see benchmarks/optimizer_step.py).

    Scale convention: h estimates the Hessian diagonal of the *mean* training loss, as
    `gauss_newton_bartlett` does with `N * g_s**2` (the factor N undoes the 1/N**2 of squaring a mean
    gradient). The official SophiaG keeps `EMA(g_s**2)` and divides by `rho * bs * EMA`, `bs` being
    the tokens per step: the same number when the estimator batch holds `bs` tokens. Without
    `hessian_fn`, h changes only through `update_hessian`.

    Args:
      b1: EMA rate of the momentum m, in [0, 1).
      b2: EMA rate of the Hessian estimate h, in [0, 1).
      rho: the paper's gamma/rho (> 0); larger rho clips fewer coordinates.
      eps: added to the denominator (>= 0).
      clip_threshold: coordinates are clipped to [-clip_threshold, clip_threshold] (> 0); None disables
        clipping.
      update_interval: k >= 1, the estimator runs on calls k, 2k, 3k, ...
      hessian_fn: `hessian_fn(params, key, **extra_args)` returning one diagonal estimate shaped like
        params (see `HessianFn`: it gets the extra arguments its signature names).
      seed: seeds the estimator's PRNG key kept in the state.
      mu_dtype: dtype of m; None keeps params' dtype.
      h_bias_correction: divide h by `1 - b2**n` in the denominator, n the estimates folded in so far
        (Adam's correction of an EMA that starts at zero; h itself is stored uncorrected; with b2 changed
        between refreshes, e.g. under inject_hyperparams, the latest b2 is used). Off by default: the
        official rule has no correction.

    Returns:
      An `optax.GradientTransformationExtraArgs` whose state is a `SophiaState`.

    Raises:
      ValueError: a hyperparameter given as a Python number is out of range (arrays, e.g. under
        `optax.inject_hyperparams`, are not checked).
    """
    _check_hyperparameters("scale_by_sophia", b1, b2, rho, eps, clip_threshold, update_interval)
    check_callable("scale_by_sophia", "hessian_fn", hessian_fn, optional=True)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    # float64 under jax_enable_x64, else float32; never weak-typed, so the state's types are fixed.
    hparam_dtype = jnp.result_type(float)
    pick = None if hessian_fn is None else keyword_picker(hessian_fn, "hessian_fn", positional=2)
    stat_names = tuple(getattr(hessian_fn, "stat_names", ())) if hasattr(hessian_fn, "with_stats") else ()
    threshold = math.inf if clip_threshold is None else clip_threshold

    def init_fn(params: optax.Params) -> SophiaState:
        # A fresh buffer per counter, so that a donated state never donates one buffer twice.
        return SophiaState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            h=optax.tree.zeros_like(params),
            key=jax.random.PRNGKey(seed),
            hessian_updates=jnp.zeros([], jnp.int32),
            hessian_skips=jnp.zeros([], jnp.int32),
            b2=jnp.asarray(b2, hparam_dtype),
            h_scale=jnp.asarray(rho, hparam_dtype),
            eps=jnp.asarray(eps, hparam_dtype),
            clip_threshold=jnp.asarray(threshold, hparam_dtype),
            refreshed=jnp.zeros([], bool),
            applied_win_rates=jnp.zeros([len(jax.tree.leaves(params))], jnp.float32),
            hessian_stats={name: jnp.zeros([], jnp.float32) for name in stat_names},
        )

    def h_scale(hessian_updates: jax.Array) -> jax.Array:
        """rho, or with h_bias_correction rho / (1 - b2**n) after n > 0 estimates."""
        if not h_bias_correction:
            return jnp.asarray(rho, hparam_dtype)
        n = hessian_updates.astype(hparam_dtype)
        weight = 1 - jnp.asarray(b2, hparam_dtype) ** n
        return jnp.asarray(rho, hparam_dtype) / jnp.where(n > 0, weight, 1)

    def precondition(g: jax.Array, m: jax.Array, h: jax.Array, scale: jax.Array) -> jax.Array:
        # fp32 (or wider) arithmetic whatever the storage dtype; elementwise only, so XLA fuses it
        # (with the weight decay, the learning rate and apply_updates) into one pass over the leaf.
        ratio = _ratio(m, h, scale, jnp.asarray(eps, hparam_dtype), at_least_float32(g.dtype))
        if clip_threshold is None:
            return ratio.astype(g.dtype)
        limit = jnp.asarray(clip_threshold).astype(ratio.dtype)
        return jnp.clip(ratio, -limit, limit).astype(g.dtype)

    def estimate(params: optax.Params, key: jax.Array,
                 extra_args: dict[str, Any]) -> tuple[optax.Updates, dict[str, jax.Array] | None]:
        if stat_names:
            return hessian_fn.with_stats(params, key, **extra_args)
        return hessian_fn(params, key, **extra_args), None

    def update_fn(
        updates: optax.Updates, state: SophiaState, params: optax.Params | None = None, **extra_args: Any
    ) -> tuple[optax.Updates, SophiaState]:
        mu = optax.tree.update_moment(updates, optax.tree.cast_like(state.mu, updates), b1, 1)
        mu = optax.tree.cast(mu, mu_dtype) if mu_dtype is not None else optax.tree.cast_like(mu, state.mu)
        scale = h_scale(state.hessian_updates)
        new_updates = jax.tree.map(lambda g, m, h: precondition(g, m, h, scale), updates, mu, state.h)
        state = state._replace(
            count=optax.safe_int32_increment(state.count), mu=mu, b2=jnp.asarray(b2, hparam_dtype),
            h_scale=scale, eps=jnp.asarray(eps, hparam_dtype), clip_threshold=jnp.asarray(threshold, hparam_dtype),
            refreshed=jnp.zeros([], bool))
        if hessian_fn is None:
            return new_updates, state
        if params is None:
            raise ValueError(
                "scale_by_sophia with a hessian_fn needs params: call update(grads, state, params, ...)."
            )
        kwargs = pick(extra_args)  # here, not in the branch: a missing argument fails on the first call

        def refresh(state: SophiaState) -> SophiaState:
            key, subkey = jax.random.split(state.key)
            h_hat, stats = estimate(params, subkey, kwargs)
            return _fold_estimate(state._replace(key=key), h_hat, b2, stats)

        state = jax.lax.cond(state.count % update_interval == 0, refresh, lambda s: s, state)
        return new_updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sophia_g(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.965,
    b2: ArrayLike = 0.99,
    rho: ArrayLike = 0.04,
    weight_decay: ArrayLike = 0.1,
    eps: ArrayLike = 1e-12,
    clip_threshold: ArrayLike | None = 1.0,
    update_interval: int = 10,
    hessian_fn: HessianFn | None = None,
    weight_decay_mask: Any | None = None,
    mu_dtype: Any | None = None,
    seed: int = 0,
    h_bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Sophia-G: `scale_by_sophia`, decoupled weight decay, then the learning rate.

    The update is `-lr * (clip(m / (rho*h + eps), -1, 1) + weight_decay * p)`, the official SophiaG
    step with `h` on the per-token scale (see `scale_by_sophia`). Pair it with the Gauss-Newton-Bartlett
    estimator:

    >>> import jax, jax.numpy as jnp, optax, sophia_jax
    >>> def logits_fn(params, x):
    ...   return x @ params["w"]
    >>> params = {"w": jnp.zeros((4, 3))}
    >>> opt = optax.chain(
    ...     optax.clip_by_global_norm(1.0),
    ...     sophia_jax.sophia_g(1e-3, hessian_fn=sophia_jax.gauss_newton_bartlett(logits_fn),
    ...                         update_interval=1),
    ... )
    >>> state = opt.init(params)
    >>> x = jnp.ones((8, 4))
    >>> grads = {"w": jnp.ones((4, 3))}
    >>> updates, state = opt.update(grads, state, params, x=x)
    >>> params = optax.apply_updates(params, updates)

    Under `optax.inject_hyperparams`, name the callables that are not schedules:
    `optax.inject_hyperparams(sophia_g, static_args=("hessian_fn",))(...)` (and "weight_decay_mask"
    when it is a callable); rho, b1, b2, eps, weight decay and the learning rate can then be changed
    between steps.

    Args:
      learning_rate: a float (>= 0) or an optax schedule of the step count.
      b1, b2, rho, eps, clip_threshold, update_interval, hessian_fn, mu_dtype, seed, h_bias_correction: see
        `scale_by_sophia`.
      weight_decay: decoupled weight decay (>= 0), multiplied by the learning rate as in AdamW.
      weight_decay_mask: a pytree of bools like params (or a callable returning one) selecting the
        leaves that decay.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    References:
      Liu et al., Sophia: A Scalable Stochastic Second-order Optimizer for Language Model
      Pre-training, 2023, https://arxiv.org/abs/2305.14342
    """
    _check_hyperparameters("sophia_g", b1, b2, rho, eps, clip_threshold, update_interval)
    check_number("sophia_g", "learning_rate", learning_rate, lambda v: v >= 0, "use a learning rate >= 0 or a schedule")
    check_number("sophia_g", "weight_decay", weight_decay, lambda v: v >= 0, "use a weight decay >= 0")
    return optax.chain(
        scale_by_sophia(b1=b1, b2=b2, rho=rho, eps=eps, clip_threshold=clip_threshold,
                        update_interval=update_interval, hessian_fn=hessian_fn, seed=seed, mu_dtype=mu_dtype,
                        h_bias_correction=h_bias_correction),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sophia_h(
    learning_rate: optax.ScalarOrSchedule,
    b1: ArrayLike = 0.965,
    b2: ArrayLike = 0.99,
    rho: ArrayLike = 0.01,
    weight_decay: ArrayLike = 0.1,
    eps: ArrayLike = 1e-12,
    clip_threshold: ArrayLike | None = 1.0,
    update_interval: int = 10,
    hessian_fn: HessianFn | None = None,
    weight_decay_mask: Any | None = None,
    mu_dtype: Any | None = None,
    seed: int = 0,
    h_bias_correction: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Sophia-H: `sophia_g` meant for the Hutchinson estimator (`sophia_jax.hutchinson`).

    Same update as `sophia_g`; only the default rho differs (0.01, the paper's gamma for Sophia-H).
    Hutchinson on the mean loss estimates the same diagonal as the GNB estimator does, but its
    entries can be negative; that is harmless, as the denominator uses `max(rho*h, 0)`.
    """
    return sophia_g(
        learning_rate, b1=b1, b2=b2, rho=rho, weight_decay=weight_decay, eps=eps, clip_threshold=clip_threshold,
        update_interval=update_interval, hessian_fn=hessian_fn, weight_decay_mask=weight_decay_mask,
        mu_dtype=mu_dtype, seed=seed, h_bias_correction=h_bias_correction,
    )


def _is_sophia_state(node: Any) -> bool:
    return isinstance(node, SophiaState)


def _find_sophia_state(opt_state: optax.OptState) -> SophiaState:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_sophia_state) if _is_sophia_state(s)]
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one SophiaState inside opt_state, found {len(found)}; pass the state of "
            "an optimizer built with sophia_jax.scale_by_sophia (or the SophiaState itself)."
        )
    return found[0]


def update_hessian(opt_state: optax.OptState, h_hat: optax.Updates) -> optax.OptState:
    """Folds an estimate computed elsewhere into the SophiaState found anywhere inside `opt_state`.

    For trainers that run the Hessian estimator as its own compiled step: `h <- b2*h + (1-b2)*h_hat`
    with the b2 of the latest update (or of init); a non-finite `h_hat` is counted and not folded in.
    Neither the step count nor the PRNG key changes. The first fold after an update records the
    clipping that update applied (one reduction over m and h), so `metrics` still reports it.
    """
    _find_sophia_state(opt_state)  # checks there is exactly one

    def fold(node: Any) -> Any:
        return _fold_estimate(node, h_hat, node.b2) if _is_sophia_state(node) else node

    return jax.tree.map(fold, opt_state, is_leaf=_is_sophia_state)


def metrics(opt_state: optax.OptState, groups: Any | None = None) -> dict[str, jax.Array]:
    """Diagnostics of the SophiaState inside `opt_state`, as scalar arrays (jit-friendly).

    They read every m and h (about two arrays' worth of memory traffic): compute them on the steps you
    log, in their own jitted function, not inside the train step.

    Args:
      opt_state: a state holding exactly one `SophiaState` (e.g. that of `sophia_g` in a chain).
      groups: optionally, a pytree like params whose leaves name each parameter's group (e.g.
        "attention", "mlp"); adds `win_rate/<group>` for every group.

    Returns:
      win_rate: fraction of coordinates the latest update did not clip, |m| < clip_threshold *
        (max(rho*h, 0) + eps) with the h (and rho, eps, bias correction) that update used, also when h
        was refreshed after it (the official script's "train/win_rate"; tune rho to keep it in 0.1-0.5);
        0 before the first update;
      hessian_norm, momentum_norm: global L2 norms of h and m;
      hessian_mean, hessian_max: mean and largest entry of h;
      hessian_updates, hessian_skips: estimates folded in / rejected as non-finite;
      count: update calls so far;
      estimator/<name>: the latest refresh's statistics of an estimator with `with_stats` given as
        `hessian_fn` (e.g. grad_norm, clipped, positions for `gauss_newton_bartlett`).
    """
    state = _find_sophia_state(opt_state)
    hs = jax.tree.leaves(state.h)
    sizes = [h.size for h in hs]
    total = max(sum(sizes), 1)
    rates = jnp.where(state.refreshed, state.applied_win_rates, _unclipped_fractions(state))
    rates = jnp.where(state.count > 0, rates, 0.0)

    def weighted(members: list[int]) -> jax.Array:  # per-leaf means, weighted by size in Python floats
        size = sum(sizes[i] for i in members)  # (no integer count: 2**31+ coordinates)
        weights = np.array([sizes[i] / size for i in members], np.float32)
        return jnp.dot(rates[np.array(members, int)], weights) if members else jnp.zeros([], jnp.float32)

    out = {
        "win_rate": weighted(list(range(len(hs)))),
        "hessian_norm": optax.tree.norm(state.h),
        "momentum_norm": optax.tree.norm(state.mu),
        "hessian_mean": sum((s / total * _mean(h) for s, h in zip(sizes, hs)), jnp.zeros([], jnp.float32)),
        "hessian_max": jnp.max(jnp.stack([jnp.max(h).astype(jnp.float32) for h in hs])) if hs
        else jnp.zeros([], jnp.float32),
        "hessian_updates": state.hessian_updates,
        "hessian_skips": state.hessian_skips,
        "count": state.count,
        **{f"estimator/{name}": value for name, value in state.hessian_stats.items()},
    }
    if groups is not None:
        names = jax.tree.leaves(groups)
        if len(names) != len(hs):
            raise ValueError(f"groups has {len(names)} leaves but the optimizer state has {len(hs)} parameter "
                             "leaves; pass a pytree like params with one group name per parameter")
        for name in dict.fromkeys(names):
            out[f"win_rate/{name}"] = weighted([i for i, n in enumerate(names) if n == name])
    return out
