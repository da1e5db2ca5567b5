"""Build side: `sophia-data tokenize` writes exactly the tokens the tokenizer produces, resumably."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import zstandard
from tokenizers import Tokenizer

from trainer.data import builder as tk
from trainer.data import cli, sources
from trainer.data import format as format_
from trainer.data.corpus import train_bpe
from trainer.data.loader import TokenDataset

WORDS = "the of and to in is that for it as with was on be by café naïve 日本 emoji🙂 x=1; def f(): return".split()


def make_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40))) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe(make_docs(200, seed=123), vocab_size=320).save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tok(tokenizer_file) -> Tokenizer:
    return Tokenizer.from_file(tokenizer_file)


def expected_stream(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """The independent statement: each document's `encode` ids followed by EOS, in order."""
    eos = tok.token_to_id("<|endoftext|>")
    return np.array([i for d in docs for i in tok.encode(d, add_special_tokens=False).ids + [eos]], np.int64)


def stream_of(cache: str, split: str = "train") -> np.ndarray:
    """The whole split read back through the random-access reader (one sequence of num_tokens tokens)."""
    ds = TokenDataset(cache, split)
    return ds.read_sequences(np.array([0]), ds.num_tokens - 1)[0].astype(np.int64)


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    lines = "".join(json.dumps({field: d, "meta": {"i": i}}) + "\n" for i, d in enumerate(docs)).encode()
    if path.name.endswith(".zst"):
        lines = zstandard.ZstdCompressor().compress(lines)
    elif path.name.endswith(".gz"):
        lines = gzip.compress(lines)
    path.write_bytes(lines)
    return path


def build(inputs, tokenizer, out, **kw):
    logs: list[str] = []
    kw.setdefault("progress", False)
    index = tk.build_cache([str(i) for i in inputs], tokenizer, str(out), log=logs.append, **kw)
    return index, logs


# ------------------------------------------------------------------------------------ inputs
def test_brace_expansion():
    assert sources.expand_braces("pile/{00..03}.jsonl.zst") == [f"pile/{i:02d}.jsonl.zst" for i in range(4)]
    assert sources.expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert sources.expand_braces("x{a,{8..10}}") == ["xa", "x8", "x9", "x10"]
    assert sources.expand_braces("{a,b{0..1}}-{x}-{y,z}") == ["a-{x}-y", "a-{x}-z", "b0-{x}-y", "b0-{x}-z",
                                                          "b1-{x}-y", "b1-{x}-z"]
    assert sources.expand_braces("lit{x}.txt") == ["lit{x}.txt"]
    assert sources.expand_braces("{c..a}") == ["c", "b", "a"]


def test_expand_inputs_globs_braces_and_errors(tmp_path):
    for name in ["b.jsonl", "a.jsonl", "c.txt", "00.jsonl", "01.jsonl"]:
        (tmp_path / name).write_text("{}\n")
    got = sources.expand_inputs([f"{tmp_path}/{{00..01}}.jsonl", f"{tmp_path}/[ab].jsonl", f"{tmp_path}/*.txt"])
    assert got == [str(tmp_path / n) for n in ["00.jsonl", "01.jsonl", "a.jsonl", "b.jsonl", "c.txt"]]
    with pytest.raises(sources.BuildError, match="02.jsonl' does not exist"):
        sources.expand_inputs([f"{tmp_path}/{{00..02}}.jsonl"])
    with pytest.raises(sources.BuildError, match="matched no files"):
        sources.expand_inputs([f"{tmp_path}/*.zst"])
    with pytest.raises(sources.BuildError, match="listed twice"):
        sources.expand_inputs([f"{tmp_path}/a.jsonl", f"{tmp_path}/*.jsonl"])


