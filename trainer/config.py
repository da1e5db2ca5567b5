"""Run configuration: frozen dataclasses, loaded from YAML, with dotted command-line overrides.

    sophia-train --config configs/gpt2_small.yaml --optimizer.rho 0.05 --mesh.fsdp 8 --seed 1

A YAML file holds any subset of the fields (missing ones keep their defaults; a top-level `base: FILE`
names a file, relative to this one, whose values are read first). Values are converted to the type the
field declares ("6e-4" -> float, "null" -> None); unknown keys are rejected with their names. A file that
is not valid YAML is refused naming the file and the line (and which file's `base:` it is).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import textwrap
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from trainer.checkpoint import CheckpointConfig
from trainer.data.config import DataConfig
from trainer.models import ModelConfig
from trainer.optim import OPTIMIZERS, OptimizerConfig, SophiaGConfig
from trainer.sharding import MeshConfig

__all__ = ["DEFAULT_CONFIG", "TrainConfig", "TrainerConfig", "build_config", "config_keys", "from_dict", "load_config",
           "load_values", "parse_args", "read_yaml", "to_dict", "usage"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "neox_tiny.yaml"


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Batch, length of the run, evaluation and logging (`--trainer.*`)."""

    num_train_steps: int = 400
    """Optimizer steps to take."""
    global_batch: int = 16
    """Sequences per optimizer step, over all devices and microbatches."""
    microbatches: int | Literal["auto"] = 1
    """Gradient accumulation: the step scans over this many equal microbatches of the global batch;
    'auto' = the fewest whose compiled step fits the device memory (measured before the first step)."""
    log_every: int = 10
    """Write metrics (metrics.jsonl, wandb, progress bar) every this many steps (1 = every step)."""
    eval_every: int = 100
    """Compute eval/loss on the held-out split every this many steps and at the end (0 = never)."""
    eval_batches: int = 4
    """Validation batches averaged into eval/loss: the first eval_batches x eval_batch_size sequences of
    the validation split, always the same ones (all of it when the split is smaller)."""
    eval_batch_size: int | None = None
    """Sequences per evaluation batch; None = the training microbatch (global_batch / microbatches)."""
    peak_flops_per_device: float | None = None
    """Peak FLOP/s of one device for throughput/mfu; None = known by device kind (TPU, H100...) or null."""
    wandb: str = "disabled"
    """Weights & Biases: 'disabled', 'offline' (writes <wandb_dir>/wandb, no network) or 'online'."""
    wandb_dir: str | None = None
    """Local directory for wandb's files; None = run_dir when it is local, else
    ~/.cache/sophia-jax/wandb/gs/<bucket>/<prefix> (wandb needs a disk; the run id stays in run_dir)."""
    wandb_project: str = "sophia-jax"
    """wandb project name."""
    wandb_name: str | None = None
    """wandb run name; None = the run directory's name."""
    wandb_tags: str = ""
    """wandb tags, comma-separated (e.g. "sophia,1.5b")."""
    progress: bool = True
    """Show progress on stderr: a bar with the latest loss on a terminal, else one line per logged step."""
    metrics_flush_seconds: float = 30.0
    """gs:// run_dir: rewrite metrics.jsonl (an object cannot be appended to) at most this often, and
    before every checkpoint and at the end; 0 = on every logged step. A local file gets each line at once."""

    def __post_init__(self) -> None:
        for name in ("num_train_steps", "global_batch", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be >= 1")
        if self.microbatches != "auto" and (not isinstance(self.microbatches, int) or self.microbatches < 1):
            raise ValueError(f"trainer.microbatches={self.microbatches!r}; use a count >= 1 or 'auto'")
        if self.eval_every < 0:
            raise ValueError(f"trainer.eval_every={self.eval_every}; use a step count, or 0 for no evaluation")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            raise ValueError(f"trainer.eval_batch_size={self.eval_batch_size} must be >= 1 (or null)")
        if self.peak_flops_per_device is not None and self.peak_flops_per_device <= 0:
            raise ValueError(f"trainer.peak_flops_per_device={self.peak_flops_per_device}; use FLOP/s > 0 or null")
        if self.microbatches != "auto" and self.global_batch % self.microbatches:
            raise ValueError(f"trainer.global_batch={self.global_batch} is not divisible by trainer.microbatches="
                             f"{self.microbatches}; use a batch that is a multiple of the microbatch count")
        if self.metrics_flush_seconds < 0:
            raise ValueError(f"trainer.metrics_flush_seconds={self.metrics_flush_seconds}; use seconds >= 0")
        if self.wandb not in ("disabled", "offline", "online"):
            raise ValueError(f"trainer.wandb={self.wandb!r}; use 'disabled', 'offline' or 'online'")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; `config.yaml` in the run directory is this, resolved."""

    model: ModelConfig = ModelConfig()
    """The model: its architecture (`arch`: neox, gpt2), shape and numerics (trainer/models/)."""
    optimizer: OptimizerConfig = SophiaGConfig()
    """Optimizer and schedule (trainer/optim.py); `type` picks sophia_g, adamw or lion."""
    trainer: TrainerConfig = TrainerConfig()
    """Batch, steps, eval and logging."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh (trainer/sharding.py)."""
    data: DataConfig = DataConfig()
    """Token source (trainer/data/); the default is the embedded standard-library corpus."""
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
# Sections whose class is chosen by their `type` field; switching type keeps only the shared fields.
CHOICES: dict[type, dict[str, type]] = {OptimizerConfig: OPTIMIZERS}


def _choose(cls: type, values: Mapping[str, Any], where: str) -> type:
    """The class of a config section: `cls` itself, or the one its `type` names for choice sections."""
    if cls not in CHOICES:
        return cls
    default = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == where)
    name = values.get("type", getattr(default, "type", None))
    if name not in CHOICES[cls]:
        raise ValueError(f"{where}.type={name!r}; use one of {', '.join(CHOICES[cls])}")
    return CHOICES[cls][name]


