"""Suite-wide JAX settings: exact fp32 matmuls and 8 simulated CPU devices for the sharding tests."""

import os

# Must be set before JAX initialises its CPU backend; harmless for single-device tests. Appended, so
# XLA_FLAGS the caller already set are kept.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
