"""Pallas GPU kernels for FlashMLA-compatible sparse FP8 attention, each beside its pure-jnp reference.

This package never imports `model1_jax`; the model imports it. Names are loaded on first use, so importing
the package does not load the Pallas backend until a kernel is called.

Public API:
  sparse_mla_decode(q, kv_cache, indices, *, kv_format, page_size, ...) -> (out, lse)   (FlashMLA's semantics)
  supported_heads(h_q): the head counts the Pallas kernel runs (16, 32, multiples of 64)
  sparse_attention(q, keys, indices, sinks, *, scale, backend, ...) -> (o, lse): full-sequence sparse attention
    over K=V rows picked by index, differentiable (jnp blocks or Pallas-Triton forward / dQ / dKV kernels)
  cache formats (FlashMLA's `kv_format`): V4 (alias MODEL1), V32, DENSE; get_format("v4"), cache_shape, cache_bytes
  quantize_kv(k, kv_format), dequantize_kv(cache, kv_format, page_size),
  write_kv(cache, slots, k_new, *, kv_format, page_size), read_tokens(cache, slots, kv_format, page_size)
  pallas_kernels.roofline: decode_flop_and_bytes, roofline_seconds
  pallas_kernels.index_format: the lightning indexer's key cache as vLLM / SGLang / DeepGEMM store it (132-byte
    FP8 rows with a power-of-two scale, page-major): quantize_rows, write, read, gather_pages

Tooling, imported by path: `pallas_kernels.compile_check` and `compile_check_sparse` (the kernels compiled for
sm_90a / sm_100a on the CPU; needs the `compile-check` extra, Triton).
"""

import importlib

_LAZY = {
    "BACKENDS": "pallas_kernels.decode",
    "sparse_mla_decode": "pallas_kernels.decode",
    "supported_heads": "pallas_kernels.triton_decode",
    "sparse_attention": "pallas_kernels.sparse_attention",
    **{name: "pallas_kernels.formats" for name in (
        "DENSE", "KV_FORMATS", "MODEL1", "V4", "V32", "DenseFormat", "Fp8Format", "KVFormat", "cache_bytes",
        "cache_shape", "dequantize_kv", "get_format", "quantize_kv", "read_tokens", "write_kv")},
}

__all__ = [
    "BACKENDS", "DENSE", "KV_FORMATS", "MODEL1", "V4", "V32", "DenseFormat", "Fp8Format", "KVFormat", "cache_bytes",
    "cache_shape", "dequantize_kv", "get_format", "quantize_kv", "read_tokens", "sparse_attention",
    "sparse_mla_decode", "supported_heads", "write_kv",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'pallas_kernels' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
