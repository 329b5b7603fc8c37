"""Pallas-Triton sparse FP8 decode: split-KV kernel plus a jnp combine (docs/kernels.md §3.4, §6.1–6.3).

Grid (t rows = b·s_q, z splits, h_q / block_h head blocks). A program owns one query row, one head block of
min(h_q, 64) heads (M = 64 feeds wgmma) and one split: a contiguous share of the row's *valid* index tiles
(main scope tiles first, then extra scope tiles; tiles past topk_length are never visited). Per 64-token
tile it gathers the token records, dequantizes them to bf16 K in chunks of 256 or 512 columns (one accumulator
per chunk, `d_chunk_for`) and runs an online softmax in base 2.
With one split the program writes the final bf16 output and natural-log lse (sink applied); otherwise it
writes fp32 O/L and log2(L) + m per split and `combine_splits` merges them in jnp.

The cache is passed as a uint16 view `[u, block_stride / 2]`: every field of both formats starts at an even
byte, a bf16 RoPE value is one word, and element offsets stay below 2^31 for caches under 4 GiB (Pallas
switches to 64-bit offsets above 4 GiB). An invalid index is replaced by slot 0 of block 0 before any address is
formed.

Shape letters follow the project's one table (docs/model.md §0): t query rows (b·s_q, flattened), z KV splits,
n heads (of the program's head block), k index positions (of a 64-wide tile), h head dims, r RoPE dims,
u page blocks, y bytes.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.formats import Fp8Format, is_valid_index

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
BLOCK_T = 64  # tokens per tile (one wgmma N / K step)
D_V = 512
# V columns dequantized and accumulated per dot: 256 (two halves, two accumulators) or 512 (whole rows); see
# `d_chunk_for` and docs/compile_check.md §4.
D_CHUNKS = (256, 512)
NEG_BIG = -1e30  # running-max start and masked logit: finite, so m_old - m_new never is inf - inf
# Scheduling cost model, in units of one tile's work: every program loads Q and stores its output (~2 tiles);
# a split program also stores fp32 O/L that the combine reads back (~4 tiles more of traffic for 64 heads).
PROGRAM_OVERHEAD_TILES = 2.0
SPLIT_OVERHEAD_TILES = 4.0


@dataclasses.dataclass(frozen=True)
class Scope:
    """Static facts of one index scope (main or extra cache)."""

    page_size: int
    num_blocks: int  # page blocks in the cache
    num_tiles: int  # index tiles of BLOCK_T positions (indices padded to a multiple of BLOCK_T)

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.page_size


def supported_heads(h_q: int) -> bool:
    """h_q 16, 32, 64, or a multiple of 64 (head block min(h_q, 64))."""
    return h_q in (16, 32) or (h_q >= 64 and h_q % 64 == 0)


def choose_num_splits(rows: int, head_blocks: int, work_tiles: int, num_sms: int) -> int:
    """Splits per (row, head block) minimizing waves × (tiles per program + overheads), ties to fewer splits."""
    def cost(s):
        waves = -(-rows * head_blocks * s // num_sms)
        return waves * (-(-work_tiles // s) + PROGRAM_OVERHEAD_TILES + (SPLIT_OVERHEAD_TILES if s > 1 else 0.0))
    return min(range(1, max(work_tiles, 1) + 1), key=lambda s: (cost(s), s))


def tile_addresses(idx_k, valid_k, kv_format: Fp8Format, page_size: int, col0: int = 0, width: int = D_V):
    """uint16-word addresses of one tile's fields; an invalid index is replaced by slot 0 first, so every address
    is inside the cache whatever the index holds.

    Returns (page_k1 [k, 1] page block, word_kh [k, 512] word holding NoPE byte c (c < d_nope) or RoPE value
    c - d_nope (MODEL1), scale_word_k1 [k, 1] first scale word, rope_word_k1 [k, 1] first RoPE word).
    """
    slot_k = jnp.where(valid_k, idx_k, 0)
    g = (slot_k % page_size)[:, None]
    cols = col0 + jnp.arange(width, dtype=jnp.int32)[None, :]
    nope = (kv_format.nope_offset(g) + cols) // 2
    rope = kv_format.rope_offset(g) // 2 + (cols - kv_format.d_nope)
    word_kh = jnp.where(cols < kv_format.d_nope, nope, rope)
    return ((slot_k // page_size)[:, None], word_kh, kv_format.scale_offset(g, page_size) // 2,
            kv_format.rope_offset(g) // 2)


def _low_or_high_byte(w, odd):
    return jnp.where(odd, w >> 8, w & 0xFF).astype(jnp.uint8)


def _load_kv_tile(cache_ref, idx_k, valid_k, kv_format: Fp8Format, page_size: int, col0: int, width: int):
    """Gathers and dequantizes columns [col0, col0 + width) of one tile: kv [k, width] bf16 (V = K[:, :512])."""
    page_k1, word_kh, scale_word_k1, _ = tile_addresses(idx_k, valid_k, kv_format, page_size, col0, width)
    w_kh = cache_ref[page_k1, word_kh]
    cols = col0 + jnp.arange(width, dtype=jnp.int32)[None, :]
    fp8 = lax.bitcast_convert_type(_low_or_high_byte(w_kh, (cols & 1) == 1), jnp.float8_e4m3fn)
    n_tiles = width // kv_format.tile  # MODEL1: the 8th "scale" is the pad byte, its columns hold RoPE
    j = col0 // kv_format.tile + jnp.arange(n_tiles, dtype=jnp.int32)[None, :]
    if kv_format.scale_format == "ue8m0":
        e = _low_or_high_byte(cache_ref[page_k1, scale_word_k1 + j // 2], (j & 1) == 1).astype(jnp.int32)
        scale = jnp.where(e == 0xFF, jnp.nan, lax.bitcast_convert_type(e << 23, jnp.float32))
    else:
        lo = cache_ref[page_k1, scale_word_k1 + 2 * j].astype(jnp.uint32)
        hi = cache_ref[page_k1, scale_word_k1 + 2 * j + 1].astype(jnp.uint32)
        scale = lax.bitcast_convert_type(lo | (hi << 16), jnp.float32)
        scale = scale.astype(jnp.bfloat16).astype(jnp.float32)  # SM90 multiplies by a bf16 scale
    nope = (fp8.astype(jnp.float32).reshape(-1, n_tiles, kv_format.tile) * scale[:, :, None]).reshape(-1, width)
    if kv_format.d_nope < D_V:  # MODEL1: the last 64 columns of V are the bf16 RoPE values
        rope = lax.bitcast_convert_type(w_kh, jnp.bfloat16).astype(jnp.float32)
        nope = jnp.where(cols < kv_format.d_nope, nope, rope)
    return jnp.where(valid_k[:, None], nope, 0.0).astype(jnp.bfloat16)


def _load_rope_tile(cache_ref, idx_k, valid_k, kv_format: Fp8Format, page_size: int):
    """V3.2's separate RoPE part of K (not part of V): [k, 64] bf16."""
    page_k1, _, _, rope_word_k1 = tile_addresses(idx_k, valid_k, kv_format, page_size, 0, kv_format.d_rope)
    rope_words = cache_ref[page_k1, rope_word_k1 + jnp.arange(kv_format.d_rope, dtype=jnp.int32)[None, :]]
    rope = lax.bitcast_convert_type(rope_words, jnp.bfloat16)
    return jnp.where(valid_k[:, None], rope, jnp.zeros_like(rope))


