"""sophia-jax: the Sophia optimizer (Liu et al. 2023) as optax transformations.

    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        sophia_jax.sophia_g(6e-4, rho=0.05, weight_decay=0.2,
                            hessian_fn=sophia_jax.gauss_newton_bartlett(logits_fn)),
    )
    updates, state = opt.update(grads, state, params, inputs=x)  # logits_fn gets the extra args it names
    diagnostics = sophia_jax.metrics(state)  # on the steps you log, in its own jitted function
"""

from sophia_jax.estimators import ChunkedLogits, gauss_newton_bartlett, hutchinson, sample_labels
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
    "ChunkedLogits",
    "HessianFn",
    "SophiaState",
    "gauss_newton_bartlett",
    "hutchinson",
    "metrics",
    "sample_labels",
    "scale_by_sophia",
    "sophia_g",
    "sophia_h",
    "update_hessian",
]
