"""`sophia-aot`: does a run fit a TPU? Its steps compiled ahead of time for a TPU topology, on this CPU.

    sophia-aot --config configs/neox_6_6b.yaml --topology v3:8x8 [--compare adamw] [--dotted.key VALUE ...]

Compiles the trainer's real `train_step` and (Sophia-G with hessian_mode 'separate') `hessian_step`
with the run's shardings for the compile-only devices of `--topology` (`Trainer(config, mesh).lower(which)
.compile()`), and prints per-core memory from XLA's analysis against the HBM a core has (15.48 GiB on a
TPU v3, `--hbm_gib`). Needs libtpu (`pip install -e ".[tpu]"`), not a TPU. Nothing is allocated.

Exit status: 0 when every step fits; 1 when one does not (the compiler's RESOURCE_EXHAUSTED line, or a
peak over --hbm_gib, on stderr); 2 on bad arguments (one line `sophia-aot: ...`).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import resource
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:  # jax and the trainer load only after the arguments are checked (bad ones exit in ~0.1 s)
    from jax.sharding import Mesh

    from trainer.config import TrainConfig
    from trainer.steps import Trainer

__all__ = ["NEOX_VOCAB", "SLICE_TOPOLOGY", "V3_HBM_GIB", "FitReport", "StepFit", "check_fit", "check_topology",
           "compile_step", "format_report", "main", "topology_mesh"]

GIB = 2**30
V3_HBM_GIB = 15.48  # per core, as the TPU v3 compiler reports it (16 GiB nominal)
NEOX_VOCAB = 50277  # the GPT-NeoX tokenizer's ids: the vocab of a config that leaves model.vocab_size null
# Cloud TPU v3 slice (accelerator type) -> the topology name libtpu compiles for (chips, 2 cores each).
SLICE_TOPOLOGY = {"v3-8": "v3:2x2", "v3-32": "v3:4x4", "v3-64": "v3:4x8", "v3-128": "v3:8x8",
                  "v3-256": "v3:8x16", "v3-512": "v3:16x16"}
_TOPOLOGY_NAME = re.compile(r"^v\d+[a-z]*:\d+(x\d+){1,2}$")


@dataclasses.dataclass(frozen=True)
class StepFit:
    """One compiled step's per-core memory, or the compiler's reason it does not fit."""

    step: str  # "train" | "hessian"
    seconds: float  # lowering + compilation
    argument_gib: float | None = None  # inputs (the state and the batch) per core
    temp_gib: float | None = None  # temporaries (activations, gradients, collectives) per core
    peak_gib: float | None = None  # XLA's peak per core
    error: str | None = None  # the compiler's RESOURCE_EXHAUSTED line


@dataclasses.dataclass(frozen=True)
class FitReport:
    """Everything `sophia-aot` prints about one config on one topology."""

    name: str  # the config file's stem
    optimizer: str  # e.g. "sophia_g (separate Hessian step)"
    params: int
    topology: str
    cores: int
    mesh: dict[str, int]  # ("data", "fsdp", "model") sizes
    microbatches: dict[str, str]  # step -> "M x N sequences"
    remat: bool
    hbm_gib: float
    steps: list[StepFit]

    def failures(self) -> list[str]:
        """One line per step that does not fit; empty when all do."""
        lines = []
        for s in self.steps:
            if s.error is not None:
                lines.append(f"the {s.step} step of {self.name} does not fit {self.topology}: {s.error}")
            elif s.peak_gib > self.hbm_gib:
                lines.append(f"the {s.step} step of {self.name} peaks at {s.peak_gib:.2f} GiB per core, over "
                             f"{self.hbm_gib} GiB (--hbm_gib)")
        return lines


def check_topology(name: str) -> str:
    """`name` if it is a topology name like v3:8x8; ValueError naming the right one for a slice name."""
    if name in SLICE_TOPOLOGY:
        raise ValueError(f"--topology {name} is a slice name; its topology is {SLICE_TOPOLOGY[name]}")
    if not _TOPOLOGY_NAME.match(name):
        known = ", ".join(f"{t} ({s})" for s, t in SLICE_TOPOLOGY.items())
        raise ValueError(f"--topology {name!r} is not a topology name; use one like {known}")
    return name


def topology_mesh(config: TrainConfig, topology: str) -> Mesh:
    """The trainer's ("data", "fsdp", "model") mesh over the compile-only devices of `topology`."""
    from jax.experimental import topologies

    from trainer.sharding import make_mesh

    return make_mesh(config.mesh, topologies.get_topology_desc(topology, "tpu").devices)