def _attend_tile(carry, q_nh, qrope_nr, idx_ref, cache_ref, tile, length, scope: Scope, kv_format, logit_scale):
    """One online-softmax step over index tile `tile` of a scope; carry = (m [n], l [n], acc: chunks [n, d_chunk] of the
    512 output columns); q_nh: chunks [n, d_chunk] of q's first 512 dims."""
    m, l, acc = carry
    d_chunk = acc[0].shape[1]
    start = pl.multiple_of(tile * BLOCK_T, BLOCK_T)
    idx_k = idx_ref[pl.ds(start, BLOCK_T)]
    pos_k = start + jnp.arange(BLOCK_T, dtype=jnp.int32)
    valid_k = is_valid_index(idx_k, pos_k, length, scope.capacity)
    kv_kh = [_load_kv_tile(cache_ref, idx_k, valid_k, kv_format, scope.page_size, c * d_chunk, d_chunk)
             for c in range(len(acc))]
    dims = (((1,), (1,)), ((), ()))
    s_nk = lax.dot_general(q_nh[0], kv_kh[0], dims, preferred_element_type=jnp.float32)
    for q_c, kv_c in zip(q_nh[1:], kv_kh[1:]):
        s_nk += lax.dot_general(q_c, kv_c, dims, preferred_element_type=jnp.float32)
    if qrope_nr is not None:
        rope_kr = _load_rope_tile(cache_ref, idx_k, valid_k, kv_format, scope.page_size)
        s_nk += lax.dot_general(qrope_nr, rope_kr, dims, preferred_element_type=jnp.float32)
    s_nk = jnp.where(valid_k[None, :], s_nk * logit_scale, NEG_BIG)
    m_new = jnp.maximum(m, s_nk.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p_nk = jnp.where(valid_k[None, :], jnp.exp2(s_nk - m_new[:, None]), 0.0)
    l = l * alpha + p_nk.sum(axis=1)
    p_nk = p_nk.astype(jnp.bfloat16)
    acc = tuple(a * alpha[:, None] + jnp.dot(p_nk, kv_c, preferred_element_type=jnp.float32)
                for a, kv_c in zip(acc, kv_kh))
    return m_new, l, acc


def _decode_kernel(*refs, kv_format: Fp8Format, main: Scope, extra: Scope | None, num_splits: int,
                   block_h: int, d_chunk: int, logit_scale: float):
    refs = list(refs)
    row, split = pl.program_id(0), pl.program_id(1)  # read at the top: not inside loops (docs/kernels.md §6.5)
    len_ref, sink_ref, q_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    qrope_ref = refs.pop(0) if kv_format.d_nope == D_V else None
    idx_ref, cache_ref = refs.pop(0), refs.pop(0)
    xlen_ref, xidx_ref, xcache_ref = (refs.pop(0), refs.pop(0), refs.pop(0)) if extra else (None, None, None)
    out_refs = refs

    chunks = [pl.ds(c * d_chunk, d_chunk) for c in range(D_V // d_chunk)]
    q_nh = [q_ref[:, c] for c in chunks]
    qrope_nr = qrope_ref[...] if qrope_ref is not None else None
    # Valid work of this row, in tiles; this program's share is [lo, hi) of main tiles followed by extra tiles.
    length = len_ref[row]
    n_main = jnp.clip(pl.cdiv(length, BLOCK_T), 0, main.num_tiles)  # a negative length means no tokens
    xlength = xlen_ref[row] if extra else 0
    n_extra = jnp.clip(pl.cdiv(xlength, BLOCK_T), 0, extra.num_tiles) if extra else 0
    per_split = pl.cdiv(n_main + n_extra, num_splits)
    lo = split * per_split
    hi = jnp.minimum(lo + per_split, n_main + n_extra)

    carry = (jnp.full((block_h,), NEG_BIG, jnp.float32), jnp.zeros((block_h,), jnp.float32),
             tuple(jnp.zeros((block_h, d_chunk), jnp.float32) for _ in chunks))
    main_step = functools.partial(_attend_tile, q_nh=q_nh, qrope_nr=qrope_nr, idx_ref=idx_ref, cache_ref=cache_ref,
                                  length=length, scope=main, kv_format=kv_format, logit_scale=logit_scale)
    carry = lax.fori_loop(jnp.minimum(lo, n_main), jnp.minimum(hi, n_main),
                          lambda t, c: main_step(c, tile=t), carry)
    if extra:
        extra_step = functools.partial(_attend_tile, q_nh=q_nh, qrope_nr=qrope_nr, idx_ref=xidx_ref,
                                       cache_ref=xcache_ref,
                                       length=xlength, scope=extra, kv_format=kv_format, logit_scale=logit_scale)
        carry = lax.fori_loop(jnp.clip(lo - n_main, 0, n_extra), jnp.clip(hi - n_main, 0, n_extra),
                              lambda t, c: extra_step(c, tile=t), carry)
    m, l, acc = carry

    nonempty = l > 0.0
    lse2 = jnp.log2(jnp.where(nonempty, l, 1.0)) + m
    if num_splits == 1:
        out_ref, lse_ref = out_refs
        sink2 = sink_ref[...] * LOG2E
        denom = l + jnp.exp2(sink2 - m)  # FlashMLA's final step: o = O / (L + 2^(sink - m))
        for c, acc_c in zip(chunks, acc):
            out_ref[:, c] = jnp.where(nonempty[:, None], acc_c / jnp.where(nonempty, denom, 1.0)[:, None],
                                      0.0).astype(out_ref.dtype)
        lse_ref[...] = jnp.where(nonempty, lse2 * LN2, jnp.inf)
    else:
        o_ref, lse2_ref = out_refs
        for c, acc_c in zip(chunks, acc):
            o_ref[:, c] = jnp.where(nonempty[:, None], acc_c / jnp.where(nonempty, l, 1.0)[:, None], 0.0)
        lse2_ref[...] = jnp.where(nonempty, lse2, -jnp.inf)


def combine_splits(o_tznh, lse2_tzn, sink_n):
    """Merges per-split (O/L, log2 L + m) into bf16 out [t, n, 512] and natural lse [t, n] (docs/kernels.md §6.3)."""
    m_tn = jnp.max(lse2_tzn, axis=1)
    m_tn = jnp.where(jnp.isfinite(m_tn), m_tn, 0.0)
    w_tzn = jnp.exp2(lse2_tzn - m_tn[:, None])  # an empty split has lse2 = -inf: weight 0
    total_tn = w_tzn.sum(axis=1)
    nonempty = total_tn > 0.0
    lse2_tn = jnp.log2(jnp.where(nonempty, total_tn, 1.0)) + m_tn
    o_tnh = jnp.einsum("tzn,tznh->tnh", w_tzn, o_tznh, precision=lax.Precision.HIGHEST)
    o_tnh = o_tnh / jnp.where(nonempty, total_tn, 1.0)[..., None]
    sink_tn = 1.0 / (1.0 + jnp.exp2(sink_n * LOG2E - lse2_tn))  # sink +inf -> 0, -inf -> 1
    out = jnp.where(nonempty[..., None], o_tnh * sink_tn[..., None], 0.0).astype(jnp.bfloat16)
    return out, jnp.where(nonempty, lse2_tn * LN2, jnp.inf)


def _pad_tiles(idx_tk):
    pad = -idx_tk.shape[-1] % BLOCK_T
    return jnp.pad(idx_tk, ((0, 0), (0, pad)), constant_values=-1) if pad else idx_tk


def _as_words(cache_uy):
    num_blocks, nbytes = cache_uy.shape
    return lax.bitcast_convert_type(cache_uy.reshape(num_blocks, nbytes // 2, 2), jnp.uint16)


def _row_lengths(length_b, s_q, topk, b):
    if length_b is None:
        return jnp.full((b * s_q,), topk, jnp.int32)
    return jnp.repeat(length_b.astype(jnp.int32), s_q)


def d_chunk_for(compute_capability: str | None, block_h: int) -> int:
    """V columns per dot. Halves (256) compile with about half of whole rows' register spills on sm_90a, and none
    for head blocks of 16 / 32; where Triton uses tcgen05 (compute capability >= 10 with a head block of 64), Triton
    3.6 and 3.8 compile halves to a bare trap, so those keep whole rows (512). No GPU (None): as for sm_90, which
    jax lowers for when it has no GPU."""
    major = int(compute_capability.split(".")[0]) if compute_capability else 9
    return 512 if major >= 10 and block_h >= 64 else 256


def default_d_chunk(block_h: int) -> int:
    """`d_chunk_for` the default device."""
    dev = jax.devices()[0]
    return d_chunk_for(str(dev.compute_capability) if dev.platform == "gpu" else None, block_h)


def num_sms() -> int:
    """SM count of the default device; 132 (H100 SXM) when it is not a GPU (interpret mode)."""
    dev = jax.devices()[0]
    return getattr(dev, "core_count", 132) if dev.platform == "gpu" else 132


def sparse_mla_decode_triton(q_btnh, kv_cache, idx_btk, *, kv_format: Fp8Format, page_size: int,
                             topk_length_b=None, extra_kv_cache=None, extra_idx_btk=None, extra_page_size=None,
                             extra_topk_length_b=None, attn_sink_n=None, softmax_scale: float,
                             num_splits: int | None = None, d_chunk: int | None = None, num_warps: int = 8,
                             num_stages: int = 2, interpret: bool = False):
    """The kernel path of `sparse_mla_decode` on already validated inputs; returns (out bf16, lse [b, n, s_q]).

    num_splits: default `choose_num_splits`; d_chunk: V columns per dot, default `d_chunk_for` the device.
    """
    b, s_q, h_q, d_qk = q_btnh.shape
    rows, block_h = b * s_q, min(h_q, 64)
    head_blocks = h_q // block_h
    idx_tk = _pad_tiles(idx_btk.reshape(rows, -1).astype(jnp.int32))
    main = Scope(page_size, kv_cache.shape[0], idx_tk.shape[1] // BLOCK_T)
    extra = None
    if extra_kv_cache is not None:
        xidx_tk = _pad_tiles(extra_idx_btk.reshape(rows, -1).astype(jnp.int32))
        extra = Scope(extra_page_size, extra_kv_cache.shape[0], xidx_tk.shape[1] // BLOCK_T)
    if num_splits is None:
        work = main.num_tiles + (extra.num_tiles if extra else 0)
        num_splits = choose_num_splits(rows, head_blocks, work, num_sms())

    q_tnh = q_btnh.reshape(rows, h_q, d_qk).astype(jnp.bfloat16)
    sink_n = (jnp.full((h_q,), -jnp.inf, jnp.float32) if attn_sink_n is None
              else attn_sink_n.astype(jnp.float32))
    whole = lambda x: pl.BlockSpec(x.shape, lambda r, s, h: (0,) * x.ndim)  # noqa: E731
    per_row = lambda x: pl.BlockSpec((None, x.shape[1]), lambda r, s, h: (r, 0))  # noqa: E731
    heads = lambda d: pl.BlockSpec((None, block_h, d), lambda r, s, h: (r, h, 0))  # noqa: E731

    length_t = _row_lengths(topk_length_b, s_q, idx_btk.shape[-1], b)
    args = [length_t, sink_n, q_tnh[..., :D_V]]
    specs = [whole(length_t), pl.BlockSpec((block_h,), lambda r, s, h: (h,)), heads(D_V)]
    if kv_format.d_nope == D_V:
        args.append(q_tnh[..., D_V:])
        specs.append(heads(d_qk - D_V))
    cache_w = _as_words(kv_cache)
    args += [idx_tk, cache_w]
    specs += [per_row(idx_tk), whole(cache_w)]
    if extra:
        xlength_t = _row_lengths(extra_topk_length_b, s_q, extra_idx_btk.shape[-1], b)
        xcache_w = _as_words(extra_kv_cache)
        args += [xlength_t, xidx_tk, xcache_w]
        specs += [whole(xlength_t), per_row(xidx_tk), whole(xcache_w)]

    if num_splits == 1:
        out_shape = [jax.ShapeDtypeStruct((rows, h_q, D_V), jnp.bfloat16),
                     jax.ShapeDtypeStruct((rows, h_q), jnp.float32)]
        out_specs = [heads(D_V), pl.BlockSpec((None, block_h), lambda r, s, h: (r, h))]
    else:
        out_shape = [jax.ShapeDtypeStruct((rows, num_splits, h_q, D_V), jnp.float32),
                     jax.ShapeDtypeStruct((rows, num_splits, h_q), jnp.float32)]
        out_specs = [pl.BlockSpec((None, None, block_h, D_V), lambda r, s, h: (r, s, h, 0)),
                     pl.BlockSpec((None, None, block_h), lambda r, s, h: (r, s, h))]

    d_chunk = default_d_chunk(block_h) if d_chunk is None else d_chunk
    if d_chunk not in D_CHUNKS:
        raise ValueError(f"d_chunk must be one of {D_CHUNKS}, got {d_chunk}")
    kernel = functools.partial(_decode_kernel, kv_format=kv_format, main=main, extra=extra, num_splits=num_splits,
                               block_h=block_h, d_chunk=d_chunk, logit_scale=softmax_scale * LOG2E)
    res = pl.pallas_call(
        kernel, grid=(rows, num_splits, head_blocks), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name=f"sparse_mla_decode_{kv_format.name}")(*args)
    out_tnh, lse_tn = res if num_splits == 1 else combine_splits(*res, sink_n)
    return out_tnh.reshape(b, s_q, h_q, D_V), lse_tn.reshape(b, s_q, h_q).transpose(0, 2, 1)
