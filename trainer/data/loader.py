"""Read side of the data pipeline: token caches -> deterministic, resumable, host-sharded global batches.

A cache (format: trainer/data/format.py; written by `sophia-data tokenize`) is one concatenated token stream
per split. Sequence i is tokens [i*seq_len, i*seq_len + seq_len + 1): inputs plus the shifted targets. Batch
`step` holds the sequences at positions [b*step, b*(step+1)) of a seeded permutation, computed per index
by a Feistel network (nothing of size "number of sequences" is ever materialised), so the order depends
only on (seed, epoch) - never on the number of hosts - and the loader's whole position is (step, seed).

Each host reads only the rows its addressable devices hold and builds the global `jax.Array` with
`jax.make_array_from_process_local_data`; a background thread prepares `prefetch` batches ahead.
`TokenDataset.reads` counts what a process read (sequences and an order-free digest of their indices), so
a run can show that its processes together read exactly what one process would, each its own part.
Local caches are memory-mapped; remote ones (gs://, any fsspec URL) are read with concurrent range reads.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from typing import Any

import fsspec
import jax
import numpy as np

from trainer.data.format import INDEX_NAME, SPLITS, read_index
from trainer.data.sources import is_local

__all__ = ["BatchLoader", "EvalBatches", "FeistelPermutation", "ReadCount", "TokenDataset", "batch_shards",
           "host_row_range"]

_MASK64 = (1 << 64) - 1


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each uint64."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class ReadCount:
    """What one process read from a dataset: `sequences` (rows, repeats counted) and `digest`, the sum mod
    2**64 of a 64-bit hash of each row's sequence index. Sums are order-free and add up: the reads of
    several processes together equal one process's reads exactly when their counts and digests add up to
    its (up to a 2**-64 chance)."""

    def __init__(self) -> None:
        self.sequences, self.digest = 0, 0
        self._lock = threading.Lock()  # the prefetch thread and the main thread may read at once

    def add(self, indices: np.ndarray, sign: int = 1) -> None:
        """Counts the rows `indices` (sign -1: takes back rows counted before, e.g. read ahead but unused)."""
        hashed = _mix64(np.asarray(indices, dtype=np.uint64) + np.uint64(1))
        total = int(np.sum(hashed, dtype=np.uint64))  # wraps mod 2**64, as the digest does
        with self._lock:
            self.sequences += sign * int(indices.size)
            self.digest = (self.digest + sign * total) & _MASK64

    def __repr__(self) -> str:
        return f"{self.sequences} sequences (digest {self.digest:016x})"


class TokenDataset:
    """Random access to one split of a token cache, without loading it.

    Attributes:
      vocab_size: tokenizer vocabulary size including added tokens (the model pads it up).
      eos_id: the token appended after every document.
      num_tokens: length of the split's concatenated token stream.
      tokenizer_path: the cache's tokenizer.json (a local path, or a URL for remote caches).
    """

    def __init__(self, cache: str, split: str):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; use one of {SPLITS}")
        self.index = read_index(cache)
        self._fs, self._root = fsspec.core.url_to_fs(cache)
        self._local = is_local(self._fs)
        info = self.index["splits"][split]
        if not info["num_tokens"] and split == "validation":
            raise ValueError(f"{cache!r} has no validation split to evaluate on: train without evaluation "
                             "(--trainer.eval_every 0), or rebuild the cache with a held-out part (sophia-data "
                             "tokenize ... --val_fraction F, or --val INPUT...)")
        if not info["num_tokens"]:
            raise ValueError(f"{cache!r} has no {split} tokens; rebuild it (sophia-data tokenize) from inputs that "
                             "hold text")
        self.cache, self.split = cache, split
        self.vocab_size: int = int(self.index["vocab_size"])
        self.eos_id: int = int(self.index["eos_id"])
        self.num_tokens: int = int(info["num_tokens"])
        root = self._root.rstrip("/")
        self.tokenizer_path: str = f"{root}/{self.index['tokenizer']}" if self._local else \
            self._fs.unstrip_protocol(f"{root}/{self.index['tokenizer']}")
        self.dtype = np.dtype(self.index["dtype"])
        self._paths = [f"{root}/{s['path']}" for s in info["shards"]]
        sizes = np.array([s["num_tokens"] for s in info["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])  # shard k holds stream [starts[k], starts[k+1])
        self._maps: list[np.memmap | None] = [None] * len(self._paths)
        self.reads = ReadCount()  # what this process has read (see ReadCount)

    def __repr__(self) -> str:
        return f"TokenDataset({self.cache!r}, {self.split!r}, num_tokens={self.num_tokens:,})"

    def num_sequences(self, seq_len: int) -> int:
        """How many (seq_len+1)-token sequences, consecutive ones sharing one token, the stream holds."""
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        return max(0, (self.num_tokens - 1) // seq_len)

    def read_sequences(self, indices: np.ndarray, seq_len: int) -> np.ndarray:
        """int32 [len(indices), seq_len+1]: row j is stream[i*seq_len : i*seq_len+seq_len+1] for i = indices[j]."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.num_sequences(seq_len)
        if indices.size and (indices.min() < 0 or indices.max() >= n):
            raise IndexError(f"sequence indices must lie in [0, {n}) for seq_len={seq_len}; got "
                             f"[{indices.min()}, {indices.max()}]")
        out = np.empty((indices.size, seq_len + 1), dtype=np.int32)
        self.reads.add(indices)
        # Split each row's token range at shard boundaries: (row, column offset, shard, start, stop).
        pieces = []
        for row, begin in enumerate(indices * seq_len):
            end, col = begin + seq_len + 1, 0
            shard = int(np.searchsorted(self._starts, begin, side="right")) - 1
            while begin < end:
                stop = min(end, int(self._starts[shard + 1]))
                pieces.append((row, col, shard, begin - int(self._starts[shard]), stop - int(self._starts[shard])))
                col, begin, shard = col + stop - begin, stop, shard + 1
        if self._local:
            for row, col, shard, lo, hi in pieces:
                out[row, col: col + hi - lo] = self._memmap(shard)[lo:hi]
        else:
            size = self.dtype.itemsize
            blobs = self._fs.cat_ranges([self._paths[p[2]] for p in pieces], [p[3] * size for p in pieces],
                                        [p[4] * size for p in pieces])
            for (row, col, _, lo, hi), blob in zip(pieces, blobs):
                out[row, col: col + hi - lo] = np.frombuffer(blob, dtype=self.dtype)
        return out

    def _memmap(self, shard: int) -> np.memmap:
        mm = self._maps[shard]
        if mm is None:
            expected = int(self._starts[shard + 1] - self._starts[shard])
            mm = np.memmap(self._paths[shard], dtype=self.dtype, mode="r")
            if mm.shape[0] != expected:
                raise ValueError(f"{self._paths[shard]} holds {mm.shape[0]} tokens but {INDEX_NAME} says {expected}: "
                                 "the cache is damaged; rebuild it with `sophia-data tokenize`")
            self._maps[shard] = mm
        return mm