def compile_step(trainer: Trainer, step: str) -> StepFit:
    """Lowers and compiles `step` ("train" or "hessian") for the trainer's mesh; never runs it."""
    import jax

    from trainer.fit import peak_bytes

    start = time.perf_counter()
    try:
        compiled = trainer.lower(step).compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        line = next(x for x in str(error).splitlines() if "RESOURCE_EXHAUSTED" in x)
        return StepFit(step, time.perf_counter() - start, error=line.strip())
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    return StepFit(step, seconds, m.argument_size_in_bytes / GIB, m.temp_size_in_bytes / GIB,
                   peak_bytes(m, "tpu") / GIB)


def check_fit(argv: Sequence[str], topology: str, *, hbm_gib: float = V3_HBM_GIB,
              steps: Sequence[str] = ("train", "hessian"), vocab_size: int = NEOX_VOCAB) -> FitReport:
    """Compiles the steps of the run `argv` describes (`--config FILE --dotted.key VALUE ...`) for `topology`.

    Args:
      argv: a sophia-train command line (config file and dotted overrides).
      topology: a TPU topology name, e.g. "v3:8x8" (a v3-128).
      hbm_gib: memory per core a step must fit in.
      steps: which of "train" and "hessian" to compile (the Hessian step exists for Sophia-G in mode
        'separate' only).
      vocab_size: model.vocab_size when the config leaves it null (it is read from the data otherwise).

    Returns:
      The report; `report.failures()` lists the steps that do not fit.

    Raises:
      ValueError, FileNotFoundError: a bad config, override, topology or mesh (with the problem named).
    """
    from trainer.config import load_config
    from trainer.fit import fit_microbatches
    from trainer.models import num_params
    from trainer.sharding import MESH_AXES
    from trainer.steps import Trainer

    config, name = load_config(argv)
    if config.model.vocab_size is None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab_size))
    mesh = topology_mesh(config, check_topology(topology))
    config = fit_microbatches(config, mesh, limit_bytes=hbm_gib * GIB, log=lambda line: print(line, file=sys.stderr))
    trainer = Trainer(config, mesh)
    opt, tc = config.optimizer, config.trainer
    separate = trainer.sophia and not trainer.cond_mode
    label = opt.type + (f" ({opt.hessian_mode} Hessian step)" if trainer.sophia else "")
    micro = {"train": f"{tc.microbatches} x {tc.global_batch // tc.microbatches} sequences"}
    if trainer.sophia:
        hm = opt.hessian_microbatches
        micro["hessian"] = f"{hm} x {trainer.hessian_batch // hm} sequences"
    wanted = [s for s in steps if s == "train" or (s == "hessian" and separate)]
    return FitReport(name, label, num_params(config.model), topology, mesh.size,
                     {a: mesh.shape[a] for a in MESH_AXES}, micro, config.model.remat, hbm_gib,
                     [compile_step(trainer, s) for s in wanted])


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_report(r: FitReport) -> str:
    """The report as the lines `sophia-aot` prints."""
    mesh = " x ".join(f"{axis} {size}" for axis, size in r.mesh.items())
    lines = [
        f"{r.name}: {r.optimizer} on {r.topology} ({r.cores} cores)",
        f"  params        {r.params / 1e9:.2f}B",
        f"  mesh          {mesh}",
        "  microbatches  " + ", ".join(f"{step} {m}" for step, m in r.microbatches.items()),
        f"  remat         {str(r.remat).lower()}",
        f"  {'step':<8} {'compile s':>10} {'argument GiB':>13} {'temp GiB':>10} {'peak GiB':>10} "
        f"{'of ' + str(r.hbm_gib) + ' GiB':>14}  fits",
    ]
    for s in r.steps:
        share = "-" if s.peak_gib is None else f"{s.peak_gib / r.hbm_gib:.0%}"
        fits = "no" if s.error is not None or s.peak_gib > r.hbm_gib else "yes"
        lines.append(f"  {s.step:<8} {s.seconds:>10.1f} {_gib(s.argument_gib):>13} {_gib(s.temp_gib):>10} "
                     f"{_gib(s.peak_gib):>10} {share:>14}  {fits}")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sophia-aot: {message} (see sophia-aot --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="sophia-aot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                     allow_abbrev=False)
    parser.add_argument("--config", required=True, help="the run's YAML file (as for sophia-train)")
    parser.add_argument("--topology", required=True,
                        help="TPU topology: v3:2x2 (v3-8), v3:4x4 (v3-32), v3:8x8 (v3-128), v3:16x16 (v3-512), ...")
    parser.add_argument("--hbm_gib", type=float, default=V3_HBM_GIB, help="memory per core (default: a v3 core's)")
    parser.add_argument("--step", choices=("train", "hessian", "all"), default="all", help="which steps to compile")
    parser.add_argument("--compare", choices=("adamw", "lion"),
                        help="also compile the same run with this optimizer (printed, not part of the exit status)")
    parser.add_argument("--vocab_size", type=int, default=NEOX_VOCAB,
                        help="model.vocab_size when the config leaves it null (default: the NeoX tokenizer's)")
    args, extra = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    run = ["--config", args.config, *extra]
    try:
        check_topology(args.topology)
        from trainer.config import load_config

        load_config(run)  # unknown keys and bad values, before libtpu loads
        if importlib.util.find_spec("libtpu") is None:
            raise ValueError('libtpu is not installed; pip install -e ".[tpu]" (no TPU needed)')
    except (ValueError, FileNotFoundError) as error:
        parser.exit(2, f"sophia-aot: {error}\n")

    # libtpu reads these when the topology first loads it: other processes may hold it (a test, another
    # sophia-aot), and this machine is no TPU host. A caller's own values win.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    slices = {t: s for s, t in SLICE_TOPOLOGY.items()}
    if args.topology in slices:  # else libtpu warns that it cannot tell the accelerator type
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", slices[args.topology])
    import jax
    from jax.experimental import topologies

    from trainer.fit import DoesNotFit

    try:
        topologies.get_topology_desc(args.topology, "tpu")
    except jax.errors.JaxRuntimeError as error:  # e.g. "v3:3x3" is not a multiple of a host's 2x2 chips
        parser.exit(2, f"sophia-aot: --topology {args.topology}: {str(error).splitlines()[0]}\n")
    steps = ("train", "hessian") if args.step == "all" else (args.step,)
    runs = [run] + ([[*run, "--optimizer.type", args.compare]] if args.compare else [])  # its own defaults
    reports = []
    for i, command_line in enumerate(runs):
        try:
            report = check_fit(command_line, args.topology, hbm_gib=args.hbm_gib, steps=steps,
                               vocab_size=args.vocab_size)
        except DoesNotFit as error:  # microbatches 'auto' found no count that fits
            print(f"sophia-aot: {error}", file=sys.stderr)
            return 1
        except (ValueError, FileNotFoundError) as error:  # e.g. a mesh that does not divide the cores
            parser.exit(2, f"sophia-aot: {error}\n")
        print(("\n" if i else "") + format_report(report), flush=True)
        reports.append(report)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"\nmax RSS of this process: {rss:.1f} GiB")
    failures = reports[0].failures()
    for line in failures:
        print(f"sophia-aot: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
