"""The paper's 1.5B train step and 6.6B Hessian step fit a TPU v3 core: compiled ahead of time for a
v3-128 (benchmarks/tpu_fit.py).

Needs libtpu (`pip install "jax[tpu]"`), not a TPU; skipped without it. ~1 min each and ~3 GB of RAM.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("libtpu", reason='libtpu is not installed (pip install "jax[tpu]")')

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "tpu_fit.py"


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("tpu_fit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tpu_fit", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name, step, mesh_shape", [
    ("neox_1_5b", "train", {"data": 1, "fsdp": 64, "model": 2}),
    ("neox_6_6b", "hessian", {"data": 1, "fsdp": 32, "model": 4}),  # 4 Hessian microbatches
])
def test_paper_steps_fit_a_v3_core(monkeypatch, name, step, mesh_shape):
    # libtpu reads these when the topology first loads it: several pytest-xdist workers may load it,
    # and there is no TPU host to look up.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    tpu_fit = load_script(monkeypatch)
    from trainer.config import load_config
    from trainer.steps import Trainer

    config, _ = load_config(["--config", str(tpu_fit.CONFIGS / f"{name}.yaml"),
                             "--model.vocab_size", str(tpu_fit.NEOX_VOCAB)])
    mesh = tpu_fit.topology_mesh(config, "v3:8x8")
    assert dict(mesh.shape) == mesh_shape
    fit = tpu_fit.compile_step(Trainer(config, mesh), step)
    assert fit.error is None, fit.error
    assert 0 < fit.peak_gib < tpu_fit.V3_HBM_GIB
