"""Shared pytest set-up: 8 virtual CPU devices for sharding tests, strict dtype promotion (as equinox's
tests run: an implicit float32 + bfloat16 or int + float promotion is an error), and a key fixture."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # noqa: E402


@pytest.fixture
def key() -> jax.Array:
    return jax.random.PRNGKey(0)
