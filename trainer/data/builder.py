"""Writes token caches (the format is trainer/data/format.py): input files -> tokenized shards + index.

Every file is written to a temporary name and then renamed, so an interrupted build never looks finished
and a re-run rebuilds only the input files whose shard record is missing, was made with other settings,
or whose input changed since (its size, modification time or, on object stores, generation/checksum).
Inputs are read by `trainer.data.sources`; `sophia-data tokenize` (trainer/data/cli.py) calls `build_cache`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np

from trainer.data.format import (EOS_CANDIDATES, FORMAT_NAME, FORMAT_VERSION, INDEX_NAME, SPLITS, TOKENIZER_NAME,
                                 held_out, token_dtype)
from trainer.data.sources import SKIP_REASONS, BuildError, expand_inputs, full_url, iter_documents

__all__ = ["BuildSettings", "build_cache", "eos_token_id", "load_tokenizer", "log_summary"]

_ENCODE_BATCH_DOCS = 512
_ENCODE_BATCH_CHARS = 4 << 20


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """What decides the tokens of a cache; it is fingerprinted so a re-run can tell finished shards."""

    text_field: str = "text"
    """JSON field that holds a document's text in .jsonl inputs."""
    val_fraction: float = 0.0
    """Fraction of training-input documents held out as validation (chosen by a hash of the raw line)."""
    strict: bool = False
    """Fail on the first malformed line (naming file:line) instead of counting and skipping it."""
    eos: str | None = None
    """EOS token appended after every document; None picks the first of EOS_CANDIDATES in the vocab."""


