"""Suite-wide JAX settings: exact fp32 matmuls and 8 simulated CPU devices for the sharding tests."""

import os

# Must be set before JAX initialises its CPU backend; harmless for single-device tests. Appended, so
# XLA_FLAGS the caller already set are kept.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def eight_devices():
    """8 devices, and XLA's cheap compilation mode, for a module (`pytestmark = usefixtures("eight_devices")`):
    the sharding tests compile many small multi-device programs and run each a few times (LLVM's expensive
    passes only change speed, not IEEE results)."""
    if jax.device_count() < 8:
        pytest.fail(f"these tests need 8 devices, found {jax.device_count()}: run with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it unless XLA_FLAGS "
                    "is already set)")
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
