"""Run configuration: frozen dataclasses, loaded from YAML, with dotted command-line overrides.

    sophia-train --config configs/gpt2_small.yaml --optimizer.rho 0.05 --mesh.fsdp 8 --seed 1

A YAML file holds any subset of the fields (missing ones keep their defaults; a top-level `base: FILE`
names a file, relative to this one, whose values are read first). Values are converted to the type the
field declares ("6e-4" -> float, "null" -> None); unknown keys are rejected with their names.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from trainer.checkpoint import CheckpointConfig
from trainer.data import DataConfig
from trainer.model import ModelConfig
from trainer.sharding import MeshConfig

__all__ = ["OptimizerConfig", "TrainConfig", "TrainerConfig", "DEFAULT_CONFIG", "load_config", "parse_args",
           "to_dict"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "neox_tiny.yaml"
OPTIMIZERS = ("sophia_g", "adamw", "lion")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimizer, learning-rate schedule and Sophia's Hessian estimator (`--optimizer.*`)."""

    type: str = "sophia_g"
    """One of sophia_g, adamw, lion."""
    learning_rate: float = 6e-4
    """Peak learning rate (after warmup)."""
    min_lr_ratio: float = 0.05
    """The cosine decays to min_lr_ratio * learning_rate at the last step (paper: 0.05)."""
    warmup: float = 0.01
    """Linear warmup length: a fraction of num_train_steps if < 1, else a number of steps."""
    weight_decay: float = 0.2
    """Decoupled weight decay (multiplied by the learning rate), on matrices only (see decay_embeddings)."""
    decay_embeddings: bool = False
    """Also decay the input embedding (norms and biases never decay)."""
    b1: float | None = None
    """Momentum EMA rate; None = the optimizer's default (sophia_g 0.965, adamw 0.9, lion 0.9)."""
    b2: float | None = None
    """Second EMA rate; None = default (sophia_g 0.99 for h, adamw 0.95, lion 0.99)."""
    eps: float | None = None
    """Denominator epsilon; None = default (sophia_g 1e-12, adamw 1e-8; unused by lion)."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient (and Sophia's sampled gradient) to this global norm; None = no clipping."""
    rho: float = 0.05
    """Sophia's rho (gamma): larger clips fewer coordinates; tune so optim/win_rate stays ~0.1-0.5."""
    update_interval: int = 10
    """Sophia's k: the Hessian estimate is refreshed after steps k, 2k, ..."""
    hessian_batch_fraction: float = 0.25
    """Sequences in a Hessian batch, as a fraction of trainer.global_batch (a separate, fresh stream)."""
    hessian_microbatches: int = 1
    """The Hessian batch is processed in this many microbatches (lax.scan), to bound activation memory."""
    hessian_mode: str = "separate"
    """'separate': its own compiled hessian_step after steps k, 2k, ... (the official order);
    'cond': inside train_step under lax.cond (one program; the estimate sees the pre-update params)."""

    def __post_init__(self) -> None:
        if self.type not in OPTIMIZERS:
            raise ValueError(f"optimizer.type={self.type!r}; use one of {', '.join(OPTIMIZERS)}")
        if self.hessian_mode not in ("separate", "cond"):
            raise ValueError(f"optimizer.hessian_mode={self.hessian_mode!r}; use 'separate' or 'cond'")
        if self.update_interval < 1:
            raise ValueError(f"optimizer.update_interval={self.update_interval}; use k >= 1")
        if self.hessian_microbatches < 1:
            raise ValueError(f"optimizer.hessian_microbatches={self.hessian_microbatches}; use a value >= 1")
        if not 0 < self.hessian_batch_fraction <= 1:
            raise ValueError(f"optimizer.hessian_batch_fraction={self.hessian_batch_fraction}; use a value in (0, 1]")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Batch, length of the run, evaluation and logging (`--trainer.*`)."""

    num_train_steps: int = 400
    """Optimizer steps to take."""
    global_batch: int = 16
    """Sequences per optimizer step, over all devices and microbatches."""
    microbatches: int = 1
    """Gradient accumulation: the step scans over this many equal microbatches of the global batch."""
    log_every: int = 10
    """Write metrics (metrics.jsonl, wandb, progress bar) every this many steps (1 = every step)."""
    eval_every: int = 100
    """Compute eval/loss on the held-out split every this many steps and at the end (0 = never)."""
    eval_batches: int = 4
    """Validation batches (of global_batch sequences) averaged into eval/loss; always the same ones."""
    peak_flops_per_device: float | None = None
    """Peak FLOP/s of one device for throughput/mfu; None = known by device kind (TPU, H100...) or null."""
    wandb: str = "disabled"
    """Weights & Biases: 'disabled', 'offline' (writes <run_dir>/wandb, no network) or 'online'."""
    wandb_project: str = "sophia-jax"
    """wandb project name."""
    wandb_name: str | None = None
    """wandb run name; None = the run directory's name."""
    wandb_tags: str = ""
    """wandb tags, comma-separated (e.g. "sophia,1.5b")."""
    progress: bool = True
    """Show a progress bar with the latest loss."""

    def __post_init__(self) -> None:
        for name in ("num_train_steps", "global_batch", "microbatches", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be >= 1")
        if self.global_batch % self.microbatches:
            raise ValueError(f"trainer.global_batch={self.global_batch} is not divisible by trainer.microbatches="
                             f"{self.microbatches}; use a batch that is a multiple of the microbatch count")
        if self.wandb not in ("disabled", "offline", "online"):
            raise ValueError(f"trainer.wandb={self.wandb!r}; use 'disabled', 'offline' or 'online'")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; `config.yaml` in the run directory is this, resolved."""

    model: ModelConfig = ModelConfig()
    """GPT-NeoX shape and numerics (trainer/model.py)."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """Optimizer and schedule (trainer/optim.py)."""
    trainer: TrainerConfig = TrainerConfig()
    """Batch, steps, eval and logging."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh (trainer/sharding.py)."""
    data: DataConfig = DataConfig()
    """Token source (trainer/data.py); the default is the embedded standard-library corpus."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """When to save to <run_dir>/checkpoints and what to keep (trainer/checkpoint.py)."""
    seed: int = 0
    """Seeds the init, the data order (Hessian batches use seed + 1) and the label sampling."""
    run_dir: str | None = None
    """Where metrics.jsonl, config.yaml and checkpoints/ go; None = runs/<config name>-<timestamp>.
    A run_dir that holds checkpoints is resumed from its latest complete one."""
    resume_from: str | None = None
    """Resume from this checkpoint instead: a step directory (RUN/checkpoints/1000) or a run directory."""


# ------------------------------------------------------------------------------------------ loading
def _unknown(keys: Sequence[str], cls: type, where: str) -> ValueError:
    prefix = f"{where}." if where else ""
    names = ", ".join(f"{prefix}{k}" for k in keys)
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    return ValueError(f"unknown config key(s): {names}. Valid keys{' under ' + where if where else ''}: {valid}")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from YAML or the command line) converted to the declared type `tp`."""
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping of fields, got {value!r}")
        return from_dict(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{where}: cannot use {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where}={value!r}: expected true or false")
    if tp in (int, float):
        try:
            number = tp(value) if not isinstance(value, str) else tp(float(value) if tp is float else int(value))
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r}: expected {tp.__name__}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"{where}={value!r}: expected an integer")
        return number
    if tp is str:
        if value is None:
            raise ValueError(f"{where}: expected a string, got null")
        return str(value)
    return value


