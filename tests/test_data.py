"""Read side: deterministic, host-independent, resumable batches that match the token stream exactly."""

from __future__ import annotations

import dataclasses
import json
import sysconfig
import time
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
import yaml
from jax.sharding import NamedSharding, PartitionSpec as P
from tokenizers import Tokenizer

from trainer.config import from_dict
from trainer.data import loader as data_lib
from trainer.data.config import DataConfig, open_dataset
from trainer.data.corpus import EmbeddedCorpus, build_embedded
from trainer.data.loader import BatchLoader, EvalBatches, FeistelPermutation, TokenDataset

SEQ = 8
SHARD_SIZES = (1000, 37, 2203)  # uneven, so sequences straddle shard boundaries
REPO = Path(__file__).parents[1]


def write_arange_cache(root: Path) -> int:
    """A cache written by hand from the documented format: the stream is 0, 1, 2, ... (uint32).

    Sequence i is then arange(i*SEQ, i*SEQ + SEQ + 1), an independent statement of what to read back.
    """
    (root / "shards").mkdir(parents=True)
    shards, start = [], 0
    for k, size in enumerate(SHARD_SIZES):
        np.arange(start, start + size, dtype=np.uint32).tofile(root / "shards" / f"s{k}.train.bin")
        shards.append({"path": f"shards/s{k}.train.bin", "num_tokens": size, "num_documents": 1})
        start += size
    (root / "tokenizer.json").write_text("{}")
    empty = {"num_tokens": 0, "num_documents": 0, "shards": []}
    index = {"format": "sophia-jax-token-cache", "version": 1, "dtype": "uint32", "vocab_size": 1 << 20,
             "eos_id": 0, "tokenizer": "tokenizer.json", "splits": {
                 "train": {"num_tokens": start, "num_documents": 3, "shards": shards}, "validation": empty}}
    (root / "index.json").write_text(json.dumps(index))
    return start


@pytest.fixture
def dataset(tmp_path) -> TokenDataset:
    write_arange_cache(tmp_path / "cache")
    return TokenDataset(str(tmp_path / "cache"), "train")


def seq_ids(batch) -> np.ndarray:
    """Which sequence each row is, checking the row is exactly that slice of the stream."""
    batch = np.asarray(batch)
    ids = batch[:, 0] // SEQ
    np.testing.assert_array_equal(batch, ids[:, None] * SEQ + np.arange(SEQ + 1))
    return ids


# ------------------------------------------------------------------------------------ dataset
def test_read_sequences_across_shards(dataset):
    total = sum(SHARD_SIZES)
    assert dataset.num_tokens == total and dataset.num_sequences(SEQ) == (total - 1) // SEQ
    idx = np.array([0, 124, 125, 129, 130, dataset.num_sequences(SEQ) - 1, 3])  # 125*8 = 1000: a boundary
    rows = dataset.read_sequences(idx, SEQ)
    assert rows.dtype == np.int32 and rows.shape == (len(idx), SEQ + 1)
    np.testing.assert_array_equal(rows, idx[:, None] * SEQ + np.arange(SEQ + 1))
    with pytest.raises(IndexError, match="must lie in"):
        dataset.read_sequences(np.array([dataset.num_sequences(SEQ)]), SEQ)


def test_remote_cache_reads_the_same_rows(tmp_path, dataset):
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "cache"), "/remote/cache", recursive=True)
    remote = TokenDataset("memory://remote/cache", "train")
    idx = np.array([5, 124, 130, 0])
    np.testing.assert_array_equal(remote.read_sequences(idx, SEQ), dataset.read_sequences(idx, SEQ))
    fs.rm("/remote", recursive=True)


def test_damaged_cache_is_reported(tmp_path, dataset):
    with open(tmp_path / "cache" / "shards" / "s1.train.bin", "ab") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(ValueError, match="holds 38 tokens but index.json says 37"):
        TokenDataset(str(tmp_path / "cache"), "train").read_sequences(np.array([125]), SEQ)


# ------------------------------------------------------------------------------------ order
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    perm = FeistelPermutation(n, seed=3, epoch=1)(np.arange(n))
    np.testing.assert_array_equal(np.sort(perm), np.arange(n))
    if n >= 64:
        assert np.mean(perm == np.arange(n)) < 0.1  # actually shuffled


def test_same_seed_same_batches_and_seeds_differ(dataset):
    a = BatchLoader(dataset, seq_len=SEQ, global_batch=16, seed=7, prefetch=0)
    b = BatchLoader(dataset, seq_len=SEQ, global_batch=16, seed=7, prefetch=0)
    hess = BatchLoader(dataset, seq_len=SEQ, global_batch=16, seed=8, prefetch=0)  # the Hessian stream
    for step in (0, 1, 5):
        np.testing.assert_array_equal(np.asarray(a.batch(step)), np.asarray(b.batch(step)))
    overlap = np.intersect1d(np.concatenate([seq_ids(a.batch(s)) for s in range(4)]),
                             np.concatenate([seq_ids(hess.batch(s)) for s in range(4)]))
    assert len(overlap) < 16  # 64 of ~405 sequences each: ~10 shared by chance, not the same order


