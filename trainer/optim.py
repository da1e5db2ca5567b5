"""The optimizer of a run, from its OptimizerConfig: Sophia-G, AdamW or Lion, one schedule, one mask.

    optimizer = chain(clip_by_global_norm(max_grad_norm), sophia_g | adamw | lion)

Non-finite gradients are handled by the train step (trainer/train.py), which keeps the old params and
optimizer state with an elementwise select (cheaper than optax.apply_if_finite's lax.cond, which makes
XLA copy the whole optimizer state through the conditional on every step).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

import sophia_jax
from trainer.config import OptimizerConfig

__all__ = ["build_optimizer", "lr_schedule", "warmup_steps", "weight_decay_mask"]

# The defaults each optimizer gets when b1 / b2 / eps are None: (b1, b2, eps).
DEFAULTS = {"sophia_g": (0.965, 0.99, 1e-12), "adamw": (0.9, 0.95, 1e-8), "lion": (0.9, 0.99, None)}


def warmup_steps(config: OptimizerConfig, num_train_steps: int) -> int:
    """`warmup` as a step count: a fraction of the run if < 1, else steps."""
    steps = config.warmup * num_train_steps if config.warmup < 1 else config.warmup
    return min(int(round(steps)), num_train_steps)


def lr_schedule(config: OptimizerConfig, num_train_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `min_lr_ratio * learning_rate` at the end.

    Step t (0-based) of the warmup uses lr * (t+1)/warmup, so the first step is not wasted at lr 0.
    """
    peak, w = config.learning_rate, warmup_steps(config, num_train_steps)
    cosine = optax.cosine_decay_schedule(peak, max(num_train_steps - w, 1), alpha=config.min_lr_ratio)
    if w == 0:
        return cosine
    warm = optax.linear_schedule(peak / w, peak, w - 1) if w > 1 else optax.constant_schedule(peak)
    return optax.join_schedules([warm, cosine], [w])


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """True for the leaves that decay: weight matrices (and the head); not norms, biases or (unless asked)
    the input embedding. Matches trainer/model.py's field names (ln1, ln2, ln_f, embed, bias)."""

    def decays(path: tuple, _: Any) -> bool:
        names = {getattr(k, "name", None) for k in path}
        if "bias" in names or names & {"ln1", "ln2", "ln_f"}:
            return False
        if "embed" in names:
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decays, params)


def build_optimizer(
    config: OptimizerConfig,
    num_train_steps: int,
    params: Any,
    *,
    seed: int = 0,
    hessian_fn: sophia_jax.HessianFn | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The run's optimizer. `hessian_fn` is compiled into Sophia's update (hessian_mode 'cond') when given;
    otherwise the trainer folds estimates in with `sophia_jax.update_hessian`."""
    schedule = lr_schedule(config, num_train_steps)
    mask = weight_decay_mask(params, config.decay_embeddings)
    d_b1, d_b2, d_eps = DEFAULTS[config.type]
    b1 = d_b1 if config.b1 is None else config.b1
    b2 = d_b2 if config.b2 is None else config.b2
    eps = d_eps if config.eps is None else config.eps
    if config.type == "sophia_g":
        core = sophia_jax.sophia_g(
            schedule, b1=b1, b2=b2, rho=config.rho, weight_decay=config.weight_decay, eps=eps,
            clip_threshold=1.0, update_interval=config.update_interval, hessian_fn=hessian_fn,
            weight_decay_mask=mask, seed=seed)
    elif config.type == "adamw":
        core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=config.weight_decay, mask=mask)
    else:
        core = optax.lion(schedule, b1=b1, b2=b2, weight_decay=config.weight_decay, mask=mask)
    clip = optax.identity() if config.max_grad_norm is None else optax.clip_by_global_norm(config.max_grad_norm)
    return optax.chain(clip, core)