# ------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst", ".jsonl.gz", ".txt"])
def test_round_trip_exact_tokens(tmp_path, tokenizer_file, tok, suffix):
    if suffix == ".txt":  # a .txt file is one document
        docs = ["\n".join(make_docs(5, seed=s)) for s in range(3)]
        paths = [tmp_path / f"part{i}.txt" for i in range(3)]
        for p, d in zip(paths, docs):
            p.write_text(d, encoding="utf-8")
    else:
        chunks = [make_docs(30, seed=s) for s in range(3)]
        paths = [write_jsonl(tmp_path / f"part{i}{suffix}", c) for i, c in enumerate(chunks)]
        docs = [d for c in chunks for d in c]
    index, _ = build([f"{tmp_path}/part{{0..2}}{suffix}"], tokenizer_file, tmp_path / "cache")
    np.testing.assert_array_equal(stream_of(str(tmp_path / "cache")), expected_stream(tok, docs))
    assert index["splits"]["train"]["num_documents"] == len(docs)
    assert index["dtype"] == "uint16" and index["eos_id"] == tok.token_to_id("<|endoftext|>")
    assert index["sources"]["train"] == [str(p) for p in paths]
    assert (tmp_path / "cache" / "tokenizer.json").read_text() == Path(tokenizer_file).read_text()


