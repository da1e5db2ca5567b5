"""Hugging Face interop (trainer/models/hf.py) against transformers' own models (torch on CPU, float32):
our params written as transformers does and loaded with AutoModelForCausalLM give our logits, for both
architectures and several shapes (vocabularies that are not a multiple of 128, rotary fractions, odd
lengths, GPT-2 without biases or with the per-layer attention scale, sharded files, bfloat16); a checkpoint
transformers saved from its own random model loads into ours with its logits; a mismatched config.json is
refused with the fields named. (The whole path through sophia-train and sophia-export: tests/test_export.py.)"""

import dataclasses
import json

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from trainer.models import ModelConfig, init_model
from trainer.models import hf

BASE = ModelConfig(vocab_size=300, seq_len=16, hidden_dim=64, num_layers=2, num_heads=4, compute_dtype="float32")
SHAPES = {  # vocab 300 and 257: not multiples of 128 (padded to 384). NeoX's default rotary 0.25: test_export.py
    "neox-full-rotary-257": dict(arch="neox", vocab_size=257, rotary_pct=1.0, rotary_base=500.0, hidden_dim=48,
                                 num_heads=3, mlp_ratio=2),
    "neox-half-rotary": dict(arch="neox", rotary_pct=0.5, num_layers=3, layer_norm_eps=1e-6),
    "gpt2": dict(arch="gpt2"),
    "gpt2-layer-scale-no-bias-mlp2-257": dict(arch="gpt2", vocab_size=257, scale_attn_by_inverse_layer_idx=True,
                                              bias=False, num_layers=3, mlp_ratio=2, hidden_dim=48, num_heads=6),
}
LENGTHS = (16, 13, 1)  # the whole context, an odd length, one token


def random_model(config: ModelConfig, seed: int = 0):
    """A model of `config` with every leaf perturbed (biases and LayerNorms away from their 0/1 init), so
    that every tensor's placement matters."""
    model = init_model(config, key=jax.random.PRNGKey(seed))
    leaves, treedef = jax.tree.flatten(model)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


@eqx.filter_jit
def _forward(model, tokens: jax.Array) -> jax.Array:
    return model(hax.named(tokens, ("batch", "position"))).rearrange(("batch", "position", "vocab")).array


def our_logits(model, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(tokens, jnp.int32)))[..., : model.config.vocab_size]


def hf_logits(hf_model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def tokens_of(length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (2, length))


def load(directory) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True).eval()


@pytest.mark.parametrize("shape", [pytest.param(s, marks=pytest.mark.slow) if s in ("neox-half-rotary", "gpt2") else s
                                   for s in SHAPES])  # test_export.py runs the default shapes
def test_exported_logits_in_transformers_equal_ours(tmp_path, shape):
    config = dataclasses.replace(BASE, **SHAPES[shape])
    model = random_model(config)
    files = hf.save_pretrained(model, tmp_path, eos_token_id=0)
    assert files == ["model.safetensors"]
    loaded = load(tmp_path)
    assert type(loaded).__name__ == hf.HF_ARCHITECTURES[config.arch][1]
    assert loaded.config.vocab_size == config.vocab_size  # cut from the padded 384
    assert loaded.get_input_embeddings().weight.shape == (config.vocab_size, config.hidden_dim)
    for length in LENGTHS:
        tokens = tokens_of(length, config.vocab_size)
        ours, theirs = our_logits(model, tokens), hf_logits(loaded, tokens)
        assert np.abs(ours).max() > 0.1
        np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_sharded_and_bfloat16_files_load(tmp_path):
    """Past max_shard_size the weights are split with an index transformers follows; bfloat16 files hold
    our params rounded to bfloat16 (the logits of those, computed in float32, agree to 1e-4)."""
    config = dataclasses.replace(BASE, arch="gpt2")
    model = random_model(config)
    files = hf.save_pretrained(model, tmp_path, eos_token_id=0, dtype="bfloat16", max_shard_size="40KB")
    assert len(files) > 2 and (tmp_path / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    loaded = load(tmp_path)
    assert loaded.get_input_embeddings().weight.dtype == torch.bfloat16
    rounded = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), model)
    tokens = tokens_of(13, config.vocab_size)
    np.testing.assert_allclose(hf_logits(loaded.float(), tokens), our_logits(rounded, tokens), atol=1e-4, rtol=0)


def test_to_hf_then_from_hf_is_the_identity():
    """The table read both ways gives back every leaf (the padded vocabulary rows come back as zeros)."""
    for shape in ("neox-half-rotary", "gpt2"):
        config = dataclasses.replace(BASE, **SHAPES[shape])
        model = random_model(config)
        leaves = hf.from_hf(hf.to_hf(model), config)
        assert len(leaves) == len(jax.tree.leaves(model))
        for path, arr in leaves.items():
            leaf = hf._get(model, path)
            assert arr.shape == leaf.array.shape, path
            names = [a.name for a in leaf.axes]
            real = np.asarray(leaf.array)
            if "vocab" in names:
                axis = names.index("vocab")
                np.testing.assert_array_equal(np.take(arr, np.arange(config.vocab_size, 384), axis), 0)
                arr, real = (np.take(a, np.arange(config.vocab_size), axis) for a in (arr, real))
            np.testing.assert_array_equal(arr, real, err_msg=str(path))


