"""Pallas GPU kernels for FlashMLA-compatible sparse FP8 attention decode.

This package does not import `model1_jax`; the model imports it.

Public API:
  sparse_mla_decode(q, kv_cache, indices, *, layout, page_size, ...) -> (out, lse)
  layouts: MODEL1, V32, DENSE (frozen dataclasses), get_layout, cache_shape, cache_bytes
  quantize_kv(k, layout), dequantize_kv(cache, layout, page_size), write_kv(cache, slots, k_new, *, layout,
  page_size), read_tokens(cache, slots, layout, page_size)
  roofline: decode_flop_and_bytes, roofline_time (spec §6.2)

Tooling, imported by path: `pallas_kernels.compile_check` (the kernels compiled for sm_90a / sm_100a on the CPU;
needs the `compile-check` extra, Triton).
"""

from pallas_kernels.decode import BACKENDS, sparse_mla_decode
from pallas_kernels.layouts import (
    DENSE,
    LAYOUTS,
    MODEL1,
    V32,
    DenseLayout,
    Fp8Layout,
    KVLayout,
    cache_bytes,
    cache_shape,
    dequantize_kv,
    get_layout,
    quantize_kv,
    read_tokens,
    write_kv,
)

__all__ = [
    "BACKENDS", "DENSE", "LAYOUTS", "MODEL1", "V32", "DenseLayout", "Fp8Layout", "KVLayout", "cache_bytes",
    "cache_shape", "dequantize_kv", "get_layout", "quantize_kv", "read_tokens", "sparse_mla_decode", "write_kv",
]
