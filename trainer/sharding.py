"""The device mesh and the ONE table from logical (named) axes to mesh axes.

Mesh axes:
  data   pure data parallelism: params replicated, batch split;
  fsdp   data parallelism with params, m and h split along `embed` (ZeRO-3 style; XLA all-gathers
         a layer's weights when it is used);
  model  tensor parallelism: heads, mlp and vocab split.

A parameter's layout is fixed for the whole run (the parameter mapping); activations are laid out by
the compute mapping inside the step. The optimizer state has the parameter layout (m and h are shaped
like the params), so FSDP shards params + m + h alike.
"""

from __future__ import annotations

import dataclasses
import math
import os

import haliax as hax
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "AXIS_RULES",
    "MESH_AXES",
    "MeshConfig",
    "batch_sharding",
    "compute_mapping",
    "make_mesh",
    "maybe_initialize_distributed",
    "param_mapping",
    "state_shardings",
]

MESH_AXES = ("data", "fsdp", "model")

# logical axis -> (mesh axes of parameters, mesh axes of activations/compute). None = replicated.
AXIS_RULES: dict[str, tuple[str | tuple[str, ...] | None, str | tuple[str, ...] | None]] = {
    "batch": (None, ("data", "fsdp")),
    "embed": ("fsdp", None),
    "heads": ("model", "model"),
    "mlp": ("model", "model"),
    "vocab": ("model", "model"),
}


def param_mapping() -> dict[str, str | tuple[str, ...]]:
    """haliax axis mapping for params and optimizer state (FSDP over `fsdp`, TP over `model`)."""
    return {axis: rule[0] for axis, rule in AXIS_RULES.items() if rule[0] is not None}


def compute_mapping() -> dict[str, str | tuple[str, ...]]:
    """haliax axis mapping for activations inside the step (batch over `data` x `fsdp`)."""
    return {axis: rule[1] for axis, rule in AXIS_RULES.items() if rule[1] is not None}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh shape (`--mesh.*`); data * fsdp * model must equal the device count, -1 = the rest."""

    data: int = 1
    """Data-parallel replicas (params replicated across them)."""
    fsdp: int = -1
    """Fully-sharded data parallelism: batch and params (and m, h) split; -1 = all remaining devices."""
    model: int = 1
    """Tensor parallelism over heads / mlp / vocab."""
    distributed: bool = False
    """Call jax.distributed.initialize() before anything else (multi-host); also set by
    SOPHIA_DISTRIBUTED=1. On TPU pods and SLURM the coordinator is found automatically."""

    def sizes(self, num_devices: int) -> tuple[int, int, int]:
        """(data, fsdp, model) with -1 resolved; raises when they do not multiply to num_devices."""
        sizes = [self.data, self.fsdp, self.model]
        if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
            raise ValueError(f"mesh (data, fsdp, model) = {tuple(sizes)}: use positive sizes and at most one -1")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"mesh data*fsdp*model = {known} (without the -1) does not divide {num_devices} "
                                 f"devices; choose sizes whose product divides {num_devices}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh data*fsdp*model = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but there are "
                             f"{num_devices} devices; make the product {num_devices} (or set one size to -1)")
        return tuple(sizes)


def maybe_initialize_distributed(config: MeshConfig) -> None:
    """jax.distributed.initialize() when the config or SOPHIA_DISTRIBUTED=1 asks for it (before any JAX use)."""
    if config.distributed or os.environ.get("SOPHIA_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """A ("data", "fsdp", "model") mesh over `devices` (default: all), sizes checked against the count."""
    devices = jax.devices() if devices is None else list(devices)
    # jax.make_mesh orders the devices by the physical topology (hosts hold contiguous blocks).
    return jax.make_mesh(config.sizes(len(devices)), MESH_AXES, (AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Layout of token batches [batch, seq_len+1]: rows split over the compute mapping of `batch`."""
    return NamedSharding(mesh, P(AXIS_RULES["batch"][1], None))


def data_parallel_size(mesh: Mesh) -> int:
    """How many row blocks a batch is split into (global batches must be a multiple of it)."""
    axes = AXIS_RULES["batch"][1]
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for a (possibly abstract) train state: NamedArrays by the parameter mapping,
    everything else (counters, keys, scalars) replicated."""
    replicated = NamedSharding(mesh, P())
    shardings = hax.partitioning.infer_resource_partitions(
        abstract_state, param_mapping(), preserve_existing_shardings=False, mesh=mesh)
    return jax.tree.map(lambda s: replicated if s is None else s, shardings, is_leaf=lambda x: x is None)
