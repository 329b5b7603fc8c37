"""Pallas GPU kernels for FlashMLA-compatible sparse FP8 attention decode.

This package does not import `model1_jax`; the model imports it.
"""