class FeistelPermutation:
    """A seeded bijection of [0, n), evaluated per index (a 6-round Feistel network plus cycle walking)."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1 or seed < 0 or epoch < 0:
            raise ValueError(f"need n >= 1, seed >= 0 and epoch >= 0; got n={n}, seed={seed}, epoch={epoch}")
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + 1) // 2
        self.keys = np.random.SeedSequence([seed, epoch]).generate_state(self.ROUNDS, np.uint64)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        half, mask = np.uint64(self.half), np.uint64((1 << self.half) - 1)
        left, right = x >> half, x & mask
        for key in self.keys:
            z = right ^ key  # splitmix64 finaliser as the round function
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            left, right = right, left ^ ((z ^ (z >> np.uint64(31))) & mask)
        return (left << half) | right

    def __call__(self, indices: np.ndarray) -> np.ndarray:
        x = self._encrypt(np.asarray(indices, dtype=np.uint64).reshape(-1))
        outside = x >= self.n
        while outside.any():  # walk the cycle until back inside [0, n): still a bijection of [0, n)
            x[outside] = self._encrypt(x[outside])
            outside = x >= self.n
        return x.astype(np.int64)


def batch_shards(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...] | None = None) -> int:
    """How many distinct row blocks `sharding` splits a batch's leading dimension into (the data-parallel
    size: global batches must be a multiple of it). `global_shape` is needed for non-named shardings."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec0 = sharding.spec[0] if len(sharding.spec) else None
        axes = () if spec0 is None else (spec0 if isinstance(spec0, tuple) else (spec0,))
        return math.prod(sharding.mesh.shape[a] for a in axes)
    rows = {idx[0].indices(global_shape[0]) for idx in sharding.devices_indices_map(global_shape).values()}
    return len(rows)


