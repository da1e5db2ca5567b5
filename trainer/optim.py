"""The optimizer of a run: one small config class per optimizer (Sophia-G, AdamW, Lion), registered by
name, each with its own defaults; one learning-rate schedule and one weight-decay mask for all of them.

    optimizer = chain(clip_by_global_norm(max_grad_norm), sophia_g | adamw | lion)

`optimizer.type` picks the class. Switching the type (in a YAML that inherits another with `base:`, or
with `--optimizer.type` on the command line) keeps the fields all optimizers share (the schedule,
weight decay, clipping) and resets the rest to the new optimizer's defaults.

Non-finite gradients are handled by the train step (trainer/train.py), which keeps the old params and
moments with an elementwise select (cheaper than optax.apply_if_finite's lax.cond, which makes XLA copy
the whole optimizer state through the conditional on every step).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import optax

import sophia_jax

__all__ = ["OPTIMIZERS", "AdamWConfig", "LionConfig", "OptimizerConfig", "SophiaGConfig", "build_optimizer",
           "lr_schedule", "warmup_steps", "weight_decay_mask"]


def _check(ok: bool, field: str, value: Any, want: str) -> None:
    if not ok:
        raise ValueError(f"optimizer.{field}={value!r}; {want}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Fields every optimizer shares: the schedule, weight decay and gradient clipping (`--optimizer.*`)."""

    type: str = "sophia_g"
    """One of sophia_g, adamw, lion; each has its own fields and defaults (below)."""
    learning_rate: float = 6e-4
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.05
    """The cosine decays to min_lr_ratio * learning_rate at the last step (paper: 0.05)."""
    warmup: float = 0.01
    """Linear warmup length: a fraction of num_train_steps if < 1, else a number of steps."""
    weight_decay: float = 0.1
    """Decoupled weight decay (multiplied by the learning rate), on matrices only (see decay_embeddings)."""
    decay_embeddings: bool = False
    """Also decay the input embedding (norms and biases never decay)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient (and Sophia's sampled gradient) to this global norm; None = no clipping."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        _check(self.type == self.name, "type", self.type, f"this is the {self.name} config")
        _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "use a positive learning rate")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "use a fraction in [0, 1]")
        _check(self.warmup >= 0, "warmup", self.warmup, "use a fraction of the run (< 1) or a step count (>= 1)")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "use a value >= 0")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm,
               "use a positive norm, or null for no clipping")

    def transformation(self, schedule: optax.Schedule, mask: Any, *, seed: int,
                       hessian_fn: sophia_jax.HessianFn | None) -> optax.GradientTransformationExtraArgs:
        """The optimizer proper (after clipping), with the run's schedule and decay mask."""
        raise NotImplementedError


def _check_betas(config: Any) -> None:
    for field in ("b1", "b2"):
        value = getattr(config, field)
        _check(0 <= value < 1, field, value, "use an EMA rate in [0, 1)")


@dataclasses.dataclass(frozen=True)
class SophiaGConfig(OptimizerConfig):
    """Sophia-G (`type: sophia_g`), the official release's hyperparameters."""

    type: str = "sophia_g"
    weight_decay: float = 0.2
    """Decoupled weight decay (multiplied by the learning rate), on matrices only (see decay_embeddings)."""
    b1: float = 0.965
    """Momentum EMA rate."""
    b2: float = 0.99
    """EMA rate of the Hessian estimate h."""
    eps: float = 1e-12
    """Added to the denominator rho * h."""
    rho: float = 0.05
    """Sophia's rho (gamma): larger clips fewer coordinates; tune so optim/win_rate stays ~0.1-0.5."""
    update_interval: int = 10
    """Sophia's k: the Hessian estimate is refreshed after steps k, 2k, ..."""
    hessian_batch_fraction: float = 0.25
    """Sequences in a Hessian batch, as a fraction of trainer.global_batch (a separate, fresh stream)."""
    hessian_microbatches: int | Literal["auto"] = 1
    """The Hessian batch is processed in this many microbatches (lax.scan), to bound activation memory;
    'auto' = the fewest whose compiled Hessian step fits the device memory."""
    hessian_mode: str = "separate"
    """'separate': its own compiled hessian_step after steps k, 2k, ... (the official order);
    'cond': inside train_step under lax.cond (one program; the estimate sees the pre-update params)."""
    hessian_clip: bool = True
    """Clip the sampled-label gradient to max_grad_norm before squaring it, as the official recipe does;
    false squares it unclipped (see optim/hessian_grad_norm and optim/hessian_grad_clipped)."""
    h_bias_correction: bool = False
    """Divide h by 1 - b2**n (n = estimates folded in) in the denominator, Adam's correction of an EMA that
    starts at zero; false is the official rule (benchmarks/RESULTS.md measures both)."""

    name: ClassVar[str] = "sophia_g"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas(self)
        _check(self.eps >= 0, "eps", self.eps, "use a value >= 0")
        _check(self.rho > 0, "rho", self.rho, "use a positive rho")
        _check(self.update_interval >= 1, "update_interval", self.update_interval, "use k >= 1")
        _check(0 < self.hessian_batch_fraction <= 1, "hessian_batch_fraction", self.hessian_batch_fraction,
               "use a fraction in (0, 1]")
        _check(self.hessian_microbatches == "auto" or (isinstance(self.hessian_microbatches, int)
                                                       and self.hessian_microbatches >= 1),
               "hessian_microbatches", self.hessian_microbatches, "use a count >= 1 or 'auto'")
        _check(self.hessian_mode in ("separate", "cond"), "hessian_mode", self.hessian_mode,
               "use 'separate' or 'cond'")

    def transformation(self, schedule, mask, *, seed, hessian_fn):
        return sophia_jax.sophia_g(
            schedule, b1=self.b1, b2=self.b2, rho=self.rho, weight_decay=self.weight_decay, eps=self.eps,
            clip_threshold=1.0, update_interval=self.update_interval, hessian_fn=hessian_fn,
            weight_decay_mask=mask, seed=seed, h_bias_correction=self.h_bias_correction)