def test_fsspec_memory_and_file_urls(tmp_path, tokenizer_file, tok):
    docs_a, docs_b = make_docs(20, seed=1), make_docs(20, seed=2)
    fs = fsspec.filesystem("memory")
    with fs.open("/in/a.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs_a).encode()))
    write_jsonl(tmp_path / "b.jsonl", docs_b)
    build(["memory://in/*.jsonl.zst", f"file://{tmp_path}/b.jsonl"], tokenizer_file, "memory://out/cache")
    assert fs.isfile("/out/cache/index.json")
    np.testing.assert_array_equal(stream_of("memory://out/cache"), expected_stream(tok, docs_a + docs_b))
    # Sequences read with range requests equal the same slices of the stream.
    ds, stream = TokenDataset("memory://out/cache", "train"), expected_stream(tok, docs_a + docs_b)
    rows = ds.read_sequences(np.array([3, 0, 7]), 16)
    for row, i in zip(rows, [3, 0, 7]):
        np.testing.assert_array_equal(row, stream[i * 16: i * 16 + 17])
    fs.rm("/in", recursive=True)
    fs.rm("/out", recursive=True)


def test_parallel_workers_write_the_same_cache(tmp_path, tokenizer_file, tok):
    chunks = [make_docs(40, seed=10 + s) for s in range(3)]
    for i, c in enumerate(chunks):
        write_jsonl(tmp_path / f"{i}.jsonl", c)
    settings = tk.BuildSettings(val_fraction=0.25)
    one, _ = build([f"{tmp_path}/*.jsonl"], tokenizer_file, tmp_path / "w1", settings=settings, workers=1)
    two, _ = build([f"{tmp_path}/*.jsonl"], tokenizer_file, tmp_path / "w2", settings=settings, workers=2)
    assert one["splits"] == two["splits"]
    for split in ("train", "validation"):
        np.testing.assert_array_equal(stream_of(str(tmp_path / "w1"), split), stream_of(str(tmp_path / "w2"), split))


# ------------------------------------------------------------------------------------ validation
def _segments(stream: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    cuts = np.flatnonzero(stream == eos)
    return [tuple(s) for s in np.split(stream, cuts + 1)[:-1]]


def test_val_fraction_partitions_documents(tmp_path, tokenizer_file, tok):
    docs = [f"document number {i}: " + d for i, d in enumerate(make_docs(300, seed=5))]
    write_jsonl(tmp_path / "all.jsonl", docs)
    index, _ = build([tmp_path / "all.jsonl"], tokenizer_file, tmp_path / "c",
                     settings=tk.BuildSettings(val_fraction=0.3))
    eos = tok.token_to_id("<|endoftext|>")
    train, val = (_segments(stream_of(str(tmp_path / "c"), s), eos) for s in ("train", "validation"))
    expected = sorted(_segments(expected_stream(tok, docs), eos))
    assert sorted(train + val) == expected  # every document exactly once, in one split
    assert 0.2 < len(val) / len(docs) < 0.4
    assert index["splits"]["validation"]["num_documents"] == len(val)


def test_val_from_separate_files(tmp_path, tokenizer_file, tok):
    train_docs, val_docs = make_docs(25, seed=7), make_docs(9, seed=8)
    write_jsonl(tmp_path / "train.jsonl", train_docs)
    write_jsonl(tmp_path / "val.jsonl.gz", val_docs)
    build([tmp_path / "train.jsonl"], tokenizer_file, tmp_path / "c", val_inputs=[str(tmp_path / "val.jsonl.gz")])
    np.testing.assert_array_equal(stream_of(str(tmp_path / "c"), "train"), expected_stream(tok, train_docs))
    np.testing.assert_array_equal(stream_of(str(tmp_path / "c"), "validation"), expected_stream(tok, val_docs))
    with pytest.raises(sources.BuildError, match="not both"):
        build([tmp_path / "train.jsonl"], tokenizer_file, tmp_path / "d", val_inputs=[str(tmp_path / "val.jsonl.gz")],
              settings=tk.BuildSettings(val_fraction=0.1))


def test_missing_validation_split_is_a_clear_error(tmp_path, tokenizer_file):
    write_jsonl(tmp_path / "a.jsonl", make_docs(5, seed=0))
    build([tmp_path / "a.jsonl"], tokenizer_file, tmp_path / "c")
    with pytest.raises(ValueError, match=r"no validation split to evaluate on: train without evaluation "
                                         r"\(--trainer.eval_every 0\), or rebuild .*--val_fraction F, or --val"):
        TokenDataset(str(tmp_path / "c"), "validation")


def held_out_by_default(line: bytes) -> bool:
    """The documented rule restated: a document is held out when the 64-bit little-endian BLAKE2b hash of
    its raw line (with its newline) is below 0.0005 of 2**64 (nanoGPT's share)."""
    return int.from_bytes(hashlib.blake2b(line, digest_size=8).digest(), "little") < 0.0005 * 2.0**64


def test_tokenize_holds_out_a_validation_split_by_default_and_says_what_it_built(tmp_path, tokenizer_file, tok,
                                                                                capsys):
    docs = make_docs(6000, seed=5)
    path = write_jsonl(tmp_path / "a.jsonl", docs)
    val_docs = [d for d, line in zip(docs, path.read_bytes().splitlines(keepends=True)) if held_out_by_default(line)]
    assert 0 < len(val_docs) < 10  # about 3 of 6,000
    argv = ["tokenize", str(path), "--tokenizer", tokenizer_file, "--out", str(tmp_path / "c"), "--workers", "1",
            "--no_progress"]
    assert cli.main(argv) == 0
    np.testing.assert_array_equal(stream_of(str(tmp_path / "c"), "validation"), expected_stream(tok, val_docs))
    out = capsys.readouterr().out.splitlines()
    assert out[-2:] == [f"validation split: {len(val_docs)} documents from 0.0005 of the documents, held out by a "
                        "hash of each line (--val_fraction, the default)",
                        f"train on it: sophia-train --data.cache {tmp_path / 'c'}"]
    assert cli.main(argv) == 0  # a re-run changes nothing, and still says what the cache holds
    out = capsys.readouterr().out
    assert "already built" in out and f"validation split: {len(val_docs)} documents" in out
    # Too few documents for the default share (or --val_fraction 0): no split, and what that means.
    write_jsonl(tmp_path / "few.jsonl", docs[:12])
    assert not any(held_out_by_default(line) for line in (tmp_path / "few.jsonl").read_bytes().splitlines(keepends=True))
    assert cli.main(["tokenize", str(tmp_path / "few.jsonl"), "--tokenizer", tokenizer_file, "--out",
                     str(tmp_path / "few"), "--no_progress"]) == 0
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "validation split: none (0.0005 of the documents, held out by a hash of each line (--val_fraction, the "
        "default)); sophia-train evaluates on this split, so train with --trainer.eval_every 0, or rebuild with "
        "--val INPUT... or a larger --val_fraction",
        f"train on it: sophia-train --data.cache {tmp_path / 'few'} --trainer.eval_every 0"]
    with pytest.raises(SystemExit) as exit_:  # argparse's errors are one line too
        cli.main(["tokenize", str(path), "--tokenizer", tokenizer_file])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == ("sophia-data tokenize: error: the following arguments are required: --out "
                                       "(see sophia-data tokenize --help)\n")


# ------------------------------------------------------------------------------------ bad input
BAD_FILE_LINES = [
    (b'{"text": "good one"}', None),
    (b'{"text": "broken"', "malformed_json"),
    (b'', None),  # blank lines are ignored, not counted
    (b'{"body": "wrong field"}', "missing_field"),
    (b'{"text": "bad \xff\xfe bytes"}', "non_utf8"),
    (b'{"text": ""}', "empty_document"),
    (b'{"text": "good two"}', None),
    (b'{"text": 5}', "missing_field"),
    (b'[1, 2]', "malformed_json"),
    (b'{"text": "lone \\ud800 surrogate"}', "non_utf8"),
    (b'{"text": "   \\n "}', "empty_document"),
    (b'{"text": "good three"}', None),
]


def test_malformed_lines_are_counted_and_skipped(tmp_path, tokenizer_file, tok):
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(line for line, _ in BAD_FILE_LINES) + b"\n")
    index, logs = build([tmp_path / "bad.jsonl"], tokenizer_file, tmp_path / "c")
    reasons = [r for _, r in BAD_FILE_LINES if r]
    assert index["skipped"] == {r: reasons.count(r) for r in sources.SKIP_REASONS}
    np.testing.assert_array_equal(stream_of(str(tmp_path / "c")),
                                  expected_stream(tok, ["good one", "good two", "good three"]))
    assert any("malformed_json=2" in line and "non_utf8=2" in line for line in logs)


