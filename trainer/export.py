"""`sophia-export`: a run's checkpoint as a Hugging Face transformers model directory.

    sophia-export RUN_DIR [--step N] --out DIR [--dtype float32|bfloat16] [--max_shard_size 5GB] [--tokenizer PATH]

RUN_DIR is a local or gs:// run directory (its newest complete checkpoint unless --step). The params are
restored with orbax (the optimizer state left on disk) onto this machine's CPU and written in transformers'
layout (trainer/models/hf.py) to DIR:

    config.json, generation_config.json   GPTNeoXForCausalLM or GPT2LMHeadModel, BOS = EOS = the data's EOS
    model.safetensors                     or model-0000i-of-0000n.safetensors + model.safetensors.index.json
                                          past --max_shard_size
    tokenizer.json, tokenizer_config.json the run's tokenizer (its token cache's, or --tokenizer)

so that `transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`
load it offline. The vocabulary is cut to `model.vocab_size` rows (the tokenizer's ids, unless the run set a
larger vocab_size): the rows padded to `vocab_multiple` are never predicted and mean nothing. DIR must be
new or empty; it is written under a temporary name and renamed when complete.

Exit status: 0 on success; 2 on bad input or unreachable storage (one line `sophia-export: ...`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["export", "main", "restore_params"]

DTYPES = ("float32", "bfloat16")


def restore_params(run_dir: str, step: int | None) -> tuple[int, Any, Any]:
    """(step, the TrainConfig saved with it, its params on one CPU device). The checkpoints are listed with
    trainer/checkpoint.py's Checkpointer; the params alone are read with orbax (ocp.PLACEHOLDER leaves, the
    optimizer's m, h and the counters, stay on disk: a third of the memory of the whole state)."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    from trainer import sharding
    from trainer.checkpoint import CheckpointConfig, Checkpointer, CheckpointReadError, read_extras
    from trainer.config import TrainConfig, from_dict
    from trainer.steps import Trainer

    directory = epath.Path(run_dir) / "checkpoints"
    if not directory.exists():  # before orbax, which would create it
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint (no {directory}); pass the run directory "
                                "that sophia-train wrote")
    checkpointer = Checkpointer(directory, CheckpointConfig(async_save=False))
    try:
        steps = checkpointer.steps()
    finally:
        checkpointer.close()
    if not steps:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint (looked in {directory}); pass the run "
                                "directory that sophia-train wrote")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ValueError(f"--step {step}: {run_dir} has checkpoints at steps {', '.join(map(str, steps))}")
    path = checkpointer.directory / str(step)
    config = from_dict(TrainConfig, read_extras(path)["config"])
    trainer = Trainer(config, sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=1, model=1), jax.devices("cpu")[:1]))
    abstract = trainer.abstract_state()
    wanted = abstract._replace(opt_state=jax.tree.map(lambda _: ocp.PLACEHOLDER, abstract.opt_state),
                               step=ocp.PLACEHOLDER, key=ocp.PLACEHOLDER, skipped=ocp.PLACEHOLDER)
    restore_args = jax.tree.map(lambda a: a if a is ocp.PLACEHOLDER else ocp.ArrayRestoreArgs(
        sharding=a.sharding, global_shape=a.shape, dtype=a.dtype), wanted)
    try:
        with ocp.PyTreeCheckpointer() as reader:
            state = reader.restore(path / "state", args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args))
    except Exception as error:
        raise CheckpointReadError(path, error) from error
    return step, config, state.params


def _tokenizer(config: Any, path: str | None) -> tuple[Any, int]:
    """(the run's tokenizer, its EOS id): the token cache's (the EOS the data put between documents), or the
    tokenizer.json at `path` (its EOS found as `sophia-data tokenize` finds it)."""
    import fsspec
    from tokenizers import Tokenizer

    from trainer.data.builder import eos_token_id
    from trainer.data.config import open_dataset

    if path is not None:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            tokenizer = Tokenizer.from_str(f.read())
        return tokenizer, eos_token_id(tokenizer, None)
    dataset = open_dataset(config.data, "train")
    with fsspec.open(dataset.tokenizer_path, "r", encoding="utf-8") as f:
        return Tokenizer.from_str(f.read()), dataset.eos_id


def export(run_dir: str, out: str | os.PathLike, *, step: int | None = None, dtype: str = "float32",
           max_shard_size: str | int = "5GB", tokenizer: str | None = None) -> dict[str, Any]:
    """Writes the checkpoint of `run_dir` at `step` (default: the newest) to `out` as a transformers model
    directory (see the module docstring); returns what it wrote (step, arch, vocab_size, files).

    Raises:
      ValueError, FileNotFoundError: a bad argument, no checkpoint, a non-empty `out`.
      CheckpointReadError, StorageError: the run or its data could not be read.
    """
    from transformers import PreTrainedTokenizerFast

    from trainer.models import hf

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; use {' or '.join(DTYPES)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {str(out)!r} exists and is not an empty directory; pass a new one (nothing "
                         "was written)")
    step, config, params = restore_params(run_dir, step)
    model = params.config
    tok, eos_id = _tokenizer(config, tokenizer)
    if tok.get_vocab_size(with_added_tokens=True) > model.vocab_size:
        raise ValueError(f"the tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids but the model only "
                         f"{model.vocab_size} (model.vocab_size); pass the run's own tokenizer (--tokenizer)")
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        files = hf.save_pretrained(params, staging, eos_token_id=eos_id, dtype=dtype, max_shard_size=max_shard_size)
        eos = tok.id_to_token(eos_id)
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos,
                                model_max_length=model.seq_len).save_pretrained(staging)
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"step": step, "arch": model.arch, "hf_class": hf.HF_ARCHITECTURES[model.arch][1],
            "vocab_size": model.vocab_size, "dtype": dtype, "files": files, "out": str(out)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        print(f"sophia-export: {message}", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sophia-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a sophia-train run directory (local or gs://)")
    parser.add_argument("--step", type=int, default=None, help="the checkpoint step (default: the newest)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the model directory to write (new or empty)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    parser.add_argument("--max_shard_size", default="5GB", help="safetensors files past this size are split")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="a tokenizer.json to write instead of the run's token cache's")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sophia-export`; returns the exit status (2: bad input, named on stderr)."""
    args = _parser().parse_args(argv)
    import jax

    if "JAX_PLATFORMS" not in os.environ:  # the export runs on the host: leave any accelerator to the training
        jax.config.update("jax_platforms", "cpu")
    from trainer import storage
    from trainer.checkpoint import CheckpointReadError

    storage.configure()
    try:
        done = export(args.run_dir, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size,
                      tokenizer=args.tokenizer)
    except (ValueError, FileNotFoundError, CheckpointReadError, storage.StorageError) as error:
        print(f"sophia-export: {error}", file=sys.stderr)
        return 2
    weights = done["files"][0] if len(done["files"]) == 1 else f"{len(done['files'])} safetensors shards"
    print(f"exported step {done['step']} of {args.run_dir} ({done['hf_class']}, vocab {done['vocab_size']}, "
          f"{done['dtype']}) to {done['out']}: config.json, {weights}, tokenizer.json; load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({done['out']!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