# -------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(spec: str) -> tuple[Any, str]:
    """Loads an HF `tokenizers` tokenizer; returns (tokenizer, its JSON text).

    `spec` is a tokenizer.json path, a directory holding one, an fsspec URL of either, or a Hugging Face
    name already in the local HF cache (nothing is downloaded).
    """
    from tokenizers import Tokenizer

    text = None
    fs, path = fsspec.core.url_to_fs(spec)
    for candidate in (path, f"{path.rstrip('/')}/{TOKENIZER_NAME}"):
        if fs.isfile(candidate):
            with fs.open(candidate, "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
            break
    if text is None and "://" not in spec:
        text = _from_hf_cache(spec)
    if text is None:
        raise BuildError(
            f"tokenizer {spec!r} not found: pass a tokenizer.json file, a directory containing one, an fsspec "
            "URL of either, or a Hugging Face name already in the local HF cache (no downloads are made)"
        )
    try:
        return Tokenizer.from_str(text), text
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise BuildError(f"tokenizer {spec!r} is not a valid HF tokenizers JSON file: {e}") from None


def _from_hf_cache(name: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(name, TOKENIZER_NAME)
    except Exception:  # an invalid repo name
        return None
    if isinstance(found, str) and os.path.isfile(found):
        with open(found, encoding="utf-8") as f:
            return f.read()
    return None


def eos_token_id(tokenizer: Any, eos: str | None) -> int:
    """The id of `eos`, or of the first EOS_CANDIDATES token the vocabulary has."""
    for name in (eos,) if eos is not None else EOS_CANDIDATES:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return int(token_id)
    wanted = repr(eos) if eos is not None else f"any of {list(EOS_CANDIDATES)}"
    raise BuildError(f"the tokenizer has no EOS token {wanted}; pass --eos with a token in its vocabulary")


# ----------------------------------------------------------------------------------------- writing
def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with fs.open(path + ".tmp", "wb") as f:
        f.write(data)
    fs.mv(path + ".tmp", path)


@dataclasses.dataclass(frozen=True)
class _Task:
    url: str
    role: str  # "train" or "validation": which split the input file feeds
    key: str  # shard file stem under shards/
    fingerprint: str
    out_root: str  # out dir as an fsspec URL or local path
    tokenizer_json: str
    eos_id: int
    dtype: str
    settings: BuildSettings


def _run_task(task: _Task, report: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Tokenizes one input file into its split shards; returns the shard record it wrote."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(task.tokenizer_json)
    fs, root = fsspec.core.url_to_fs(task.out_root)
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    parts = {s: {"path": f"shards/{task.key}.{s}.bin", "num_tokens": 0, "num_documents": 0} for s in SPLITS}
    files = {s: fs.open(f"{root}/{parts[s]['path']}.tmp", "wb") for s in SPLITS}
    docs = iter_documents(task.url, task.settings.text_field, task.settings.strict, skipped)
    frac = task.settings.val_fraction if task.role == "train" else 0.0
    try:
        while batch := list(_take_batch(docs)):
            encodings = tokenizer.encode_batch([text for _, text in batch], add_special_tokens=False)
            pieces: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
            for (raw, _), enc in zip(batch, encodings):
                split = "validation" if task.role == "validation" or held_out(raw, frac) else "train"
                pieces[split].append(np.asarray(enc.ids + [task.eos_id], dtype=task.dtype))
            for split, arrays in pieces.items():
                if arrays:
                    tokens = np.concatenate(arrays)
                    files[split].write(tokens.tobytes())
                    parts[split]["num_tokens"] += int(tokens.size)
                    parts[split]["num_documents"] += len(arrays)
            if report is not None:
                report(len(batch), sum(len(e.ids) + 1 for e in encodings))
    finally:
        for f in files.values():
            f.close()
    for split in SPLITS:
        tmp = f"{root}/{parts[split]['path']}.tmp"
        if parts[split]["num_tokens"]:
            fs.mv(tmp, f"{root}/{parts[split]['path']}")
        else:
            fs.rm(tmp)
            parts[split]["path"] = None
    record = {"fingerprint": task.fingerprint, "source": task.url, "role": task.role, "parts": parts,
              "skipped": skipped}
    _write_atomic(fs, f"{root}/shards/{task.key}.json", json.dumps(record, indent=1).encode())
    return record


def _take_batch(docs: Iterator[tuple[bytes, str]]) -> Iterator[tuple[bytes, str]]:
    chars = 0
    for doc in itertools.islice(docs, _ENCODE_BATCH_DOCS):
        yield doc
        chars += len(doc[1])
        if chars >= _ENCODE_BATCH_CHARS:
            return


def _worker_task(task: _Task, queue: Any) -> dict[str, Any]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this process is one of --workers; no nested threads
    return _run_task(task, lambda d, t: queue.put((d, t)))


class _Progress:
    """A tqdm bar over tokens, with docs/s and files done in its postfix."""

    def __init__(self, enabled: bool, num_files: int):
        from tqdm import tqdm

        self.start, self.docs, self.files, self.num_files = time.perf_counter(), 0, 0, num_files
        self.bar = tqdm(unit="tok", unit_scale=True, disable=not enabled, desc="tokenize", dynamic_ncols=True)

    def update(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.bar.update(tokens)
        rate = self.docs / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:,.0f} docs/s, files {self.files}/{self.num_files}", refresh=False)

    def file_done(self) -> None:
        self.files += 1
        self.update(0, 0)


def build_cache(
    inputs: Sequence[str],
    tokenizer: str,
    out: str,
    *,
    val_inputs: Sequence[str] = (),
    settings: BuildSettings = BuildSettings(),
    workers: int = 1,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tokenizes `inputs` (and `val_inputs`) into a token cache at `out`; returns its index.

    Resumable: input files whose shard record matches the current settings are not re-tokenized, and a
    cache whose index already matches is left alone. `workers` > 1 tokenizes files in that many processes.
    """
    if not 0.0 <= settings.val_fraction < 1.0:
        raise BuildError(f"val_fraction={settings.val_fraction} must be in [0, 1)")
    if settings.val_fraction and val_inputs:
        raise BuildError("pass either --val files or --val_fraction, not both")
    train_urls, val_urls = expand_inputs(inputs), expand_inputs(val_inputs)
    if set(train_urls) & set(val_urls):
        raise BuildError(f"{sorted(set(train_urls) & set(val_urls))[0]!r} is both a training and a --val input")
    tok, tok_json = load_tokenizer(tokenizer)
    eos_id, vocab_size = eos_token_id(tok, settings.eos), tok.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size).name
    tok_sha = hashlib.sha256(tok_json.encode()).hexdigest()
    fs, root = fsspec.core.url_to_fs(out)
    out_url = full_url(fs, root)

    tasks = []
    for role, urls in (("train", train_urls), ("validation", val_urls)):
        for url in urls:
            src_fs, src_path = fsspec.core.url_to_fs(url)
            # fsspec's ukey hashes the file's metadata: size and mtime locally, generation and checksums
            # on GCS, so an input rewritten with the same length is tokenized again.
            ident = {"format": FORMAT_VERSION, "source": url, "content": src_fs.ukey(src_path), "role": role,
                     "tokenizer": tok_sha, "eos_id": eos_id, "text_field": settings.text_field,
                     "val_fraction": settings.val_fraction if role == "train" else 0.0}
            fingerprint = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
            key = hashlib.sha256(url.encode()).hexdigest()[:16]
            tasks.append(_Task(url, role, key, fingerprint, out_url, tok_json, eos_id, dtype, settings))
    build_fp = hashlib.sha256("".join(t.fingerprint for t in tasks).encode()).hexdigest()

    existing = None
    if fs.isfile(f"{root}/{INDEX_NAME}"):
        with fs.open(f"{root}/{INDEX_NAME}", "rb") as f:
            existing = json.load(f)
    if existing is not None and existing.get("build_fingerprint") == build_fp:
        log(f"{out}: already built with these inputs and settings; nothing to do")
        log_summary(existing, 0.0, 0, log)
        return existing
    if existing is not None:
        fs.rm(f"{root}/{INDEX_NAME}")  # from here on the cache is unfinished until the new index lands
    fs.makedirs(f"{root}/shards", exist_ok=True)
    _write_atomic(fs, f"{root}/{TOKENIZER_NAME}", tok_json.encode())

    records: dict[str, dict[str, Any]] = {}
    for task in tasks:
        record_path = f"{root}/shards/{task.key}.json"
        if fs.isfile(record_path):
            with fs.open(record_path, "rb") as f:
                record = json.load(f)
            if record.get("fingerprint") == task.fingerprint:
                records[task.key] = record
    pending = [t for t in tasks if t.key not in records]
    log(f"tokenizing {len(pending)} of {len(tasks)} input files ({len(records)} already done) into {out}")
    start = time.perf_counter()
    bar = _Progress(progress, len(pending))
    try:
        if workers <= 1 or len(pending) <= 1:
            for task in pending:
                records[task.key] = _run_task(task, bar.update)
                bar.file_done()
        else:
            _run_parallel(pending, min(workers, len(pending)), bar, records)
    finally:
        bar.bar.close()
    elapsed = time.perf_counter() - start

    index = _assemble_index(tasks, records, vocab_size, eos_id, dtype, tok_sha, settings, build_fp, metadata)
    _write_atomic(fs, f"{root}/{INDEX_NAME}", json.dumps(index, indent=1).encode())
    log_summary(index, elapsed, len(pending), log)
    return index


def _run_parallel(pending: list[_Task], workers: int, bar: _Progress, records: dict[str, Any]) -> None:
    ctx = multiprocessing.get_context("spawn")  # tokenizers' thread pool does not survive fork
    with ctx.Manager() as manager:
        queue = manager.Queue()
        pool = ctx.Pool(workers)
        try:
            running = {t.key: pool.apply_async(_worker_task, (t, queue)) for t in pending}
            while running:
                time.sleep(0.2)
                while not queue.empty():
                    bar.update(*queue.get())
                for key in [k for k, r in running.items() if r.ready()]:
                    records[key] = running.pop(key).get()  # re-raises a worker's error
                    bar.file_done()
            pool.close()
        finally:
            pool.terminate()  # on an error or Ctrl-C, stop the other files now; their .tmp files stay unfinished
            pool.join()


def _assemble_index(tasks, records, vocab_size, eos_id, dtype, tok_sha, settings, build_fp, metadata):
    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        shards = []
        for task in tasks:
            part = records[task.key]["parts"][split]
            if part["num_tokens"]:
                shards.append({**part, "source": task.url})
        splits[split] = {"num_tokens": sum(s["num_tokens"] for s in shards),
                         "num_documents": sum(s["num_documents"] for s in shards), "shards": shards}
    skipped = {r: sum(records[t.key]["skipped"][r] for t in tasks) for r in SKIP_REASONS}
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": dtype, "vocab_size": vocab_size,
        "eos_id": eos_id, "tokenizer": TOKENIZER_NAME, "tokenizer_sha256": tok_sha,
        "settings": dataclasses.asdict(settings), "build_fingerprint": build_fp, "splits": splits,
        "skipped": skipped, "sources": {role: [t.url for t in tasks if t.role == role] for role in SPLITS},
        "metadata": metadata or {},
    }


def log_summary(index: dict[str, Any], elapsed: float, built: int, log: Callable[[str], None]) -> None:
    for split, info in index["splits"].items():
        log(f"  {split:<10} {info['num_documents']:>12,} docs {info['num_tokens']:>15,} tokens "
            f"in {len(info['shards'])} shards")
    bad = {k: v for k, v in index["skipped"].items() if v}
    log(f"  skipped: {', '.join(f'{k}={v:,}' for k, v in bad.items()) if bad else 'none'}")
    tokens = sum(info["num_tokens"] for info in index["splits"].values())
    if built:
        log(f"  {elapsed:.1f} s, {tokens / max(elapsed, 1e-9):,.0f} tokens/s (all splits, {built} files built)")
