"""Cloud TPU VM tooling for sophia-jax: `sophia-tpu` (infra/tpu.py) creates a slice, installs this
checkout on every worker, launches a run detached and babysits it through preemptions."""

__all__: list[str] = []
