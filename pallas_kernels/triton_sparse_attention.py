"""Pallas-Triton kernels of `sparse_attention`: forward, and a backward in two kernels (dQ; dKV by atomics).

Shapes and semantics are those of `pallas_kernels.sparse_attention` (o, lse without the sink, +inf for empty
rows); this module holds the kernels and the padding around them. docs/training.md §3 explains the design.

* Forward, grid (b, t, n / H): a program owns one query row and a block of H heads; it walks the row's index
  list in tiles of BK rows: gather (clamp + mask) a [BK, h] tile from the flattened keys, logits [H, BK],
  online softmax in base 2 (running max starts at −1e30, never −inf), acc [H, h] += P · tile. The sink joins
  the denominator at the end. Tiles after the row's last valid index are never visited (`ntiles`).
* dQ, grid (b, t, n / H): the same walk with ℓ (log-normaliser incl. sink) known: P = 2^(s − ℓ₂),
  dS = P ⊙ (dO · tileᵀ − D'), dq += dS · tile.
* dKV, grid (b, t): one program per query row loops over tiles and, inside, over head blocks, summing
  scale · dSᵀ q + Pᵀ dO over all n heads into a [BK, h] fp32 tile, then adds that tile to the row's keys
  with one `atomic_add` per tile (K = V: both gradients land on the same row). Summing the heads first cuts
  the atomic traffic by n / H against fusing dKV into the dQ kernel, at the price of recomputing the two
  logit products (7 matmuls per tile instead of 4). Invalid lanes add 0 to one of BK spare rows past the keys
  (a distinct row per lane), so every address is in bounds and one atomic call never repeats a row.

Padding (all outside the kernels): heads to a power of two >= 16 (Triton's dot needs M >= 16), head dim to a
power of two >= 16, the index list to a multiple of BK with −1. Padded heads have q = dO = 0 and ℓ = +inf, so
they contribute nothing.

GPU tile choices (untimed: no GPU was available; see docs/training.md §3.3), for V4's h = 512 and n = 64 / 128:
forward H = 64, BK = 32: q [64, 512] and one bf16 tile [32, 512] are 64 + 32 KiB of shared memory (two
pipeline stages: 128 KiB), the fp32 accumulator [64, 512] is 128 registers per thread at 8 warps — the shape
that the decode kernel compiled to with small spills. dQ: the same plus dO. dKV: a [32, 512] fp32 tile (64
registers per thread) and [64, 32] logits per head block, the head blocks in a loop so that one block's q and dO
are in shared memory at a time. fp32 inputs use IEEE fp32 dots (exact, slow: tests); bf16 inputs use tensor
cores with fp32 accumulation and P / dS cast to bf16 for the value-side products.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
NEG_BIG = -1e30  # masked logit and running-max start: finite, so m_old − m_new is never inf − inf
BLOCK_H = 64  # heads per program (M of the logit matmul; >= 64 lets Hopper use wgmma)
BLOCK_K = 32  # index rows per tile
NUM_WARPS = 8
NUM_STAGES = 2
HIGHEST = lax.Precision.HIGHEST  # fp32 operands: IEEE dots; bf16 operands are unaffected
NT = (((1,), (1,)), ((), ()))  # A · Bᵀ
TN = (((0,), (0,)), ((), ()))  # Aᵀ · B


def _pow2_at_least(x: int, floor: int = 16) -> int:
    return max(floor, 1 << (x - 1).bit_length())


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
    return lax.dot_general(a, b, dims, precision=HIGHEST, preferred_element_type=jnp.float32)


def _load_tile(idx_ref, kv_ref, tile, base, num_keys: int, block_k: int, width: int):
    """Gathers tile `tile` of a row: (rows [BK, h] in the keys' dtype, zero where invalid; valid [BK]; idx)."""
    start = pl.multiple_of(tile * block_k, block_k)
    idx = idx_ref[pl.ds(start, block_k)]
    valid = (idx >= 0) & (idx < num_keys)
    rows = base + jnp.where(valid, idx, 0)  # clamp first: the GPU reads whatever address it is given
    cols = jnp.arange(width, dtype=jnp.int32)
    kv = kv_ref[rows[:, None], cols[None, :]]
    return jnp.where(valid[:, None], kv, jnp.zeros((), kv.dtype)), valid, idx


def _forward_kernel(ntiles_ref, sink_ref, q_ref, idx_ref, kv_ref, o_ref, lse_ref, *, num_keys, block_k,
                    logit_scale):
    bi, ti = pl.program_id(0), pl.program_id(1)  # at the top: interpret mode fails on program_id inside loops
    q = q_ref[...]
    block_h, width = q.shape
    n_tiles = ntiles_ref[bi, ti]
    base = bi * num_keys

    def step(tile, carry):
        m, l, acc = carry
        kv, valid, _ = _load_tile(idx_ref, kv_ref, tile, base, num_keys, block_k, width)
        s = jnp.where(valid[None, :], _dot(q, kv, NT) * logit_scale, NEG_BIG)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.where(valid[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
        acc = acc * alpha[:, None] + _dot(p.astype(kv.dtype), kv)
        return m_new, l * alpha + p.sum(axis=1), acc

    init = (jnp.full((block_h,), NEG_BIG, jnp.float32), jnp.zeros((block_h,), jnp.float32),
            jnp.zeros((block_h, width), jnp.float32))
    m, l, acc = lax.fori_loop(0, n_tiles, step, init)
    nonempty = l > 0.0
    denom = l + jnp.exp2(sink_ref[...] * LOG2E - m)  # the sink: exp(sink) in units of 2^m
    o_ref[...] = jnp.where(nonempty[:, None], acc / jnp.where(nonempty, denom, 1.0)[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, (jnp.log2(jnp.where(nonempty, l, 1.0)) + m) * LN2, jnp.inf)


def _probs(q, do, kv, valid, logz2, delta, logit_scale):
    """P [H, BK] and dS = P ⊙ (dO · tileᵀ − D') [H, BK], fp32."""
    s = _dot(q, kv, NT) * logit_scale
    p = jnp.where(valid[None, :], jnp.exp2(s - logz2[:, None]), 0.0)
    ds = jnp.where(valid[None, :], p * (_dot(do, kv, NT) - delta[:, None]), 0.0)
    return p, ds


def _dq_kernel(ntiles_ref, q_ref, do_ref, logz2_ref, delta_ref, idx_ref, kv_ref, dq_ref, *, num_keys, block_k,
               logit_scale, scale):
    bi, ti = pl.program_id(0), pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    logz2, delta = logz2_ref[...], delta_ref[...]
    block_h, width = q.shape
    base = bi * num_keys

    def step(tile, dq):
        kv, valid, _ = _load_tile(idx_ref, kv_ref, tile, base, num_keys, block_k, width)
        _, ds = _probs(q, do, kv, valid, logz2, delta, logit_scale)
        return dq + _dot(ds.astype(kv.dtype), kv)

    dq = lax.fori_loop(0, ntiles_ref[bi, ti], step, jnp.zeros((block_h, width), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(ntiles_ref, q_ref, do_ref, logz2_ref, delta_ref, idx_ref, kv_ref, _dkv_in_ref, dkv_ref, *,
                num_keys, block_k, block_h, logit_scale, scale, spare_row):
    bi, ti = pl.program_id(0), pl.program_id(1)
    n_pad, width = q_ref.shape
    base = bi * num_keys
    lane = jnp.arange(block_k, dtype=jnp.int32)
    cols = jnp.arange(width, dtype=jnp.int32)

    def step(tile, carry):
        kv, valid, idx = _load_tile(idx_ref, kv_ref, tile, base, num_keys, block_k, width)

        # A loop, not a Python unroll: unrolled, Triton hoists every head block's q and dO out of the tile loop
        # into shared memory (n 128: 325 KiB > 227 KiB, docs/compile_check.md §2). A one-trip loop (n 64) compiles
        # as the unrolled form did (same shared memory and spills).
        def head_block(hb, acc):
            heads = pl.ds(pl.multiple_of(hb * block_h, block_h), block_h)
            q, do = q_ref[heads, :], do_ref[heads, :]
            p, ds = _probs(q, do, kv, valid, logz2_ref[heads], delta_ref[heads], logit_scale)
            return acc + scale * _dot(ds.astype(q.dtype), q, TN) + _dot(p.astype(do.dtype), do, TN)

        acc = lax.fori_loop(0, n_pad // block_h, head_block, jnp.zeros((block_k, width), jnp.float32))
        dest = jnp.where(valid, base + idx, spare_row + lane)  # invalid lanes: distinct spare rows, adding 0
        plt.atomic_add(dkv_ref, (dest[:, None], cols[None, :]), jnp.where(valid[:, None], acc, 0.0))
        return carry

    lax.fori_loop(0, ntiles_ref[bi, ti], step, 0)


# -- wrappers: padding, tile counts, pallas_call -----------------------------------------------------------


def _prepare(q_btnh, keys_bsh, idx_btk, block_k):
    """Padded q [b, t, N, W], flattened keys [b·s, W], padded indices [b, t, K'] and tiles per row [b, t]."""
    b, t, n, h = q_btnh.shape
    s = keys_bsh.shape[1]
    n_pad, width = _pow2_at_least(n), _pow2_at_least(h)
    q = jnp.pad(q_btnh, ((0, 0), (0, 0), (0, n_pad - n), (0, width - h)))
    kv = jnp.pad(keys_bsh, ((0, 0), (0, 0), (0, width - h))).reshape(b * s, width)
    idx = idx_btk.astype(jnp.int32)
    k = idx.shape[2]
    idx = jnp.pad(idx, ((0, 0), (0, 0), (0, -k % block_k)), constant_values=-1)
    valid = (idx_btk >= 0) & (idx_btk < s)
    last = jnp.max(jnp.where(valid, jnp.arange(1, k + 1, dtype=jnp.int32), 0), axis=-1)  # 1 + last valid
    return q, kv, idx, (last + block_k - 1) // block_k


def _pad_heads(x_btn, n_pad, fill):
    return jnp.pad(x_btn, ((0, 0), (0, 0), (0, n_pad - x_btn.shape[2])), constant_values=fill)


def _params(num_warps):
    return plt.CompilerParams(num_warps=num_warps, num_stages=NUM_STAGES)


def triton_forward(q_btnh, keys_bsh, idx_btk, sinks_n, *, scale: float, interpret: bool = False,
                   block_h: int = BLOCK_H, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS):
    """(o [b, t, n, h] in q's dtype, lse [b, t, n] f32) on validated inputs."""
    b, t, n, h = q_btnh.shape
    s = keys_bsh.shape[1]
    q, kv, idx, ntiles = _prepare(q_btnh, keys_bsh, idx_btk, block_k)
    n_pad, width = q.shape[2:]
    bh = min(block_h, n_pad)
    sink = jnp.pad(sinks_n.astype(jnp.float32), (0, n_pad - n))
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    heads = pl.BlockSpec((None, None, bh, width), lambda i, j, k: (i, j, k, 0))
    kernel = functools.partial(_forward_kernel, num_keys=s, block_k=block_k, logit_scale=scale * LOG2E)
    o, lse = pl.pallas_call(
        kernel, grid=(b, t, n_pad // bh),
        in_specs=[whole(ntiles), pl.BlockSpec((bh,), lambda i, j, k: (k,)), heads,
                  pl.BlockSpec((None, None, idx.shape[2]), lambda i, j, k: (i, j, 0)), whole(kv)],
        out_specs=[heads, pl.BlockSpec((None, None, bh), lambda i, j, k: (i, j, k))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, t, n_pad), jnp.float32)],
        compiler_params=_params(num_warps), interpret=interpret, name="sparse_attention_fwd",
    )(ntiles, sink, q, idx, kv)
    return o[:, :, :n, :h], lse[:, :, :n]


def triton_backward(q_btnh, keys_bsh, idx_btk, logz_btn, delta_btn, do_btnh, *, scale: float,
                    interpret: bool = False, block_h: int = BLOCK_H, block_k: int = BLOCK_K,
                    num_warps: int = NUM_WARPS):
    """(dq [b, t, n, h] f32, dkeys [b, s, h] f32); logz = ℓ (natural log, sink included), delta = D'."""
    b, t, n, h = q_btnh.shape
    s = keys_bsh.shape[1]
    q, kv, idx, ntiles = _prepare(q_btnh, keys_bsh, idx_btk, block_k)
    n_pad, width = q.shape[2:]
    bh = min(block_h, n_pad)
    do = jnp.pad(do_btnh.astype(q.dtype), ((0, 0), (0, 0), (0, n_pad - n), (0, width - h)))
    logz2 = _pad_heads(logz_btn.astype(jnp.float32) * LOG2E, n_pad, jnp.inf)  # padded heads: P = 0
    delta = _pad_heads(delta_btn.astype(jnp.float32), n_pad, 0.0)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)  # noqa: E731
    row_idx = lambda *g: (g[0], g[1], 0)  # noqa: E731
    common = dict(num_keys=s, block_k=block_k, logit_scale=scale * LOG2E, scale=scale)

    heads = pl.BlockSpec((None, None, bh, width), lambda i, j, k: (i, j, k, 0))
    head_vec = pl.BlockSpec((None, None, bh), lambda i, j, k: (i, j, k))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **common), grid=(b, t, n_pad // bh),
        in_specs=[whole(ntiles), heads, heads, head_vec, head_vec,
                  pl.BlockSpec((None, None, idx.shape[2]), row_idx), whole(kv)],
        out_specs=heads, out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
        compiler_params=_params(num_warps), interpret=interpret, name="sparse_attention_dq",
    )(ntiles, q, do, logz2, delta, idx, kv)

    all_heads = pl.BlockSpec((None, None, n_pad, width), lambda i, j: (i, j, 0, 0))
    all_vec = pl.BlockSpec((None, None, n_pad), lambda i, j: (i, j, 0))
    dkv0 = jnp.zeros((b * s + block_k, width), jnp.float32)  # block_k spare rows absorb invalid lanes
    dkv = pl.pallas_call(
        functools.partial(_dkv_kernel, **common, block_h=bh, spare_row=b * s), grid=(b, t),
        in_specs=[whole(ntiles), all_heads, all_heads, all_vec, all_vec,
                  pl.BlockSpec((None, None, idx.shape[2]), row_idx), whole(kv), whole(dkv0)],
        out_specs=whole(dkv0), out_shape=jax.ShapeDtypeStruct(dkv0.shape, jnp.float32),
        input_output_aliases={7: 0}, compiler_params=_params(num_warps), interpret=interpret,
        name="sparse_attention_dkv",
    )(ntiles, q, do, logz2, delta, idx, kv, dkv0)
    return dq[:, :, :n, :h], dkv[:b * s].reshape(b, s, width)[:, :, :h]