def test_epochs_cover_each_sequence_once_then_reshuffle(dataset):
    loader = BatchLoader(dataset, seq_len=SEQ, global_batch=16, seed=0, prefetch=0)
    spe, n = loader.steps_per_epoch, dataset.num_sequences(SEQ)
    assert spe == n // 16
    epoch0 = np.concatenate([seq_ids(loader.batch(s)) for s in range(spe)])
    epoch1 = np.concatenate([seq_ids(loader.batch(s)) for s in range(spe, 2 * spe)])
    for ids in (epoch0, epoch1):
        assert len(np.unique(ids)) == len(ids) == spe * 16  # no repeats inside an epoch
        assert ids.min() >= 0 and ids.max() < n
    assert not np.array_equal(epoch0, epoch1)  # a new order, not a silent repeat


# ------------------------------------------------------------------------------------ hosts
def single_host_batch(dataset, sharding, step, seed=1):
    return np.asarray(BatchLoader(dataset, seq_len=SEQ, global_batch=32, seed=seed, sharding=sharding,
                                  prefetch=0).batch(step))


@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (2, 4)])
@pytest.mark.parametrize("hosts", [1, 2, 4])
def test_simulated_hosts_together_read_the_global_batch(dataset, mesh_shape, hosts):
    mesh = jax.make_mesh(mesh_shape, ("data", "model"))
    sharding = NamedSharding(mesh, P("data", None))
    for step in (0, 3):
        expected = single_host_batch(dataset, sharding, step)
        covered = np.zeros(32, dtype=bool)
        for p in range(hosts):
            loader = BatchLoader(dataset, seq_len=SEQ, global_batch=32, seed=1, sharding=sharding, prefetch=0,
                                 process_index=p, process_count=hosts)
            start, stop = loader.rows
            # Host p's devices are the p-th contiguous group; they hold a contiguous block of rows.
            per_host = np.array_split(np.arange(8), hosts)[p]
            data_blocks = {d // mesh_shape[1] for d in per_host}
            assert (start, stop) == (min(data_blocks) * 32 // mesh_shape[0], (max(data_blocks) + 1) * 32 // mesh_shape[0])
            np.testing.assert_array_equal(loader.host_batch(step), expected[start:stop])
            covered[start:stop] = True
        assert covered.all()


def test_sharded_batch_is_assembled_from_host_rows(dataset):
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    loader = BatchLoader(dataset, seq_len=SEQ, global_batch=16, seed=2, sharding=sharding, prefetch=0)
    batch = loader.batch(4)
    assert batch.shape == (16, SEQ + 1) and batch.dtype == np.int32 and batch.sharding == sharding
    unsharded = np.asarray(BatchLoader(dataset, seq_len=SEQ, global_batch=16, seed=2, prefetch=0).batch(4))
    for shard in batch.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), unsharded[shard.index])
    seq_ids(batch)


def test_batch_not_divisible_by_data_shards(dataset):
    sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))
    with pytest.raises(ValueError, match="global_batch=12 is not divisible by the 8 data shards"):
        BatchLoader(dataset, seq_len=SEQ, global_batch=12, seed=0, sharding=sharding)
    fsdp = NamedSharding(jax.make_mesh((4, 2), ("data", "fsdp")), P(("data", "fsdp")))
    with pytest.raises(ValueError, match="global_batch=12 is not divisible by the 8 data shards"):
        BatchLoader(dataset, seq_len=SEQ, global_batch=12, seed=0, sharding=fsdp)
    replicated_model = NamedSharding(jax.make_mesh((4, 2), ("data", "model")), P("data"))
    assert BatchLoader(dataset, seq_len=SEQ, global_batch=12, seed=0, sharding=replicated_model).rows == (0, 12)
    with pytest.raises(ValueError, match="fewer than global_batch=4096"):
        BatchLoader(dataset, seq_len=SEQ, global_batch=4096, seed=0)


# ------------------------------------------------------------------------------------ resume
def test_iteration_and_resume_continue_with_the_next_batch(dataset):
    reference = BatchLoader(dataset, seq_len=SEQ, global_batch=8, seed=4, prefetch=0)
    with BatchLoader(dataset, seq_len=SEQ, global_batch=8, seed=4, prefetch=3) as loader:
        for step, batch in zip(range(5), loader):
            np.testing.assert_array_equal(np.asarray(batch), np.asarray(reference.batch(step)))
        state = loader.state()
    assert state["step"] == 5 and state["seed"] == 4
    state = json.loads(json.dumps(state))  # survives a checkpoint round trip
    with BatchLoader.from_state(dataset, state, seq_len=SEQ, global_batch=8, prefetch=2) as resumed:
        for step in range(5, 5 + 2 * reference.steps_per_epoch, 7):  # across an epoch boundary too
            resumed_batch = next(resumed)
            np.testing.assert_array_equal(np.asarray(resumed_batch), np.asarray(reference.batch(step)))
            for _ in range(6):
                next(resumed)
    with pytest.raises(ValueError, match="saved with global_batch=8 but global_batch=16"):
        BatchLoader.from_state(dataset, state, seq_len=SEQ, global_batch=16)


