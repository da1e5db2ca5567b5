"""Fitting a run to device memory: `trainer.microbatches: auto` and `optimizer.hessian_microbatches: auto`.

A step's memory is read from XLA's analysis of the step compiled ahead of time (`Trainer.lower`), nothing
allocated. It grows with the rows of a microbatch (activations) on top of a fixed part (params, optimizer
state, gradients): not always linearly (XLA changes its choices with the shapes), but never down. So
`auto` searches the candidate sizes (those that split the batch evenly over the data-parallel devices)
for the largest that fits, keeping a bracket of a size that fits and one that does not: it compiles the
smallest (which must fit) and the largest (the whole batch: one microbatch), then probes where the line
through the bracket's two measurements crosses the budget, bisecting instead whenever such a guess did
not halve the bracket. Memory that is linear in the rows takes 3 to 5 compiles; any non-decreasing
curve over n candidates at most 2 + 2 ceil(log2(n - 1)) (8 for the 7 candidates of a batch of 512 on 8
data devices).
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import Mesh

from trainer.config import TrainConfig
from trainer.optim import SophiaGConfig

__all__ = ["FILL", "DoesNotFit", "bound_bytes", "device_memory", "fit_microbatches", "peak_bytes"]

logger = logging.getLogger(__name__)

FILL = 0.9  # a step may use this fraction of a device's memory (the rest: fragmentation, the runtime)


class DoesNotFit(ValueError):
    """Not even a step's smallest microbatch fits the device memory."""


def bound_bytes(analysis: Any) -> int:
    """An upper bound on a compiled program's live bytes per device from `compiled.memory_analysis()`:
    arguments + temporaries + outputs not aliased to donated inputs."""
    return int(analysis.argument_size_in_bytes + analysis.temp_size_in_bytes + analysis.output_size_in_bytes
               - analysis.alias_size_in_bytes)


def peak_bytes(analysis: Any, platform: str) -> int:
    """A compiled program's peak memory per device from `compiled.memory_analysis()`: XLA's peak on TPU and
    GPU (below `bound_bytes` there, buffers being reused); on CPU, whose "peak" counts little more than the
    arguments, `bound_bytes`."""
    peak = int(getattr(analysis, "peak_memory_in_bytes", 0) or 0)
    return bound_bytes(analysis) if platform == "cpu" or not peak else peak


def device_memory(mesh: Mesh) -> int | None:
    """Bytes one device of `mesh` can allocate (its allocator's limit), or None where unknown (CPU)."""
    stats = mesh.devices.flat[0].memory_stats() if hasattr(mesh.devices.flat[0], "memory_stats") else None
    return None if not stats or "bytes_limit" not in stats else int(stats["bytes_limit"])


def _largest_fitting(sizes: list[int], measure: Callable[[int], float], limit: float, what: str) -> int:
    """The largest of `sizes` (ascending) whose measured bytes fit `limit`, for bytes that do not decrease
    with the size (see the module docstring for the search and its number of `measure` calls)."""
    need: dict[int, float] = {}

    def fits(i: int) -> bool:
        if i not in need:
            need[i] = measure(sizes[i])
        return need[i] <= limit

    if not fits(0):
        first = need[0]
        amount = "more than the device has" if math.isinf(first) else f"{first / 2**30:.2f} GiB per device"
        raise DoesNotFit(f"{what}: even microbatches of {sizes[0]} sequences need {amount}, over the "
                         f"{limit / 2**30:.2f} GiB available; use more devices (FSDP), model.remat full, "
                         "a model.loss_chunk, or a shorter sequence")
    lo, hi = 0, len(sizes) - 1  # sizes[lo] fits; sizes[hi] does not (once measured)
    if fits(hi):
        return sizes[hi]
    interpolate = True
    while hi - lo > 1:
        width, probe = hi - lo, (lo + hi) // 2
        if interpolate and math.isfinite(need[hi]) and need[hi] > need[lo]:
            per_row = (need[hi] - need[lo]) / (sizes[hi] - sizes[lo])
            crossing = sizes[lo] + (limit - need[lo]) / per_row  # where the line reaches the limit
            probe = min(max(bisect.bisect_right(sizes, crossing) - 1, lo + 1), hi - 1)
        if fits(probe):
            lo = probe
        else:
            hi = probe
        interpolate = not interpolate or 2 * (hi - lo) <= width  # a guess that did not halve: bisect next
    return sizes[lo]


