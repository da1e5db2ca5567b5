"""Shared pytest set-up: 8 virtual CPU devices for sharding tests, and a key fixture."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402


@pytest.fixture
def key() -> jax.Array:
    return jax.random.PRNGKey(0)