@dataclasses.dataclass(frozen=True)
class AdamWConfig(OptimizerConfig):
    """AdamW (`type: adamw`), nanoGPT's and the paper's baseline betas."""

    type: str = "adamw"
    b1: float = 0.9
    """First-moment EMA rate."""
    b2: float = 0.95
    """Second-moment EMA rate."""
    eps: float = 1e-8
    """Added to the denominator sqrt(nu)."""

    name: ClassVar[str] = "adamw"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas(self)
        _check(self.eps >= 0, "eps", self.eps, "use a value >= 0")

    def transformation(self, schedule, mask, *, seed, hessian_fn):
        return optax.adamw(schedule, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay, mask=mask)


@dataclasses.dataclass(frozen=True)
class LionConfig(OptimizerConfig):
    """Lion (`type: lion`, Chen et al. 2023): use a learning rate 3-10x smaller and decay 3-10x larger
    than AdamW's."""

    type: str = "lion"
    learning_rate: float = 1e-4
    """Peak learning rate (after warmup)."""
    weight_decay: float = 1.0
    """Decoupled weight decay (multiplied by the learning rate), on matrices only (see decay_embeddings)."""
    b1: float = 0.9
    """Interpolation rate of the update direction."""
    b2: float = 0.99
    """Momentum EMA rate."""

    name: ClassVar[str] = "lion"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas(self)

    def transformation(self, schedule, mask, *, seed, hessian_fn):
        return optax.lion(schedule, b1=self.b1, b2=self.b2, weight_decay=self.weight_decay, mask=mask)


OPTIMIZERS: dict[str, type[OptimizerConfig]] = {c.name: c for c in (SophiaGConfig, AdamWConfig, LionConfig)}


def warmup_steps(config: OptimizerConfig, num_train_steps: int) -> int:
    """`warmup` as a step count: a fraction of the run if < 1, else steps."""
    steps = config.warmup * num_train_steps if config.warmup < 1 else config.warmup
    return min(int(round(steps)), num_train_steps)


def lr_schedule(config: OptimizerConfig, num_train_steps: int) -> optax.Schedule:
    """Linear warmup to `learning_rate`, then cosine decay to `min_lr_ratio * learning_rate` on the last step.

    `count` is the 0-based step (the loop's step t applies schedule(t - 1)). With w warmup steps, step t < w
    uses lr * (t+1)/w, so the first step is not wasted at lr 0 and step w - 1 applies the peak; the cosine
    then runs from that peak to the floor, which step num_train_steps - 1 (the last) applies exactly. The
    count is made float32 first: optax's schedules mix it with Python floats, which strict dtype
    promotion (the tests' setting) refuses for an int32 count.
    """
    peak, w = config.learning_rate, warmup_steps(config, num_train_steps)
    peak_at = max(w - 1, 0)  # the count that applies the peak
    cosine = optax.cosine_decay_schedule(peak, max(num_train_steps - 1 - peak_at, 1), alpha=config.min_lr_ratio)
    if w <= 1:
        schedule = cosine
    else:
        warm = optax.linear_schedule(peak / w, peak, w - 1)
        schedule = optax.join_schedules([warm, cosine], [peak_at])
    return lambda count: schedule(jnp.asarray(count, jnp.float32))


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
    """True for the leaves that decay: the linear layers' weight matrices (and NeoX's untied head); not
    norms, biases or (unless asked) the embeddings - NeoX's input embedding, GPT-2's wte (also its tied
    head, which nanoGPT does not decay either) and wpe. Matches the field names of trainer/models/ (ln1, ln2,
    ln_f, embed, pos_embed, bias)."""

    def decays(path: tuple, _: Any) -> bool:
        names = {getattr(k, "name", None) for k in path}
        if "bias" in names or names & {"ln1", "ln2", "ln_f"}:
            return False
        if names & {"embed", "pos_embed"}:
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
    core = config.transformation(schedule, mask, seed=seed, hessian_fn=hessian_fn)
    clip = optax.identity() if config.max_grad_norm is None else optax.clip_by_global_norm(config.max_grad_norm)
    return optax.chain(clip, core)