def host_row_range(sharding: jax.sharding.Sharding | None, global_shape: tuple[int, int],
                   process_index: int, process_count: int, simulated: bool) -> tuple[int, int]:
    """[start, stop) of the global batch rows held by host `process_index`.

    Real hosts own the devices whose `process_index` is theirs. With `simulated` hosts (tests), host p
    owns the p-th of `process_count` equal groups of the sharding's devices in id order.
    """
    batch = global_shape[0]
    if sharding is None:
        if batch % process_count:
            raise ValueError(f"global_batch={batch} is not divisible by {process_count} hosts; use a multiple")
        size = batch // process_count
        return process_index * size, (process_index + 1) * size
    shards = batch_shards(sharding, global_shape)
    if batch % shards:
        raise ValueError(f"global_batch={batch} is not divisible by the {shards} data shards of the batch "
                         f"sharding; use a global_batch that is a multiple of {shards} (or shard the batch less)")
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    if simulated:
        if len(devices) % process_count:
            raise ValueError(f"{len(devices)} devices cannot be split over {process_count} simulated hosts")
        per = len(devices) // process_count
        owned = set(devices[process_index * per: (process_index + 1) * per])
    else:
        owned = {d for d in devices if d.process_index == process_index}
    rows = sorted({idx[0].indices(batch)[:2] for d, idx in sharding.devices_indices_map(global_shape).items()
                   if d in owned})
    start, stop = rows[0]
    for lo, hi in rows[1:]:
        if lo > stop:
            raise ValueError(f"host {process_index} holds non-contiguous batch rows {rows}; build the mesh with "
                             "jax.make_mesh so each host's devices hold one contiguous block of the batch")
        stop = max(stop, hi)
    return start, stop


