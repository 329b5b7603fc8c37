"""Pure-jnp sparse MLA decode: the exact, readable statement of FlashMLA's semantics (docs/kernels.md §3).

Gather every indexed key of both scopes, dequantize it, and take one masked softmax in float32 with
HIGHEST-precision matmuls. Invalid positions are removed by select (never by multiplying by 0), so NaN in an
unreferenced cache slot cannot reach the output. Memory is O(b · s_q · topk · d_qk): fine for tests, the
benchmark's comparison and small decode batches; the Pallas kernel is the fast path.

Shape letters follow the project's one table (docs/model.md §0): b batch, t query rows per request (s_q), n heads,
h head dims, k index positions (both scopes together).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.formats import KVFormat, is_valid_index, read_tokens

HIGHEST = lax.Precision.HIGHEST


def _gather_scope(kv_cache, idx_btk, length_b, kv_format: KVFormat, page_size: int):
    """Keys float32 [b, t, k, h] (zero where invalid) and the validity mask [b, t, k] of one scope."""
    b, _, topk = idx_btk.shape
    capacity = kv_cache.shape[0] * page_size
    length_b11 = (jnp.full((b,), topk, jnp.int32) if length_b is None else length_b.astype(jnp.int32))[:, None, None]
    pos_k = jnp.arange(topk, dtype=jnp.int32)
    valid_btk = is_valid_index(idx_btk, pos_k, length_b11, capacity)
    k_btkh = read_tokens(kv_cache, jnp.where(valid_btk, idx_btk, 0), kv_format, page_size)
    return jnp.where(valid_btk[..., None], k_btkh, 0.0), valid_btk


def sparse_mla_decode_xla(q_btnh, kv_cache, idx_btk, *, kv_format: KVFormat, page_size: int, topk_length_b=None,
                          extra_kv_cache=None, extra_idx_btk=None, extra_page_size=None, extra_topk_length_b=None,
                          attn_sink_n=None, softmax_scale: float):
    """Reference on validated inputs: (out [b, t, n, d_v] in bf16, or float32 for float32 q; lse f32 [b, n, t])."""
    k_btkh, valid_btk = _gather_scope(kv_cache, idx_btk, topk_length_b, kv_format, page_size)
    if extra_kv_cache is not None:  # one softmax over the union of both scopes
        xk_btkh, xvalid_btk = _gather_scope(extra_kv_cache, extra_idx_btk, extra_topk_length_b, kv_format,
                                            extra_page_size)
        k_btkh = jnp.concatenate([k_btkh, xk_btkh], axis=2)
        valid_btk = jnp.concatenate([valid_btk, xvalid_btk], axis=2)

    q = q_btnh.astype(jnp.float32)
    z_btnk = softmax_scale * jnp.einsum("btnh,btkh->btnk", q, k_btkh, precision=HIGHEST)
    valid_bt1k = valid_btk[:, :, None, :]
    z_btnk = jnp.where(valid_bt1k, z_btnk, -jnp.inf)
    nonempty_btn = jnp.broadcast_to(valid_btk.any(axis=-1)[:, :, None], z_btnk.shape[:3])
    m_btn = jnp.where(nonempty_btn, z_btnk.max(axis=-1), 0.0)
    p_btnk = jnp.where(valid_bt1k, jnp.exp(z_btnk - m_btn[..., None]), 0.0)
    sum_btn = p_btnk.sum(axis=-1)
    lse_btn = jnp.log(jnp.where(nonempty_btn, sum_btn, 1.0)) + m_btn
    o_btnh = jnp.einsum("btnk,btkh->btnh", p_btnk, k_btkh[..., :kv_format.d_v], precision=HIGHEST)
    o_btnh = o_btnh / jnp.where(nonempty_btn, sum_btn, 1.0)[..., None]
    if attn_sink_n is not None:  # o * exp(lse) / (exp(lse) + exp(sink)); lse is left unchanged
        o_btnh = o_btnh / (1.0 + jnp.exp(attn_sink_n.astype(jnp.float32) - lse_btn))[..., None]
    o_btnh = jnp.where(nonempty_btn[..., None], o_btnh, 0.0)
    lse_btn = jnp.where(nonempty_btn, lse_btn, jnp.inf)
    out_dtype = jnp.float32 if q_btnh.dtype == jnp.float32 else jnp.bfloat16
    return o_btnh.astype(out_dtype), lse_btn.transpose(0, 2, 1)