def hf_random_checkpoint(directory, arch: str, **overrides) -> torch.nn.Module:
    """A transformers model with random weights (biases and LayerNorms perturbed too), saved as transformers
    saves it: what a downloaded Pythia or GPT-2 directory looks like, built here."""
    torch.manual_seed(0)
    if arch == "neox":
        config = transformers.GPTNeoXConfig(
            vocab_size=390, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                         "partial_rotary_factor": 0.25}, **overrides)
        model = transformers.GPTNeoXForCausalLM(config)
    else:
        config = transformers.GPT2Config(vocab_size=390, n_embd=64, n_layer=2, n_head=4, n_positions=32,
                                         **overrides)
        model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model.eval()


OURS = {"neox": ModelConfig(arch="neox", seq_len=32, hidden_dim=64, num_layers=2, num_heads=4,
                            compute_dtype="float32"),
        "gpt2": ModelConfig(arch="gpt2", seq_len=32, hidden_dim=64, num_layers=2, num_heads=4,
                            compute_dtype="float32")}


@pytest.mark.parametrize("arch", ["neox", "gpt2"])
def test_a_transformers_checkpoint_loads_with_its_logits(tmp_path, arch):
    """transformers' save_pretrained of its own random GPTNeoXForCausalLM (lm_head.weight, 5.x names) or
    GPT2LMHeadModel (tied: no lm_head tensor): check_config takes its vocabulary (390, padded to 512), and
    load_params gives our model its logits."""
    theirs = hf_random_checkpoint(tmp_path, arch)
    config = hf.check_config(OURS[arch], tmp_path)
    assert config.vocab_size == 390 and config.padded_vocab == 512
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "model"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    abstract = jax.eval_shape(lambda: init_model(config, key=jax.random.PRNGKey(0)))
    shardings = jax.tree.map(lambda _: replicated, abstract)
    model = hf.load_params(tmp_path, config, shardings)
    for length in (32, 7):
        tokens = tokens_of(length, 390, seed=length)
        np.testing.assert_allclose(our_logits(model, tokens), hf_logits(theirs, tokens), atol=1e-4, rtol=0)


def test_mismatched_checkpoints_are_refused_with_the_fields_named(tmp_path):
    hf_random_checkpoint(tmp_path / "neox", "neox", use_parallel_residual=False)
    hf_random_checkpoint(tmp_path / "gpt2", "gpt2", activation_function="relu")
    wrong = dataclasses.replace(OURS["neox"], hidden_dim=32, num_layers=3, rotary_pct=0.5, vocab_size=400)
    with pytest.raises(ValueError) as error:
        hf.check_config(wrong, tmp_path / "neox")
    message = str(error.value)
    for part in ("model.hidden_dim=32 but its config.json has hidden_size=64",
                 "model.num_layers=3 but its config.json has num_hidden_layers=2",
                 "model.rotary_pct=0.5 but its config.json has partial_rotary_factor=0.25",
                 "model.vocab_size=400 but its config.json has vocab_size=390",
                 "its config.json has use_parallel_residual=False (only True)"):
        assert part in message, message
    assert "\n" not in message
    with pytest.raises(ValueError, match="holds a gpt2 model but model.arch=neox; set --model.arch gpt2"):
        hf.check_config(OURS["neox"], tmp_path / "gpt2")
    gpt2 = dataclasses.replace(OURS["gpt2"], seq_len=16, scale_attn_by_inverse_layer_idx=True, bias=False)
    with pytest.raises(ValueError) as error:
        hf.check_config(gpt2, tmp_path / "gpt2")
    for part in ("model.seq_len=16 but its config.json has n_positions=32",
                 "model.scale_attn_by_inverse_layer_idx=True but its config.json has scale_attn_by_inverse_layer_idx"
                 "=False", "model.bias=False but its config.json has (GPT-2's biases)=True",
                 "activation_function='relu' (only the tanh GELU, 'gelu_new')"):
        assert part in str(error.value), str(error.value)
    with pytest.raises(ValueError, match="model.mlp_ratio=2 but its config.json has n_inner/n_embd=4.0"):
        hf.check_config(dataclasses.replace(OURS["gpt2"], mlp_ratio=2), tmp_path / "gpt2")
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        hf.check_config(OURS["gpt2"], tmp_path)
    hf_random_checkpoint(tmp_path / "bin-only", "gpt2")
    (tmp_path / "bin-only" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors .* convert a pytorch_model.bin"):
        hf.load_params(tmp_path / "bin-only", hf.check_config(OURS["gpt2"], tmp_path / "bin-only"), None)