def test_the_read_count_leaves_out_batches_read_ahead_and_never_used(dataset):
    """A run stops with batches in the prefetch queue (and one being read): the count it reports at the end
    is of the sequences of the batches it used."""
    with BatchLoader(dataset, seq_len=SEQ, global_batch=8, seed=1, prefetch=3) as loader:
        used = [seq_ids(next(loader)) for _ in range(5)]
        deadline = time.monotonic() + 60
        while dataset.reads.sequences < 8 * (5 + 3):  # the queue of 3 is full
            assert time.monotonic() < deadline, "the prefetch thread did not read ahead"
            time.sleep(0.01)
    expected = data_lib.ReadCount()
    for ids in used:
        expected.add(ids)
    assert (dataset.reads.sequences, dataset.reads.digest) == (40, expected.digest)


def test_prefetch_errors_reach_the_consumer(dataset, monkeypatch):
    loader = BatchLoader(dataset, seq_len=SEQ, global_batch=8, seed=0, prefetch=2)
    monkeypatch.setattr(dataset, "read_sequences", lambda *a: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(RuntimeError, match="reading batch 0 failed") as info:
        next(loader)
    assert isinstance(info.value.__cause__, OSError)
    loader.close()


# ------------------------------------------------------------------------------------ embedded corpus
def test_embedded_corpus_builds_once_with_the_same_format(tmp_path):
    cfg = DataConfig(embedded=EmbeddedCorpus(vocab_size=300, max_bytes=150_000, val_fraction=0.2),
                     embedded_dir=str(tmp_path))
    train, val = open_dataset(cfg, "train"), open_dataset(cfg, "validation")
    tok = Tokenizer.from_file(train.tokenizer_path)
    assert train.vocab_size == 300 and train.eos_id == tok.token_to_id("<|endoftext|>")
    files = train.index["metadata"]["embedded"]["files"]
    assert files["train"] and files["validation"] and not set(files["train"]) & set(files["validation"])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for ds, names in ((train, files["train"]), (val, files["validation"])):
        texts = [(stdlib / n).read_text(encoding="utf-8") for n in names]
        expected = [i for t in texts if t.strip() for i in tok.encode(t).ids + [ds.eos_id]]
        np.testing.assert_array_equal(ds.read_sequences(np.array([0]), ds.num_tokens - 1)[0], expected)
    index_file = Path(train.cache) / "index.json"
    mtime = index_file.stat().st_mtime_ns
    assert open_dataset(cfg, "train").cache == train.cache and index_file.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [Path(train.cache).name]  # no staging left behind
    # Deterministic: a second build elsewhere trains the same tokenizer and writes the same tokens.
    other = build_embedded(EmbeddedCorpus(300, 150_000, 0.2), tmp_path / "again")
    assert Path(other, "tokenizer.json").read_text() == Path(train.tokenizer_path).read_text()


def test_data_configs_are_data_config_fields():
    fields = {f.name for f in dataclasses.fields(DataConfig)}
    for path in sorted((REPO / "configs" / "data").glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        assert set(values) <= fields, f"{path.name}: unknown keys {set(values) - fields}"
        from_dict(DataConfig, values)
    assert yaml.safe_load((REPO / "configs/data/pile.yaml").read_text())["cache"].startswith("gs://")


def test_open_dataset_rejects_unknown_split(dataset):
    with pytest.raises(ValueError, match="split='test'"):
        TokenDataset(dataset.cache, "test")
    assert data_lib.host_row_range(None, (8, 9), 1, 2, simulated=True) == (4, 8)


def test_eval_batches_cover_a_small_split_whole_in_order_with_padding(dataset):
    n = dataset.num_sequences(SEQ)  # 405 sequences of 8+1 tokens
    mesh = jax.make_mesh((8,), ("data",))
    sharding = NamedSharding(mesh, P("data", None))
    evals = EvalBatches(dataset, seq_len=SEQ, batch_size=16, max_batches=1000, sharding=sharding)
    assert evals.num_sequences == n and len(evals) == -(-n // 16)
    rows, weights = zip(*[(np.asarray(t), np.asarray(w)) for t, w in evals])
    rows, weights = np.concatenate(rows), np.concatenate(weights)
    assert weights.sum() == n and weights[:n].all() and not weights[n:].any()
    np.testing.assert_array_equal(seq_ids(rows[:n]), np.arange(n))  # every sequence once, in order
    assert not rows[n:].any()
    capped = EvalBatches(dataset, seq_len=SEQ, batch_size=16, max_batches=3, sharding=sharding)
    assert capped.num_sequences == 48 and len(capped) == 3