def _unknown(keys: Sequence[str], cls: type, where: str) -> ValueError:
    prefix = f"{where}." if where else ""
    names = ", ".join(f"{prefix}{k}" for k in keys)
    fields = [f.name for f in dataclasses.fields(cls)]
    close = [match for k in keys for match in difflib.get_close_matches(k, fields, n=1)]
    hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
    return ValueError(f"unknown config key(s): {names}.{hint} Valid keys{' under ' + where if where else ''}: "
                      f"{', '.join(fields)}")


def _expected(tp: Any) -> str:
    """What a value of type `tp` must be, in words: "an integer", "an integer or 'auto'", "a number or null"."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(v) for v in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _expected(arg) for arg in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, getattr(
        tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` (from YAML or the command line) converted to the declared type `tp`."""
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must be a mapping of fields, got {value!r}")
        return from_dict(tp, value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{where}={value!r}: expected {_expected(tp)}")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError:
                continue
        raise ValueError(f"{where}={value!r}: expected {_expected(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no"):
            return value.lower() in ("true", "yes")
        raise ValueError(f"{where}={value!r}: expected true or false")
    if tp in (int, float):
        if isinstance(value, bool) or value is None:  # YAML's true is not the integer 1
            raise ValueError(f"{where}={value!r}: expected {'an integer' if tp is int else 'a number'}")
        try:
            number = tp(value) if not isinstance(value, str) else tp(float(value) if tp is float else int(value))
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r}: expected {'an integer' if tp is int else 'a number'}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ValueError(f"{where}={value!r}: expected an integer")
        return number
    if tp is str:
        if value is None or isinstance(value, (bool, Mapping, list)):
            raise ValueError(f"{where}={value!r}: expected a string")
        return str(value)
    return value


