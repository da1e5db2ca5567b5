"""`sophia-data`: build token caches for the trainer (also `python -m trainer.data.cli`).

    sophia-data tokenize 'pile/train/{00..29}.jsonl.zst' --tokenizer neox/tokenizer.json \\
        --val pile/val.jsonl.zst --out /data/pile-neox --workers 16
    sophia-data info /data/pile-neox
    sophia-data embedded          # builds (or finds) the embedded corpus; prints its directory
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from trainer.data.builder import BuildSettings, build_cache, log_summary
from trainer.data.corpus import EmbeddedCorpus, build_embedded
from trainer.data.format import EOS_CANDIDATES, read_index
from trainer.data.sources import BuildError

__all__ = ["DEFAULT_VAL_FRACTION", "main"]

# Without --val or --val_fraction, tokenize holds out this share of the documents as the validation split:
# nanoGPT's for OpenWebText (about 4,000 of its 8M documents). Inputs of fewer than a few thousand
# documents may get none, which tokenize then says.
DEFAULT_VAL_FRACTION = 0.0005


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (`sophia-data: ...`, exit 2) instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sophia-data", description="Build token caches for the sophia-jax trainer.")
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenize", help="tokenize text files into a token cache (read with --data.cache DIR)")
    tok.add_argument("inputs", nargs="+", help="files, globs, brace ranges {00..29} or fsspec URLs")
    tok.add_argument("--tokenizer", required=True, help="tokenizer.json path/dir/URL or a locally cached HF name")
    tok.add_argument("--out", required=True, help="output cache directory (local path or fsspec URL)")
    tok.add_argument("--text_field", default="text", help="JSON field holding the text (default: text)")
    val = tok.add_mutually_exclusive_group()
    val.add_argument("--val_fraction", type=float, default=None,
                     help=f"hold out this fraction of the documents as the validation split (default without --val: "
                          f"{DEFAULT_VAL_FRACTION}, as nanoGPT does; 0: no validation split)")
    val.add_argument("--val", nargs="+", default=[], metavar="INPUT", help="validation inputs (instead of a held-out "
                                                                            "fraction)")
    tok.add_argument("--strict", action="store_true", help="fail on the first malformed line (file:line)")
    tok.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    tok.add_argument("--eos", default=None, help=f"EOS token (default: first of {', '.join(EOS_CANDIDATES)})")
    tok.add_argument("--no_progress", action="store_true", help="no progress bar")
    info = sub.add_parser("info", help="print a cache's index summary")
    info.add_argument("cache")
    emb = sub.add_parser("embedded", help="build (or find) the embedded stdlib corpus and print its directory "
                                          "(it holds a small tokenizer.json too)")
    default = EmbeddedCorpus()
    emb.add_argument("--vocab_size", type=int, default=default.vocab_size, help="BPE vocabulary size")
    emb.add_argument("--max_bytes", type=int, default=default.max_bytes, help="bytes of standard-library source")
    emb.add_argument("--val_fraction", type=float, default=default.val_fraction, help="files held out")
    emb.add_argument("--dir", default=None, help="parent directory (default: ~/.cache/sophia-jax)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sophia-data`; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "tokenize":
            fraction = args.val_fraction if args.val_fraction is not None else 0.0 if args.val else DEFAULT_VAL_FRACTION
            settings = BuildSettings(args.text_field, fraction, args.strict, args.eos)
            index = build_cache(args.inputs, args.tokenizer, args.out, val_inputs=args.val, settings=settings,
                                workers=args.workers, progress=not args.no_progress)
            for line in _what_was_built(index, args.out, fraction, args.val_fraction is None and not args.val):
                print(line)
        elif args.command == "info":
            index = read_index(args.cache)
            log_summary(index, 0.0, 0, print)
            print(f"  dtype {index['dtype']}, vocab {index['vocab_size']}, eos {index['eos_id']}")
        else:
            corpus = EmbeddedCorpus(args.vocab_size, args.max_bytes, args.val_fraction)
            print(build_embedded(corpus, args.dir, log=lambda m: print(m, file=sys.stderr)))
    except (BuildError, FileNotFoundError, ValueError) as e:
        print(f"sophia-data: error: {e}", file=sys.stderr)
        return 2
    return 0


def _what_was_built(index: dict[str, Any], out: str, fraction: float, default_fraction: bool) -> list[str]:
    """What tokenize tells the user after the split counts: where the validation split came from (or that
    there is none, and what that means for training) and the command that trains on the cache."""
    val = index["splits"]["validation"]
    if index["sources"]["validation"]:
        source = f"the {len(index['sources']['validation'])} --val input file(s)"
    elif fraction:
        source = (f"{fraction:g} of the documents, held out by a hash of each line (--val_fraction"
                  f"{', the default' if default_fraction else ''})")
    else:
        source = "--val_fraction 0"
    if val["num_tokens"]:
        return [f"validation split: {val['num_documents']:,} documents from {source}",
                f"train on it: sophia-train --data.cache {out}"]
    return [f"validation split: none ({source}); sophia-train evaluates on this split, so train with "
            "--trainer.eval_every 0, or rebuild with --val INPUT... or a larger --val_fraction",
            f"train on it: sophia-train --data.cache {out} --trainer.eval_every 0"]


if __name__ == "__main__":
    sys.exit(main())
