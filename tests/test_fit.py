"""`microbatches: auto` (trainer/fit.py): the search finds the largest microbatch that fits - the fewest
microbatches - for any memory curve that does not decrease with the size, with few compiles; and a batch
that no count splits over the data devices is refused with one line, not an IndexError."""

import dataclasses
import math
import random

import jax
import pytest

from trainer.config import TrainConfig, TrainerConfig
from trainer.fit import DoesNotFit, _largest_fitting, fit_microbatches
from trainer.models import ModelConfig
from trainer.optim import SophiaGConfig
from trainer.sharding import MeshConfig, make_mesh


class Measured:
    """A `measure` function from a table of bytes per microbatch size, counting its calls (= compiles)."""

    def __init__(self, table: dict[int, float]):
        self.table, self.calls = table, []

    def __call__(self, size: int) -> float:
        self.calls.append(size)
        return self.table[size]


def brute_force(table: dict[int, float], limit: float) -> int:
    """The largest size whose bytes fit: what measuring every candidate would pick."""
    return max(size for size, need in table.items() if need <= limit)


def bound(n: int) -> int:
    """The documented worst case: the smallest and the largest, then 2 probes per halving of the bracket."""
    return 2 + 2 * math.ceil(math.log2(max(n - 1, 1)))


def test_the_issue_s_sizes_pick_the_largest_that_fits():
    """{1: 10, 2: 20, 4: 25, 8: 30} under 35: 8 fits (the old extrapolation from sizes 1 and 2 picked 2)."""
    measure = Measured({1: 10, 2: 20, 4: 25, 8: 30})
    assert _largest_fitting([1, 2, 4, 8], measure, 35, "the train step") == 8
    assert measure.calls == [1, 8]  # the smallest and the whole batch: 2 compiles
    measure = Measured({1: 10, 2: 20, 4: 25, 8: 30})
    assert _largest_fitting([1, 2, 4, 8], measure, 27, "the train step") == 4
    assert len(measure.calls) == 3


@pytest.mark.parametrize("curve", ["linear", "quadratic", "cubic", "sqrt", "steps"])
def test_every_limit_gives_what_measuring_every_size_gives(curve):
    sizes = list(range(8, 481, 8))  # 60 candidates, as for a batch of 480 on 8 data devices
    shape = {"linear": lambda s: s, "quadratic": lambda s: s * s / 64, "cubic": lambda s: s**3 / 4096,
             "sqrt": lambda s: 40 * math.sqrt(s), "steps": lambda s: 100 * (s // 96)}[curve]
    table = {s: 1000 + shape(s) for s in sizes}
    worst = 0
    for limit in sorted({table[s] for s in sizes} | {table[s] + 0.5 for s in sizes}):
        measure = Measured(table)
        assert _largest_fitting(sizes, measure, limit, "the train step") == brute_force(table, limit), limit
        assert len(measure.calls) == len(set(measure.calls))  # no size compiled twice
        worst = max(worst, len(measure.calls))
    assert worst <= bound(len(sizes))
    if curve == "linear":  # the line through the bracket lands on the answer: 3 to 5 compiles
        assert worst <= 5


def test_random_non_decreasing_curves_and_the_compile_bound():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 40)
        sizes = sorted(rng.sample(range(1, 200), n))
        need, table = 0.0, {}
        for s in sizes:  # flat stretches, jumps and refusals (inf: XLA would not compile it)
            need += rng.choice([0.0, 0.0, rng.random(), 10 * rng.random()])
            table[s] = math.inf if need > 30 and rng.random() < 0.3 else need
            need = table[s]
        limit = rng.uniform(0, max(v for v in table.values() if math.isfinite(v)) + 1)
        measure = Measured(table)
        if table[sizes[0]] > limit:
            with pytest.raises(DoesNotFit, match="even microbatches of"):
                _largest_fitting(sizes, measure, limit, "the train step")
            continue
        assert _largest_fitting(sizes, measure, limit, "the train step") == brute_force(table, limit)
        assert len(measure.calls) <= bound(n)


# heads 4 and a batch of 12: no microbatch size splits 12 rows over 8 data devices.
CONFIG = TrainConfig(model=ModelConfig(vocab_size=250, seq_len=16, hidden_dim=32, num_layers=2, num_heads=4),
                     optimizer=SophiaGConfig(hessian_batch_fraction=0.5),
                     trainer=TrainerConfig(global_batch=12, microbatches="auto"))


def test_a_batch_no_count_splits_over_the_data_devices_is_refused_by_name():
    mesh = make_mesh(MeshConfig(data=8, fsdp=1), jax.devices()[:8])
    with pytest.raises(ValueError, match=r"no microbatch count splits trainer\.global_batch=12 over the 8 "
                                         r"data-parallel devices \(mesh data\*fsdp\); use a batch that is a "
                                         r"multiple of 8"):
        fit_microbatches(CONFIG, mesh, limit_bytes=2**30, log=lambda _: None)
    # The Hessian batch is rounded up to a multiple of the data devices, so it always has a size.
    fine = dataclasses.replace(CONFIG, trainer=dataclasses.replace(CONFIG.trainer, global_batch=16, microbatches=1),
                               optimizer=dataclasses.replace(CONFIG.optimizer, hessian_microbatches="auto"))
    fitted = fit_microbatches(fine, mesh, limit_bytes=2**30, log=lambda _: None)
    assert fitted.optimizer.hessian_microbatches == 1  # 8 rows (16 x 0.5) whole
