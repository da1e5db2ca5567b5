"""Throughput of the data pipeline: `sophia-data tokenize` (1 and N workers) and the BatchLoader.

The corpus is this Python's standard-library source written as jsonl shards (real text, no downloads),
tokenized with the embedded corpus' byte-level BPE (the NeoX tokenizer is not available offline; a
50k-vocab BPE costs about the same per byte). The loader is timed two ways at each batch shape:
  host read   `host_batch(step)`: this host's rows, random access into the memory-mapped cache;
  loader      iterating the BatchLoader: background prefetch plus building the global jax.Array on the
              devices (sharded over all local devices along the batch axis), blocking on each batch.
Both are compared with a stated train-step rate (`--train_tokens_per_s`): the default 1.2M tokens/s is
GPT-2 small (124M) at 480x1024 tokens/step on one 8xA100 node at 40% MFU (~8.5e8 flop/token), the
fastest single host in the paper's setups; a loader above it never stalls the step.

    python benchmarks/data_throughput.py [--text_mb 8 --files 4 --steps 30 --devices 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def write_corpus(out: Path, text_bytes: int, files: int) -> tuple[list[str], int]:
    """Standard-library source as `files` jsonl shards of about text_bytes/files each."""
    from trainer.data.corpus import stdlib_files

    docs = stdlib_files(text_bytes)
    paths = [out / f"stdlib-{i:02d}.jsonl" for i in range(files)]
    handles = [open(p, "w", encoding="utf-8") for p in paths]
    for i, (name, text) in enumerate(docs):
        handles[i % files].write(json.dumps({"text": text, "path": name}) + "\n")
    for h in handles:
        h.close()
    return [str(p) for p in paths], sum(len(t.encode()) for _, t in docs)


def time_tokenize(inputs: list[str], tokenizer: str, out: Path, workers: int) -> tuple[float, int, int]:
    from trainer.data.builder import build_cache

    start = time.perf_counter()
    index = build_cache(inputs, tokenizer, str(out), workers=workers, progress=False, log=lambda _: None)
    elapsed = time.perf_counter() - start
    return elapsed, index["splits"]["train"]["num_tokens"], index["splits"]["train"]["num_documents"]


def time_loader(dataset, batch: int, seq_len: int, steps: int, prefetch: int) -> tuple[float, float]:
    """Seconds per batch for host reads only, and for iterating the loader (global arrays, blocking)."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from trainer.data.loader import BatchLoader

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    loader = BatchLoader(dataset, seq_len=seq_len, global_batch=batch, seed=0, sharding=sharding,
                         prefetch=prefetch)
    loader.host_batch(0)  # open the memmaps
    start = time.perf_counter()
    for step in range(steps):
        loader.host_batch(step)
    host = (time.perf_counter() - start) / steps
    with loader:
        jax.block_until_ready(next(loader))  # start the thread, compile nothing further
        start = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(next(loader))
        full = (time.perf_counter() - start) / steps
    return host, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text_mb", type=float, default=8.0, help="MB of stdlib source to tokenize")
    parser.add_argument("--files", type=int, default=4, help="input jsonl shards (the unit of parallelism)")
    parser.add_argument("--workers", type=int, default=2, help="worker count compared with 1")
    parser.add_argument("--steps", type=int, default=30, help="batches timed per loader configuration")
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--devices", type=int, default=8, help="virtual CPU devices the batch is sharded over")
    parser.add_argument("--train_tokens_per_s", type=float, default=1.2e6, help="train-step rate to keep up with")
    args = parser.parse_args()

    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.config.jax_platforms == "cpu":
        jax.config.update("jax_num_cpu_devices", args.devices)
    from trainer.data.corpus import EmbeddedCorpus, build_embedded
    from trainer.data.loader import TokenDataset

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        embedded = build_embedded(EmbeddedCorpus(), tmp / "embedded")
        embedded_s = time.perf_counter() - start
        tokenizer = str(Path(embedded) / "tokenizer.json")
        inputs, text_bytes = write_corpus(tmp, int(args.text_mb * 1e6), args.files)
        print(f"embedded corpus (default settings) built from scratch in {embedded_s:.1f} s")
        print(f"tokenize input: {text_bytes / 1e6:.1f} MB of stdlib source in {args.files} jsonl files; "
              f"{os.cpu_count()} CPU cores; jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} devices")
        # One worker tokenizes in-process with the tokenizer's own thread pool (all cores); the first row
        # pins that pool to one thread to show the per-core rate that N workers multiply.
        for workers, threads in ((1, "1"), (1, None), (args.workers, None)):
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
            if threads == "1":
                os.environ["TOKENIZERS_PARALLELISM"] = "false"
            seconds, tokens, docs = time_tokenize(inputs, tokenizer, tmp / f"cache-w{workers}-{threads}", workers)
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
            label = f"tokenize, {workers} worker{'s' * (workers > 1)}" + (", 1 thread" if threads else "")
            rows.append((label, f"{docs / seconds:,.0f} docs/s", f"{tokens / seconds / 1e6:,.2f}M",
                         f"{text_bytes / seconds / 1e6:.1f} MB/s text", ""))
        dataset = TokenDataset(str(tmp / f"cache-w{args.workers}-None"), "train")
        for batch, seq_len in ((16, 1024), (480, 1024)):
            batch = max(batch // args.devices, 1) * args.devices
            host, full = time_loader(dataset, batch, seq_len, args.steps, args.prefetch)
            for name, seconds in (("host read", host), ("loader (prefetch + global array)", full)):
                tok_s = batch * seq_len / seconds
                rows.append((f"{name} {batch}x{seq_len}", f"{1 / seconds:,.1f} batches/s", f"{tok_s / 1e6:,.2f}M",
                             f"{seconds * 1e3:.2f} ms/batch", f"{tok_s / args.train_tokens_per_s:,.1f}x"))
    header = ("what", "rate", "tokens/s", "detail", f"vs train {args.train_tokens_per_s / 1e6:.1f}M tok/s")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    for row in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


if __name__ == "__main__":
    main()
