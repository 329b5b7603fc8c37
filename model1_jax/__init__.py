"""model1-jax: DeepSeek MODEL1 (released as DeepSeek-V4) in JAX and Flax NNX."""
