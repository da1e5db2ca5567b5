"""What the end-to-end tests (test_resume, test_gcs) compare between two `sophia-train` runs."""

import jax
import numpy as np

from trainer.checkpoint import CheckpointConfig, Checkpointer


def final_state(run_dir: str, step: int):
    """The train state and extras a run saved at `step` (a local path or gs://), restored as saved."""
    checkpointer = Checkpointer(f"{run_dir}/checkpoints", CheckpointConfig(async_save=False))
    state, extras = checkpointer.restore(step, None)
    checkpointer.close()
    return state, extras


def assert_same_final_state(run_dir: str, reference: str, step: int) -> None:
    """The two runs saved the same state at `step`, bit for bit (params, m, h, counts, key), after reading
    the same data (the loader position)."""
    (state, extras), (ref_state, ref_extras) = final_state(run_dir, step), final_state(reference, step)
    assert extras["loader"] == ref_extras["loader"] == {"step": step, "seed": 0, "global_batch": 8, "seq_len": 32}
    paths = jax.tree_util.tree_flatten_with_path(ref_state)[0]
    assert any("h" in jax.tree_util.keystr(p) for p, _ in paths)  # m, h, count and key are in there
    for (path, ref), leaf in zip(paths, jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref), err_msg=jax.tree_util.keystr(path))
