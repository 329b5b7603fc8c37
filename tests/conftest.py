"""Suite-wide JAX settings: exact fp32 matmuls and 8 simulated CPU devices for the sharding tests."""

import os

# Must be set before JAX initialises its CPU backend; harmless for single-device tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
