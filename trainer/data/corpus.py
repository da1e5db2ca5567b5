"""The embedded default corpus: this Python's standard library source, tokenized with a BPE trained on it.

`sophia-train` with no data arguments needs real text on every machine without downloads. The standard
library's `.py` files are read at run time (sorted paths, capped in bytes; nothing is copied into the repo),
a byte-level BPE with an `<|endoftext|>` EOS is trained on the training files with HF `tokenizers`, and the
result goes through the same writer as `sophia-data tokenize`, so the trainer reads it like any other cache.

The cache lands in `<parent>/embedded-<hash>` where the hash covers the settings, the Python version and
the tokenizers version; the whole directory is built under a temporary name and renamed, so a second run
(or a concurrent one) reuses a finished build and never sees a partial one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import uuid
from collections.abc import Callable
from pathlib import Path

from trainer.data.builder import BuildSettings, build_cache
from trainer.data.format import EOS_CANDIDATES, INDEX_NAME, held_out

__all__ = ["EmbeddedCorpus", "build_embedded", "default_parent", "stdlib_files", "train_bpe"]

_CORPUS_VERSION = 1  # bump when the file selection or the tokenizer recipe changes
EOS = EOS_CANDIDATES[0]  # "<|endoftext|>"


@dataclasses.dataclass(frozen=True)
class EmbeddedCorpus:
    """Settings of the embedded corpus; every field is part of the cache directory's hash."""

    vocab_size: int = 4096
    """BPE vocabulary size, including the 256 byte symbols and the EOS token."""
    max_bytes: int = 6_000_000
    """Stop adding files (in sorted path order) once this many UTF-8 bytes of source are collected."""
    val_fraction: float = 0.05
    """Fraction of files (chosen by a hash of the relative path) held out as the validation split."""

    def __post_init__(self) -> None:
        if self.vocab_size < 258:
            raise ValueError(f"data.embedded.vocab_size={self.vocab_size} is too small: it needs the 256 bytes plus "
                             "EOS (>= 258)")
        if self.max_bytes < 1:
            raise ValueError(f"data.embedded.max_bytes={self.max_bytes} must be positive")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"data.embedded.val_fraction={self.val_fraction}; use a fraction in (0, 1)")

    def key(self) -> str:
        """Hash of the settings, the Python and tokenizers versions: names the cache directory."""
        import tokenizers

        ident = {**dataclasses.asdict(self), "python": sys.version, "tokenizers": tokenizers.__version__,
                 "corpus_version": _CORPUS_VERSION}
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def default_parent() -> Path:
    """~/.cache/sophia-jax (or $XDG_CACHE_HOME/sophia-jax)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sophia-jax"


def stdlib_files(max_bytes: int) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's UTF-8 `.py` files in sorted order, up to `max_bytes` in total.

    site-packages is excluded (it differs between machines); files that are not UTF-8 are skipped.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)
    files, total = [], 0
    for path in paths:
        if total >= max_bytes:
            break
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        files.append((path.relative_to(root).as_posix(), text))
        total += len(text.encode("utf-8"))
    if not files:
        raise FileNotFoundError(f"no readable .py files under the standard library at {root}; "
                                "pass --data.cache with a token cache instead of the embedded corpus")
    return files


def train_bpe(texts: list[str], vocab_size: int):
    """A deterministic byte-level BPE (`tokenizers.Tokenizer`) with `<|endoftext|>` as its first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise ValueError(f"data.embedded.vocab_size={vocab_size} is too small: it needs the 256 bytes plus EOS (>= 258)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def build_embedded(corpus: EmbeddedCorpus = EmbeddedCorpus(), parent: str | os.PathLike | None = None,
                   progress: bool = False, log: Callable[[str], None] | None = None) -> str:
    """Returns the directory of the embedded token cache, building it first if no finished one exists
    (a few seconds; `log`, if given, is told what is happening)."""
    parent = Path(parent) if parent is not None else default_parent()
    final = parent / f"embedded-{corpus.key()}"
    if (final / INDEX_NAME).is_file():
        return str(final)
    if log is not None:
        log(f"building the embedded corpus (the standard library's source, {corpus.max_bytes / 1e6:g} MB, and a "
            f"{corpus.vocab_size}-token BPE) in {final}; later runs reuse it")
    parent.mkdir(parents=True, exist_ok=True)
    staging = parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _build_into(staging, corpus, progress)
        try:
            os.rename(staging, final)
        except OSError:  # another process finished first (final exists and is not empty)
            if not (final / INDEX_NAME).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(final)


def _build_into(staging: Path, corpus: EmbeddedCorpus, progress: bool) -> None:
    files = stdlib_files(corpus.max_bytes)
    val = [f for f in files if held_out(f[0].encode(), corpus.val_fraction)]
    train = [f for f in files if not held_out(f[0].encode(), corpus.val_fraction)]
    if len(files) < 2:
        raise ValueError(f"data.embedded.max_bytes={corpus.max_bytes} selects {len(files)} file; raise it to get "
                         "at least one training and one validation file")
    if not val:  # a tiny cap can leave a split empty: move one file over
        val, train = train[-1:], train[:-1]
    elif not train:
        train, val = val[:-1], val[-1:]
    sources = staging / "sources"
    sources.mkdir(parents=True)
    for name, split in (("train", train), ("validation", val)):
        with open(sources / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for relpath, text in split:
                f.write(json.dumps({"text": text, "path": relpath}) + "\n")
    tokenizer = train_bpe([text for _, text in train], corpus.vocab_size)
    tokenizer.save(str(sources / "tokenizer.json"))
    metadata = {"embedded": {**dataclasses.asdict(corpus), "python": sys.version,
                             "files": {"train": [p for p, _ in train], "validation": [p for p, _ in val]}}}
    build_cache([str(sources / "train.jsonl")], str(sources / "tokenizer.json"), str(staging),
                val_inputs=[str(sources / "validation.jsonl")], settings=BuildSettings(eos=EOS), workers=1,
                progress=progress, metadata=metadata, log=lambda _: None)
    shutil.rmtree(sources)
