"""Sparse full-sequence attention over K=V rows picked by index: jnp reference, custom VJP, public entry point.

Every query row (b, t) attends, with all n heads, to the key rows `keys[b, indices[b, t, :]]` and a per-head
sink logit, in one softmax (K = V: a key row is also its value):

    z_s = scale · q[b, t, n] · keys[b, s]              for each valid index s of the row
    o[b, t, n]   = Σ_s exp(z_s) keys[b, s] / (Σ_s exp(z_s) + exp(sink_n))
    lse[b, t, n] = log Σ_s exp(z_s)                    natural log, WITHOUT the sink; +inf for a row with no
                                                       valid index (its o is 0), as FlashMLA's kernels do.

An index is valid iff 0 <= index < s (the key count); anything else (−1 padding, out of range) is never read,
so unreferenced key rows may hold anything, NaN included. Valid indices are gathered, not unioned: a row that
lists the same key twice attends to it twice (the model never repeats a key within a row).

Memory is linear in the number of (query, index) pairs: the forward runs over blocks of `block_t` queries,
so no [t, t] or [t, k, s] array exists, and keeps only o and lse; the backward (`jax.custom_vjp`) recomputes
each block's gather instead of storing [t, k, h] per-query copies. With ℓ = logaddexp(lse, sink) the
per-head log-normaliser, P_s = exp(z_s − ℓ), dO the output cotangent and D = dO · o:

    dz_s   = P_s · (dO · keys[s] − D')         D' = D − dlse · exp(ℓ − lse)  (lse's own cotangent folded in)
    dq     = scale · Σ_s dz_s · keys[s]
    dkeys[s] += scale · Σ_{t,n} dz_s · q[t, n] + Σ_{t,n} P_s · dO[t, n]          (scatter-add over every row
                                                                                   that lists s: K = V)
    dsink_n = −Σ_{b,t} exp(sink_n − ℓ) · D                                        (the sink has no value row)

Backends: "xla" is this module's blockwise jnp code (any shapes); "pallas" the Pallas-Triton kernels of
`triton_sparse_attention` (GPU, or CPU with `interpret=True`); "auto" the kernels on a GPU, else jnp. Both
backends share this custom VJP, so they differ only in how a block is computed. docs/training.md §1-2 derive
the formulas and the memory arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
BACKENDS = ("auto", "xla", "pallas")
BLOCK_ELEMENTS = 1 << 20  # jnp backend: most elements of one gathered [b, block_t, k, h] block (4 MiB in fp32);
# small blocks stay in the CPU caches (measured: 8 queries of 192 rows x 512 beat 32 and 128 by 1.4x and 3x)


def valid_indices(idx_btk: jax.Array, num_keys: int) -> jax.Array:
    """True where an index may be read: 0 <= index < num_keys."""
    return (idx_btk >= 0) & (idx_btk < num_keys)


def default_block_t(b: int, t: int, k: int, h: int) -> int:
    """Queries per jnp block: the largest power of two with b · block_t · k · h <= BLOCK_ELEMENTS, at most
    the next power of two >= t."""
    block = 1
    while block < t and 2 * block * b * k * h <= BLOCK_ELEMENTS:
        block *= 2
    return block


# -- jnp blocks --------------------------------------------------------------------------------------------


def _gather_rows(keys_bsh, idx_btk):
    """keys[b, idx[b, t, k]] [b, t, k, h] (zero where invalid) and the validity mask [b, t, k]."""
    valid_btk = valid_indices(idx_btk, keys_bsh.shape[1])
    b = keys_bsh.shape[0]
    rows_btkh = keys_bsh[jnp.arange(b)[:, None, None], jnp.where(valid_btk, idx_btk, 0)]
    return jnp.where(valid_btk[..., None], rows_btkh, jnp.zeros((), keys_bsh.dtype)), valid_btk


def _forward_block(q_btnh, keys_bsh, idx_btk, sinks_n, scale):
    """One query block: (o [b, t, n, h] in q's dtype, lse [b, t, n] f32)."""
    rows_btkh, valid_btk = _gather_rows(keys_bsh, idx_btk)
    z_btnk = jnp.einsum("btnh,btkh->btnk", q_btnh, rows_btkh, preferred_element_type=F32) * scale
    valid_bt1k = valid_btk[:, :, None, :]
    z_btnk = jnp.where(valid_bt1k, z_btnk, -jnp.inf)
    nonempty_bt1 = valid_btk.any(axis=-1)[..., None]
    m_btn = jnp.where(nonempty_bt1, z_btnk.max(axis=-1), 0.0)
    e_btnk = jnp.where(valid_bt1k, jnp.exp(z_btnk - m_btn[..., None]), 0.0)
    l_btn = e_btnk.sum(axis=-1)
    # exp(sink − m) may overflow to inf for a huge sink: o then tends to 0, which is the right limit.
    denom_btn = jnp.where(nonempty_bt1, l_btn + jnp.exp(sinks_n - m_btn), 1.0)
    # Probabilities are cast to the keys' dtype before the value product, as the dense `attend` does.
    p_btnk = (e_btnk / denom_btn[..., None]).astype(keys_bsh.dtype)
    o_btnh = jnp.einsum("btnk,btkh->btnh", p_btnk, rows_btkh, preferred_element_type=F32)
    lse_btn = jnp.where(nonempty_bt1, jnp.log(jnp.where(nonempty_bt1, l_btn, 1.0)) + m_btn, jnp.inf)
    return o_btnh.astype(q_btnh.dtype), lse_btn


def _backward_block(dkeys_bsh, q_btnh, keys_bsh, idx_btk, logz_btn, delta_btn, do_btnh, scale):
    """One query block of the backward (see the module docstring): (dkeys accumulated, dq [b, t, n, h] f32)."""
    rows_btkh, valid_btk = _gather_rows(keys_bsh.astype(F32), idx_btk)
    q_btnh, do_btnh = q_btnh.astype(F32), do_btnh.astype(F32)
    valid_bt1k = valid_btk[:, :, None, :]
    z_btnk = jnp.einsum("btnh,btkh->btnk", q_btnh, rows_btkh) * scale
    p_btnk = jnp.where(valid_bt1k, jnp.exp(z_btnk - logz_btn[..., None]), 0.0)
    dp_btnk = jnp.einsum("btnh,btkh->btnk", do_btnh, rows_btkh)
    dz_btnk = jnp.where(valid_bt1k, p_btnk * (dp_btnk - delta_btn[..., None]), 0.0)
    dq_btnh = scale * jnp.einsum("btnk,btkh->btnh", dz_btnk, rows_btkh)
    drows_btkh = scale * jnp.einsum("btnk,btnh->btkh", dz_btnk, q_btnh) + jnp.einsum("btnk,btnh->btkh", p_btnk,
                                                                                       do_btnh)
    drows_btkh = jnp.where(valid_btk[..., None], drows_btkh, 0.0)
    b = idx_btk.shape[0]
    dkeys_bsh = dkeys_bsh.at[jnp.arange(b)[:, None, None], jnp.where(valid_btk, idx_btk, 0)].add(drows_btkh)
    return dkeys_bsh, dq_btnh


def _split_blocks(x, block_t, fill):
    """[b, t, ...] -> [t_pad / block_t, b, block_t, ...], padding t with `fill`."""
    b, t = x.shape[:2]
    pad = -t % block_t
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, (t + pad) // block_t, block_t, *x.shape[2:]), 1, 0)


def _merge_blocks(x, t):
    """Inverse of `_split_blocks`: [nb, b, block_t, ...] -> [b, t, ...]."""
    nb, b, block_t = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape(b, nb * block_t, *x.shape[3:])[:, :t]


def xla_forward(q_btnh, keys_bsh, idx_btk, sinks_n, *, scale: float, block_t: int):
    """Blockwise jnp forward: (o [b, t, n, h], lse [b, t, n] f32)."""
    t = q_btnh.shape[1]
    blocks = (_split_blocks(q_btnh, block_t, 0), _split_blocks(idx_btk, block_t, -1))
    o, lse = lax.map(lambda qi: _forward_block(qi[0], keys_bsh, qi[1], sinks_n, scale), blocks)
    return _merge_blocks(o, t), _merge_blocks(lse, t)


def xla_backward(q_btnh, keys_bsh, idx_btk, logz_btn, delta_btn, do_btnh, *, scale: float, block_t: int):
    """Blockwise jnp backward: (dq [b, t, n, h] f32, dkeys [b, s, h] f32); `logz` and `delta` as in the module
    docstring (ℓ and D'), both f32 [b, t, n]."""
    t = q_btnh.shape[1]
    blocks = tuple(_split_blocks(x, block_t, f) for x, f in
                   [(q_btnh, 0), (idx_btk, -1), (logz_btn, 0.0), (delta_btn, 0.0), (do_btnh, 0)])

    def step(dkeys_bsh, blk):
        return _backward_block(dkeys_bsh, blk[0], keys_bsh, blk[1], blk[2], blk[3], blk[4], scale)

    dkeys_bsh, dq = lax.scan(step, jnp.zeros(keys_bsh.shape, F32), blocks)
    return _merge_blocks(dq, t), dkeys_bsh


# -- custom VJP shared by the backends --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Impl:
    """Static choice of how blocks are computed: "xla" (jnp, `block_t`) or "pallas" (kernels)."""

    backend: str
    block_t: int = 0
    interpret: bool = False


def _forward(impl: Impl, scale, q, keys, idx, sinks):
    if impl.backend == "xla":
        return xla_forward(q, keys, idx, sinks, scale=scale, block_t=impl.block_t)
    from pallas_kernels.triton_sparse_attention import triton_forward
    return triton_forward(q, keys, idx, sinks, scale=scale, interpret=impl.interpret)


def _backward(impl: Impl, scale, q, keys, idx, logz, delta, do):
    if impl.backend == "xla":
        return xla_backward(q, keys, idx, logz, delta, do, scale=scale, block_t=impl.block_t)
    from pallas_kernels.triton_sparse_attention import triton_backward
    return triton_backward(q, keys, idx, logz, delta, do, scale=scale, interpret=impl.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _attention(impl: Impl, scale: float, q, keys, idx, sinks):
    return _forward(impl, scale, q, keys, idx, sinks)


def _attention_fwd(impl, scale, q, keys, idx, sinks):
    o, lse = _forward(impl, scale, q, keys, idx, sinks)
    return (o, lse), (q, keys, idx, sinks, o, lse)


def _attention_bwd(impl, scale, res, cotangents):
    q, keys, idx, sinks, o, lse = res
    do, dlse = cotangents
    nonempty = jnp.isfinite(lse)  # lse is +inf exactly for rows without a valid index
    logz = jnp.logaddexp(lse, sinks)  # +inf for those rows, so every P there is 0
    d = jnp.einsum("btnh,btnh->btn", do.astype(F32), o.astype(F32))
    delta = jnp.where(nonempty, d - dlse * jnp.exp(jnp.where(nonempty, logz - lse, 0.0)), 0.0)
    dq, dkeys = _backward(impl, scale, q, keys, idx, logz, delta, do)
    dsinks = -jnp.einsum("btn,btn->n", jnp.exp(sinks - logz), d)
    return dq.astype(q.dtype), dkeys.astype(keys.dtype), None, dsinks.astype(sinks.dtype)


_attention.defvjp(_attention_fwd, _attention_bwd)


# -- public entry point -----------------------------------------------------------------------------------


def sparse_attention(q, keys, indices, sinks, *, scale: float | None = None, backend: str = "auto",
                     interpret: bool = False, block_t: int | None = None):
    """Softmax attention of every head of each query row over the key rows it indexes, with per-head sinks.

    Args:
      q: `[b, t, n, h]` float32 or bfloat16 queries.
      keys: `[b, s, h]`, q's dtype: the shared K = V rows of each sequence.
      indices: int32 `[b, t, k]`: rows of `keys` each query attends to; values outside [0, s) are invalid and
        never read. Valid indices of one row should be distinct (they are gathered, so a repeat counts twice;
        the Pallas backward in interpret mode would drop all but one repeat's key gradient).
      sinks: float32 `[n]` sink logits (±inf allowed in the forward; the gradient needs them finite).
      scale: logit scale, default h ** -0.5.
      backend: "auto", "xla" or "pallas"; interpret: run the Pallas kernels in interpret mode (CPU).
      block_t: queries per block of the jnp backend (default `default_block_t`).

    Returns:
      o `[b, t, n, h]` in q's dtype and lse float32 `[b, t, n]` (natural log, sink excluded, +inf for a row
      without valid indices). Differentiable in q, keys, sinks (and through lse).
    """
    _check(q, keys, indices, sinks, scale, block_t)
    b, t, n, h = q.shape
    scale = float(h ** -0.5 if scale is None else scale)
    if _use_pallas(backend, interpret, q):
        impl = Impl("pallas", interpret=interpret)
    else:
        impl = Impl("xla", block_t=int(block_t or default_block_t(b, t, indices.shape[2], h)))
    return _attention(impl, scale, q, keys, indices, sinks)


def _use_pallas(backend: str, interpret: bool, q) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(interpret, bool):
        raise ValueError(f"interpret must be a bool, got {interpret!r}")
    if backend == "xla" and interpret:
        raise ValueError("interpret=True runs the Pallas kernels; it cannot be combined with backend='xla'")
    if backend == "auto":
        return interpret or jax.default_backend() == "gpu"
    return backend == "pallas"


def _check(q, keys, indices, sinks, scale, block_t) -> None:
    def need(ok, what):
        if not ok:
            raise ValueError(what)

    def desc(x):
        return f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}"

    need(getattr(q, "ndim", 0) == 4 and q.dtype in (jnp.float32, jnp.bfloat16),
         f"q must be float32 or bfloat16 [b, t, n, h], got {desc(q)}")
    b, t, n, h = q.shape
    need(min(q.shape) >= 1, f"q must have b, t, n, h >= 1, got shape {q.shape}")
    need(getattr(keys, "ndim", 0) == 3 and keys.shape[0] == b and keys.shape[2] == h and keys.dtype == q.dtype,
         f"keys must be {jnp.dtype(q.dtype).name} [{b}, s, {h}], got {desc(keys)}")
    need(keys.shape[1] >= 1, "keys must have s >= 1 rows")
    need(getattr(indices, "ndim", 0) == 3 and indices.shape[:2] == (b, t) and indices.dtype == jnp.int32,
         f"indices must be int32 [{b}, {t}, k], got {desc(indices)}")
    need(indices.shape[2] >= 1, "indices must have k >= 1 per row")
    need(getattr(sinks, "shape", None) == (n,) and sinks.dtype == jnp.float32,
         f"sinks must be float32 [{n}], got {desc(sinks)}")
    need(scale is None or (isinstance(scale, numbers.Real) and not isinstance(scale, bool) and scale > 0),
         f"scale must be a positive float or None, got {scale!r}")
    need(block_t is None or (isinstance(block_t, int) and not isinstance(block_t, bool) and block_t >= 1),
         f"block_t must be a positive int or None, got {block_t!r}")
