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
import re
from collections.abc import Mapping
from typing import Any

import haliax as hax
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "AXIS_RULES",
    "MESH_AXES",
    "MeshConfig",
    "batch_sharding",
    "compute_mapping",
    "distributed_args",
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
    SOPHIA_DISTRIBUTED=1. On TPU pods and SLURM JAX finds the coordinator, process count and id itself
    (any of the three below that is set is passed on)."""
    coordinator_address: str | None = None
    """HOST:PORT where process 0 serves JAX's coordination service, for several processes off a TPU pod
    (set it, num_processes and process_id on every process); also JAX_COORDINATOR_ADDRESS."""
    num_processes: int | None = None
    """How many processes take part (with coordinator_address); also JAX_NUM_PROCESSES."""
    process_id: int | None = None
    """This process's index in [0, num_processes) (with coordinator_address); also JAX_PROCESS_ID."""
    heartbeat_timeout_seconds: int = 100
    """JAX's coordination service declares a process dead after this long without its heartbeat and stops
    the others (a lost host must not leave its peers waiting in a collective forever); also how long a
    process that ends waits for the others at shutdown."""

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


_ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
        "process_id": "JAX_PROCESS_ID"}


def distributed_args(config: MeshConfig, environ: Mapping[str, str] = os.environ) -> dict[str, Any] | None:
    """The arguments of `jax.distributed.initialize` for this process, or None for a single-process run.

    Each of coordinator_address, num_processes and process_id comes from `--mesh.<name>`, else from its
    JAX_* variable. `distributed` (or SOPHIA_DISTRIBUTED=1) initializes with whichever are set, JAX
    detecting the rest (TPU VMs, SLURM); otherwise any of them set asks for all three. Raises ValueError,
    naming the fix, on partial or out-of-range settings.
    """
    values: dict[str, Any] = {}
    for name, var in _ENV.items():
        value, source = getattr(config, name), f"--mesh.{name}"
        if value is None and environ.get(var, "").strip():
            value, source = environ[var].strip(), var
            if name != "coordinator_address":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"{var}={environ[var]!r} is not an integer; set it to a number or unset "
                                     "it") from None
        if value is not None:
            values[name] = (value, source)
    auto = config.distributed or environ.get("SOPHIA_DISTRIBUTED") == "1"
    if not values and not auto:
        return None
    if not auto and len(values) < 3:
        missing = ", ".join(f"--mesh.{n} (or {_ENV[n]})" for n in _ENV if n not in values)
        given = ", ".join(source for _, source in values.values())
        raise ValueError(f"{given} set but not {missing}: a multi-process run needs all three on every process "
                         "(or --mesh.distributed true where JAX finds them itself: TPU VMs, SLURM)")
    address = values.get("coordinator_address")
    if address is not None and not re.fullmatch(r"\S+:\d{1,5}", address[0]):
        raise ValueError(f"{address[1]}={address[0]!r}: use HOST:PORT, the address of process 0 (e.g. 10.0.0.2:8476)")
    count, pid = values.get("num_processes"), values.get("process_id")
    if count is not None and count[0] < 1:
        raise ValueError(f"{count[1]}={count[0]}: use the number of processes, >= 1")
    if pid is not None and (pid[0] < 0 or (count is not None and pid[0] >= count[0])):
        bound = f"[0, {count[0]})" if count is not None else "0 or more"
        raise ValueError(f"{pid[1]}={pid[0]} is out of range: give each process an id in {bound}")
    return {name: value for name, (value, _) in values.items()}


def maybe_initialize_distributed(config: MeshConfig) -> None:
    """`jax.distributed.initialize(**distributed_args(config))` when they ask for several processes (before
    any other JAX use; a second call in the same process does nothing)."""
    args = distributed_args(config)
    if args is not None and not jax.distributed.is_initialized():
        jax.distributed.initialize(**args, heartbeat_timeout_seconds=config.heartbeat_timeout_seconds,
                                   shutdown_timeout_seconds=config.heartbeat_timeout_seconds)


def make_mesh(config: MeshConfig, devices: list | None = None) -> Mesh:
    """A ("data", "fsdp", "model") mesh over `devices` (default: all), sizes checked against the count."""
    devices = jax.devices() if devices is None else list(devices)
    # jax.make_mesh orders the devices by the physical topology (hosts hold contiguous blocks).
    return jax.make_mesh(config.sizes(len(devices)), MESH_AXES, (AxisType.Auto,) * 3, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Layout of token batches [batch, seq_len+1]: rows split over the compute mapping of `batch`."""
    return NamedSharding(mesh, P(AXIS_RULES["batch"][1], None))


def state_shardings(abstract_state, mesh: Mesh):
    """NamedShardings for a (possibly abstract) train state: NamedArrays by the parameter mapping,
    everything else (counters, keys, scalars) replicated."""
    replicated = NamedSharding(mesh, P())
    shardings = hax.partitioning.infer_resource_partitions(
        abstract_state, param_mapping(), preserve_existing_shardings=False, mesh=mesh)
    return jax.tree.map(lambda s: replicated if s is None else s, shardings, is_leaf=lambda x: x is None)