def from_dict(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """`cls(**values)` with nested dataclasses, type conversion and unknown keys rejected by name; a choice
    section (`optimizer`) becomes the class its `type` names."""
    cls = _choose(cls, values, where)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise _unknown(unknown, cls, where)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def _shared_fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _deep_merge(base: Mapping, update: Mapping, cls: type = TrainConfig) -> dict:
    """`update` over `base`, section by section. In a choice section, an update that changes `type` keeps
    only the base's shared fields (those of the section's base class)."""
    out = dict(base)
    hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
    for k, v in update.items():
        sub = hints.get(k)
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and dataclasses.is_dataclass(sub):
            old = out[k]
            if sub in CHOICES and "type" in v and v["type"] != old.get("type", v["type"]):
                old = {name: value for name, value in old.items() if name in _shared_fields(sub)}
            out[k] = _deep_merge(old, v, sub)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's values, after those of its `base:` chain (each `base:` relative to the file naming it).
    Raises FileNotFoundError or ValueError naming the file (and the line, for a YAML syntax error)."""
    return _read_yaml(Path(path), ())


def _read_yaml(path: Path, named_by: tuple[Path, ...]) -> dict[str, Any]:
    """`read_yaml`, for `path` reached through the `base:` lines of the files `named_by` (outermost first)."""
    where = f"{_shown(path)} (the base: of {_shown(named_by[-1])})" if named_by else _shown(path)
    if not path.is_file():
        if named_by:
            raise FileNotFoundError(f"{_shown(named_by[-1])}: its base: {_shown(path)} was not found (a relative "
                                    "base: is read next to the file that names it); fix the path")
        raise FileNotFoundError(f"config file {str(path)!r} not found; pass an existing YAML file to --config "
                                f"(see the configs/ directory)")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.MarkedYAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {_yaml_problem(error)}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{where} must hold a mapping of config sections, got {type(values).__name__}")
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str) or not base:
        raise ValueError(f"{where}: base: must name a YAML file, got {base!r}")
    target = path.parent / Path(base).expanduser()
    chain = (*named_by, path)
    if any(os.path.realpath(target) == os.path.realpath(p) for p in chain):
        cycle = " -> ".join(_shown(p) for p in (*chain, target))
        raise ValueError(f"{where}: base: {base} makes a cycle ({cycle}); remove one of the base: lines")
    return _deep_merge(_read_yaml(target, chain), values)


def _shown(path: Path) -> str:
    """A path as the user would write it: `a/../b.yaml` as `b.yaml`."""
    return os.path.normpath(path)


def _yaml_problem(error: yaml.MarkedYAMLError) -> str:
    """A YAML syntax error in one line: where it is and what is wrong (PyYAML's own text spans lines and names
    the input "<unicode string>")."""
    mark = error.problem_mark or error.context_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    text += error.problem or "cannot be parsed"
    if error.context and error.context_mark is not None:
        text += f" ({error.context} that starts on line {error.context_mark.line + 1})"
    elif error.context:
        text += f" ({error.context})"
    return text


def _set_dotted(values: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = values
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"--{dotted}: {p} is not a config section")
    node[leaf] = value


class CommandLine(typing.NamedTuple):
    config_file: str | None  # --config FILE
    overrides: dict[str, str]  # dotted key -> value text
    help: bool  # -h / --help
    version: bool = False  # --version


def parse_args(argv: Sequence[str]) -> CommandLine:
    """`[--config FILE] [-h | --help] [--version] [--dotted.key VALUE | --dotted.key=VALUE ...]`."""
    config_file, overrides, show_help, show_version, i = None, {}, False, False, 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            show_help, i = True, i + 1
            continue
        if arg == "--version":
            show_version, i = True, i + 1
            continue
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"unexpected argument {arg!r}; use --config FILE or --section.key VALUE (--help lists "
                             "the keys)")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ValueError(_missing_value(key))
            value, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            config_file = value
        else:
            overrides[key] = value
    return CommandLine(config_file, overrides, show_help, show_version)


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every dotted key the command line takes (those of all optimizer types included)."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        section = hints[f.name]
        if section in CHOICES:
            for choice in CHOICES[section].values():
                keys += config_keys(choice, f"{prefix}{f.name}.")
        elif dataclasses.is_dataclass(section):
            keys += config_keys(section, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return list(dict.fromkeys(keys))


def _missing_value(key: str) -> str:
    """The error for `--key` with no value after it: a key that takes one, or a mistyped option."""
    if key in config_keys() or key == "config":
        return f"--{key} needs a value: --{key} VALUE or --{key}=VALUE"
    close = difflib.get_close_matches(key, ["help", "version", "config", *config_keys()], n=1)
    hint = f"did you mean --{close[0]}? " if close else ""
    return f"unknown option --{key}; {hint}(sophia-train --help lists the options and keys)"


def load_values(command_line: CommandLine) -> tuple[dict[str, Any], str]:
    """The merged YAML + override values of a command line (not yet checked), and the config's name."""
    path = Path(command_line.config_file) if command_line.config_file is not None else DEFAULT_CONFIG
    values = read_yaml(path) if (command_line.config_file is not None or path.is_file()) else {}
    overrides: dict[str, Any] = {}
    for dotted, value in command_line.overrides.items():
        _set_dotted(overrides, dotted, _parse_value(value))
    return _deep_merge(values, overrides), path.stem


def build_config(values: Mapping[str, Any]) -> TrainConfig:
    """The TrainConfig of merged values; unknown keys and bad values are named in a ValueError."""
    _check_dotted(values)
    return from_dict(TrainConfig, values)


def load_config(argv: Sequence[str] = ()) -> tuple[TrainConfig, str]:
    """The TrainConfig of a command line, and the config's name (the YAML file's stem)."""
    values, name = load_values(parse_args(argv))
    return build_config(values), name


def _parse_value(text: str) -> Any:
    """A command-line value read as YAML ("null", "true", "3"), else kept as the raw string."""
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _check_dotted(values: Mapping[str, Any], cls: type = TrainConfig, where: str = "") -> None:
    """Reject unknown keys at every level before any dataclass validation runs."""
    cls = _choose(cls, values, where)
    hints = typing.get_type_hints(cls)
    unknown = [k for k in values if k not in hints or k not in {f.name for f in dataclasses.fields(cls)}]
    if unknown:
        raise _unknown(unknown, cls, where)
    for k, v in values.items():
        if dataclasses.is_dataclass(hints[k]) and isinstance(v, Mapping):
            _check_dotted(v, hints[k], f"{where}.{k}" if where else k)


def to_dict(config: Any) -> dict[str, Any]:
    """A (nested) config dataclass as plain YAML-able values."""
    return dataclasses.asdict(config)


# ------------------------------------------------------------------------------------------ --help
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (and of its bases), by field name."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    """A field's type for --help: INT, FLOAT|null, INT|auto."""
    if typing.get_origin(tp) is Literal:
        return "|".join(str(v) for v in typing.get_args(tp))
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return "|".join("null" if a is type(None) else _type_name(a) for a in args)
    return {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}.get(tp, getattr(tp, "__name__", str(tp)).upper())


def _section_lines(cls: type, values: Any, prefix: str, skip: set[str] = frozenset()) -> list[str]:
    lines, docs, hints = [], field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            lines += _section_lines(hints[f.name], getattr(values, f.name, None), f"{prefix}{f.name}.")
            continue
        current = getattr(values, f.name, f.default)
        shown = "null" if current is None else str(current).lower() if isinstance(current, bool) else current
        lines.append(f"  --{prefix}{f.name} {_type_name(hints[f.name])}  (now: {shown})")
        lines += ["      " + line for line in textwrap.wrap(docs.get(f.name, ""), 96)]
    return lines


def usage(config: TrainConfig, name: str) -> str:
    """`sophia-train --help`: every config key, grouped by section, with its value in `config` and its doc."""
    out = ["usage: sophia-train [--config FILE] [--section.key VALUE | --section.key=VALUE ...] [--version]",
           "",
           "Trains a GPT-NeoX with Sophia-G, AdamW or Lion. Every key below can be set in the YAML file (a",
           "`base: other.yaml` line inherits another) or on the command line; VALUE is read as YAML (null, true,",
           f"3e-4). Values shown are those of {name}.yaml with the overrides given.",
           "",
           "  --config FILE  (default: configs/neox_tiny.yaml)"]
    hints = typing.get_type_hints(TrainConfig)
    top = [f.name for f in dataclasses.fields(TrainConfig) if not dataclasses.is_dataclass(hints[f.name])]
    out += _section_lines(TrainConfig, config, "", skip={f.name for f in dataclasses.fields(TrainConfig)} - set(top))
    for f in dataclasses.fields(TrainConfig):
        section = hints[f.name]
        if not dataclasses.is_dataclass(section):
            continue
        out += ["", f"{f.name}: {field_docs(TrainConfig)[f.name]}"]
        if section in CHOICES:
            chosen = getattr(config, f.name)
            out += _section_lines(type(chosen), chosen, f"{f.name}.")
            for other in CHOICES[section].values():
                if other is type(chosen):
                    continue
                own = _shared_fields(other) - _shared_fields(section)
                out += [""] + textwrap.wrap(f"with --{f.name}.type {other.name}: {' '.join(other.__doc__.split())}",
                                            100, initial_indent="  ", subsequent_indent="    ")
                out += _section_lines(other, other(), f"{f.name}.", skip=_shared_fields(other) - own)
        else:
            out += _section_lines(section, getattr(config, f.name), f"{f.name}.")
    return "\n".join(out) + "\n"
