"""Shared pytest set-up: 8 virtual CPU devices for sharding tests, strict dtype promotion (as equinox's
tests run: an implicit float32 + bfloat16 or int + float promotion is an error), no route to Google Cloud
(tests/gcs.py), persistent JAX compilation caches (this process and trainer subprocesses), and a key
fixture."""

import atexit
import os
import shutil
import tempfile

from gcs import OFFLINE_ENV

# Must happen before JAX initialises its backends.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
# No test reaches Google Cloud: set before gcsfs and fsspec are imported (they read some at import).
os.environ.update(OFFLINE_ENV)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_dtype_promotion", "strict")
# A persistent compilation cache for this test process (set before anything compiles): many tests build
# the same small trainer, and a hit is the same executable, so no result changes (the in-process tests run
# ~25% faster on 2 cores). One directory per process, removed at exit.
_CACHE = tempfile.mkdtemp(prefix="sophia-jax-test-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

import pytest  # noqa: E402


@pytest.fixture
def key() -> jax.Array:
    return jax.random.PRNGKey(0)


@pytest.fixture(scope="session")
def compile_cache_env(tmp_path_factory) -> dict[str, str]:
    """Environment for `sophia-train` subprocesses: one persistent JAX compilation cache per test worker, so
    a program compiles once however often a test restarts the trainer (a hit is the same executable, so no
    result changes; a restart then costs ~9 s instead of ~30 s here)."""
    return {"JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
