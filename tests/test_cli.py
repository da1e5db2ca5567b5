"""What a user of the command lines meets: every failure is one line `sophia-train: ...` (sophia-plot,
sophia-aot) with exit status 2 and no traceback - YAML errors with the file and line, run directories that
cannot be written, every checkpoint damaged (without asyncio's tracebacks after it) -; Ctrl-C on the
default run prints the command that resumes it; without a terminal the progress is one line per logged
step; --version, --help's types and a mistyped --help."""

import fcntl
import importlib.util
import json
import os
import pty
import re
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from trainer import aot, plot
from trainer.checkpoint import Checkpointer
from trainer.train import main

ROOT = Path(__file__).resolve().parents[1]
# A run of seconds: 4 steps, the Hessian refreshed on steps 2 and 4, checkpoints at 2 and 4. The Hessian
# batch is the whole batch of 8, which splits over any of 1 to 8 devices.
TINY = ["--trainer.num_train_steps", "4", "--trainer.log_every", "1", "--trainer.eval_every", "2",
        "--trainer.eval_batches", "1", "--trainer.global_batch", "8", "--model.hidden_dim", "32",
        "--model.num_layers", "2", "--model.num_heads", "4", "--model.seq_len", "32",
        "--optimizer.update_interval", "2", "--optimizer.hessian_batch_fraction", "1.0",
        "--checkpoint.every_steps", "2", "--checkpoint.every_minutes", "null",
        "--data.embedded.max_bytes", "300000", "--data.embedded.vocab_size", "384"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    out.update(JAX_PLATFORMS="cpu", WANDB_MODE="disabled", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return out


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "trainer.train", *args]


def assert_one_line(stderr: str, prefix: str = "sophia-train: ") -> str:
    """stderr is exactly one line starting with `prefix` (no traceback); returns it."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, corpus) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (trained in this process, 8 devices)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main([*TINY, "--data.embedded_dir", str(corpus), "--trainer.progress", "false",
                 "--run_dir", str(run_dir)]) == 0
    assert Checkpointer(run_dir / "checkpoints").steps() == [2, 4]
    return run_dir


# ------------------------------------------------------------------------------------------ YAML
@pytest.mark.parametrize("files, config, message", [
    ({"bad.yaml": "model:\n  seq_len: 128\n  hidden_dim: [1, 2\n"}, "bad.yaml",
     "bad.yaml is not valid YAML: line 4, column 1: expected ',' or ']', but got '<stream end>' (while parsing a "
     "flow sequence that starts on line 3)"),
    ({"bad.yaml": "seed: 1\n  model: {\n", "sub/top.yaml": "base: ../bad.yaml\nseed: 2\n"}, "sub/top.yaml",
     "bad.yaml (the base: of sub/top.yaml) is not valid YAML: line 2, column 8: mapping values are not allowed here"),
    ({"top.yaml": "base: missing.yaml\n"}, "top.yaml",
     "top.yaml: its base: missing.yaml was not found (a relative base: is read next to the file that names it)"),
    ({"top.yaml": "base: [a.yaml]\n"}, "top.yaml", "top.yaml: base: must name a YAML file, got ['a.yaml']"),
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "a.yaml",
     "b.yaml (the base: of a.yaml): base: a.yaml makes a cycle (a.yaml -> b.yaml -> a.yaml)"),
])
def test_yaml_errors_name_the_file_and_line_in_one_line(tmp_path, monkeypatch, capsys, files, config, message):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["--config", config]) == 2
    assert assert_one_line(capsys.readouterr().err).startswith(f"sophia-train: {message}")


def test_a_relative_base_is_read_next_to_the_file_naming_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs" / "sub").mkdir(parents=True)
    (tmp_path / "configs" / "base.yaml").write_text("seed: 7\ntrainer:\n  global_batch: 24\n")
    (tmp_path / "configs" / "sub" / "run.yaml").write_text("base: ../base.yaml\nseed: 8\n")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # not where either file is
    assert main(["--config", "../configs/sub/run.yaml", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--seed INT  (now: 8)" in out and "--trainer.global_batch INT  (now: 24)" in out


# ------------------------------------------------------------------------------------------ flags
def test_version_and_a_mistyped_help(capsys):
    assert main(["--version"]) == 0
    assert re.fullmatch(r"sophia-train \S+ \(jax \S+, optax \S+, haliax \S+, orbax-checkpoint \S+\)\n",
                        capsys.readouterr().out)
    assert main(["--hepl"]) == 2
    assert assert_one_line(capsys.readouterr().err) == (
        "sophia-train: unknown option --hepl; did you mean --help? (sophia-train --help lists the options and keys)")
    assert main(["--trainer.global_batch"]) == 2
    assert "--trainer.global_batch needs a value" in assert_one_line(capsys.readouterr().err)
    assert main(["--trainer.microbatches", "autp"]) == 2
    assert assert_one_line(capsys.readouterr().err) == (
        "sophia-train: trainer.microbatches='autp': expected an integer or 'auto'")


def test_help_types_the_microbatch_counts_as_int_or_auto(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--trainer.microbatches INT|auto  (now: 1)" in out
    assert "--optimizer.hessian_microbatches INT|auto  (now: 1)" in out
    assert "--trainer.eval_batch_size INT|null" in out and "--optimizer.max_grad_norm FLOAT|null" in out


# ------------------------------------------------------------------------------ run directories
def unprivileged(tmp_path: Path) -> list[str]:
    """A command prefix under which file permissions apply: nothing for a normal user; for root (as in CI
    containers, where chmod stops nothing) setpriv without the capabilities that override them. Skips
    when there is no such way here."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to apply")
    prefix = [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]
    probe = tmp_path / "probe"
    probe.mkdir()
    probe.chmod(0o555)
    if subprocess.run([*prefix, "sh", "-c", f"touch {probe}/x"], capture_output=True).returncode == 0:
        pytest.skip("root can write into a read-only directory even without its capabilities here")
    return prefix


