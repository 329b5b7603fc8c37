"""Independent float64 numpy oracle for FlashMLA's sparse FP8 decode, written from docs/kernels.md.

It shares no semantics code with `pallas_kernels`: byte offsets come from the tables of docs/kernels.md §4, the
quantizer from docs/kernels.md §5 (with frexp instead of bit tricks), the attention from docs/kernels.md §3.4. Only
FlashMLA's comparison rule (docs/kernels.md §7.1) is imported, from `pallas_kernels.compare`, so the benchmark checks
with the same rule.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from pallas_kernels.compare import decode_report

BF16 = ml_dtypes.bfloat16
FP8 = ml_dtypes.float8_e4m3fn

# docs/kernels.md §4: (d_qk, NoPE dims, dims per scale)
FACTS = {"model1": (512, 448, 64), "v32": (576, 512, 128)}


def block_stride(kv_format: str, page: int) -> int:
    if kv_format == "model1":
        return math.ceil(584 * page / 576) * 576
    return 656 * page


def token_offsets(kv_format: str, page: int, g):
    """(NoPE, scale, RoPE) byte offsets of slot g inside its block (the tables of docs/kernels.md §4.1, §4.3)."""
    if kv_format == "model1":
        return 576 * g, 576 * page + 8 * g, 576 * g + 448
    return 656 * g, 656 * g + 512, 656 * g + 528


def quantize(k_ush: np.ndarray, kv_format: str, fill: int = 0) -> np.ndarray:
    """docs/kernels.md §5 on bf16 keys `[P, G, d_qk]` -> uint8 `[P, S]`; bytes of no token are set to `fill`."""
    d_qk, d_nope, tile = FACTS[kv_format]
    num_blocks, page, _ = k_ush.shape
    x = np.asarray(k_ush).astype(BF16).astype(np.float32)
    tiles = x[..., :d_nope].reshape(num_blocks, page, d_nope // tile, tile)
    with np.errstate(invalid="ignore"):
        s_inv = np.maximum(np.max(np.abs(tiles), axis=-1) / np.float32(448.0), np.float32(1e-4)).astype(np.float32)
    mant, expo = np.frexp(s_inv.astype(np.float64))  # s_inv = mant * 2^expo, mant in [0.5, 1)
    ceil_log2 = np.where(mant == 0.5, expo - 1, expo)
    nan = np.isnan(s_inv)
    scale = np.where(nan, np.nan, np.ldexp(1.0, ceil_log2)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        fp8 = (tiles / scale[..., None]).astype(FP8).reshape(num_blocks, page, d_nope).view(np.uint8)
    rope = x[..., d_nope:].astype(BF16).view(np.uint8)  # little-endian bf16 pairs
    out = np.full((num_blocks, block_stride(kv_format, page)), fill, np.uint8)
    for g in range(page):
        o_nope, o_scale, o_rope = token_offsets(kv_format, page, g)
        out[:, o_nope:o_nope + d_nope] = fp8[:, g]
        out[:, o_rope:o_rope + 2 * (d_qk - d_nope)] = rope[:, g]
        if kv_format == "model1":
            e = np.where(nan[:, g], 255, ceil_log2[:, g] + 127).astype(np.uint8)
            out[:, o_scale:o_scale + 7] = e
        else:
            out[:, o_scale:o_scale + 16] = scale[:, g].astype("<f4").view(np.uint8).reshape(num_blocks, 16)
    return out


def dequantize_tokens(cache: np.ndarray, kv_format: str, page: int, slots: np.ndarray) -> np.ndarray:
    """float64 keys `[n, d_qk]` of flat slots (all in range), read from the bytes."""
    d_qk, d_nope, tile = FACTS[kv_format]
    slots = np.asarray(slots, np.int64)
    p, g = slots // page, slots % page
    o_nope, o_scale, o_rope = token_offsets(kv_format, page, g)
    take = lambda off, n: cache[p[:, None], off[:, None] + np.arange(n)]  # noqa: E731
    fp8 = take(o_nope, d_nope).view(FP8).astype(np.float64)
    if kv_format == "model1":
        e = take(o_scale, 7).astype(np.float64)
        scale = np.where(e == 255, np.nan, 2.0 ** (e - 127))
    else:
        scale = take(o_scale, 16).view("<f4").astype(np.float64)
    rope = take(o_rope, 2 * (d_qk - d_nope)).view("<u2").view(BF16).astype(np.float64)
    nope = (fp8.reshape(-1, d_nope // tile, tile) * scale[..., None]).reshape(-1, d_nope)
    return np.concatenate([nope, rope], axis=1)


def valid_positions(idx_btk, length_b, capacity):
    """docs/kernels.md §3.2–3.3, with our superset rule: -1 and anything outside [0, capacity) is invalid."""
    b, _, topk = idx_btk.shape
    length = np.full(b, topk) if length_b is None else np.asarray(length_b)
    in_len = np.arange(topk)[None, None, :] < length[:, None, None]
    idx = np.asarray(idx_btk, np.int64)
    return in_len & (idx >= 0) & (idx < capacity)


def sparse_decode(q, scopes, *, kv_format, attn_sink=None, softmax_scale, d_v=512):
    """docs/kernels.md §3.4 in float64. `scopes`: list of (cache, indices [b,s_q,k], page, topk_length or None; or for a
    dense float cache `[P, G, d]` the kv_format name "dense"). Returns (out [b,s_q,h,512], lse [b,h,s_q])."""
    q = np.asarray(q).astype(np.float64)
    b, s_q, h_q, _ = q.shape
    out = np.zeros((b, s_q, h_q, d_v))
    lse = np.full((b, h_q, s_q), np.inf)
    for i in range(b):
        for j in range(s_q):
            keys = []
            for cache, idx, page, length in scopes:
                valid = valid_positions(idx, length, cache.shape[0] * page)[i, j]
                slots = np.asarray(idx)[i, j][valid]
                if kv_format == "dense":
                    keys.append(np.asarray(cache).astype(np.float64)[slots // page, slots % page])
                else:
                    keys.append(dequantize_tokens(cache, kv_format, page, slots))
            k = np.concatenate(keys, axis=0)  # T, duplicates kept
            if len(k) == 0:
                continue  # out 0, lse +inf, whatever the sink
            z = softmax_scale * q[i, j] @ k.T  # [h, T]
            m = z.max(axis=1, keepdims=True)
            row_lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
            o = np.exp(z - row_lse[:, None]) @ k[:, :d_v]
            if attn_sink is not None:
                with np.errstate(over="ignore"):
                    o = o / (1.0 + np.exp(np.asarray(attn_sink, np.float64) - row_lse))[:, None]
            out[i, j] = o
            lse[i, :, j] = row_lse
    return out, lse


def check_decode(out, lse, ref_out, ref_lse):
    """FlashMLA's sparse-decode tolerances (docs/kernels.md §7.1); the rule itself is `pallas_kernels.compare`."""
    problem = decode_report(out, lse, ref_out, ref_lse)
    assert problem is None, problem
