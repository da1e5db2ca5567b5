"""sophia-jax: the Sophia optimizer (Liu et al. 2023) as optax transformations.

    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        sophia_jax.sophia_g(6e-4, rho=0.05, weight_decay=0.2,
                            hessian_fn=sophia_jax.gauss_newton_bartlett(logits_fn)),
    )
    updates, state = opt.update(grads, state, params, batch=batch)  # extra kwargs reach the estimator
"""

from sophia_jax.estimators import gauss_newton_bartlett, hutchinson
from sophia_jax.transform import (
    HessianFn,
    SophiaState,
    metrics,
    scale_by_sophia,
    sophia_g,
    sophia_h,
    update_hessian,
)

__all__ = [
    "HessianFn",
    "SophiaState",
    "gauss_newton_bartlett",
    "hutchinson",
    "metrics",
    "scale_by_sophia",
    "sophia_g",
    "sophia_h",
    "update_hessian",
]
