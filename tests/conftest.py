"""Test-wide setup: 8 simulated CPU devices and a persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here.
"""
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_CACHE = os.environ.setdefault(
      "FMJAX_TEST_JAX_CACHE", os.path.join(tempfile.gettempdir(), "fmjax_jax_cache"))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    """One prepared copy of the bundled dataset shared by every test."""
    return str(tmp_path_factory.mktemp("tfds"))
