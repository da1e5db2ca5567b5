"""Cloud TPU VM tooling for sophia-jax: `sophia-tpu` (infra/cli.py) creates a slice (a TPU VM or a queued
resource), installs this checkout on every worker, launches a run detached, shows its progress and babysits
it through preemptions. The stages are infra/tpu.py, the babysitter infra/babysit.py; the command line sits
on top of both, which do not import each other's callers."""

__all__: list[str] = []
