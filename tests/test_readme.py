"""The README's optimizer example is complete and runs as written."""

import re

import jax
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_optimizer_example_runs_and_learns(capsys):
    text = README.read_text()
    section = text[text.index("## The optimizer"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    with jax.numpy_dtype_promotion("standard"):  # as a user runs it (optax's schedules mix int and float)
        exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    final = namespace["loss_fn"](namespace["params"], namespace["inputs"], namespace["labels"], namespace["mask"])
    assert float(final) < 0.5 * 2.079  # learned: ln(8) = 2.079 is the loss of a uniform guess
    win_rate = float(re.search(r"win rate ([0-9.]+)", out).group(1))
    assert 0.0 < win_rate <= 1.0
    assert int(namespace["sophia_jax"].metrics(namespace["state"])["hessian_updates"]) == 20
