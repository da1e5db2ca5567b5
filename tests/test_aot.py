"""sophia-aot (trainer/aot.py): the paper's 1.5B train step and 6.6B Hessian step fit a TPU v3 core when
compiled ahead of time for a v3-128; a step over the memory exits 1; bad arguments exit 2 with one line.

The compiles need libtpu (`pip install -e ".[tpu]"`), not a TPU, and are skipped without it; the paper's
steps take ~2 min each on 2 cores and ~2 GB of RAM (marked slow).
"""

import importlib.util
from pathlib import Path

import pytest

from trainer import aot

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
requires_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                     reason='libtpu is not installed (pip install -e ".[tpu]")')


@pytest.fixture
def libtpu_env(monkeypatch):
    # libtpu reads these when a topology first loads it: pytest-xdist workers may each load it, and
    # this machine is no TPU host.
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")


@pytest.mark.slow
@requires_libtpu
@pytest.mark.parametrize("name, step, mesh_shape", [
    ("neox_1_5b", "train", {"data": 1, "fsdp": 64, "model": 2}),  # fsdp -1: 128 cores / TP 2
    ("neox_6_6b", "hessian", {"data": 1, "fsdp": 32, "model": 4}),  # 4 Hessian microbatches
])
def test_paper_steps_fit_a_v3_core(libtpu_env, name, step, mesh_shape):
    report = aot.check_fit(["--config", str(CONFIGS / f"{name}.yaml")], "v3:8x8", steps=[step])
    assert report.cores == 128
    assert report.mesh == mesh_shape
    [fit] = report.steps
    assert fit.step == step and fit.error is None, fit.error
    assert 0 < fit.peak_gib < aot.V3_HBM_GIB
    assert report.failures() == []


@requires_libtpu
def test_a_step_over_the_memory_exits_1(libtpu_env, capsys):
    # neox_tiny compiles in seconds; no step fits in 1 KiB per core.
    argv = ["--config", str(CONFIGS / "neox_tiny.yaml"), "--topology", "v3:2x2", "--hbm_gib", str(2**-20),
            "--step", "train", "--trainer.global_batch", "32"]
    assert aot.main(argv) == 1
    out, err = capsys.readouterr()
    # 4 x 128 with the NeoX vocab padded to 50432: 2 * 50432 * 128 embedding + head = 0.013B
    assert "params        0.01B" in out and "data 1 x fsdp 8 x model 1" in out  # v3:2x2 = 8 cores
    assert "microbatches  train 1 x 32 sequences" in out
    assert "the train step of neox_tiny peaks at" in err and "over 9.5367431640625e-07 GiB (--hbm_gib)" in err


@requires_libtpu
def test_auto_microbatches_that_the_compiler_refuses_exit_1_with_one_line(libtpu_env, capsys):
    # One sequence of 32k positions per core: naive attention's float32 scores alone are 4 heads x 32768^2
    # x 4 bytes = 16 GiB, over a v3 core's 15.48, so XLA refuses to compile even the smallest microbatch
    # (8 sequences: one per data-parallel core).
    argv = ["--config", str(CONFIGS / "neox_tiny.yaml"), "--topology", "v3:2x2", "--step", "train",
            "--model.attention", "naive", "--model.seq_len", "32768", "--trainer.global_batch", "32",
            "--trainer.microbatches", "auto"]
    assert aot.main(argv) == 1
    err = capsys.readouterr().err
    assert "the train step with microbatches of 8 sequences does not compile: RESOURCE_EXHAUSTED" in err
    assert err.splitlines()[-1] == ("sophia-aot: the train step: even microbatches of 8 sequences need more than "
                                    "the device has, over the 13.93 GiB available; use more devices (FSDP), "
                                    "model.remat full, a model.loss_chunk, or a shorter sequence")
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--config", "configs/neox_1_5b.yaml", "--topology", "v3-128"],
     "sophia-aot: --topology v3-128 is a slice name; its topology is v3:8x8"),
    (["--config", "configs/neox_1_5b.yaml", "--topology", "8x8"], "sophia-aot: --topology '8x8' is not a topology"),
    (["--config", "configs/neox_1_5b.yaml", "--topology", "v3:8x8", "--optimizer.rhoo", "1"],
     "sophia-aot: unknown config key(s): optimizer.rhoo."),
    (["--config", "no/such.yaml", "--topology", "v3:8x8"], "sophia-aot: config file 'no/such.yaml' not found"),
    (["--topology", "v3:8x8"], "sophia-aot: the following arguments are required: --config"),
])
def test_bad_arguments_exit_2_with_one_line(monkeypatch, capsys, argv, message):
    monkeypatch.chdir(CONFIGS.parent)
    with pytest.raises(SystemExit) as exit_:
        aot.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
