"""Public sparse MLA decode with FlashMLA's `flash_mla_with_kvcache` sparse-FP8 semantics: checks and dispatch.

Every argument is checked before any compute; bad input raises a ValueError that names the argument.
Backends: "xla" is the pure-jnp reference (any kv_format, bf16 or float32 q); "pallas" the Pallas-Triton kernel
(FP8 formats, bf16 q, h_q 16, 32 or a multiple of 64; `interpret=True` runs it on CPU); "auto" the kernel on a
GPU when it supports the inputs, else the reference (`interpret=True` forces the kernel).
A Mosaic GPU kernel for Hopper would live beside `triton_decode.py`, reuse its `combine_splits` and
`choose_num_splits`, and be picked in `_use_pallas`'s place here.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from pallas_kernels.formats import KVFormat, check_cache, get_format
from pallas_kernels.reference import sparse_mla_decode_xla
from pallas_kernels.triton_decode import sparse_mla_decode_triton, supported_heads

BACKENDS = ("auto", "xla", "pallas")
_STATIC = ("kv_format", "page_size", "extra_page_size", "softmax_scale")
_xla = jax.jit(sparse_mla_decode_xla, static_argnames=_STATIC)
_pallas = jax.jit(sparse_mla_decode_triton, static_argnames=(*_STATIC, "interpret"))


def sparse_mla_decode(q, kv_cache, indices, *, kv_format: str | KVFormat, page_size: int, topk_length=None,
                      extra_kv_cache=None, extra_indices=None, extra_page_size=None, extra_topk_length=None,
                      attn_sink=None, softmax_scale: float | None = None, backend: str = "auto",
                      interpret: bool = False):
    """Sparse MQA decode over a paged FP8 (or dense) KV cache, FlashMLA semantics (docs/kernels.md §2–3).

    Args:
      q: bf16 `[b, s_q, h_q, d_qk]` (d_qk 512 MODEL1, 576 V3.2); float32 is accepted by the "xla" backend.
      kv_cache: cache of `kv_format` (`formats.cache_shape`): uint8 `[num_blocks, block_stride(page_size)]`, or
        for "dense"
        float32/bf16 `[num_blocks, page_size, d_qk]`.
      indices: int32 `[b, s_q, topk]`, entries `block * page_size + offset`; -1 or any value outside the cache
        is invalid and never read.
      kv_format: "v4" (alias "model1"), "v32", "dense" or a format object. page_size: tokens per page block.
      topk_length: optional int32 `[b]`; entries at or past it are ignored whatever they hold.
      extra_kv_cache, extra_indices, extra_page_size, extra_topk_length: an optional second scope (same kv_format,
        its own page size); main and extra keys share one softmax.
      attn_sink: optional float32 `[h_q]` (may hold ±inf); scales out by exp(lse) / (exp(lse) + exp(sink)).
      softmax_scale: default d_qk ** -0.5.
      backend: "auto", "xla" or "pallas". interpret: run the Pallas kernel in interpret mode (CPU).

    Returns:
      out `[b, s_q, h_q, 512]` (bf16; float32 for float32 q) and lse float32 `[b, h_q, s_q]` (natural log,
      +inf for a row without valid keys, whose out is 0; the sink does not change lse).
    """
    fmt = get_format(kv_format)
    _check_inputs(q, kv_cache, indices, fmt, page_size, topk_length, extra_kv_cache, extra_indices,
                  extra_page_size, extra_topk_length, attn_sink, softmax_scale)
    use_pallas = _use_pallas(backend, interpret, fmt, q)
    kwargs = dict(kv_format=fmt, page_size=int(page_size), topk_length_b=topk_length, extra_kv_cache=extra_kv_cache,
                  extra_idx_btk=extra_indices,
                  extra_page_size=None if extra_page_size is None else int(extra_page_size),
                  extra_topk_length_b=extra_topk_length, attn_sink_n=attn_sink,
                  softmax_scale=float(fmt.d_qk ** -0.5 if softmax_scale is None else softmax_scale))
    if use_pallas:
        return _pallas(q, kv_cache, indices, interpret=interpret, **kwargs)
    return _xla(q, kv_cache, indices, **kwargs)


def _use_pallas(backend, interpret, fmt: KVFormat, q) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a bool, got {interpret!r}")
    if backend == "xla":
        if interpret:
            raise ValueError("interpret=True runs the Pallas kernel; it cannot be combined with backend='xla'")
        return False
    kernel_ok = fmt.quantized and q.dtype == jnp.bfloat16 and supported_heads(q.shape[2])
    if backend == "auto":
        return interpret or (jax.default_backend() == "gpu" and kernel_ok)
    if not fmt.quantized:
        raise ValueError(f"kv_format {fmt.name!r} is supported by backend='xla' only")
    if q.dtype != jnp.bfloat16:
        raise ValueError(f"q must be bfloat16 for backend='pallas', got {q.dtype}")
    if not supported_heads(q.shape[2]):
        raise ValueError(f"q has h_q = {q.shape[2]} heads; backend='pallas' supports 16, 32 and multiples of 64")
    return True


def _check_array(x, name: str, shape: tuple, dtypes: tuple) -> None:
    """`shape` entries of None match any size."""
    x_shape, x_dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
    ok = (x_shape is not None and len(x_shape) == len(shape)
          and all(want is None or got == want for got, want in zip(x_shape, shape)))
    if not ok or x_dtype not in dtypes:
        shape_str = "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"
        dtype_str = "/".join(jnp.dtype(d).name for d in dtypes)
        raise ValueError(f"{name} must be {dtype_str} {shape_str}, got {x_dtype} {x_shape}")


def _check_inputs(q, kv_cache, indices, fmt: KVFormat, page_size, topk_length, extra_kv_cache, extra_indices,
                  extra_page_size, extra_topk_length, attn_sink, softmax_scale) -> None:
    _check_array(q, "q", (None, None, None, None), (jnp.bfloat16, jnp.float32))
    if q.shape[3] != fmt.d_qk:
        raise ValueError(f"q has d_qk = {q.shape[3]}, but kv_format {fmt.name!r} needs {fmt.d_qk}")
    b, s_q, h_q, _ = q.shape
    if min(b, s_q, h_q) < 1:
        raise ValueError(f"q must have b, s_q, h_q >= 1, got shape {q.shape}")
    check_cache(kv_cache, fmt, page_size, "kv_cache")
    _check_array(indices, "indices", (b, s_q, None), (jnp.int32,))
    if indices.shape[2] < 1:
        raise ValueError("indices must have topk >= 1")
    if topk_length is not None:
        _check_array(topk_length, "topk_length", (b,), (jnp.int32,))
    if extra_kv_cache is None:
        for name, val in [("extra_indices", extra_indices), ("extra_page_size", extra_page_size),
                          ("extra_topk_length", extra_topk_length)]:
            if val is not None:
                raise ValueError(f"{name} was given without extra_kv_cache")
    else:
        if extra_indices is None or extra_page_size is None:
            raise ValueError("extra_kv_cache needs extra_indices and extra_page_size")
        check_cache(extra_kv_cache, fmt, extra_page_size, "extra_kv_cache")
        _check_array(extra_indices, "extra_indices", (b, s_q, None), (jnp.int32,))
        if extra_indices.shape[2] < 1:
            raise ValueError("extra_indices must have extra_topk >= 1")
        if extra_topk_length is not None:
            _check_array(extra_topk_length, "extra_topk_length", (b,), (jnp.int32,))
    if attn_sink is not None:
        _check_array(attn_sink, "attn_sink", (h_q,), (jnp.float32,))
    if softmax_scale is not None and (not isinstance(softmax_scale, numbers.Real) or isinstance(softmax_scale, bool)
                                      or not softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a positive float or None, got {softmax_scale!r}")