class BatchLoader:
    """Deterministic global batches [global_batch, seq_len+1] (int32) of a TokenDataset.

    `batch(step)` depends only on (dataset, seq_len, global_batch, seed, step). Iterating yields
    batch(start_step), batch(start_step+1), ... prepared ahead in a background thread; `state()` is the
    resume point to checkpoint and `from_state` continues with exactly the next batch. Past one epoch
    (num_sequences // global_batch steps) a fresh permutation of (seed, epoch) is used. Two loaders with
    different seeds (e.g. seed and seed+1 for Sophia's Hessian batches) give independent orders.
    """

    def __init__(self, dataset: TokenDataset, *, seq_len: int, global_batch: int, seed: int,
                 sharding: jax.sharding.Sharding | None = None, start_step: int = 0, prefetch: int = 2,
                 process_index: int | None = None, process_count: int | None = None):
        if global_batch < 1 or start_step < 0 or prefetch < 0 or seed < 0:
            raise ValueError(f"need global_batch >= 1, start_step >= 0, prefetch >= 0, seed >= 0; got "
                             f"{global_batch}, {start_step}, {prefetch}, {seed}")
        self.dataset, self.seq_len, self.global_batch, self.seed = dataset, seq_len, global_batch, seed
        self.sharding, self.prefetch = sharding, prefetch
        self.num_sequences = dataset.num_sequences(seq_len)
        self.steps_per_epoch = self.num_sequences // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{dataset!r} has only {self.num_sequences} sequences of {seq_len}+1 tokens, fewer "
                             f"than global_batch={global_batch}; use a smaller batch or seq_len, or more data")
        self.process_count = jax.process_count() if process_count is None else process_count
        self.process_index = jax.process_index() if process_index is None else process_index
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index={self.process_index} must be in [0, process_count={self.process_count})")
        self.simulated = (self.process_count, self.process_index) != (jax.process_count(), jax.process_index())
        if self.process_count > 1 and sharding is None and not self.simulated:
            raise ValueError("multi-host loading needs the batch `sharding` (e.g. NamedSharding(mesh, P('data')))")
        self.global_shape = (global_batch, seq_len + 1)
        self.rows = host_row_range(sharding, self.global_shape, self.process_index, self.process_count,
                                   self.simulated)
        self._next_step = start_step
        self._queue: queue.Queue[tuple[int, Any]] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._perm_cache: tuple[int, FeistelPermutation] | None = None

    # ------------------------------------------------------------------------------ random access
    def sequence_indices(self, step: int) -> np.ndarray:
        """The dataset sequence indices of all global_batch rows of batch `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        cached = self._perm_cache
        if cached is None or cached[0] != epoch:
            cached = (epoch, FeistelPermutation(self.num_sequences, self.seed, epoch))
            self._perm_cache = cached
        first = within * self.global_batch
        return cached[1](np.arange(first, first + self.global_batch))

    def host_batch(self, step: int) -> np.ndarray:
        """This host's rows [rows[0], rows[1]) of batch `step` as int32 NumPy; only those are read."""
        start, stop = self.rows
        return self.dataset.read_sequences(self.sequence_indices(step)[start:stop], self.seq_len)

    def batch(self, step: int) -> jax.Array:
        """Global batch `step`: with `sharding`, a global jax.Array assembled from this host's rows."""
        if self.simulated and self.process_count > 1:
            raise RuntimeError(f"process_count={self.process_count} is simulated (jax.process_count()="
                               f"{jax.process_count()}): use host_batch(step); batch() needs every host")
        local = self.host_batch(step)
        if self.sharding is None:
            return jax.device_put(local)
        return jax.make_array_from_process_local_data(self.sharding, local, self.global_shape)

    # ------------------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[jax.Array]:
        return self

    def __next__(self) -> jax.Array:
        if self.prefetch == 0:
            out = self.batch(self._next_step)
        else:
            if self._thread is None:
                self._start_thread()
            step, out = self._queue.get()
            if isinstance(out, BaseException):
                raise RuntimeError(f"reading batch {step} failed in the prefetch thread") from out
        self._next_step += 1
        return out

    def _start_thread(self) -> None:
        self._queue = queue.Queue(maxsize=self.prefetch)
        self._stop.clear()
        self._thread = threading.Thread(target=self._produce, args=(self._next_step,), daemon=True,
                                        name="BatchLoader-prefetch")
        self._thread.start()

    def _produce(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item: Any = self.batch(step)
            except BaseException as e:  # handed to the consumer, which re-raises it
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put((step, item), timeout=0.1)
                    break
                except queue.Full:
                    continue
            else:  # stopped with this batch read and never queued
                self._unread(step, item)
            if isinstance(item, BaseException):
                return
            step += 1

    def _unread(self, step: int, item: Any) -> None:
        """Takes a batch read ahead and never used back out of the dataset's read count, so the count is
        what the run used."""
        if not isinstance(item, BaseException):
            start, stop = self.rows
            self.dataset.reads.add(self.sequence_indices(step)[start:stop], sign=-1)

    def close(self) -> None:
        """Stops the prefetch thread, taking the batches it read ahead back out of the read count; the loader
        may be iterated again (it restarts from state())."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            while not self._queue.empty():
                self._unread(*self._queue.get_nowait())
            self._thread, self._queue = None, None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ checkpointing
    def state(self) -> dict[str, int]:
        """The resume point: {"step": next step to be yielded, "seed": seed} plus the shape it assumes."""
        return {"step": self._next_step, "seed": self.seed, "global_batch": self.global_batch,
                "seq_len": self.seq_len}

    @classmethod
    def from_state(cls, dataset: TokenDataset, state: dict[str, int], **kwargs: Any) -> BatchLoader:
        """A loader whose first batch is the one after those already yielded when `state` was taken."""
        for name in ("global_batch", "seq_len"):
            if name in state and name in kwargs and int(state[name]) != kwargs[name]:
                raise ValueError(f"the loader state was saved with {name}={state[name]} but {name}={kwargs[name]} "
                                 "was asked for: resuming would change the data order; keep the original value")
            if name in state:
                kwargs.setdefault(name, int(state[name]))
        if "seed" in kwargs and kwargs["seed"] != int(state["seed"]):
            raise ValueError(f"seed={kwargs['seed']} conflicts with the saved loader seed {state['seed']}")
        if "start_step" in kwargs:
            raise ValueError("from_state takes the start step from `state`; do not pass start_step")
        kwargs.pop("seed", None)
        return cls(dataset, seed=int(state["seed"]), start_step=int(state["step"]), **kwargs)


class EvalBatches:
    """Fixed evaluation batches: the first `min(num_sequences, max_batches * batch_size)` sequences of a
    split, in order, so a small split is evaluated whole and a large one on the same sample every time.

    Each batch is `(tokens int32 [batch_size, seq_len+1], weights float32 [batch_size])`; the last one is
    padded with zero rows of weight 0. Like `BatchLoader`, each host reads only its own rows.
    """

    def __init__(self, dataset: TokenDataset, *, seq_len: int, batch_size: int, max_batches: int,
                 sharding: jax.sharding.NamedSharding | None = None):
        if batch_size < 1 or max_batches < 1:
            raise ValueError(f"need batch_size >= 1 and max_batches >= 1; got {batch_size}, {max_batches}")
        available = dataset.num_sequences(seq_len)
        if available == 0:
            raise ValueError(f"{dataset!r} holds no sequence of {seq_len}+1 tokens to evaluate on; use a shorter "
                             "seq_len or a larger validation split")
        self.dataset, self.seq_len, self.batch_size, self.sharding = dataset, seq_len, batch_size, sharding
        self.num_sequences = min(available, max_batches * batch_size)
        self.global_shape = (batch_size, seq_len + 1)
        self.rows = host_row_range(sharding, self.global_shape, jax.process_index(), jax.process_count(), False)

    def __len__(self) -> int:
        return -(-self.num_sequences // self.batch_size)

    def __iter__(self) -> Iterator[tuple[jax.Array, jax.Array]]:
        return (self.batch(j) for j in range(len(self)))

    def batch(self, j: int) -> tuple[jax.Array, jax.Array]:
        start, stop = self.rows
        indices = j * self.batch_size + np.arange(start, stop)
        real = indices < self.num_sequences
        tokens = np.zeros((stop - start, self.seq_len + 1), np.int32)
        tokens[real] = self.dataset.read_sequences(indices[real], self.seq_len)
        weights = real.astype(np.float32)
        if self.sharding is None:
            return jax.device_put(tokens), jax.device_put(weights)
        row_sharding = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec(self.sharding.spec[0]))
        return (jax.make_array_from_process_local_data(self.sharding, tokens, self.global_shape),
                jax.make_array_from_process_local_data(row_sharding, weights, (self.batch_size,)))