def fit_microbatches(config: TrainConfig, mesh: Mesh, limit_bytes: float | None = None,
                     log: Callable[[str], None] = logger.info) -> TrainConfig:
    """`config` with `auto` microbatch counts replaced by the fewest whose compiled step fits `FILL` of
    `limit_bytes` per device (default: the device's memory). Where the memory is unknown (CPU) `auto` is 1.
    Raises DoesNotFit (a ValueError) when not even the smallest microbatch fits."""
    from trainer import sharding
    from trainer.data.loader import batch_shards
    from trainer.steps import Trainer, hessian_rows

    tc, opt = config.trainer, config.optimizer
    sophia = isinstance(opt, SophiaGConfig)
    if tc.microbatches != "auto" and not (sophia and opt.hessian_microbatches == "auto"):
        return config
    limit = device_memory(mesh) if limit_bytes is None else limit_bytes
    dp = batch_shards(sharding.batch_sharding(mesh))

    def with_counts(train: int, hessian: int) -> TrainConfig:
        out = dataclasses.replace(config, trainer=dataclasses.replace(config.trainer, microbatches=train))
        if sophia:
            out = dataclasses.replace(out, optimizer=dataclasses.replace(out.optimizer, hessian_microbatches=hessian))
        return out

    def sizes(rows: int, what: str) -> list[int]:
        """The microbatch sizes that split `rows` evenly over the data devices."""
        found = [r for r in range(dp, rows + 1, dp) if rows % r == 0]
        if not found:
            raise ValueError(f"microbatches 'auto': no microbatch count splits {what} over the {dp} data-parallel "
                             f"devices (mesh data*fsdp); use a batch that is a multiple of {dp}")
        return found

    train = tc.microbatches if tc.microbatches != "auto" else None
    hessian = opt.hessian_microbatches if sophia and opt.hessian_microbatches != "auto" else None
    if limit is None:
        log("microbatches 'auto': the device memory is unknown here (CPU): using 1")
        return with_counts(train or 1, hessian or 1)
    budget = FILL * limit

    def measure(which: str, rows: int) -> float:
        """The step's bytes per device at `rows` per microbatch; infinite when the compiler refuses it for
        the memory (as XLA for TPU does)."""
        if which == "train":  # (the Hessian count does not change the train step)
            candidate = with_counts(tc.global_batch // rows, hessian or 1)
        else:
            candidate = with_counts(train or 1, hessian_rows(config, dp) // rows)
        try:
            compiled = Trainer(candidate, mesh).lower(which).compile()
        except jax.errors.JaxRuntimeError as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            log(f"microbatches 'auto': the {which} step with microbatches of {rows} sequences does not compile: "
                f"{str(error).splitlines()[0]}")
            return math.inf
        need = peak_bytes(compiled.memory_analysis(), mesh.devices.flat[0].platform)
        log(f"microbatches 'auto': the {which} step with microbatches of {rows} sequences needs "
            f"{need / 2**30:.2f} GiB per device (budget {budget / 2**30:.2f} GiB)")
        return need

    if train is None:
        rows = _largest_fitting(sizes(tc.global_batch, f"trainer.global_batch={tc.global_batch}"),
                                lambda r: measure("train", r), budget, "the train step")
        train = tc.global_batch // rows
    if sophia and hessian is None:
        total = hessian_rows(config, dp)
        rows = _largest_fitting(sizes(total, f"the Hessian batch of {total}"), lambda r: measure("hessian", r),
                                budget, "the Hessian step")
        hessian = total // rows
    log(f"microbatches 'auto': trainer.microbatches={train}" + (f", optimizer.hessian_microbatches={hessian}"
                                                                if sophia else ""))
    return with_counts(train, hessian or 1)
