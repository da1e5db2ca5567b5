"""`sophia-train`: a GPT-NeoX trained with Sophia-G (or AdamW / Lion) on a device mesh.

    sophia-train [--config FILE] [--run_dir DIR] [--dotted.key VALUE ...]     (also: python -m trainer.train)
    sophia-train --help                                                        (every key, with its doc)

With no arguments it trains configs/neox_tiny.yaml on the embedded corpus (this Python's standard library
source, tokenized on the spot) and writes <run_dir>/metrics.jsonl and <run_dir>/config.yaml. run_dir may be
a local directory or gs://bucket/prefix (trainer/storage.py).

Several processes (a TPU pod's hosts, or `--mesh.coordinator_address/num_processes/process_id`) run the
same command: each reads only its rows of every batch, all take part in checkpoints, and process 0 alone
writes the bookkeeping (metrics.jsonl, config.yaml, wandb).

`setup` builds a run (data, mesh, compiled steps, state - resumed from a checkpoint when the run directory
holds one) and refuses bad input before anything runs; `run_loop` takes the steps through
`Trainer.step` (trainer/steps.py) and runs the hooks - evaluation, logging, checkpoints - on the steps
they are due.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import jax
import numpy as np
import yaml
from etils import epath
from jax.experimental import multihost_utils

from trainer import sharding, storage
from trainer.checkpoint import Checkpointer, CheckpointReadError, PreemptionGuard, resume
from trainer.config import TrainConfig, build_config, load_values, parse_args, to_dict, usage
from trainer.data.config import open_dataset
from trainer.data.loader import BatchLoader, EvalBatches, batch_shards
from trainer.fit import fit_microbatches
from trainer.lease import Lease, LeaseLost, take as take_lease
from trainer.metrics import MetricsWriter, peak_flops
from trainer.models import flops_per_token, num_params
from trainer.models import hf
from trainer.steps import Batch, Trainer, TrainState

__all__ = ["RESUME_FIELDS", "Run", "main", "run_loop", "setup", "train"]

logger = logging.getLogger("sophia-train")

# Config fields that fix the shapes (or the data order) of a saved state: resuming with any of them
# changed is refused with their names. The mesh may change (the restore reshards). Each maps to the value a
# checkpoint written before the field existed is taken to have (None: every checkpoint records it).
RESUME_FIELDS = {
    **dict.fromkeys(("model.seq_len", "model.hidden_dim", "model.num_layers", "model.num_heads", "model.mlp_ratio",
                     "model.vocab_size", "model.vocab_multiple", "model.param_dtype", "optimizer.type",
                     "optimizer.update_interval", "trainer.global_batch", "seed")),
    "model.arch": "neox",  # GPT-2's leaves differ from GPT-NeoX's; before model.arch every run was a NeoX
    "model.bias": True,
}


class Run(NamedTuple):
    """A run, set up and checked, ready for `run_loop`: everything that can fail on bad input has."""

    config: TrainConfig
    trainer: Trainer
    state: TrainState
    start_step: int  # steps already taken (0 for a fresh run)
    loader: BatchLoader  # positioned at start_step
    hessian_loader: BatchLoader | None  # Sophia-G's estimator batches: the j-th refresh reads batch j
    eval_batches: EvalBatches | None
    checkpointer: Checkpointer
    lease: Lease | Any = None  # the run directory's (trainer/lease.py), held until run_loop ends

    def close(self) -> None:
        """Ends a run that will not loop (or has): its checkpoints written, its lease released."""
        self.checkpointer.close()
        if self.lease is not None:
            self.lease.release()


def setup(config: TrainConfig, name: str = "run") -> Run:
    """Builds the data, mesh, model, optimizer and state of `config`, resuming from a checkpoint when the
    run directory holds one (or `config.resume_from` names one). Raises ValueError / FileNotFoundError /
    CheckpointReadError / StorageError, naming the problem, on bad input or unreachable storage."""
    storage.configure()
    sharding.maybe_initialize_distributed(config.mesh)
    mesh = sharding.make_mesh(config.mesh)
    if config.run_dir is None and jax.process_count() > 1:
        raise ValueError(f"{jax.process_count()} processes need --run_dir: each would make its own timestamped "
                         "directory; give all of them the same one (gs://BUCKET/PREFIX on a pod)")
    run_dir = config.run_dir or f"runs/{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    run_path = epath.Path(run_dir)
    if jax.process_count() > 1 and not storage.is_remote(run_dir):
        logger.warning("run_dir %s is local: every process must see the same directory (one machine or a shared "
                       "filesystem); on a pod use gs://", run_dir)
    _make_run_dir(run_path)
    # One run at a time in a run directory: taken before anything there is read or changed.
    lease = take_lease(run_path, 60 * config.checkpoint.lease_minutes)
    try:
        return _build(config, run_dir, run_path, mesh, lease)
    except BaseException:
        lease.release()
        raise


def _build(config: TrainConfig, run_dir: str, run_path: epath.Path, mesh: jax.sharding.Mesh, lease: Any) -> Run:
    """The rest of `setup`, under the run directory's lease."""
    # The run directory is read first: a storage outage stops the run here, before the data loads.
    checkpointer = Checkpointer(run_path / "checkpoints", config.checkpoint)
    try:
        train_data = open_dataset(config.data, "train", log=logger.info)
        val_data = open_dataset(config.data, "validation") if config.trainer.eval_every else None
    except OSError as error:
        if isinstance(error, (FileNotFoundError, storage.StorageError)):
            raise
        raise storage.StorageError(f"could not read the token cache {config.data.cache} ({storage.describe(error)});"
                                   " check the path and its access (or wait for the storage to recover) and run "
                                   "again") from error
    model = config.model
    if model.init_from is not None:  # checked against its config.json (and its vocab_size taken) up front
        model = hf.check_config(model, model.init_from)
    if model.vocab_size is None:
        model = dataclasses.replace(model, vocab_size=train_data.vocab_size)
    elif model.vocab_size < train_data.vocab_size:
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the data's vocabulary "
                         f"({train_data.vocab_size}); raise it or leave it null")
    config = dataclasses.replace(config, model=model, run_dir=run_dir)
    config = fit_microbatches(config, mesh, log=logger.info)
    trainer = Trainer(config, mesh)
    config = trainer.config  # with "auto" settings resolved for these devices
    tc, seq = config.trainer, model.seq_len
    if (note := _hessian_rounding(trainer)) is not None:
        logger.info("%s", note)

    resumed = resume(checkpointer, trainer.abstract_state(), to_dict(config), RESUME_FIELDS,
                     resume_from=config.resume_from, metrics_path=run_path / "metrics.jsonl")
    if resumed is not None:
        start_step, state = resumed.step, resumed.state
        loader = BatchLoader.from_state(train_data, resumed.extras["loader"], seq_len=seq,
                                        global_batch=tc.global_batch, sharding=trainer.batch_sharding,
                                        prefetch=config.data.prefetch)
    else:
        start_step, state = 0, trainer.init_state()
        if model.init_from is not None:  # a fresh run starts from the Hugging Face checkpoint's weights
            state = state._replace(params=hf.load_params(model.init_from, trainer.config.model,
                                                         trainer.state_shardings.params))
        loader = BatchLoader(train_data, seq_len=seq, global_batch=tc.global_batch, seed=config.seed,
                             sharding=trainer.batch_sharding, prefetch=config.data.prefetch)
    if jax.process_index() == 0:
        storage.write_text(run_path / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    hessian_loader = None
    if trainer.sophia:
        hessian_loader = BatchLoader(train_data, seq_len=seq, global_batch=trainer.hessian_batch,
                                     seed=config.seed + 1, sharding=trainer.batch_sharding, prefetch=0)
    eval_batches = None
    if tc.eval_every:
        eval_batches = EvalBatches(val_data, seq_len=seq, batch_size=trainer.eval_batch_size,
                                   max_batches=tc.eval_batches, sharding=trainer.batch_sharding)
    logger.info("run_dir %s | %s | mesh %s | %.2fM params | %s", run_dir, config.optimizer.type,
                dict(mesh.shape), num_params(model) / 1e6, train_data)
    return Run(config, trainer, state, start_step, loader, hessian_loader, eval_batches, checkpointer, lease)


def _make_run_dir(path: epath.Path) -> None:
    """Creates a local run directory and checks that it can be written, before anything else happens (an
    object store has no directories: nothing to do). Raises StorageError naming the problem: a parent that
    is a file, no permission, a read-only filesystem - also when resuming in a directory made read-only."""
    if storage.is_remote(path):
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _unwritable(path, storage.describe(error)) from error
    probe = path / f".sophia-write-check-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as error:  # the directory itself is not writable: its name says enough
        raise _unwritable(path, f"{type(error).__name__}: [Errno {error.errno}] {error.strerror}") from error


def _unwritable(path: epath.Path, reason: str) -> storage.StorageError:
    return storage.StorageError(f"cannot write to the run directory {path} ({reason}); pass a --run_dir you can "
                                "write to, or fix its permissions; nothing was changed")


def _hessian_rounding(trainer: Trainer) -> str | None:
    """A note for the log when the Hessian batch was rounded up to split evenly (steps.hessian_rows)."""
    if not trainer.sophia:
        return None
    tc, opt = trainer.config.trainer, trainer.config.optimizer
    asked = max(1, round(tc.global_batch * opt.hessian_batch_fraction))
    if trainer.hessian_batch == asked:
        return None
    return (f"the Hessian batch is {trainer.hessian_batch} sequences, not {asked} (optimizer.hessian_batch_fraction="
            f"{opt.hessian_batch_fraction:g} of {tc.global_batch}): rounded up to a multiple of the "
            f"{batch_shards(trainer.batch_sharding)} data-parallel devices x optimizer.hessian_microbatches="
            f"{opt.hessian_microbatches}")


def batches(run: Run) -> Iterator[tuple[int, Batch]]:
    """(step, its Batch) for the steps after run.start_step: the loader's next batch, and on Hessian
    refresh steps k, 2k, ... the estimator's (the j-th refresh reads Hessian batch j - 1)."""
    trainer = run.trainer
    for step in range(run.start_step + 1, run.config.trainer.num_train_steps + 1):
        hessian = run.hessian_loader.batch(step // trainer.k - 1) if trainer.hessian_due(step) else None
        yield step, Batch(next(run.loader), hessian)


# ---------------------------------------------------------------------------------------- hooks
class Hook(NamedTuple):
    """`fn(step, state, record)` run after steps that are multiples of `every` (and after the last)."""

    every: int
    fn: Callable[[int, TrainState, dict[str, Any]], None]

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or last)


class _Throughput:
    """tokens/s and MFU over the steps since the last log; the first step after a (re)start compiles and
    is not timed."""

    def __init__(self, trainer: Trainer):
        c = trainer.config
        self.tokens_per_step = c.trainer.global_batch * c.model.seq_len
        peak = peak_flops(trainer.mesh.devices.flat[0].device_kind, c.trainer.peak_flops_per_device)
        self.flops = None if peak is None else peak * trainer.mesh.size
        self.flops_per_token = flops_per_token(c.model)
        self.start, self.steps = None, 0

    def step_done(self, state: TrainState) -> None:
        if self.start is None:
            jax.block_until_ready(state.step)
            self.start = time.perf_counter()
        else:
            self.steps += 1

    def read(self) -> dict[str, float | None]:
        """The rates since the last read (None before any timed step); restarts the clock."""
        tps = self.steps * self.tokens_per_step / (time.perf_counter() - self.start) if self.steps else None
        self.start, self.steps = time.perf_counter(), 0
        mfu = None if tps is None or self.flops is None else tps * self.flops_per_token / self.flops
        return {"throughput/tokens_per_second": tps, "throughput/mfu": mfu}


class _Agreed:
    """The decisions that depend on a clock and lead to a collective - save because `every_minutes` passed,
    stop because another run took the run directory's lease - taken by process 0 every
    `checkpoint.decide_every` steps and followed by every process (a process deciding on its own clock
    would wait alone in a save's barrier while the others train on: issue 17's hang). One broadcast of two
    integers at those steps on several processes; none at the others."""

    def __init__(self, checkpointer: Checkpointer, lease: Any, every: int):
        self.checkpointer, self.lease, self.every = checkpointer, lease, every

    def at(self, step: int) -> tuple[bool, bool]:
        """(save now by time, the lease is lost) after `step`: the same on every process."""
        if step % self.every:
            return False, False
        lost = self.lease is not None and self.lease.lost is not None
        verdict = np.array([self.checkpointer.due_by_time(), lost], np.int32)
        if jax.process_count() > 1:
            verdict = np.asarray(multihost_utils.broadcast_one_to_all(verdict))
        return bool(verdict[0]), bool(verdict[1])


def _compile_together(run: Run) -> None:
    """With several processes: each compiles the steps before the first one runs, then all meet at a
    barrier of JAX's coordination service (no device collective), so that none enters the steps'
    collectives while another is still compiling. Gloo (CPU) gives every new communicator 30 s for all
    processes to join, which an unequal compile under load outlasts (seen here after a resume:
    "Gloo context initialization failed: DEADLINE_EXCEEDED"). The jitted steps reuse these executables."""
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp

    trainer = run.trainer
    steps = ["train"] + (["hessian"] if trainer.sophia and not trainer.cond_mode else [])
    steps += ["eval"] if run.eval_batches is not None else []
    for which in steps:
        trainer.lower(which).compile()
    ocp.multihost.sync_global_processes("sophia-jax: steps compiled", processes=set(range(jax.process_count())),
                                        timeout=3600)


def run_loop(run: Run) -> dict[str, Any]:
    """Trains from run.start_step to the end (or to a SIGTERM/SIGINT, after which it saves and returns).
    Returns the last logged record; `record["preempted"]` names the signal if one stopped the run.

    Raises:
      LeaseLost: another run took the run directory over; this one stopped without writing more.
    """
    config, trainer, checkpointer = run.config, run.trainer, run.checkpointer
    tc, run_dir = config.trainer, epath.Path(config.run_dir)
    writer = MetricsWriter(run_dir, config=to_dict(config), total_steps=tc.num_train_steps,
                           start_step=run.start_step, wandb_mode=tc.wandb, wandb_project=tc.wandb_project,
                           name=tc.wandb_name or run_dir.name, tags=[t for t in tc.wandb_tags.split(",") if t],
                           progress=tc.progress, wandb_dir=tc.wandb_dir, flush_seconds=tc.metrics_flush_seconds)
    throughput = _Throughput(trainer)
    last = {"record": {}, "skipped": int(jax.device_get(run.state.skipped))}

    def evaluate(step: int, state: TrainState, record: dict[str, Any]) -> None:
        record["eval/loss"] = trainer.eval_loss(state.params, run.eval_batches)

    def log(step: int, state: TrainState, record: dict[str, Any]) -> None:
        record.update(jax.device_get(record))
        record.update(throughput.read())
        skipped = int(record["optim/skipped_steps"])
        if skipped > last["skipped"]:
            logger.warning("step %d: %d step(s) skipped so far for a non-finite loss or gradient", step, skipped)
            last["skipped"] = skipped
        last["record"] = writer.log(step, record)

    def save(step: int, state: TrainState, record: dict[str, Any]) -> None:
        writer.flush()  # metrics.jsonl holds every line up to a checkpoint before the checkpoint can exist
        checkpointer.save(step, state, {"loader": run.loader.state(), "config": to_dict(config)})

    hooks = [Hook(tc.eval_every, evaluate), Hook(tc.log_every, log)]
    agreed = _Agreed(checkpointer, run.lease, config.checkpoint.decide_every)
    state, lost = run.state, False
    try:
        _compile_together(run)
        with PreemptionGuard() as guard:
            logger.info("%s", _compiling(run))
            for step, batch in batches(run):
                state, record = trainer.step(state, batch, step)
                writer.advance()
                throughput.step_done(state)
                final = step == tc.num_train_steps
                for hook in hooks:
                    if hook.due(step, final):
                        hook.fn(step, state, record)
                stop = guard.should_stop(step)
                by_time, lost = agreed.at(step)
                if lost:
                    owner = getattr(run.lease, "lost", None) or "another run (see process 0's log)"
                    raise LeaseLost(f"stopped at step {step} without saving it: {owner} took over the lease of "
                                    f"{run_dir}, which this run had not renewed for checkpoint.lease_minutes "
                                    "(stalled?); the run directory is that run's now")
                if stop or final or by_time or checkpointer.due_by_steps(step):
                    save(step, state, record)
                if stop:
                    checkpointer.wait()
                    logger.warning("%s received: saved step %d to %s; exiting", guard.signal_name or
                                   "preemption notice", step, checkpointer.directory)
                    return {**last["record"], "preempted": guard.signal_name or "preemption"}
    finally:
        checkpointer.close()
        writer.close(flush=not lost)  # a lost run directory is another run's now
        run.loader.close()
        if run.lease is not None:
            run.lease.release()
        if jax.process_count() > 1:
            logger.info("%s", _reads(run))
    return last["record"]


def _compiling(run: Run) -> str:
    """The log line before the first step, which waits for XLA to compile the train step."""
    trainer, first = run.trainer, run.start_step + 1
    line = f"compiling the train step (step {first} waits for it"
    if trainer.sophia and not trainer.cond_mode:
        refresh = -(-first // trainer.k) * trainer.k
        if refresh <= run.config.trainer.num_train_steps:
            line += f"; the Hessian step compiles at step {refresh}"
    return line + ")"


def _reads(run: Run) -> str:
    """What this process read, for the log of a multi-process run: each process reads only its own rows of
    every batch, and the counts and digests of all processes add up to one process's (batches read ahead
    and never used are not counted)."""
    loader, hessian = run.loader, run.hessian_loader
    line = (f"process {jax.process_index()} of {jax.process_count()} read train {loader.dataset.reads} in rows "
            f"[{loader.rows[0]}, {loader.rows[1]}) of each batch of {loader.global_batch}")
    if hessian is not None:
        line += f" and [{hessian.rows[0]}, {hessian.rows[1]}) of each Hessian batch of {hessian.global_batch}"
    if run.eval_batches is not None:
        line += f"; validation {run.eval_batches.dataset.reads}"
    return line


def train(config: TrainConfig, name: str = "run") -> dict[str, Any]:
    """Runs `config` to the end (resuming if its run_dir holds checkpoints); returns the last logged record."""
    return run_loop(setup(config, name))


def _summary(record: dict[str, Any]) -> str:
    shown = [f"{key} {record[key]:.4f}" for key in ("train/loss", "eval/loss") if record.get(key) is not None]
    return f"step {record.get('step')}" + "".join(f", {s}" for s in shown)


def _resume_command(argv: Sequence[str], config: TrainConfig) -> str:
    """The command that resumes a stopped run: its arguments with `--run_dir` (added if the run directory
    was the default's timestamped one; absolute, so that it works from anywhere) and without a
    `--resume_from` (which would restore that step again instead of the newest)."""
    args, i, resume_from_given = [], 0, False
    while i < len(argv):
        arg = argv[i]
        resume_from_given |= arg.startswith("--resume_from")
        if arg in ("--run_dir", "--resume_from"):
            i += 2
            continue
        if not arg.startswith(("--run_dir=", "--resume_from=")):
            args.append(arg)
        i += 1
    run_dir = config.run_dir if storage.is_remote(config.run_dir) else os.path.abspath(config.run_dir)
    args += ["--run_dir", run_dir]
    if config.resume_from is not None and not resume_from_given:  # set in the YAML
        args += ["--resume_from", "null"]
    return shlex.join(["sophia-train", *args])


def _final_line(record: dict[str, Any], config: TrainConfig, seconds: float, argv: Sequence[str]) -> str:
    if "preempted" in record:
        return f"stopped in {seconds:.1f} s: {_summary(record)}; to resume: {_resume_command(argv, config)}"
    return f"done in {seconds:.1f} s: {_summary(record)}; metrics.jsonl and checkpoints/ in {config.run_dir}"


def _one_line(error: BaseException) -> str:
    """An error's message on one line (some, like a refused resume, list one problem per line)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text


def _version() -> str:
    names = ("sophia-jax", "jax", "optax", "haliax", "orbax-checkpoint")
    versions = []
    for name in names:
        try:
            versions.append(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            versions.append("not installed")
    return f"sophia-train {versions[0]} (" + ", ".join(f"{n} {v}" for n, v in zip(names[1:], versions[1:])) + ")"


@contextlib.contextmanager
def _console_logging():
    """The project's INFO messages on stderr, through the progress bar (tqdm.write) so they are not glued
    onto it; JAX's and absl's loggers stay at WARNING."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    loggers = [logging.getLogger(name) for name in ("sophia-train", "trainer")]
    saved = [(lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
        lg.propagate = False  # a root handler (absl installs one) would print each line twice
    try:
        with logging_redirect_tqdm(loggers=loggers):
            yield
    finally:
        for lg, (level, propagate) in zip(loggers, saved):
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sophia-train`; returns the exit status: 0 done (or stopped by a signal, saved), 2 bad
    input or unusable storage (one line `sophia-train: ...` on stderr), 130 interrupted before the first step."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with _console_logging():
        try:
            command_line = parse_args(argv)
            if command_line.version:
                print(_version())
                return 0
            values, name = load_values(command_line)
            config = build_config(values)
            if command_line.help:
                print(usage(config, name), end="")
                return 0
            run = setup(config, name)
        except (ValueError, FileNotFoundError, CheckpointReadError, storage.StorageError) as error:
            print(f"sophia-train: {_one_line(error)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("sophia-train: interrupted before the first step; nothing was saved", file=sys.stderr)
            return 130
        if run.start_step >= config.trainer.num_train_steps:
            logger.info("the run in %s is already complete (step %d of %d); nothing to do", run.config.run_dir,
                        run.start_step, config.trainer.num_train_steps)
            run.close()
            return 0
        start = time.perf_counter()
        try:
            record = run_loop(run)
        except LeaseLost as error:
            print(f"sophia-train: {error}", file=sys.stderr)
            return 2
        logger.info("%s", _final_line(record, run.config, time.perf_counter() - start, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