def test_strict_mode_names_file_and_line(tmp_path, tokenizer_file, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_FILE_LINES) + b"\n")
    with pytest.raises(sources.BadInputError, match=rf"^{path}:2: malformed json"):
        build([path], tokenizer_file, tmp_path / "c", settings=tk.BuildSettings(strict=True))
    assert not (tmp_path / "c" / "index.json").exists()
    write_jsonl(tmp_path / "good.jsonl", make_docs(50, seed=3))
    with pytest.raises(sources.BadInputError, match=rf"^{path}:2: malformed json"):  # raised from a worker process
        build([path, tmp_path / "good.jsonl"], tokenizer_file, tmp_path / "c", settings=tk.BuildSettings(strict=True),
              workers=2)
    assert not (tmp_path / "c" / "index.json").exists()
    (tmp_path / "bin.txt").write_bytes(b"line one\nline two\nbad \xff here\n")
    rc = cli.main(["tokenize", str(tmp_path / "bin.txt"), "--tokenizer", tokenizer_file, "--out",
                  str(tmp_path / "d"), "--strict", "--no_progress", "--workers", "1"])
    assert rc == 2 and f"{tmp_path / 'bin.txt'}:3: non utf8" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ atomic + resume
def test_interrupted_build_leaves_no_index_and_rerun_resumes(tmp_path, tokenizer_file, tok, monkeypatch):
    chunks = [make_docs(20, seed=30 + s) for s in range(3)]
    for i, c in enumerate(chunks):
        write_jsonl(tmp_path / f"{i}.jsonl", c)
    real_run, calls = tk._run_task, []

    def crash_on_second(task, report=None):
        calls.append(task.url)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        return real_run(task, report)

    monkeypatch.setattr(tk, "_run_task", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        build([f"{tmp_path}/{{0..2}}.jsonl"], tokenizer_file, tmp_path / "c")
    monkeypatch.undo()
    assert not (tmp_path / "c" / "index.json").exists()
    with pytest.raises(FileNotFoundError, match="not a finished token cache"):
        TokenDataset(str(tmp_path / "c"), "train")
    done = sorted((tmp_path / "c" / "shards").glob("*.train.bin"))
    assert len(done) == 1
    first_mtime = done[0].stat().st_mtime_ns

    _, logs = build([f"{tmp_path}/{{0..2}}.jsonl"], tokenizer_file, tmp_path / "c")
    assert "tokenizing 2 of 3 input files (1 already done)" in logs[0]
    assert done[0].stat().st_mtime_ns == first_mtime
    np.testing.assert_array_equal(stream_of(str(tmp_path / "c")), expected_stream(tok, sum(chunks, [])))
    assert not list((tmp_path / "c").rglob("*.tmp"))

    _, logs = build([f"{tmp_path}/{{0..2}}.jsonl"], tokenizer_file, tmp_path / "c")
    assert "already built" in logs[0]
    # Other settings invalidate every shard record: all files are re-tokenized.
    index, logs = build([f"{tmp_path}/{{0..2}}.jsonl"], tokenizer_file, tmp_path / "c",
                        settings=tk.BuildSettings(val_fraction=0.5))
    assert "tokenizing 3 of 3" in logs[0] and index["splits"]["validation"]["num_tokens"] > 0


def test_an_input_rewritten_with_the_same_length_is_tokenized_again(tmp_path, tokenizer_file, tok):
    """The shard record must follow the input's content identity, not its byte size."""
    path = tmp_path / "a.jsonl"
    write_jsonl(path, ["alpha beta gamma", "the of and"])
    build([path], tokenizer_file, tmp_path / "c")
    size = path.stat().st_size
    write_jsonl(path, ["gamma alpha beta", "and the of"])  # same bytes, other order: same length
    assert path.stat().st_size == size
    _, logs = build([path], tokenizer_file, tmp_path / "c")
    assert "tokenizing 1 of 1 input files" in logs[0]
    np.testing.assert_array_equal(stream_of(str(tmp_path / "c")),
                                  expected_stream(tok, ["gamma alpha beta", "and the of"]))


# ------------------------------------------------------------------------------------ tokenizer + CLI
def test_tokenizer_resolution_and_errors(tmp_path, tokenizer_file):
    directory = Path(tokenizer_file).parent
    assert tk.load_tokenizer(str(directory))[1] == Path(tokenizer_file).read_text()
    with pytest.raises(sources.BuildError, match="'/nonexistent/tok.json' not found"):
        tk.load_tokenizer("/nonexistent/tok.json")
    (tmp_path / "broken.json").write_text('{"not": "a tokenizer"')
    with pytest.raises(sources.BuildError, match="not a valid HF tokenizers JSON"):
        tk.load_tokenizer(str(tmp_path / "broken.json"))
    tokenizer, _ = tk.load_tokenizer(tokenizer_file)
    with pytest.raises(sources.BuildError, match="no EOS token '<eos>'; pass --eos"):
        tk.eos_token_id(tokenizer, "<eos>")
    assert format_.token_dtype(50277) == np.uint16 and format_.token_dtype(100_000) == np.uint32


def test_cli(tmp_path, tokenizer_file, tok, capsys):
    docs = make_docs(12, seed=40)
    write_jsonl(tmp_path / "a.jsonl", docs, field="content")
    argv = ["tokenize", str(tmp_path / "a.jsonl"), "--tokenizer", tokenizer_file, "--out", str(tmp_path / "c"),
            "--text_field", "content", "--workers", "1", "--no_progress"]
    assert cli.main(argv) == 0
    np.testing.assert_array_equal(stream_of(str(tmp_path / "c")), expected_stream(tok, docs))
    assert cli.main(["info", str(tmp_path / "c")]) == 0
    assert "12 docs" in capsys.readouterr().out
    assert cli.main(["tokenize", str(tmp_path / "a.jsonl"), "--tokenizer", str(tmp_path / "none.json"),
                    "--out", str(tmp_path / "d")]) == 2
    assert "none.json' not found" in capsys.readouterr().err
    help_run = subprocess.run([sys.executable, "-m", "trainer.data.cli", "tokenize", "--help"],
                              capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert help_run.returncode == 0 and "--val_fraction" in help_run.stdout
