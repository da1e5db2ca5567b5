"""Shared pytest set-up: 8 virtual CPU devices for sharding tests, strict dtype promotion (as equinox's
tests run: an implicit float32 + bfloat16 or int + float promotion is an error), no route to Google Cloud
(tests/gcs.py), and a key fixture."""

import os

from gcs import OFFLINE_ENV

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
# No test reaches Google Cloud: set before gcsfs and fsspec are imported (they read some at import).
os.environ.update(OFFLINE_ENV)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")

import pytest  # noqa: E402


@pytest.fixture
def key() -> jax.Array:
    return jax.random.PRNGKey(0)
