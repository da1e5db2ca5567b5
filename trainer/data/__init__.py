"""The data pipeline, one concern per module (the reader never imports the writer):

    format.py   the on-disk token cache format (index, splits, dtype, the validation-split rule)
    sources.py  input files: globs, brace ranges, fsspec URLs; .jsonl(.zst/.gz) and .txt readers
    builder.py  the cache writer (tokenize inputs into shards + index)
    corpus.py   the embedded default corpus (stdlib source + a BPE trained on it), via the writer
    loader.py   the reader: TokenDataset, deterministic host-sharded BatchLoader, evaluation batches
    config.py   DataConfig and `open_dataset` (the trainer's entry point)
    cli.py      `sophia-data`
"""
