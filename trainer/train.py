"""`sophia-train`: a GPT-NeoX trained with Sophia-G (or AdamW / Lion) on a device mesh.

    sophia-train [--config FILE] [--run_dir DIR] [--dotted.key VALUE ...]     (also: python -m trainer.train)

With no arguments it trains configs/neox_tiny.yaml on the embedded corpus (this Python's standard library
source, tokenized on the spot) and writes <run_dir>/metrics.jsonl and <run_dir>/config.yaml.

One step is one pure jitted function, `train_step(state, batch) -> (state, metrics)`, compiled once with
the state's shardings and the state donated: gradient over `microbatches` (lax.scan), skip if not finite,
clip, optimizer update. For Sophia-G the Hessian estimate is refreshed on steps k, 2k, ... from a fresh
batch (a second data stream, seed + 1): by default in its own compiled `hessian_step` run after the
train step, which is the official loop's order (hessian_mode 'separate'); or inside the train step
under lax.cond (hessian_mode 'cond'). benchmarks/train_step.py measures both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple

import haliax as hax
import jax
import jax.numpy as jnp
import optax
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sophia_jax
from trainer import sharding
from trainer.attention import resolve_implementation
from trainer.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    PreemptionGuard,
    check_resumable,
    read_extras,
    trim_metrics,
)
from trainer.config import TrainConfig, load_config, to_dict
from trainer.metrics import MetricsWriter, peak_flops
from trainer.model import GPTNeoX, flops_per_token, logits_fn, num_params, token_losses
from trainer.optim import build_optimizer, lr_schedule

__all__ = ["RESUME_FIELDS", "Run", "TrainState", "Trainer", "main", "run_loop", "setup", "train"]

logger = logging.getLogger("sophia-train")


class TrainState(NamedTuple):
    """Everything that changes during training; all leaves are arrays (checkpointable as is)."""

    step: jax.Array  # int32 []: optimizer steps taken (including skipped ones)
    params: GPTNeoX  # the model, param_dtype (float32)
    opt_state: optax.OptState  # chain(clip, sophia_g | adamw | lion) state: m, h / nu, counters
    key: jax.Array  # uint32 [2]: Hessian label sampling uses fold_in(key, step)
    skipped: jax.Array  # int32 []: steps skipped because the gradient was not finite


def _is_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves))


class Trainer:
    """Builds the model, optimizer and compiled steps of a run on `mesh`.

    Attributes:
      train_step: jitted `(state, batch[, hessian_batch]) -> (state, metrics)`; state donated.
        hessian_batch is taken only with optimizer.hessian_mode 'cond'.
      hessian_step: jitted `(state, hessian_batch) -> (state, metrics)` (Sophia-G, mode 'separate').
      eval_step: jitted `(params, batch) -> (loss sum, count)`.
    """

    def __init__(self, config: TrainConfig, mesh: Mesh):
        if config.model.vocab_size is None:
            raise ValueError("model.vocab_size is unset: set it, or let main() take it from the dataset")
        self.config, self.mesh = config, mesh
        # "auto" attention is resolved for the mesh's devices (a TPU topology compiled on a CPU host is TPU).
        platform = mesh.devices.flat[0].platform
        self.model_config = dataclasses.replace(config.model, attention=resolve_implementation(
            config.model.attention, platform, config.model.compute_dtype))
        opt, tc = config.optimizer, config.trainer
        self.sophia = opt.type == "sophia_g"
        self.cond_mode = self.sophia and opt.hessian_mode == "cond"
        self.k = opt.update_interval
        self.hessian_batch = max(1, round(tc.global_batch * opt.hessian_batch_fraction))
        self._check_batches(sharding.data_parallel_size(mesh))

        gnb = sophia_jax.gauss_newton_bartlett(
            logits_fn, max_grad_norm=opt.max_grad_norm, microbatches=opt.hessian_microbatches,
            constrain_grads=lambda g: hax.shard(g, sharding.param_mapping()))  # an FSDP-sharded accumulator
        self.estimator = gnb
        abstract_params = jax.eval_shape(lambda k: GPTNeoX.init(self.model_config, key=k), jax.random.PRNGKey(0))
        self.optimizer = build_optimizer(opt, tc.num_train_steps, abstract_params, seed=config.seed,
                                         hessian_fn=gnb if self.cond_mode else None)
        self.schedule = lr_schedule(opt, tc.num_train_steps)

        abstract_state = jax.eval_shape(self._init, jax.random.PRNGKey(0))
        self.state_shardings = sharding.state_shardings(abstract_state, mesh)
        self.batch_sharding = sharding.batch_sharding(mesh)
        replicated = NamedSharding(mesh, P())
        batch_in = (self.batch_sharding, self.batch_sharding) if self.cond_mode else (self.batch_sharding,)
        self._init_jit = jax.jit(self._init, out_shardings=self.state_shardings)
        self._train_jit = jax.jit(self._train_step, in_shardings=(self.state_shardings, *batch_in),
                                  out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self._hessian_jit = jax.jit(self._hessian_step, in_shardings=(self.state_shardings, self.batch_sharding),
                                    out_shardings=(self.state_shardings, replicated), donate_argnums=0)
        self._eval_jit = jax.jit(self._eval_step, in_shardings=(self.state_shardings.params, self.batch_sharding),
                                 out_shardings=replicated)

    def _check_batches(self, dp: int) -> None:
        tc = self.config.trainer
        micro = tc.global_batch // tc.microbatches
        if micro % dp:
            raise ValueError(f"a microbatch of {micro} sequences (trainer.global_batch={tc.global_batch} / "
                             f"trainer.microbatches={tc.microbatches}) is not divisible by the {dp} data-parallel "
                             f"devices (mesh data*fsdp); use a global_batch that is a multiple of {dp * tc.microbatches}")
        hm = self.config.optimizer.hessian_microbatches
        if self.sophia and self.hessian_batch % (dp * hm):
            raise ValueError(f"the Hessian batch of {self.hessian_batch} sequences (optimizer.hessian_batch_fraction="
                             f"{self.config.optimizer.hessian_batch_fraction} of {tc.global_batch}) is not divisible "
                             f"by the {dp} data-parallel devices x optimizer.hessian_microbatches={hm}; change the "
                             "fraction, the batch or the microbatch count")

    @contextlib.contextmanager
    def _context(self):
        """The mesh and the compute axis mapping, active while the steps are traced."""
        with jax.set_mesh(self.mesh), hax.axis_mapping(sharding.compute_mapping()):
            yield

    # ------------------------------------------------------------------------------ pure functions
    def _init(self, key: jax.Array) -> TrainState:
        k_params, k_train = jax.random.split(key)
        params = GPTNeoX.init(self.model_config, key=k_params)
        return TrainState(jnp.zeros([], jnp.int32), params, self.optimizer.init(params), k_train,
                          jnp.zeros([], jnp.int32))

    def _loss_and_grads(self, params: GPTNeoX, batch: jax.Array) -> tuple[jax.Array, Any]:
        """Mean loss and its gradient over the global batch, accumulated over `microbatches` (lax.scan)."""
        M = self.config.trainer.microbatches

        def sum_loss(p: GPTNeoX, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
            losses, weights = token_losses(p, tokens)
            return losses.sum().array, weights.sum().array

        grad_fn = jax.value_and_grad(sum_loss, has_aux=True)
        if M == 1:
            (loss_sum, count), grads = grad_fn(params, batch)
        else:
            # Microbatch i = rows i, i+M, i+2M, ...: every microbatch is spread over all data shards.
            B, L = batch.shape
            micro = batch.reshape(B // M, M, L).swapaxes(0, 1)
            micro = jax.lax.with_sharding_constraint(micro, P(None, *self.batch_sharding.spec))

            def body(carry, tokens):
                g_acc, l_acc, n_acc = carry
                (l, n), g = grad_fn(params, tokens)
                g_acc = hax.shard(jax.tree.map(jnp.add, g_acc, g), sharding.param_mapping())
                return (g_acc, l_acc + l, n_acc + n), None

            zeros = hax.shard(jax.tree.map(jnp.zeros_like, params), sharding.param_mapping())
            (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
        count = jnp.maximum(count, 1.0)
        return loss_sum / count, jax.tree.map(lambda g: g / count, grads)

    def _train_step(self, state: TrainState, batch: jax.Array, hessian_batch: jax.Array | None = None):
        loss, grads = self._loss_and_grads(state.params, batch)
        grads = hax.shard(grads, sharding.param_mapping())
        finite = _is_finite(grads)
        extra = {"tokens": hessian_batch} if self.cond_mode else {}
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params, **extra)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731  (a select XLA fuses into the update)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = TrainState(state.step + 1, jax.tree.map(keep, params, state.params),
                               jax.tree.map(keep, opt_state, state.opt_state), state.key, skipped)
        metrics = {
            "train/loss": loss,
            "lr": self.schedule(state.step),
            "optim/grad_norm": optax.global_norm(grads),
            "optim/update_norm": optax.global_norm(updates),
            "optim/skipped_steps": skipped,
        }
        if self.sophia:
            metrics.update(self._sophia_metrics(new_state.opt_state))
        return new_state, metrics

    def _sophia_metrics(self, opt_state: optax.OptState) -> dict[str, jax.Array]:
        m = sophia_jax.metrics(opt_state)
        return {"optim/win_rate": m["win_rate"], "optim/hessian_norm": m["hessian_norm"],
                "optim/hessian_updates": m["hessian_updates"], "optim/hessian_skips": m["hessian_skips"]}

    def _hessian_step(self, state: TrainState, hessian_batch: jax.Array):
        """Folds one GNB estimate on `hessian_batch` (labels sampled from the model) into Sophia's h."""
        key = jax.random.fold_in(state.key, state.step)
        h_hat = self.estimator(state.params, key, tokens=hessian_batch)
        h_hat = hax.shard(h_hat, sharding.param_mapping())
        state = state._replace(opt_state=sophia_jax.update_hessian(state.opt_state, h_hat))
        return state, self._sophia_metrics(state.opt_state)

    def _eval_step(self, params: GPTNeoX, batch: jax.Array) -> tuple[jax.Array, jax.Array]:
        losses, weights = token_losses(params, batch)
        return losses.sum().array, weights.sum().array

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
        `.compile().memory_analysis()` here or for a topology with no devices attached (benchmarks)."""
        c = self.config

        def tokens(rows: int) -> jax.ShapeDtypeStruct:
            return jax.ShapeDtypeStruct((rows, c.model.seq_len + 1), jnp.int32, sharding=self.batch_sharding)

        state = self.abstract_state()  # outside the mesh context: it makes a concrete key, on the host
        args = {"train": (state, tokens(c.trainer.global_batch)),
                "hessian": (state, tokens(self.hessian_batch)),
                "eval": (state.params, tokens(c.trainer.global_batch))}[which]
        if which == "train" and self.cond_mode:  # the estimator's batch goes into the train step too
            args = (*args, tokens(self.hessian_batch))
        jitted = {"train": self._train_jit, "hessian": self._hessian_jit, "eval": self._eval_jit}[which]
        with self._context():
            return jitted.lower(*args)

    def init_state(self, seed: int | None = None) -> TrainState:
        with self._context():
            return self._init_jit(jax.random.PRNGKey(self.config.seed if seed is None else seed))

    def train_step(self, state: TrainState, batch: jax.Array, hessian_batch: jax.Array | None = None):
        with self._context():
            if self.cond_mode:
                return self._train_jit(state, batch, hessian_batch)
            return self._train_jit(state, batch)

    def hessian_step(self, state: TrainState, hessian_batch: jax.Array):
        with self._context():
            return self._hessian_jit(state, hessian_batch)

    def eval_loss(self, params: GPTNeoX, batches: Sequence[jax.Array]) -> jax.Array:
        with self._context():
            sums = [self._eval_jit(params, b) for b in batches]
        return sum(s for s, _ in sums) / sum(n for _, n in sums)

    def hessian_due(self, step: int) -> bool:
        """Whether the Hessian estimate is refreshed after (1-based) step `step`: steps k, 2k, ..."""
        return self.sophia and step % self.k == 0


# ---------------------------------------------------------------------------------------- the loop
# Config fields that fix the shapes (or the data order) of a saved state: resuming with any of them
# changed is refused with their names. The mesh may change (the restore reshards).
RESUME_FIELDS = (
    "model.seq_len", "model.hidden_dim", "model.num_layers", "model.num_heads", "model.mlp_ratio",
    "model.vocab_size", "model.vocab_multiple", "model.param_dtype", "optimizer.type",
    "optimizer.update_interval", "trainer.global_batch", "seed",
)


def _throughput(trainer: Trainer, steps: int, seconds: float) -> dict[str, float | None]:
    c = trainer.config
    tps = steps * c.trainer.global_batch * c.model.seq_len / max(seconds, 1e-9)
    peak = peak_flops(trainer.mesh.devices.flat[0].device_kind, c.trainer.peak_flops_per_device)
    mfu = None if peak is None else tps * flops_per_token(c.model) / (peak * trainer.mesh.size)
    return {"throughput/tokens_per_second": tps, "throughput/mfu": mfu}


class Run(NamedTuple):
    """A run, set up and checked, ready for `run_loop`: everything that can fail on bad input has."""

    config: TrainConfig
    trainer: Trainer
    state: TrainState
    start_step: int
    loader: Any  # BatchLoader positioned at start_step
    hessian_loader: Any
    eval_batches: list
    checkpointer: Checkpointer


def _find_checkpoint(path: str | Path) -> tuple[Checkpointer | None, int | None]:
    """(checkpointer over the directory, step) named by --resume_from: a step directory, a checkpoints
    directory or a run directory (its latest step)."""
    path = Path(path)
    if (path / "extras").is_dir() and path.name.isdigit():
        return Checkpointer(path.parent, CheckpointConfig(async_save=False)), int(path.name)
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if not directory.is_dir():
        raise FileNotFoundError(f"--resume_from {str(path)!r} does not exist; pass a checkpoint step directory "
                                "(RUN_DIR/checkpoints/STEP) or a run directory")
    checkpointer = Checkpointer(directory, CheckpointConfig(async_save=False))
    steps = checkpointer.steps()
    if not steps:
        raise FileNotFoundError(f"--resume_from {str(path)!r} holds no complete checkpoint")
    return checkpointer, None


def setup(config: TrainConfig, name: str = "run") -> Run:
    """Builds the data, mesh, model, optimizer and state of `config`, resuming from a checkpoint when the
    run directory holds one (or `config.resume_from` names one). Raises ValueError / FileNotFoundError,
    naming the problem, on bad input."""
    from trainer.data import BatchLoader, open_dataset

    sharding.maybe_initialize_distributed(config.mesh)
    mesh = sharding.make_mesh(config.mesh)
    train_data, val_data = open_dataset(config.data, "train"), open_dataset(config.data, "validation")
    model = config.model
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=train_data.vocab_size)
    elif model.vocab_size < train_data.vocab_size:
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the data's vocabulary "
                         f"({train_data.vocab_size}); raise it or leave it null")
    run_dir = config.run_dir or f"runs/{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    config = dataclasses.replace(config, model=model, run_dir=run_dir)
    trainer = Trainer(config, mesh)
    tc, seq = config.trainer, model.seq_len
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    checkpointer = Checkpointer(Path(run_dir) / "checkpoints", config.checkpoint)

    # Resume: an explicit --resume_from, else the latest complete checkpoint of run_dir.
    source, step_wanted = (_find_checkpoint(config.resume_from) if config.resume_from
                           else (checkpointer, None))
    restored = None
    steps = source.steps()
    if steps:
        newest = step_wanted if step_wanted is not None else steps[-1]
        saved = None
        with contextlib.suppress(FileNotFoundError, ValueError):  # a damaged newest step: restore_latest warns
            saved = read_extras(source.directory / str(newest))["config"]
        if saved is not None:  # before restoring, so a changed shape is refused rather than read as damage
            check_resumable(saved, to_dict(config), RESUME_FIELDS)
        abstract = trainer.abstract_state()
        if step_wanted is not None:
            restored = (step_wanted, *source.restore(step_wanted, abstract))
        else:
            restored = source.restore_latest(abstract)
            if restored is None:
                raise ValueError(f"none of the checkpoints in {source.directory} ({', '.join(map(str, steps))}) "
                                 "could be restored (see the warnings above); move them away or use another "
                                 "--run_dir")
    if restored is not None:
        start_step, state, extras = restored
        check_resumable(extras["config"], to_dict(config), RESUME_FIELDS)
        logger.info("resuming from %s/%d", source.directory, start_step)
        checkpointer.set_aside_after(start_step)  # damaged ones (or, with --resume_from, a later future)
        loader = BatchLoader.from_state(train_data, extras["loader"], seq_len=seq, global_batch=tc.global_batch,
                                        sharding=trainer.batch_sharding, prefetch=config.data.prefetch)
        dropped = trim_metrics(Path(run_dir) / "metrics.jsonl", start_step) if jax.process_index() == 0 else 0
        if dropped:
            logger.info("dropped %d metrics line(s) written after step %d", dropped, start_step)
    else:
        start_step, state = 0, trainer.init_state()
        loader = BatchLoader(train_data, seq_len=seq, global_batch=tc.global_batch, seed=config.seed,
                             sharding=trainer.batch_sharding, prefetch=config.data.prefetch)
    if source is not checkpointer:
        source.close()
    if jax.process_index() == 0:
        (Path(run_dir) / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    hessian_loader = BatchLoader(train_data, seq_len=seq, global_batch=trainer.hessian_batch, seed=config.seed + 1,
                                 sharding=trainer.batch_sharding, prefetch=0)
    eval_loader = BatchLoader(val_data, seq_len=seq, global_batch=tc.global_batch, seed=config.seed,
                              sharding=trainer.batch_sharding, prefetch=0)
    eval_batches = [eval_loader.batch(i) for i in range(tc.eval_batches)] if tc.eval_every else []
    logger.info("run_dir %s | %s | mesh %s | %.2fM params | %s", run_dir, config.optimizer.type,
                dict(mesh.shape), num_params(model) / 1e6, train_data)
    return Run(config, trainer, state, start_step, loader, hessian_loader, eval_batches, checkpointer)


def run_loop(run: Run) -> dict[str, Any]:
    """Trains from run.start_step to the end (or to a SIGTERM/SIGINT, after which it saves and returns).
    Returns the last logged record; `record["preempted"]` names the signal if one stopped the run."""
    config, trainer, state, checkpointer = run.config, run.trainer, run.state, run.checkpointer
    tc, run_dir = config.trainer, Path(config.run_dir)
    writer = MetricsWriter(run_dir, config=to_dict(config), total_steps=tc.num_train_steps,
                           start_step=run.start_step, wandb_mode=tc.wandb, wandb_project=tc.wandb_project,
                           name=tc.wandb_name or run_dir.name, tags=[t for t in tc.wandb_tags.split(",") if t],
                           progress=tc.progress)
    k = trainer.k
    hessian_batch = run.hessian_loader.batch(0) if trainer.cond_mode else None
    record: dict[str, Any] = {}
    timer_start, timer_steps = None, 0  # the first step after (re)start compiles: not timed
    last_skipped = int(jax.device_get(state.skipped))

    def save(step: int) -> None:
        checkpointer.save(step, state, {"loader": run.loader.state(), "config": to_dict(config)})

    try:
        with PreemptionGuard() as guard:
            for step in range(run.start_step + 1, tc.num_train_steps + 1):  # `step`: steps done after it
                batch = next(run.loader)
                if trainer.cond_mode and step % k == 0:
                    hessian_batch = run.hessian_loader.batch(step // k - 1)
                state, metrics = trainer.train_step(state, batch, hessian_batch)
                if trainer.hessian_due(step) and not trainer.cond_mode:
                    state, hessian_metrics = trainer.hessian_step(state, run.hessian_loader.batch(step // k - 1))
                    metrics = {**metrics, **hessian_metrics}
                writer.advance()
                if timer_start is None:
                    jax.block_until_ready(state.step)
                    timer_start, timer_steps = time.perf_counter(), 0
                else:
                    timer_steps += 1
                last = step == tc.num_train_steps
                if step % tc.log_every == 0 or last:
                    metrics = jax.device_get(metrics)
                    if timer_steps:
                        metrics.update(_throughput(trainer, timer_steps, time.perf_counter() - timer_start))
                    else:
                        metrics.update({"throughput/tokens_per_second": None, "throughput/mfu": None})
                    if tc.eval_every and (step % tc.eval_every == 0 or last):
                        metrics["eval/loss"] = trainer.eval_loss(state.params, run.eval_batches)
                    if int(metrics["optim/skipped_steps"]) > last_skipped:
                        last_skipped = int(metrics["optim/skipped_steps"])
                        logger.warning("step %d: %d step(s) skipped so far for non-finite gradients",
                                       step, last_skipped)
                    record = writer.log(step, metrics)
                    timer_start, timer_steps = time.perf_counter(), 0
                stop = guard.should_stop(step)
                if stop or last or checkpointer.due(step):
                    save(step)
                if stop:
                    checkpointer.wait()
                    logger.warning("%s received: saved step %d to %s; exiting (run again to resume)",
                                   guard.signal_name or "preemption notice", step, checkpointer.directory)
                    record = {**record, "preempted": guard.signal_name or "preemption"}
                    break
    finally:
        checkpointer.close()
        writer.close()
        run.loader.close()
    return record


def train(config: TrainConfig, name: str = "run") -> dict[str, Any]:
    """Runs `config` to the end (resuming if its run_dir holds checkpoints); returns the last logged record."""
    return run_loop(setup(config, name))


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)  # force: absl (imported by orbax) installs a root handler first
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save step at INFO
    try:
        config, name = load_config(sys.argv[1:] if argv is None else argv)
        run = setup(config, name)
    except (ValueError, FileNotFoundError) as error:
        print(f"sophia-train: {error}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    record = run_loop(run)
    logger.info("%s in %.1f s: step %s train/loss %s eval/loss %s",
                "stopped" if "preempted" in record else "done", time.perf_counter() - start,
                record.get("step"), record.get("train/loss"), record.get("eval/loss"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