def from_dict(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """`cls(**values)` with nested dataclasses, type conversion and unknown keys rejected by name."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise _unknown(unknown, cls, where)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _deep_merge(base: dict, update: Mapping) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's values, after those of its `base:` chain."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} not found; pass an existing YAML file to --config "
                                f"(see the configs/ directory)")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config sections, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is not None:
        values = _deep_merge(read_yaml(path.parent / base), values)
    return values


def _set_dotted(values: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = values
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--{dotted}: {p} is not a config section")
    node[leaf] = value


def parse_args(argv: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """`[--config FILE] [--dotted.key VALUE | --dotted.key=VALUE ...]` -> (config file, overrides)."""
    config_file, overrides, i = None, {}, 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"unexpected argument {arg!r}; use --config FILE or --section.key VALUE")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            config_file = value
        else:
            overrides[key] = value
    return config_file, overrides


def load_config(argv: Sequence[str] = ()) -> tuple[TrainConfig, str]:
    """The TrainConfig of a command line, and the config's name (the YAML file's stem)."""
    config_file, overrides = parse_args(argv)
    path = Path(config_file) if config_file is not None else DEFAULT_CONFIG
    values = read_yaml(path) if (config_file is not None or path.is_file()) else {}
    for dotted, value in overrides.items():
        _set_dotted(values, dotted, _parse_value(value))
    _check_dotted(values)
    return from_dict(TrainConfig, values), path.stem


def _parse_value(text: str) -> Any:
    """A command-line value read as YAML ("null", "true", "3"), else kept as the raw string."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _check_dotted(values: Mapping[str, Any], cls: type = TrainConfig, where: str = "") -> None:
    """Reject unknown keys at every level before any dataclass validation runs."""
    hints = typing.get_type_hints(cls)
    unknown = [k for k in values if k not in hints]
    if unknown:
        raise _unknown(unknown, cls, where)
    for k, v in values.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, Mapping):
            _check_dotted(v, hints[k], f"{where}.{k}" if where else k)


def to_dict(config: Any) -> dict[str, Any]:
    """A (nested) config dataclass as plain YAML-able values."""
    return dataclasses.asdict(config)
