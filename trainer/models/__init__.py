"""The model families a run can train (`model.arch`), one file each, and what is the same for all of them.

    neox.py    GPT-NeoX (rotary, parallel residual, untied head): Pythia, the paper's NeoX runs
    gpt2.py    GPT-2 (learned positions, sequential residual, tied head): the official GPT-2 runs, the seed's
               1.5B levanter run
    common.py  the config, the shared layers (rotary, LayerNorm, GELU, causal attention, the scanned layer
               stack) and the loss
    hf.py      conversion to and from Hugging Face transformers' GPTNeoXForCausalLM / GPT2LMHeadModel

`init_model(config, key=...)` builds the family `config.arch` names; `token_losses`, `loss_fn`,
`logits_fn` and `model.hidden` work on any of them, so the trainer, the Sophia-G estimator and the
checkpoints never branch on the architecture.
"""

from __future__ import annotations

from typing import Union

import jax

from trainer.models import gpt2, neox
from trainer.models.common import (
    ARCHITECTURES,
    PADDED_LOGIT,
    REMAT_POLICIES,
    LanguageModel,
    ModelConfig,
    apply_rotary,
    head_logits,
    logits_fn,
    loss_fn,
    split_tokens,
    token_losses,
)
from trainer.models.gpt2 import GPT2
from trainer.models.neox import GPTNeoX

__all__ = [
    "ARCHITECTURES",
    "GPT2",
    "GPTNeoX",
    "MODELS",
    "PADDED_LOGIT",
    "REMAT_POLICIES",
    "LanguageModel",
    "Model",
    "ModelConfig",
    "apply_rotary",
    "flops_per_token",
    "head_logits",
    "init_model",
    "logits_fn",
    "loss_fn",
    "num_params",
    "split_tokens",
    "token_losses",
]

MODELS = {"neox": GPTNeoX, "gpt2": GPT2}  # model.arch -> its Module
Model = Union[GPTNeoX, GPT2]
_FAMILIES = {"neox": neox, "gpt2": gpt2}


def init_model(config: ModelConfig, *, key: jax.Array) -> Model:
    """A freshly initialised model of the family `config.arch` names, params in `config.param_dtype`."""
    return MODELS[config.arch].init(config, key=key)


def num_params(config: ModelConfig, *, include_embeddings: bool = True) -> int:
    """Closed-form parameter count of `config`'s model (tests check it against the leaves); without the
    embeddings: NeoX's input embedding and head, GPT-2's wte and wpe."""
    return _FAMILIES[config.arch].num_params(config, include_embeddings=include_embeddings)


def flops_per_token(config: ModelConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward): 6*N + 12*L*d*S (PaLM appendix B).

    N counts the matmul params: all but the embedding lookups (gathers), plus the output head's V*d (NeoX's
    own head, GPT-2's tied wte); the second term is the attention scores and weighted sum. Used for MFU;
    the Hessian step is not counted.
    """
    S = config.seq_len if seq_len is None else seq_len
    n_matmul = num_params(config, include_embeddings=False) + config.padded_vocab * config.hidden_dim
    return 6.0 * n_matmul + 12.0 * config.num_layers * config.hidden_dim * S
