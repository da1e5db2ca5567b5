"""The compiled steps of a run (`Trainer`): train, Hessian (Sophia-G) and eval, and the one place that
dispatches them, `Trainer.step`.

One step is one pure jitted function, `train_step(state, batch) -> (state, metrics)`, compiled once with
the state's shardings and the state donated: gradient over `microbatches` (lax.scan), clip, optimizer
update. For Sophia-G the Hessian estimate is refreshed on steps k, 2k, ... from a fresh batch: by default
in its own compiled `hessian_step` run after the train step, which is the official loop's order
(hessian_mode 'separate'); or inside the train step under lax.cond (hessian_mode 'cond').

Sophia's diagnostics (`sophia_jax.metrics`: win rates, norms of h and m) read every m and h, so they are
not in the train step: `Trainer.step` computes them in their own compiled function on the steps the loop
logs (`log_due`), after the step's Hessian refresh; every step reports the refresh counters.

A step whose loss or gradient is not finite is taken but its update is dropped: params and the
optimizer's moments keep their values, while every counter (the step, the schedule's count, Sophia's
count and so its k-cadence) advances, and a due Hessian refresh still happens (it does not read the
gradient). So one counter holds everywhere: after n steps the state, the schedule, the data and the
Hessian refreshes are all at step n, whatever was skipped; `optim/skipped_steps` counts the dropped ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, NamedTuple

import haliax as hax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sophia_jax
from sophia_jax.microbatches import accumulate
from trainer import sharding
from trainer.attention import resolve_implementation
from trainer.config import TrainConfig
from trainer.data.loader import batch_shards
from trainer.models import Model, ModelConfig, head_logits, init_model, token_losses
from trainer.optim import SophiaGConfig, build_optimizer, lr_schedule

__all__ = ["Batch", "TrainState", "Trainer", "estimator_logits", "hessian_rows", "param_groups"]


class TrainState(NamedTuple):
    """Everything that changes during training; all leaves are arrays (checkpointable as is)."""

    step: jax.Array  # int32 []: steps taken (skipped ones included), = the schedule's and Sophia's counts
    params: Model  # the model, param_dtype (float32)
    opt_state: optax.OptState  # chain(clip, sophia_g | adamw | lion) state: m, h / nu, counters
    key: jax.Array  # uint32 [2]: Hessian label sampling uses fold_in(key, step)
    skipped: jax.Array  # int32 []: steps whose update was dropped (non-finite loss or gradient)


class Batch(NamedTuple):
    """The input of one step, whatever the Hessian mode."""

    tokens: jax.Array  # int32 [global_batch, seq_len+1]
    hessian_tokens: jax.Array | None = None  # int32 [hessian_batch, seq_len+1]; needed on refresh steps only


def param_groups(params: Model) -> Any:
    """A pytree like params naming each leaf's group: embedding (GPT-2's tied wte and its wpe too),
    attention, mlp, norm or head (NeoX's untied one)."""
    fields = (("embed", "embedding"), ("pos_embed", "embedding"), ("attn", "attention"), ("mlp", "mlp"),
              ("head", "head"))

    def group(path: tuple, _: Any) -> str:
        names = [getattr(k, "name", None) for k in path]
        for field, name in fields:
            if field in names:
                return name
        return "norm"

    return jax.tree_util.tree_map_with_path(group, params)


def hessian_rows(config: TrainConfig, data_parallel: int = 1) -> int:
    """Sequences in a Sophia-G Hessian batch (0 for other optimizers): hessian_batch_fraction of the global
    batch, rounded up to a multiple of `data_parallel` x optimizer.hessian_microbatches (1 while 'auto') so
    that it splits evenly over the data-parallel devices (the default run's 4 rows become 8 on 8 devices)."""
    opt = config.optimizer
    if not isinstance(opt, SophiaGConfig):
        return 0
    unit = data_parallel * (opt.hessian_microbatches if isinstance(opt.hessian_microbatches, int) else 1)
    rows = max(1, round(config.trainer.global_batch * opt.hessian_batch_fraction))
    return -(-rows // unit) * unit


def estimator_logits(config: ModelConfig) -> Callable[[Model, jax.Array], sophia_jax.ChunkedLogits]:
    """`logits_fn(model, tokens)` for `sophia_jax.gauss_newton_bartlett`: the model's final hidden states and
    its output head as a `sophia_jax.ChunkedLogits`, so the estimator builds the float32 logits
    `model.loss_chunk` positions at a time (0: the whole sequence), as the train loss does. Uses
    `model.hidden` and `trainer.models.head_logits` (padded vocabulary columns at -1e9: never sampled), so it
    serves every architecture."""

    def logits_fn(model: Model, tokens: jax.Array) -> sophia_jax.ChunkedLogits:
        Batch, Pos = hax.Axis("batch", tokens.shape[0]), hax.Axis("position", tokens.shape[1] - 1)
        x, head = model.hidden(hax.named(tokens[:, :-1], (Batch, Pos)))
        x = x.rearrange((Batch, Pos, "embed"))

        def project(hidden: jax.Array) -> jax.Array:  # [batch, chunk, embed] -> float32 [batch, chunk, vocab]
            chunk = hax.named(hidden, (Batch, Pos.resize(hidden.shape[1]), x.axes[2]))
            return head_logits(head, chunk, config.vocab_size).rearrange((Batch, chunk.axes[1], "vocab")).array

        return sophia_jax.ChunkedLogits(x.array, project, chunk=config.loss_chunk)

    return logits_fn


def _is_sophia(node: Any) -> bool:
    return isinstance(node, sophia_jax.SophiaState)


# sophia_jax.metrics' estimator statistics -> the names the run logs (as the separate Hessian step's).
_ESTIMATOR_METRICS = {"estimator/grad_norm": "hessian_grad_norm", "estimator/clipped": "hessian_grad_clipped"}


def _drop_update(finite: jax.Array, new: Any, old: Any) -> Any:
    """The optimizer state after a step whose update is dropped (see the module docstring): floating
    leaves (the moments) keep their old values, counters take the new ones; Sophia's h keeps its refresh
    (and the scalars it records with it)."""

    def select(n: jax.Array, o: jax.Array) -> jax.Array:
        return jnp.where(finite, n, o) if jnp.issubdtype(n.dtype, jnp.floating) else n

    def keep(n: Any, o: Any) -> Any:
        if _is_sophia(n):
            return n._replace(mu=jax.tree.map(select, n.mu, o.mu))
        return jax.tree.map(select, n, o)

    return jax.tree.map(keep, new, old, is_leaf=_is_sophia)


class Trainer:
    """Builds the model, optimizer and compiled steps of a run on `mesh`.

    `step(state, batch, step)` takes one optimizer step as the training loop does; `lower(which)` gives a
    step's program from shapes alone (for memory analysis and ahead-of-time compiles).
    """

    def __init__(self, config: TrainConfig, mesh: Mesh):
        if config.model.vocab_size is None:
            raise ValueError("model.vocab_size is unset: set it, or let main() take it from the dataset")
        # "auto" attention is resolved for the mesh's devices (a TPU topology compiled on a CPU host is TPU).
        attention = resolve_implementation(config.model.attention, mesh.devices.flat[0].platform,
                                           config.model.compute_dtype)
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention=attention))
        self.config, self.mesh = config, mesh
        opt, tc = config.optimizer, config.trainer
        self.sophia = isinstance(opt, SophiaGConfig)
        self.cond_mode = self.sophia and opt.hessian_mode == "cond"
        self.k = opt.update_interval if self.sophia else None
        if tc.microbatches == "auto" or (self.sophia and opt.hessian_microbatches == "auto"):
            raise ValueError("microbatches 'auto' must be resolved first: trainer.fit.fit_microbatches(config, mesh)")
        self.batch_sharding = sharding.batch_sharding(mesh)
        self.hessian_batch = hessian_rows(config, batch_shards(self.batch_sharding))
        self._check_batches(batch_shards(self.batch_sharding))

        self.estimator = None
        if self.sophia:
            self.estimator = sophia_jax.gauss_newton_bartlett(
                estimator_logits(config.model), max_grad_norm=opt.max_grad_norm if opt.hessian_clip else None,
                microbatches=opt.hessian_microbatches,
                constrain_grads=lambda g: hax.shard(g, sharding.param_mapping()))  # an FSDP-sharded accumulator
        abstract_params = jax.eval_shape(lambda k: init_model(config.model, key=k), jax.random.PRNGKey(0))
        self.groups = param_groups(abstract_params)
        self.optimizer = build_optimizer(opt, tc.num_train_steps, abstract_params, seed=config.seed,
                                         hessian_fn=self.estimator if self.cond_mode else None)
        self.schedule = lr_schedule(opt, tc.num_train_steps)

        abstract_state = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        self.state_shardings = sharding.state_shardings(abstract_state, mesh)
        replicated = NamedSharding(mesh, P())
        self._row_sharding = NamedSharding(mesh, P(self.batch_sharding.spec[0]))
        batch_in = Batch(self.batch_sharding, self.batch_sharding if self.cond_mode else None)
        self._init_jit = jax.jit(self._init, out_shardings=self.state_shardings)
        self._train_jit = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_in),
                                  out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self._hessian_jit = jax.jit(self._hessian_step, in_shardings=(self.state_shardings, self.batch_sharding),
                                    out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self._eval_jit = jax.jit(self._eval_step, out_shardings=replicated,
                                 in_shardings=(self.state_shardings.params, self.batch_sharding, self._row_sharding))
        self._metrics_jit = jax.jit(self._sophia_metrics, in_shardings=(self.state_shardings.opt_state,),
                                    out_shardings=replicated)
        self._idle_hessian_tokens = None  # cond mode: a placeholder batch for steps that do not refresh h

    def _check_batches(self, dp: int) -> None:
        tc = self.config.trainer
        micro = tc.global_batch // tc.microbatches
        if micro % dp:
            raise ValueError(f"a microbatch of {micro} sequences (trainer.global_batch={tc.global_batch} / "
                             f"trainer.microbatches={tc.microbatches}) is not divisible by the {dp} data-parallel "
                             f"devices (mesh data*fsdp); use a global_batch that is a multiple of {dp * tc.microbatches}")

    @property
    def eval_batch_size(self) -> int:
        """Sequences per evaluation batch: trainer.eval_batch_size, else the training microbatch."""
        tc = self.config.trainer
        return tc.eval_batch_size or tc.global_batch // tc.microbatches

    @contextlib.contextmanager
    def _context(self):
        """The mesh and the compute axis mapping, active while the steps are traced."""
        with jax.set_mesh(self.mesh), hax.axis_mapping(sharding.compute_mapping()):
            yield

    # ------------------------------------------------------------------------------ pure functions
    def _init(self, key: jax.Array) -> TrainState:
        k_params, k_train = jax.random.split(key)
        params = init_model(self.config.model, key=k_params)
        return TrainState(jnp.zeros([], jnp.int32), params, self.optimizer.init(params), k_train,
                          jnp.zeros([], jnp.int32))

    def _loss_and_grads(self, params: Model, tokens: jax.Array) -> tuple[jax.Array, Any]:
        """Mean loss and its gradient over the global batch, accumulated over `microbatches` (lax.scan)."""

        def sum_loss(p: Model, rows: jax.Array) -> tuple[jax.Array, jax.Array]:
            losses, weights = token_losses(p, rows)
            return losses.sum().array, weights.sum().array

        def microbatch(_: jax.Array, rows: jax.Array) -> tuple[tuple[jax.Array, jax.Array], Any]:
            return jax.value_and_grad(sum_loss, has_aux=True)(params, rows)

        def constrain(total: tuple) -> tuple:
            return total[0], hax.shard(total[1], sharding.param_mapping())

        (loss_sum, count), grads = accumulate(microbatch, tokens, self.config.trainer.microbatches,
                                              constrain=constrain)
        count = jnp.maximum(count, 1.0)
        return loss_sum / count, jax.tree.map(lambda g: g / count, grads)

    def _train_step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads = self._loss_and_grads(state.params, batch.tokens)
        grads = hax.shard(grads, sharding.param_mapping())
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)  # a norm is finite iff every entry is
        extra = {"tokens": batch.hessian_tokens} if self.cond_mode else {}
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params, **extra)
        params = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                              optax.apply_updates(state.params, updates), state.params)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = TrainState(state.step + 1, params, _drop_update(finite, opt_state, state.opt_state),
                               state.key, skipped)
        metrics = {
            "train/loss": loss,
            "lr": self.schedule(state.step),  # the rate this step applied: the schedule's count is state.step
            "optim/grad_norm": grad_norm,
            "optim/update_norm": jnp.where(finite, optax.tree.norm(updates), 0.0),
            "optim/skipped_steps": skipped,
        }
        if self.sophia:
            metrics.update(self._hessian_counters(new_state.opt_state))
        return new_state, metrics

    @staticmethod
    def _hessian_counters(opt_state: optax.OptState) -> dict[str, jax.Array]:
        """Sophia's refresh counters: scalars of the state, free to report on every step."""
        sophia = next(x for x in jax.tree.leaves(opt_state, is_leaf=_is_sophia) if _is_sophia(x))
        return {"optim/hessian_updates": sophia.hessian_updates, "optim/hessian_skips": sophia.hessian_skips}

    def _sophia_metrics(self, opt_state: optax.OptState) -> dict[str, jax.Array]:
        """`sophia_jax.metrics` as the run logs them (on logged steps only: they read every m and h)."""
        out = {}
        for name, value in sophia_jax.metrics(opt_state, groups=self.groups).items():
            if name in _ESTIMATOR_METRICS:  # hessian_mode 'cond': the in-update estimator's, from the state
                out[f"optim/{_ESTIMATOR_METRICS[name]}"] = value
            elif name not in ("count", "momentum_norm") and not name.startswith("estimator/"):
                out[f"optim/{name}"] = value
        return out

    def _hessian_step(self, state: TrainState, tokens: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """Folds one GNB estimate on `tokens` (labels sampled from the model) into Sophia's h; reports the
        sampled-label gradient's norm before its clip and whether the clip shrank it."""
        key = jax.random.fold_in(state.key, state.step)
        h_hat, stats = self.estimator.with_stats(state.params, key, tokens=tokens)
        h_hat = hax.shard(h_hat, sharding.param_mapping())
        state = state._replace(opt_state=sophia_jax.update_hessian(state.opt_state, h_hat))
        return state, {**self._hessian_counters(state.opt_state), "optim/hessian_grad_norm": stats["grad_norm"],
                       "optim/hessian_grad_clipped": stats["clipped"]}

    def _eval_step(self, params: Model, tokens: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
        losses, counted = token_losses(params, tokens, jnp.broadcast_to(weights[:, None], tokens[:, 1:].shape))
        return losses.sum().array, counted.sum().array

    # ------------------------------------------------------------------------------ compiled entry points
    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings (ShapeDtypeStructs), to restore a checkpoint into."""
        shapes = jax.eval_shape(self._init, jax.random.PRNGKey(0))

        def attach(sharding: NamedSharding, leaf: Any) -> Any:  # the sharding tree stops at NamedArrays
            if isinstance(leaf, hax.NamedArray):
                return hax.NamedArray(attach(sharding, leaf.array), leaf.axes)
            return None if leaf is None else jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

        return jax.tree.map(attach, self.state_shardings, shapes)

    def lower(self, which: str = "train") -> jax.stages.Lowered:
        """`which` ("train", "hessian" or "eval") lowered from shapes alone, nothing allocated: for
        `.compile().memory_analysis()` here or for a topology with no devices attached (sophia-aot)."""
        c = self.config

        def tokens(rows: int) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct((rows, c.model.seq_len + 1), jnp.int32, sharding=self.batch_sharding)

        state = self.abstract_state()  # outside the mesh context: it makes a concrete key, on the host
        if which == "hessian" and not self.sophia:
            raise ValueError(f"optimizer.type={c.optimizer.type!r} has no Hessian step")
        eval_rows = self.eval_batch_size
        args = {"train": (state, Batch(tokens(c.trainer.global_batch),
                                       tokens(self.hessian_batch) if self.cond_mode else None)),
                "hessian": (state, tokens(self.hessian_batch)),
                "eval": (state.params, tokens(eval_rows),
                         jax.ShapeDtypeStruct((eval_rows,), jnp.float32, sharding=self._row_sharding))}[which]
        jitted = {"train": self._train_jit, "hessian": self._hessian_jit, "eval": self._eval_jit}[which]
        with self._context():
            return jitted.lower(*args)

    def init_state(self, seed: int | None = None) -> TrainState:
        with self._context():
            return self._init_jit(jax.random.PRNGKey(self.config.seed if seed is None else seed))

    def hessian_due(self, step: int) -> bool:
        """Whether Sophia's h is refreshed on (1-based) step `step`: steps k, 2k, ..."""
        return self.sophia and step % self.k == 0

    def log_due(self, step: int) -> bool:
        """Whether the loop logs (1-based) step `step`: multiples of trainer.log_every and the last step
        (trainer/train.py's logging hook). `step` then adds Sophia's diagnostics to the step's metrics."""
        tc = self.config.trainer
        return bool(tc.log_every) and (step % tc.log_every == 0 or step == tc.num_train_steps)

    def step(self, state: TrainState, batch: Batch, step: int) -> tuple[TrainState, dict[str, jax.Array]]:
        """Takes (1-based) step `step` from `state` (at step - 1): the train step on `batch.tokens`, and
        when `hessian_due(step)` the Hessian refresh on `batch.hessian_tokens` - inside the train step in
        'cond' mode, as its own step after it otherwise (the official order). The one step dispatch: the
        loop, the tests and the benchmarks all take steps through here."""
        due = self.hessian_due(step)
        if due and batch.hessian_tokens is None:
            raise ValueError(f"step {step} refreshes the Hessian estimate: pass Batch(tokens, hessian_tokens)")
        with self._context():
            if self.cond_mode:
                if not due:  # the estimator's branch is not taken; any batch of the right shape will do
                    if self._idle_hessian_tokens is None:
                        self._idle_hessian_tokens = jax.device_put(
                            jnp.zeros((self.hessian_batch, self.config.model.seq_len + 1), jnp.int32),
                            self.batch_sharding)
                    batch = batch._replace(hessian_tokens=self._idle_hessian_tokens)
                state, metrics = self._train_jit(state, batch)
            else:
                state, metrics = self._train_jit(state, batch._replace(hessian_tokens=None))
                if due:
                    state, hessian_metrics = self._hessian_jit(state, batch.hessian_tokens)
                    metrics = {**metrics, **hessian_metrics}
            if self.sophia and self.log_due(step):
                diagnostics = self._metrics_jit(state.opt_state)
                if not (self.cond_mode and due):  # the estimator's numbers belong to its refresh steps only
                    diagnostics = {k: v for k, v in diagnostics.items() if "hessian_grad" not in k}
                metrics = {**metrics, **diagnostics}
            return state, metrics

    def eval_loss(self, params: Model, batches: Any) -> jax.Array:
        """Mean loss over `batches` of (tokens, row weights) (trainer.data.loader.EvalBatches)."""
        with self._context():
            sums = [self._eval_jit(params, tokens, weights) for tokens, weights in batches]
        return sum(s for s, _ in sums) / jnp.maximum(sum(n for _, n in sums), 1.0)
