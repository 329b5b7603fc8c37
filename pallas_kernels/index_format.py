"""The lightning indexer's key cache in the serving engines' FP8 format, and its compute-precision twin
(docs/serving.md §4).

FP8 format: a page of B entries with head dim j (128 in every released model) is `uint8[(j + 4)·B]`:
  bytes j·t … j·t + j − 1          the FP8 e4m3 row of entry t            (all B rows first)
  bytes j·B + 4·t … j·B + 4·t + 3  entry t's scale, little-endian float32 (then all B scales)
132 bytes per entry at j = 128. This is the page layout vLLM's `indexer_k_quant_and_cache` writes and its
gather / DeepGEMM's paged MQA logits read (the same bytes in SGLang); rows interleaved with their scales
(`[128 | 4]` records) would be a different, wrong layout. One scale per row:
  s = 2^ceil(log2(max(amax, 1e-4) / 448)),   fp8 = round-to-nearest-even(k / s),   k ≈ fp8 · s (exact product)
with keys rounded to bf16 first (the engines quantize bf16 keys). Note the floor: 1e-4 applies to amax,
where FlashMLA's KV format floors amax / 448 (formats.py).

Compute-precision format: `[u, B, j]` of the compute dtype, no rounding.

Letters: u pages, s slots / entries, j indexer head dim, y bytes, b sequences.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.formats import FP8_MAX, _ceil_log2

AMAX_MIN = 1e-4  # floor on a row's amax before dividing by 448
SCALE_BYTES = 4


def page_bytes(page_size: int, head_dim: int) -> int:
    """Bytes of one FP8 page: B rows of j FP8 bytes, then B float32 scales."""
    return page_size * (head_dim + SCALE_BYTES)


def cache_shape(pages: int, page_size: int, head_dim: int, fp8: bool = True) -> tuple[int, ...]:
    """`(u, (j + 4)·B)` bytes for the FP8 format, `(u, B, j)` for the compute-precision one."""
    return (pages, page_bytes(page_size, head_dim)) if fp8 else (pages, page_size, head_dim)


def head_dim_of(cache, page_size: int) -> int:
    """j of a cache in either format."""
    if cache.dtype == jnp.uint8:
        return cache.shape[1] // page_size - SCALE_BYTES
    return cache.shape[-1]


def quantize_rows(k_sj):
    """Keys `[s, j]` → (FP8 bytes uint8 `[s, j]`, scales float32 `[s]`), as the engines quantize them."""
    x = k_sj.astype(jnp.bfloat16).astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    exponent = _ceil_log2(jnp.maximum(amax, AMAX_MIN) / FP8_MAX)
    scale = lax.bitcast_convert_type((exponent + 127) << 23, jnp.float32)  # 2^exponent, exactly
    fp8 = (x / scale[:, None]).astype(jnp.float8_e4m3fn)  # |x / scale| <= 448: no saturation needed
    return lax.bitcast_convert_type(fp8, jnp.uint8), scale


def dequantize_rows(fp8_u8, scale):
    """FP8 bytes `[..., j]` and scales `[...]` → float32 keys `[..., j]` (exact: a power-of-two scale)."""
    return lax.bitcast_convert_type(fp8_u8, jnp.float8_e4m3fn).astype(jnp.float32) * scale[..., None]


def _split(slots, page_size: int, pages: int):
    keep = (slots >= 0) & (slots < pages * page_size)
    return jnp.where(keep, slots // page_size, pages), jnp.where(keep, slots % page_size, 0)  # page `pages`: dropped


@functools.partial(jax.jit, static_argnames=("page_size",))
def write(cache, slots, k_new, *, page_size: int):
    """Writes keys `k_new [s, j]` at flat slots `[s]` (`page · B + offset`); a negative or out-of-range slot is
    skipped. Either format (uint8 caches are FP8). Returns the new cache (in place when donated)."""
    slots = slots.astype(jnp.int32)
    p, g = _split(slots, page_size, cache.shape[0])
    if cache.dtype != jnp.uint8:
        return cache.at[p, g].set(k_new.astype(cache.dtype), mode="drop")
    j = head_dim_of(cache, page_size)
    fp8, scale = quantize_rows(k_new)
    record = jnp.concatenate([fp8, lax.bitcast_convert_type(scale, jnp.uint8)], axis=1)  # [s, j + 4]
    r = jnp.arange(j + SCALE_BYTES, dtype=jnp.int32)
    g1 = g[:, None]
    cols = jnp.where(r < j, g1 * j + r, page_size * j + g1 * SCALE_BYTES + (r - j))
    return cache.at[p[:, None], cols].set(record, mode="drop")


def read(cache, slots, *, page_size: int):
    """Keys at flat slots (any shape, all in range) as float32 `[..., j]`; either format."""
    slots = jnp.asarray(slots, jnp.int32)
    p, g = slots // page_size, slots % page_size
    if cache.dtype != jnp.uint8:
        return cache[p, g].astype(jnp.float32)
    j = head_dim_of(cache, page_size)
    fp8 = cache[p[..., None], g[..., None] * j + jnp.arange(j)]
    scale_u8 = cache[p[..., None], page_size * j + g[..., None] * SCALE_BYTES + jnp.arange(SCALE_BYTES)]
    return dequantize_rows(fp8, lax.bitcast_convert_type(scale_u8, jnp.float32))


def gather_pages(cache, pages_bu, *, page_size: int):
    """Every entry of the pages `pages_bu [b, u]` (a block table; negative ids read page 0, which the caller
    masks) as float32 keys `[b, u·B, j]`; either format."""
    b, u = pages_bu.shape
    pages_bu = jnp.maximum(pages_bu, 0)
    if cache.dtype != jnp.uint8:
        return cache[pages_bu].reshape(b, u * page_size, -1).astype(jnp.float32)
    j = head_dim_of(cache, page_size)
    raw = cache[pages_bu]  # [b, u, y]
    fp8 = raw[..., :page_size * j].reshape(b, u, page_size, j)
    scale = lax.bitcast_convert_type(raw[..., page_size * j:].reshape(b, u, page_size, SCALE_BYTES), jnp.float32)
    return dequantize_rows(fp8, scale).reshape(b, u * page_size, j)
