"""Whether the paper's GPT-NeoX steps fit a TPU v3 core: per-core memory of the trainer's compiled steps.

Compiles the real `train_step` and (Sophia-G) `hessian_step` ahead of time for a TPU topology, with the
trainer's shardings, and reports XLA's memory analysis per core against the HBM the compiler sees (15.48
GiB on a v3 core). Each config is compiled with Sophia-G as written and with `--optimizer.type adamw`.
A step that does not fit fails to compile with RESOURCE_EXHAUSTED and is reported as "no".
Exits 1 if a Sophia-G step does not fit.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 TPU_WORKER_HOSTNAMES=localhost python benchmarks/tpu_fit.py \
        [--topology v3:8x8] [--configs neox_1_5b neox_6_6b] [--override trainer.microbatches=8 ...]

Needs libtpu (`pip install "jax[tpu]"`) but no TPU: the compile runs on this machine's CPU. The configs
have no data, so model.vocab_size is set to 50277 (the NeoX tokenizer's; padded to 50432).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import jax
from jax.experimental import topologies
from jax.sharding import Mesh

from trainer.config import TrainConfig, load_config
from trainer.model import num_params
from trainer.sharding import MESH_AXES, make_mesh
from trainer.steps import Trainer

GIB = 2**30
V3_HBM_GIB = 15.48  # per core, as the TPU v3 compiler reports it (16 GiB nominal)
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
NEOX_VOCAB = 50277
# The comparison run: AdamW with its default betas (memory does not depend on them).
ADAMW = ["--optimizer.type", "adamw"]


@dataclasses.dataclass
class Fit:
    """One compiled step's per-core memory, or why it did not compile."""

    step: str  # "train" | "hessian"
    seconds: float  # lowering + compilation
    argument_gib: float | None = None
    temp_gib: float | None = None
    peak_gib: float | None = None
    error: str | None = None  # first line of RESOURCE_EXHAUSTED


def topology_mesh(config: TrainConfig, topology: str) -> Mesh:
    """The trainer's ("data", "fsdp", "model") mesh over the compile-only devices of `topology`."""
    return make_mesh(config.mesh, topologies.get_topology_desc(topology, "tpu").devices)


def compile_step(trainer: Trainer, step: str) -> Fit:
    """Lowers and compiles `step` ("train" or "hessian") for the trainer's mesh; never runs it."""
    start = time.perf_counter()
    try:
        compiled = trainer.lower(step).compile()
    except jax.errors.JaxRuntimeError as error:
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        return Fit(step, time.perf_counter() - start, error=str(error).strip().splitlines()[0])
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    peak = getattr(m, "peak_memory_in_bytes", 0) or (
        m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
    return Fit(step, seconds, m.argument_size_in_bytes / GIB, m.temp_size_in_bytes / GIB, peak / GIB)


def measure(argv: list[str], topology: str) -> tuple[TrainConfig, str, Mesh, list[Fit]]:
    """The config of a command line, its mesh on `topology`, and the fits of its steps."""
    config, name = load_config(argv)
    mesh = topology_mesh(config, topology)
    trainer = Trainer(config, mesh)
    steps = ["train", "hessian"] if trainer.sophia and not trainer.cond_mode else ["train"]
    return config, name, mesh, [compile_step(trainer, s) for s in steps]


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--topology", default="v3:8x8", help="TPU topology name, e.g. v3:2x2, v3:8x8 (v3-128)")
    parser.add_argument("--configs", nargs="+", default=["neox_1_5b", "neox_6_6b"],
                        help="config names under configs/ or YAML paths")
    parser.add_argument("--override", nargs="+", default=[], metavar="DOTTED=VALUE",
                        help="config overrides applied to every run, e.g. trainer.microbatches=8 mesh.model=4")
    parser.add_argument("--hbm_gib", type=float, default=V3_HBM_GIB, help="HBM per core the steps must fit in")
    args = parser.parse_args(argv)

    overrides = ["--model.vocab_size", str(NEOX_VOCAB)]
    for item in args.override:
        key, eq, value = item.partition("=")
        if not eq:
            parser.error(f"--override {item!r}: write dotted.key=value")
        overrides += [f"--{key}", value]

    print(f"| config | optimizer | params | topology | cores | mesh data x fsdp x model | microbatches | remat "
          f"| step | compile s | argument GiB/core | temp GiB/core | peak GiB/core | of {args.hbm_gib} GiB | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    sophia_fits = True
    for entry in args.configs:
        path = Path(entry) if entry.endswith((".yaml", ".yml")) else CONFIGS / f"{entry}.yaml"
        for extra in ([], ADAMW):
            config, name, mesh, fits = measure(["--config", str(path), *overrides, *extra], args.topology)
            c = config
            shape = " x ".join(str(mesh.shape[a]) for a in MESH_AXES)
            for fit in fits:
                fits_hbm = fit.error is None and fit.peak_gib <= args.hbm_gib
                if c.optimizer.type == "sophia_g" and not fits_hbm:
                    sophia_fits = False
                verdict = "yes" if fits_hbm else f"no: {fit.error}" if fit.error else "no"
                fraction = "-" if fit.peak_gib is None else f"{fit.peak_gib / args.hbm_gib:.0%}"
                opt = c.optimizer.type + (" (cond)" if c.optimizer.type == "sophia_g"
                                          and c.optimizer.hessian_mode == "cond" else "")
                print(f"| {name} | {opt} | {num_params(c.model) / 1e9:.2f}B | {args.topology} "
                      f"| {mesh.size} | {shape} | {c.trainer.microbatches} | {c.model.remat} | {fit.step} "
                      f"| {fit.seconds:.0f} | {_gib(fit.argument_gib)} | {_gib(fit.temp_gib)} "
                      f"| {_gib(fit.peak_gib)} | {fraction} | {verdict} |", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(f"\nmax RSS of this process: {rss:.1f} GiB; overrides: {' '.join(args.override) or 'none'}")
    return 0 if sophia_fits else 1


if __name__ == "__main__":
    sys.exit(main())
