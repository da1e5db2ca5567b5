"""Hugging Face transformers interop: this project's GPT-NeoX and GPT-2 to and from transformers'
`GPTNeoXForCausalLM` and `GPT2LMHeadModel` (their config.json and safetensors state dict).

One table per architecture (`_tensors`) pairs every HF tensor with one leaf of ours and says how the HF
dimensions group our named axes, e.g. GPT-NeoX's fused `query_key_value.weight` [3 d, d] is
[(heads, qkv, head_size), (embed)] (laid out per head) and GPT-2's Conv1D `c_attn.weight` [d, 3 d] is
[(embed), (qkv, heads, head_size)] (q, k, v each contiguous). Both directions read the same table, so
`from_hf(to_hf(params))` is the identity by construction (tests/test_hf_export.py checks it against
transformers' own forward pass). The per-layer HF tensors are stacked on our `layers` axis. The vocabulary
is cut to `vocab_size` rows on the way out (the rows padded to `vocab_multiple` mean nothing) and padded
with zero rows on the way in.

Reading a checkpoint needs only json, transformers' `AutoConfig` and safetensors; nothing here imports
torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import equinox as eqx
import haliax as hax
import jax
import jax.numpy as jnp
import numpy as np

from trainer.models import Model, ModelConfig, init_model

__all__ = ["HF_ARCHITECTURES", "check_config", "from_hf", "hf_config", "load_params", "read_config", "save_pretrained",
           "to_hf"]

# model.arch -> (HF model_type, the transformers class that loads it)
HF_ARCHITECTURES = {"neox": ("gpt_neox", "GPTNeoXForCausalLM"), "gpt2": ("gpt2", "GPT2LMHeadModel")}


class _Tensor(NamedTuple):
    hf: str  # the HF name; "{i}" stands for the layer index of a per-layer tensor
    leaf: tuple[str, ...]  # attribute path of our leaf (a NamedArray; None when model.bias is false)
    dims: tuple[tuple[str, ...], ...]  # the HF dims, each a group of our axes flattened in this order


def _tensors(config: ModelConfig) -> list[_Tensor]:
    """The table of `config.arch`: every HF tensor and the leaf it is."""
    E, V, M, P, HQK = ("embed",), ("vocab",), ("mlp",), ("position",), ("heads", "qkv", "head_size")
    layer_norms = lambda hf, ours: [_Tensor(f"{hf}.weight", ours + ("weight",), (E,)),  # noqa: E731
                                    _Tensor(f"{hf}.bias", ours + ("bias",), (E,))]
    block = ("layers", "stacked")
    if config.arch == "neox":
        h = "gpt_neox.layers.{i}"
        return [
            _Tensor("gpt_neox.embed_in.weight", ("embed", "weight"), (V, E)),
            *layer_norms(f"{h}.input_layernorm", block + ("ln1",)),
            *layer_norms(f"{h}.post_attention_layernorm", block + ("ln2",)),
            _Tensor(f"{h}.attention.query_key_value.weight", block + ("attn", "qkv", "weight"), (HQK, E)),
            _Tensor(f"{h}.attention.query_key_value.bias", block + ("attn", "qkv", "bias"), (HQK,)),
            _Tensor(f"{h}.attention.dense.weight", block + ("attn", "out", "weight"), (E, ("heads", "head_size"))),
            _Tensor(f"{h}.attention.dense.bias", block + ("attn", "out", "bias"), (E,)),
            _Tensor(f"{h}.mlp.dense_h_to_4h.weight", block + ("mlp", "up", "weight"), (M, E)),
            _Tensor(f"{h}.mlp.dense_h_to_4h.bias", block + ("mlp", "up", "bias"), (M,)),
            _Tensor(f"{h}.mlp.dense_4h_to_h.weight", block + ("mlp", "down", "weight"), (E, M)),
            _Tensor(f"{h}.mlp.dense_4h_to_h.bias", block + ("mlp", "down", "bias"), (E,)),
            *layer_norms("gpt_neox.final_layer_norm", ("ln_f",)),
            # transformers 4.x, vLLM and Pythia's files name the head embed_out; 5.x renames it lm_head on load.
            _Tensor("embed_out.weight", ("head", "weight"), (V, E)),
        ]
    h = "transformer.h.{i}"  # GPT-2's linear layers are Conv1D: [in, out]
    return [
        _Tensor("transformer.wte.weight", ("embed", "weight"), (V, E)),
        _Tensor("transformer.wpe.weight", ("pos_embed", "weight"), (P, E)),
        *layer_norms(f"{h}.ln_1", block + ("ln1",)),
        _Tensor(f"{h}.attn.c_attn.weight", block + ("attn", "qkv", "weight"), (E, ("qkv", "heads", "head_size"))),
        _Tensor(f"{h}.attn.c_attn.bias", block + ("attn", "qkv", "bias"), (("qkv", "heads", "head_size"),)),
        _Tensor(f"{h}.attn.c_proj.weight", block + ("attn", "out", "weight"), (("heads", "head_size"), E)),
        _Tensor(f"{h}.attn.c_proj.bias", block + ("attn", "out", "bias"), (E,)),
        *layer_norms(f"{h}.ln_2", block + ("ln2",)),
        _Tensor(f"{h}.mlp.c_fc.weight", block + ("mlp", "up", "weight"), (E, M)),
        _Tensor(f"{h}.mlp.c_fc.bias", block + ("mlp", "up", "bias"), (M,)),
        _Tensor(f"{h}.mlp.c_proj.weight", block + ("mlp", "down", "weight"), (M, E)),
        _Tensor(f"{h}.mlp.c_proj.bias", block + ("mlp", "down", "bias"), (E,)),
        *layer_norms("transformer.ln_f", ("ln_f",)),
    ]


def _sizes(config: ModelConfig, vocab: int) -> dict[str, int]:
    return {"embed": config.hidden_dim, "heads": config.num_heads, "head_size": config.head_size, "qkv": 3,
            "mlp": config.hidden_dim * config.mlp_ratio, "position": config.seq_len, "vocab": vocab,
            "layers": config.num_layers}


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    return functools.reduce(getattr, path, tree)


def _layered(t: _Tensor) -> bool:
    return "{i}" in t.hf


# ------------------------------------------------------------------------------------------ ours -> HF
def to_hf(params: Model, vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """The HF state dict (float32 NumPy arrays, HF names) of `params`, its vocabulary cut to `vocab_size`
    rows (default: `config.vocab_size`, the ids the model was trained on). With model.bias false the GPT-2
    biases are written as zeros (HF's GPT-2 always has them)."""
    config = params.config
    vocab = config.vocab_size if vocab_size is None else vocab_size
    sizes, out = _sizes(config, vocab), {}
    for t in _tensors(config):
        axes = (("layers",) if _layered(t) else ()) + sum(t.dims, ())
        leaf = _get(params, t.leaf)
        if leaf is None:
            arr = np.zeros([sizes[a] for a in axes], np.float32)
        else:
            arr = np.asarray(jax.device_get(leaf.rearrange(axes).array), np.float32)
            if "vocab" in axes:
                arr = np.take(arr, np.arange(vocab), axis=axes.index("vocab"))
        lead = arr.shape[:1] if _layered(t) else ()
        arr = arr.reshape(lead + tuple(int(np.prod([sizes[a] for a in dim])) for dim in t.dims))
        if _layered(t):
            out.update({t.hf.format(i=i): arr[i] for i in range(config.num_layers)})
        else:
            out[t.hf] = arr
    return out


def hf_config(config: ModelConfig, vocab_size: int, *, eos_token_id: int, dtype: str = "float32") -> Any:
    """The transformers config (GPTNeoXConfig or GPT2Config) of `config` with `vocab_size` ids; BOS and EOS
    are both `eos_token_id` (the token the data puts between documents), dropout 0 as trained."""
    import transformers

    common = dict(vocab_size=vocab_size, bos_token_id=eos_token_id, eos_token_id=eos_token_id, dtype=dtype,
                  architectures=[HF_ARCHITECTURES[config.arch][1]])
    if config.arch == "neox":
        rope = {"rope_type": "default", "rope_theta": config.rotary_base, "partial_rotary_factor": config.rotary_pct}
        return transformers.GPTNeoXConfig(
            hidden_size=config.hidden_dim, num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            intermediate_size=config.hidden_dim * config.mlp_ratio, hidden_act="gelu",
            max_position_embeddings=config.seq_len, layer_norm_eps=config.layer_norm_eps, use_parallel_residual=True,
            tie_word_embeddings=False, attention_bias=True, rope_parameters=rope, hidden_dropout=0.0,
            attention_dropout=0.0, **common)
    return transformers.GPT2Config(
        n_embd=config.hidden_dim, n_layer=config.num_layers, n_head=config.num_heads,
        n_inner=config.hidden_dim * config.mlp_ratio, n_positions=config.seq_len, activation_function="gelu_new",
        layer_norm_epsilon=config.layer_norm_eps,
        scale_attn_by_inverse_layer_idx=config.scale_attn_by_inverse_layer_idx,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True, **common)


def save_pretrained(params: Model, directory: str | Path, *, eos_token_id: int, dtype: str = "float32",
                    max_shard_size: str | int = "5GB") -> list[str]:
    """Writes `params` to `directory` as transformers does: config.json, generation_config.json and the
    weights in `dtype` ("float32" or "bfloat16") as model.safetensors, or past `max_shard_size` as
    model-0000i-of-0000n.safetensors with model.safetensors.index.json (huggingface_hub's split). The
    vocabulary is cut to `config.vocab_size`. Returns the weight files' names."""
    import ml_dtypes
    from huggingface_hub import constants, split_state_dict_into_shards_factory
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    directory = Path(directory)
    config = params.config
    cast = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    state_dict = {name: np.ascontiguousarray(a.astype(cast)) for name, a in to_hf(params).items()}
    hf = hf_config(config, config.vocab_size, eos_token_id=eos_token_id, dtype=dtype)
    hf.save_pretrained(directory)
    GenerationConfig.from_model_config(hf).save_pretrained(directory)
    split = split_state_dict_into_shards_factory(
        state_dict, get_storage_size=lambda a: a.nbytes, max_shard_size=max_shard_size,
        filename_pattern=constants.SAFETENSORS_WEIGHTS_FILE_PATTERN)
    for filename, names in split.filename_to_tensors.items():
        save_file({name: state_dict[name] for name in names}, str(directory / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": sum(a.nbytes for a in state_dict.values())},
                 "weight_map": split.tensor_to_filename}
        (directory / constants.SAFETENSORS_INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


# ------------------------------------------------------------------------------------------ HF -> ours
def read_config(directory: str | Path) -> Any:
    """transformers' config of a local checkpoint directory (its config.json, HF's defaults filled in)."""
    from transformers import AutoConfig

    path = Path(directory)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.init_from {str(directory)!r} holds no config.json; pass a local directory "
                                "saved by transformers' save_pretrained (e.g. a downloaded Pythia or GPT-2)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def _expected(config: ModelConfig, hf: Any) -> list[tuple[str, Any, str, Any]]:
    """(our field, our value, the HF field, its value) pairs that must agree, for `hf`'s model type."""
    if hf.model_type == "gpt_neox":
        rope = hf.rope_parameters or {}
        return [("hidden_dim", config.hidden_dim, "hidden_size", hf.hidden_size),
                ("num_layers", config.num_layers, "num_hidden_layers", hf.num_hidden_layers),
                ("num_heads", config.num_heads, "num_attention_heads", hf.num_attention_heads),
                ("mlp_ratio", config.mlp_ratio, "intermediate_size/hidden_size", hf.intermediate_size / hf.hidden_size),
                ("rotary_pct", config.rotary_pct, "partial_rotary_factor", rope.get("partial_rotary_factor")),
                ("rotary_base", config.rotary_base, "rope_theta", rope.get("rope_theta")),
                ("layer_norm_eps", config.layer_norm_eps, "layer_norm_eps", hf.layer_norm_eps)]
    return [("hidden_dim", config.hidden_dim, "n_embd", hf.n_embd),
            ("num_layers", config.num_layers, "n_layer", hf.n_layer),
            ("num_heads", config.num_heads, "n_head", hf.n_head),
            ("mlp_ratio", config.mlp_ratio, "n_inner/n_embd", (hf.n_inner or 4 * hf.n_embd) / hf.n_embd),
            ("seq_len", config.seq_len, "n_positions", hf.n_positions),
            ("layer_norm_eps", config.layer_norm_eps, "layer_norm_epsilon", hf.layer_norm_epsilon),
            ("scale_attn_by_inverse_layer_idx", config.scale_attn_by_inverse_layer_idx,
             "scale_attn_by_inverse_layer_idx", hf.scale_attn_by_inverse_layer_idx),
            ("bias", config.bias, "(GPT-2's biases)", True)]


def _unsupported(hf: Any) -> list[str]:
    """The features of `hf` that neither of this project's models has."""
    if hf.model_type == "gpt_neox":
        wanted = {"use_parallel_residual": True, "hidden_act": "gelu", "tie_word_embeddings": False,
                  "attention_bias": True}
        rope_type = (hf.rope_parameters or {}).get("rope_type", "default")
        found = [] if rope_type == "default" else [f"rope_type={rope_type!r} (only 'default' rotary)"]
    else:
        wanted = {"scale_attn_weights": True, "tie_word_embeddings": True, "add_cross_attention": False}
        found = [] if hf.activation_function in ("gelu_new", "gelu_pytorch_tanh") else [
            f"activation_function={hf.activation_function!r} (only the tanh GELU, 'gelu_new')"]
    return found + [f"{k}={getattr(hf, k)!r} (only {v!r})" for k, v in wanted.items() if getattr(hf, k) != v]


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, (int, float)) and np.isclose(a, b, rtol=1e-6))


def check_config(config: ModelConfig, directory: str | Path) -> ModelConfig:
    """`config` checked against the HF checkpoint in `directory` (its architecture, shape and numerics),
    with `vocab_size` taken from it when unset. Raises ValueError naming every field that differs."""
    hf = read_config(directory)
    types = {hf_type: arch for arch, (hf_type, _) in HF_ARCHITECTURES.items()}
    where = f"model.init_from {str(directory)!r}"
    if hf.model_type not in types:
        raise ValueError(f"{where} holds a {hf.model_type!r} model; a run can start from "
                         f"{' or '.join(f'{t} ({c})' for t, c in HF_ARCHITECTURES.values())} checkpoints")
    if types[hf.model_type] != config.arch:
        raise ValueError(f"{where} holds a {hf.model_type} model but model.arch={config.arch}; set --model.arch "
                         f"{types[hf.model_type]} (and the shape of its config.json)")
    problems = [f"model.{ours}={mine!r} but its config.json has {theirs}={value!r}"
                for ours, mine, theirs, value in _expected(config, hf) if not _same(mine, value)]
    if config.vocab_size is not None and config.vocab_size != hf.vocab_size:
        problems.append(f"model.vocab_size={config.vocab_size} but its config.json has vocab_size={hf.vocab_size} "
                        "(leave model.vocab_size null to take it)")
    problems += [f"its config.json has {feature}" for feature in _unsupported(hf)]
    if problems:
        raise ValueError(f"{where} does not match this run's model: {'; '.join(problems)}. Set the model fields "
                         "to the checkpoint's (configs/ has matching ones) or start from another checkpoint")
    return config if config.vocab_size is not None else dataclasses.replace(config, vocab_size=hf.vocab_size)


class _SafetensorsDir(Mapping):
    """The tensors of a checkpoint directory's model.safetensors (or its sharded index), read on access."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self._open, index = safe_open, directory / "model.safetensors.index.json"
        if index.is_file():
            self._files = {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (directory / "model.safetensors").is_file():
            with safe_open(directory / "model.safetensors", framework="numpy") as f:
                self._files = {name: directory / "model.safetensors" for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"model.init_from {str(directory)!r} holds no model.safetensors (or model.safetensors.index.json);"
                " convert a pytorch_model.bin with transformers: AutoModelForCausalLM.from_pretrained(DIR)"
                ".save_pretrained(DIR)")

    def __getitem__(self, name: str) -> np.ndarray:
        with self._open(self._files[name], framework="numpy") as f:
            return f.get_tensor(name)

    def __contains__(self, name: object) -> bool:  # without reading the tensor (Mapping's would)
        return name in self._files

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


def _aliases(name: str) -> list[str]:
    """`name` and its spellings in checkpoints written by other code: NeoX's head is lm_head in transformers
    5.x files; GPT2Model files (the original gpt2) have no `transformer.` prefix."""
    if name == "embed_out.weight":
        return [name, "lm_head.weight"]
    if name.startswith("transformer."):
        return [name, name[len("transformer."):]]
    return [name]


def from_hf(tensors: Mapping[str, np.ndarray], config: ModelConfig) -> dict[tuple[str, ...], np.ndarray]:
    """Our leaves from an HF state dict: float32 NumPy arrays in each leaf's own axis order, keyed by
    attribute path, the vocabulary padded with zero rows to `config.padded_vocab`."""
    abstract = jax.eval_shape(lambda: init_model(config, key=jax.random.PRNGKey(0)))
    sizes, leaves = _sizes(config, config.vocab_size), {}

    def tensor(name: str) -> np.ndarray:
        found = [n for n in _aliases(name) if n in tensors]
        if not found:
            raise ValueError(f"the checkpoint has no tensor {name!r} (it has {len(tensors)} others); is it a "
                             "complete checkpoint of this architecture?")
        return np.asarray(tensors[found[0]], np.float32)

    for t in _tensors(config):
        leaf = _get(abstract, t.leaf)
        if leaf is None:  # GPT-2 without biases: check_config refuses HF checkpoints for it
            continue
        axes = (("layers",) if _layered(t) else ()) + sum(t.dims, ())
        if _layered(t):
            arr = np.stack([tensor(t.hf.format(i=i)) for i in range(config.num_layers)])
        else:
            arr = tensor(t.hf)
        arr = arr.reshape([sizes[a] for a in axes])
        if "vocab" in axes:
            pad = [(0, 0)] * arr.ndim
            pad[axes.index("vocab")] = (0, config.padded_vocab - config.vocab_size)
            arr = np.pad(arr, pad)
        leaves[t.leaf] = np.transpose(arr, [axes.index(a.name) for a in leaf.axes])
    return leaves


def load_params(directory: str | Path, config: ModelConfig, shardings: Any) -> Model:
    """The params of a run that starts from the HF checkpoint in `directory` (checked with `check_config`
    first), in `config.param_dtype` and laid out as `shardings` (the train state's params shardings): every
    process reads the files and places its own shards."""
    leaves = from_hf(_SafetensorsDir(Path(directory)), config)
    model = jax.eval_shape(lambda: init_model(config, key=jax.random.PRNGKey(0)))
    dtype = jnp.dtype(config.param_dtype)

    def place(path: tuple[str, ...]) -> hax.NamedArray:
        abstract, sharding = _get(model, path), _get(shardings, path)
        sharding = sharding.array if isinstance(sharding, hax.NamedArray) else sharding
        host = leaves[path].astype(dtype)
        return hax.NamedArray(jax.make_array_from_callback(host.shape, sharding, lambda index: host[index]),
                              abstract.axes)

    paths = list(leaves)
    return eqx.tree_at(lambda m: [_get(m, p) for p in paths], model, [place(p) for p in paths])
