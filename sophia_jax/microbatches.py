"""Microbatching: a sum over a batch computed a slice at a time under `lax.scan`, to bound memory.

Used by the Gauss-Newton-Bartlett estimator and by the trainer's gradient accumulation.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import jax
import jax.numpy as jnp

__all__ = ["accumulate"]

T = TypeVar("T")


def _is_batched(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and jnp.ndim(leaf) > 0


def accumulate(fn: Callable[[jax.Array, Any], T], batch: Any, microbatches: int, *,
               constrain: Callable[[T], T] | None = None) -> T:
    """`sum_i fn(i, microbatch_i)` over `microbatches` slices of `batch`, one at a time.

    Every array leaf of `batch` with a leading axis is split along it; microbatch i takes rows
    i, i+M, i+2M, ... (M = microbatches), so each microbatch spans every data shard of a batch split
    over devices by rows. Scalars and non-array leaves reach every call unchanged.

    Args:
      fn: `fn(i, microbatch) -> pytree of arrays`, i an int32 index (e.g. to fold into a PRNG key).
      batch: a pytree of arrays (and constants).
      microbatches: M >= 1; M == 1 calls `fn(0, batch)` once, without a scan.
      constrain: applied to the running sum at each microbatch (e.g. a sharding constraint, so an
        FSDP-sharded gradient does not get a replicated accumulator).

    Returns:
      The sum of `fn`'s outputs over the microbatches.
    """
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches} must be >= 1")
    constrain = constrain or (lambda x: x)
    if microbatches == 1:
        return fn(jnp.zeros([], jnp.int32), batch)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(batch)
    if not any(_is_batched(leaf) for _, leaf in leaves):
        raise ValueError(f"microbatches={microbatches} but the batch holds no array with a batch axis to split; "
                         "pass the batch as an array argument")
    split, fixed = [], []
    for path, leaf in leaves:
        if not _is_batched(leaf):
            split.append(None)
            fixed.append(leaf)
            continue
        rows = leaf.shape[0]
        if rows % microbatches:
            raise ValueError(f"batch argument {jax.tree_util.keystr(path) or 'batch'} has {rows} rows, not divisible "
                             f"by {microbatches} microbatches; use a batch that is a multiple of the microbatch count")
        split.append(leaf.reshape(rows // microbatches, microbatches, *leaf.shape[1:]).swapaxes(0, 1))
        fixed.append(None)

    def microbatch(xs: list) -> Any:
        return treedef.unflatten([x if f is None else f for x, f in zip(xs, fixed)])

    def body(total: T, xs: tuple[jax.Array, list]) -> tuple[T, None]:
        i, parts = xs
        return constrain(jax.tree.map(jnp.add, total, fn(i, microbatch(parts)))), None

    first = microbatch([None if x is None else x[0] for x in split])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, jnp.zeros([], jnp.int32), first))
    total, _ = jax.lax.scan(body, constrain(zeros), (jnp.arange(microbatches, dtype=jnp.int32), split))
    return total