def test_a_run_dir_under_a_regular_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["--run_dir", str(tmp_path / "a-file" / "run")]) == 2
    line = assert_one_line(capsys.readouterr().err)
    assert line.startswith(f"sophia-train: cannot write to the run directory {tmp_path}/a-file/run "
                           "(NotADirectoryError: [Errno 20] Not a directory")
    assert line.endswith("pass a --run_dir you can write to, or fix its permissions; nothing was changed")


def test_a_run_dir_in_a_read_only_parent_is_one_line(tmp_path, env):
    prefix = unprivileged(tmp_path)
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    result = subprocess.run([*prefix, *train_command("--run_dir", str(parent / "run"))], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "cannot write to the run directory" in assert_one_line(result.stderr)
    assert "Permission denied" in result.stderr and list(parent.iterdir()) == []


def test_resuming_in_a_read_only_run_dir_is_one_line_and_changes_nothing(tmp_path, finished_run, corpus, env):
    prefix = unprivileged(tmp_path)
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    command = train_command(*TINY, "--data.embedded_dir", str(corpus), "--trainer.num_train_steps", "6",
                            "--run_dir", str(run_dir))
    result = subprocess.run([*prefix, *command], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    line = assert_one_line(result.stderr)
    assert f"cannot write to the run directory {run_dir}" in line and "Permission denied" in line
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


def test_a_refused_resume_lists_the_changed_fields_in_one_line(tmp_path, finished_run, corpus, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert main([*TINY, "--data.embedded_dir", str(corpus), "--run_dir", str(run_dir), "--model.hidden_dim", "64",
                 "--seed", "3"]) == 2
    assert assert_one_line(capsys.readouterr().err) == (
        "sophia-train: cannot resume: the config changed fields that shape the train state: model.hidden_dim: "
        "checkpoint has 32, this run has 64; seed: checkpoint has 0, this run has 3; restore the old values, or "
        "start a fresh run in another --run_dir")



def test_a_resume_into_another_architecture_is_refused_by_name(tmp_path, finished_run, corpus, capsys):
    """model.arch and model.bias shape the saved state (GPT-2 has other leaves than GPT-NeoX): refused by name,
    not left to fail inside orbax."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    assert main([*TINY, "--data.embedded_dir", str(corpus), "--run_dir", str(run_dir), "--model.arch", "gpt2",
                 "--model.bias", "false"]) == 2
    line = assert_one_line(capsys.readouterr().err)
    assert "cannot resume" in line and "model.arch: checkpoint has 'neox', this run has 'gpt2'" in line
    assert "model.bias: checkpoint has True, this run has False" in line

# ------------------------------------------------------------------------------ damaged checkpoints
def test_every_checkpoint_damaged_gives_readable_warnings_and_one_line(tmp_path, finished_run, corpus, env):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    for path in (run_dir / "checkpoints").rglob("ocdbt.process_0/d/*"):
        path.write_bytes(b"\0" * 7)  # torn array data in both checkpoints
    command = train_command(*TINY, "--data.embedded_dir", str(corpus), "--trainer.num_train_steps", "6",
                            "--run_dir", str(run_dir))
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr[-5000:]  # no asyncio tracebacks after the error
    for line, step in zip(lines, (4, 2)):
        assert re.fullmatch(rf"\S+ trainer\.checkpoint: checkpoint {run_dir}/checkpoints/{step} is damaged "
                            r"\(OUT_OF_RANGE: Error reading \"[^\"]+\" in OCDBT database at local file .*\); "
                            r"trying the one before it", line), line
        assert "pybind11" not in line and "bound method" not in line
    assert lines[2] == (f"sophia-train: none of the checkpoints in {run_dir}/checkpoints (2, 4) could be restored "
                        "(see the warnings above); move them away or use another --run_dir")


class Fifo:
    """A named pipe in place of a file: a read of it blocks until `serve` starts giving every reader
    `content` (each open gets it whole, then end of file) from `after` seconds on."""

    def __init__(self, path: Path, content: bytes, after: float):
        self.path, self.content, self.after = path, content, after
        self.first_served: float | None = None
        self._stop = threading.Event()
        path.unlink()
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "Fifo":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _serve(self) -> None:
        time.sleep(self.after)
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while nobody reads it
            except OSError:
                time.sleep(0.02)
                continue
            try:
                os.set_blocking(fd, True)
                os.write(fd, self.content)
            except BrokenPipeError:
                pass
            finally:
                os.close(fd)
            if self.first_served is None:
                self.first_served = time.monotonic()


def test_a_failed_restore_leaves_no_read_behind(tmp_path, finished_run, capfd):
    """The source of the asyncio tracebacks: orbax restores in an event loop that it closes as soon as one
    read fails, under the reads still in flight. Here the two data files of a checkpoint are pipes: every
    read of them waits; after 2 s one gives torn data (the checkpoint is damaged, the restore fails), after
    4 s the other answers too. The restore must not return before that last read has ended."""
    directory = tmp_path / "checkpoints"
    shutil.copytree(finished_run / "checkpoints" / "4", directory / "4")
    data = sorted((directory / "4" / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    slow, torn = data[-1], data[-2]
    with Fifo(torn, b"\0" * 7, after=2.0), Fifo(slow, slow.read_bytes(), after=4.0) as last:
        assert Checkpointer(directory).restore_latest(None) is None  # damaged: nothing restores
        returned = time.monotonic()
    assert last.first_served is not None and last.first_served < returned, \
        "the restore returned while a read was still pending"
    time.sleep(0.5)  # a read left behind would wake up on a closed loop now
    err = capfd.readouterr().err
    assert "Event loop is closed" not in err and "Exception ignored" not in err


# ------------------------------------------------------------------------------ Ctrl-C, logs, final line
def read_until(process: subprocess.Popen, marker: str, seen: list[str]) -> None:
    for line in process.stderr:
        seen.append(line)
        if marker in line:
            return
    raise AssertionError(f"{marker!r} never came: {''.join(seen)[-3000:]}")


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_ctrl_c_on_the_default_run_prints_the_command_that_resumes_it(tmp_path, corpus, env):
    """No --run_dir: the run goes to runs/neox_tiny-<time>. Ctrl-C while the first step compiles saves step 1
    and prints the exact resume command; that command finishes the run from step 1. Without a terminal the
    progress is one plain line per logged step."""
    args = [*TINY, "--data.embedded_dir", str(corpus)]
    process = subprocess.Popen(train_command(*args), env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    read_until(process, "compiling the train step", seen)
    process.send_signal(signal.SIGINT)
    seen += process.stderr.read().splitlines(keepends=True)
    assert process.wait(timeout=300) == 0, "".join(seen)
    [run_dir] = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("neox_tiny-")
    stderr = "".join(seen)
    assert f"SIGINT received: saved step 1 to {run_dir}/checkpoints; exiting" in stderr
    command = re.search(r"stopped in [\d.]+ s: step 1, train/loss [\d.]+; to resume: (.*)", stderr).group(1)
    assert shlex.split(command) == ["sophia-train", *args, "--run_dir", str(run_dir)]

    resumed = subprocess.run(train_command(*shlex.split(command)[1:]), env=env, cwd=tmp_path, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    lines = resumed.stderr.splitlines()
    assert "\r" not in resumed.stderr and f"resuming from {run_dir}/checkpoints/1" in resumed.stderr
    assert [int(m) for line in lines for m in re.findall(r" step (\d)/4: loss [\d.]+", line)] == [2, 3, 4]
    assert any(re.search(r" step 4/4: loss [\d.]+, eval [\d.]+, win [\d.]+, tok/s [\d.e+]+, lr [\d.e-]+$", line)
               for line in lines)
    compiling = next(i for i, line in enumerate(lines) if "compiling the train step (step 2 waits for it;" in line)
    assert compiling < next(i for i, line in enumerate(lines) if "step 2/4" in line)
    assert re.search(rf"done in [\d.]+ s: step 4, train/loss [\d.]+, eval/loss [\d.]+; metrics.jsonl and "
                     rf"checkpoints/ in {run_dir}$", lines[-1]), lines[-1]
    assert "process 0 of 1" not in resumed.stderr and "digest" not in resumed.stderr
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow  # minutes on 2 cores: `python -m pytest -q -m slow`
def test_ctrl_c_before_the_first_step_is_one_line_and_leaves_no_half_built_corpus(tmp_path, env):
    corpus = tmp_path / "corpus"
    process = subprocess.Popen(train_command(*TINY, "--data.embedded_dir", str(corpus), "--run_dir",
                                             str(tmp_path / "run")), env=env, stderr=subprocess.PIPE, text=True)
    seen: list[str] = []
    read_until(process, "building the embedded corpus", seen)
    process.send_signal(signal.SIGINT)
    rest = process.stderr.read()
    assert process.wait(timeout=300) == 130, rest
    assert assert_one_line(rest) == "sophia-train: interrupted before the first step; nothing was saved"
    assert not corpus.exists() or list(corpus.iterdir()) == []  # no finished cache, no staging directory


def test_progress_on_a_terminal_is_a_bar():
    """The other side of the plain lines: on a terminal (a pty here) tqdm redraws one bar."""
    from trainer.metrics import Progress

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    with os.fdopen(slave, "w") as terminal:
        progress = Progress(total_steps=3, stream=terminal)
        for step in (1, 2, 3):
            progress.advance()
            progress.show({"step": step, "train/loss": 1.0 / step})
        progress.close()
    output = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the terminal's other end is closed
            break
        if not chunk:
            break
        output += chunk
    os.close(master)
    text = output.decode()
    assert "\r" in text and "3/3" in text and "loss=0.3333" in text


# ------------------------------------------------------------------------------------------ sophia-plot
def test_plot_without_metrics_is_one_line(tmp_path, capsys):
    assert plot.main([str(tmp_path)]) == 2
    assert assert_one_line(capsys.readouterr().err, "sophia-plot: ") == (
        f"sophia-plot: {tmp_path}/metrics.jsonl does not exist: {tmp_path} is not a run directory written by "
        "sophia-train (or no step has been logged yet)")
    with pytest.raises(SystemExit) as exit_:
        plot.main([])
    assert exit_.value.code == 2
    assert "the following arguments are required: run_dirs" in assert_one_line(capsys.readouterr().err,
                                                                                "sophia-plot: ")


def test_plot_marks_the_points_of_short_series(tmp_path):
    """A run with one evaluation: a line without markers would draw nothing for it."""
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "train/loss": 5.0 - s / 100, **({"eval/loss": 4.5} if s == 300 else {})}) + "\n"
        for s in range(1, 301)))
    fig = plot.plot_runs([tmp_path], tmp_path / "curves.png")
    loss_ax, eval_ax, _ = fig.axes
    [eval_line] = eval_ax.lines
    assert list(eval_line.get_xdata()) == [300] and eval_line.get_marker() == "o"
    assert loss_ax.lines[0].get_marker() in (None, "None", "")  # 300 points: a plain line


# ------------------------------------------------------------------------------------------ sophia-aot
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason='libtpu is not installed (".[tpu]")')
def test_aot_auto_microbatches_that_no_count_splits_exit_2_with_one_line(monkeypatch, capsys):
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    argv = ["--config", str(ROOT / "configs" / "neox_tiny.yaml"), "--topology", "v3:2x2", "--step", "train",
            "--trainer.global_batch", "12", "--trainer.microbatches", "auto"]
    with pytest.raises(SystemExit) as exit_:
        aot.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("sophia-aot: microbatches 'auto': no microbatch count splits "
                                    "trainer.global_batch=12 over the 8 data-parallel devices (mesh data*fsdp); use a "
                                    "batch that is a multiple of 8")
    assert "Traceback" not in err

