"""What the trainer reads: `DataConfig` (`--data.*`) and `open_dataset`, the pipeline's entry point."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from trainer.data.corpus import EmbeddedCorpus, build_embedded
from trainer.data.loader import TokenDataset

__all__ = ["DataConfig", "open_dataset"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the training tokens come from (`--data.*` on the trainer's command line)."""

    cache: str | None = None
    """Token cache directory or URL written by `sophia-data tokenize`; None = the embedded stdlib corpus."""
    embedded: EmbeddedCorpus = EmbeddedCorpus()
    """The embedded corpus's settings (vocab_size, max_bytes, val_fraction); ignored when `cache` is set."""
    embedded_dir: str | None = None
    """Parent directory of the embedded cache (None = ~/.cache/sophia-jax); it lands in embedded-<hash>/."""
    prefetch: int = 2
    """Batches prepared ahead in a background thread (0 = read synchronously)."""

    def __post_init__(self) -> None:
        if self.prefetch < 0:
            raise ValueError(f"data.prefetch={self.prefetch}; use 0 (synchronous) or more batches ahead")


def open_dataset(cfg: DataConfig, split: str, log: Callable[[str], None] | None = None) -> TokenDataset:
    """The `split` ("train" or "validation") of `cfg.cache`, building the embedded corpus when it is None
    (telling `log` while it does)."""
    cache = cfg.cache if cfg.cache is not None else build_embedded(cfg.embedded, cfg.embedded_dir, log=log)
    return TokenDataset(cache, split)
