"""The Pallas-Triton decode kernel lowers for CUDA on a CPU-only machine (docs/kernels.md §6.5).

Interpret mode accepts code that Triton cannot compile (non power-of-two arrays, missing primitives, bad
casts); this lowering runs the whole Pallas -> Triton IR pipeline, so such code fails CI here.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import MODEL1, V32, cache_shape, sparse_mla_decode
from pallas_kernels.compile_check import lower_for_cuda
from pallas_kernels.triton_decode import sparse_mla_decode_triton

S = jax.ShapeDtypeStruct


def _lower_for_cuda(fn, *specs) -> str:
    text = lower_for_cuda(fn, *specs).as_text()
    assert any("triton" in t for t in re.findall(r"custom_call @(\S+)\(", text)), "no Triton kernel in the HLO"
    return text


@pytest.mark.parametrize("kv_format", [MODEL1, V32], ids=lambda l: l.name)
@pytest.mark.parametrize("h_q,num_splits,extra", [(64, 1, False), (128, 3, True), (16, 1, True), (32, 2, False)])
def test_kernel_lowers_for_cuda(kv_format, h_q, num_splits, extra):
    b, s_q, topk, page = 2, 2, 576, 64
    specs = [S((b, s_q, h_q, kv_format.d_qk), jnp.bfloat16), S(cache_shape(40, page, kv_format), jnp.uint8),
             S((b, s_q, topk), jnp.int32), S((b,), jnp.int32), S((h_q,), jnp.float32)]
    if extra:
        specs += [S(cache_shape(300, 2, kv_format), jnp.uint8), S((b, s_q, 128), jnp.int32), S((b,), jnp.int32)]

    def run(q, cache, idx, length, sink, *x):
        scope = dict(extra_kv_cache=x[0], extra_idx_btk=x[1], extra_page_size=2, extra_topk_length_b=x[2]) if x else {}
        return sparse_mla_decode_triton(q, cache, idx, kv_format=kv_format, page_size=page, topk_length_b=length,
                                        attn_sink_n=sink, softmax_scale=0.05, num_splits=num_splits, **scope)

    _lower_for_cuda(run, *specs)


def test_public_entry_point_lowers_for_cuda_at_benchmark_size():
    """MODEL1 CONFIG2-like shapes (b 128, h 128, main 128 / 256-token pages, extra 1024 / 64-token pages)."""
    b, s_q = 128, 2
    specs = [S((b, s_q, 128, 512), jnp.bfloat16), S(cache_shape(b * 64, 256, MODEL1), jnp.uint8),
             S((b, s_q, 128), jnp.int32), S(cache_shape(b * 256, 64, MODEL1), jnp.uint8),
             S((b, s_q, 1024), jnp.int32), S((128,), jnp.float32)]
    run = functools.partial(_decode_with_extra, page=256, extra_page=64)
    _lower_for_cuda(run, *specs)


def _decode_with_extra(q, cache, idx, xcache, xidx, sink, *, page, extra_page):
    return sparse_mla_decode(q, cache, idx, kv_format="model1", page_size=page, extra_kv_cache=xcache,
                             extra_indices=xidx, extra_page_size=extra_page, attn_sink=sink, backend="pallas")


@pytest.mark.parametrize("num_blocks", [148 * 512, 140_000], ids=["3.2GB", "5.2GB"])
def test_kernel_lowers_for_large_caches(num_blocks):
    """V3.2 caches of the benchmark's peak size (32-bit element offsets of the uint16 view) and past 4 GiB
    (Pallas switches to 64-bit offsets)."""
    specs = [S((148, 2, 128, 576), jnp.bfloat16), S(cache_shape(num_blocks, 64, V32), jnp.uint8),
             S((148, 2, 2048), jnp.int32)]
    _lower_for_cuda(lambda q, c, i: sparse_mla_decode(q, c, i, kv_format=V32, page_size=64, backend="pallas"), *specs)
