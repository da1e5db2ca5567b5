"""The on-disk token cache format, which the builder writes and the loader reads.

A token cache is a directory (local or any fsspec URL) holding

    index.json                 written last; its presence means "finished" (see `read_index`)
    tokenizer.json             the tokenizer the tokens were made with
    shards/<key>.json          per-input-file record; its presence means that file's shards are finished
    shards/<key>.<split>.bin   raw little-endian uint16/uint32 token ids, EOS after every document

index.json: {"format", "version", "dtype", "vocab_size", "eos_id", "tokenizer", "tokenizer_sha256",
"settings", "build_fingerprint", "splits": {split: {"num_tokens", "num_documents", "shards": [{"path",
"num_tokens", "num_documents", "source"}]}}, "skipped", "sources", "metadata"}. A split's token stream is
its shards concatenated in order.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import fsspec
import numpy as np

__all__ = ["EOS_CANDIDATES", "FORMAT_NAME", "FORMAT_VERSION", "INDEX_NAME", "SPLITS", "TOKENIZER_NAME",
           "held_out", "read_index", "token_dtype"]

INDEX_NAME = "index.json"
TOKENIZER_NAME = "tokenizer.json"
FORMAT_NAME = "sophia-jax-token-cache"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (GPT-2/NeoX vocabularies), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def held_out(raw: bytes, val_fraction: float) -> bool:
    """The one validation-split rule: a document (or, for the embedded corpus, a file path) goes to
    validation when a hash of its raw bytes falls below `val_fraction`, so any worker count agrees."""
    if val_fraction <= 0.0:
        return False
    digest = int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")
    return digest < val_fraction * 2.0**64


def read_index(cache: str) -> dict[str, Any]:
    """Loads and checks a cache's index.json; a missing one means the build never finished."""
    fs, root = fsspec.core.url_to_fs(cache)
    path = f"{root.rstrip('/')}/{INDEX_NAME}"
    try:  # not fs.isfile(): it answers False when the storage cannot be reached, an outage is no "missing"
        with fs.open(path, "rb") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{cache!r} has no {INDEX_NAME}: it is not a finished token cache; "
                                "(re)run `sophia-data tokenize ... --out` to build or finish it") from None
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise ValueError(f"{cache!r}: index is format {index.get('format')!r} v{index.get('version')}, this code "
                         f"reads {FORMAT_NAME!r} v{FORMAT_VERSION}; rebuild the cache with this version")
    return index
