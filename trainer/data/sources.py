"""Where documents come from: input patterns (braces, globs, fsspec URLs) and the readers of
.jsonl / .jsonl.zst / .jsonl.gz / .txt files, with bad lines counted or, under --strict, fatal."""

from __future__ import annotations

import gzip
import io
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any, BinaryIO

import fsspec

__all__ = ["SKIP_REASONS", "BadInputError", "BuildError", "expand_braces", "expand_inputs", "full_url", "is_local",
           "iter_documents"]

SKIP_REASONS = ("malformed_json", "missing_field", "non_utf8", "empty_document")


class BuildError(ValueError):
    """The build cannot start or finish: bad arguments, missing inputs, unusable tokenizer."""


class BadInputError(BuildError):
    """A malformed input line under `--strict`; the message starts with `file:line`."""


def expand_braces(pattern: str) -> list[str]:
    """Expands shell-style braces like bash: `{00..29}` (zero padding kept), `{a..e}`, `{x,y}`, nested."""
    start = pattern.find("{")
    if start == -1:
        return [pattern]
    depth, parts, last = 0, [], start + 1
    for i in range(start, len(pattern)):
        if pattern[i] == "{":
            depth += 1
        elif pattern[i] == "}":
            depth -= 1
            if depth == 0:
                break
        elif pattern[i] == "," and depth == 1:
            parts.append(pattern[last:i])
            last = i + 1
    else:
        return [pattern]  # unbalanced braces are literal
    parts.append(pattern[last:i])
    head, tail = pattern[:start], pattern[i + 1:]
    items = parts if len(parts) > 1 else _brace_range(parts[0])
    if items is None:  # "{x}" stays literal, as in bash; later groups still expand
        return [head + "{" + parts[0] + "}" + rest for rest in expand_braces(tail)]
    return [out for item in items for out in expand_braces(head + item + tail)]


def _brace_range(body: str) -> list[str] | None:
    numeric = re.fullmatch(r"(-?)(\d+)\.\.(-?)(\d+)", body)
    if numeric:
        lo, hi = int(numeric.group(1) + numeric.group(2)), int(numeric.group(3) + numeric.group(4))
        padded = any(len(d) > 1 and d.startswith("0") for d in (numeric.group(2), numeric.group(4)))
        width = max(len(numeric.group(2)), len(numeric.group(4))) if padded else 0
        step = 1 if hi >= lo else -1
        return [f"{i:0{width}d}" if width else str(i) for i in range(lo, hi + step, step)]
    letters = re.fullmatch(r"([a-zA-Z])\.\.([a-zA-Z])", body)
    if letters:
        lo, hi = ord(letters.group(1)), ord(letters.group(2))
        step = 1 if hi >= lo else -1
        return [chr(c) for c in range(lo, hi + step, step)]
    return None


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def full_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return path if is_local(fs) else fs.unstrip_protocol(path)


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Brace-expands then globs each pattern (local paths or fsspec URLs), keeping the given order.

    Glob matches are sorted; a pattern that matches nothing, or a file listed twice, is an error.
    """
    urls: list[str] = []
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            fs, path = fsspec.core.url_to_fs(expanded)
            if any(ch in path for ch in "*?["):
                found = sorted(p for p in fs.glob(path) if fs.isfile(p))
                if not found:
                    raise BuildError(f"input pattern {expanded!r} matched no files; check the path and quoting")
                urls.extend(full_url(fs, p) for p in found)
            elif fs.isfile(path):
                urls.append(full_url(fs, path))
            else:
                raise BuildError(f"input {expanded!r} does not exist (or is a directory); pass files or globs")
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise BuildError(f"input {url!r} is listed twice; each file may be tokenized once")
        seen.add(url)
    return urls


def _open_stream(url: str) -> BinaryIO:
    """A binary reader of the decompressed bytes of `url` (.zst and .gz by extension)."""
    raw = fsspec.open(url, "rb").open()
    if url.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True), 1 << 20)
    if url.endswith(".gz"):
        return io.BufferedReader(gzip.GzipFile(fileobj=raw), 1 << 20)
    return raw


def _format_of(url: str) -> str:
    name = url.removesuffix(".zst").removesuffix(".gz")
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    if name.endswith(".txt"):
        return "txt"
    raise BuildError(f"input {url!r}: unknown format; use .jsonl, .txt, optionally with .zst or .gz")


def iter_documents(url: str, text_field: str, strict: bool, skipped: dict[str, int]) -> Iterator[tuple[bytes, str]]:
    """Yields (raw bytes, text) per document of `url`, counting bad ones into `skipped`.

    A .jsonl line is one document (its `text_field`); a .txt file is one document. Blank lines are ignored.
    """
    kind = _format_of(url)
    with _open_stream(url) as stream:
        if kind == "txt":
            raw = stream.read()
            reason, text = _decode(raw)
            lineno = raw.count(b"\n", 0, getattr(text, "start", 0)) + 1 if reason == "non_utf8" else 1
            lines: Iterator[tuple[int, bytes, str | None, str | None]] = iter([(lineno, raw, reason, text)])
        else:
            lines = (_parse_json_line(n, line, text_field) for n, line in enumerate(stream, 1) if line.strip())
        for lineno, raw, reason, text in lines:
            if reason is None and (not isinstance(text, str) or not text.strip()):
                reason = "empty_document"
            if reason is not None:
                if strict:
                    raise BadInputError(f"{url}:{lineno}: {reason.replace('_', ' ')}; fix it or drop --strict")
                skipped[reason] += 1
                continue
            yield raw, text


def _decode(raw: bytes) -> tuple[str | None, Any]:
    try:
        return None, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return "non_utf8", e


def _parse_json_line(lineno: int, line: bytes, field: str) -> tuple[int, bytes, str | None, str | None]:
    reason, text = _decode(line)
    if reason:
        return lineno, line, reason, None
    try:
        record = json.loads(text)
    except ValueError:
        return lineno, line, "malformed_json", None
    if not isinstance(record, dict):
        return lineno, line, "malformed_json", None
    value = record.get(field)
    if not isinstance(value, str):
        return lineno, line, "missing_field", None
    try:
        value.encode("utf-8")  # lone surrogates from "\ud800" escapes cannot be tokenized
    except UnicodeEncodeError:
        return lineno, line, "non_utf8", None
    return lineno, line, None, value
