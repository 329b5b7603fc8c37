"""The lightning indexer's training objective: joint-softmax teacher, KL to the indexer, recall@k.

For a query t with candidate entries c (its valid picks in the sparse stage, every visible entry in the
warm-up), the teacher is each head's probability of c under the layer's joint softmax (window keys +
entries + sink; ℓ is that softmax's log-normaliser, `logaddexp(lse, sink)` of `sparse_attention`),
summed over all heads and L1-normalised over the candidates:

    p_t(c) = Σ_n exp(z_{t,n,c} − ℓ_{t,n}) / Σ_{c'} Σ_n exp(z_{t,n,c'} − ℓ_{t,n}),   z = scale · q · entry_c

The student is the softmax of the indexer's scores over the same candidates, and the loss is KL(p ‖ q) per
query with p held constant. docs/training.md §4 explains why normalising each head over the entries alone
(without ℓ) is a different, wrong teacher. Everything here is blockwise over queries or linear in the
candidate count; the warm-up's candidates are all visible entries (t/m per query), so its arrays are
[t, t/m], the one quadratic (but m times smaller than t²) piece.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def teacher(q_btnh: jax.Array, keys_bsh: jax.Array, cand_btc: jax.Array, logz_btn: jax.Array, *, scale: float,
            block_t: int = 64) -> jax.Array:
    """Teacher p [b, t, c] f32 (0 at invalid candidates, rows without one are all 0); no gradient.

    `cand_btc` holds rows of `keys_bsh` (entries; outside [0, s) = none), `logz_btn` the joint log-normaliser
    ℓ (natural log, sink included). Computed over blocks of `block_t` queries, never [t, n, c] at once.
    """
    q_btnh, keys_bsh, logz_btn = (lax.stop_gradient(x) for x in (q_btnh, keys_bsh, logz_btn))
    b, t = cand_btc.shape[:2]
    s = keys_bsh.shape[1]
    block_t = min(block_t, t)
    pad = -t % block_t

    def split(x, fill):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill) if pad else x
        return jnp.moveaxis(x.reshape(b, (t + pad) // block_t, block_t, *x.shape[2:]), 1, 0)

    def block(args):
        q, cand, logz = args
        valid = (cand >= 0) & (cand < s)
        rows = jnp.where(valid[..., None], keys_bsh[jnp.arange(b)[:, None, None], jnp.where(valid, cand, 0)], 0.0)
        z = jnp.einsum("btnh,btch->btnc", q.astype(F32), rows.astype(F32)) * scale
        mass = jnp.where(valid, jnp.exp(z - logz[..., None]).sum(axis=2), 0.0)  # Σ over heads [b, t, c]
        total = mass.sum(axis=-1, keepdims=True)
        return jnp.where(total > 0, mass / jnp.where(total > 0, total, 1.0), 0.0)

    p = lax.map(block, (split(q_btnh, 0), split(cand_btc, -1), split(logz_btn.astype(F32), jnp.inf)))
    return jnp.moveaxis(p, 0, 1).reshape(b, t + pad, cand_btc.shape[2])[:, :t]


def kl_per_query(teacher_btc: jax.Array, scores_btc: jax.Array, valid_btc: jax.Array) -> jax.Array:
    """KL(teacher ‖ softmax(scores over the valid candidates)) per query [b, t] f32; 0 for rows without
    a valid candidate. Differentiable in `scores` only."""
    p = lax.stop_gradient(teacher_btc.astype(F32))
    logits = jnp.where(valid_btc, scores_btc.astype(F32), -jnp.inf)
    any_valid = valid_btc.any(axis=-1, keepdims=True)
    log_q = jax.nn.log_softmax(jnp.where(any_valid, logits, 0.0), axis=-1)
    log_p = jnp.log(jnp.where(p > 0, p, 1.0))
    terms = jnp.where(valid_btc & (p > 0), p * (log_p - jnp.where(valid_btc, log_q, 0.0)), 0.0)
    return terms.sum(axis=-1)


def recall_at_k(teacher_btc: jax.Array, scores_btc: jax.Array, valid_btc: jax.Array, k: int
                ) -> tuple[jax.Array, jax.Array]:
    """(hits, slots): over the rows with valid candidates, how many of the teacher's top-min(k, valid)
    candidates are also among the scores' top-min(k, valid), and how many that could have been.
    recall@k = hits / slots. Both int32 scalars; ties break towards the lower candidate index."""
    valid = valid_btc
    count_bt = valid.sum(axis=-1)
    kk = min(k, valid.shape[-1])
    limit_bt = jnp.minimum(count_bt, kk)
    rank_ok = jnp.arange(kk) < limit_bt[..., None]  # [b, t, kk]: the first min(k, valid) of each ranking

    def top(x):
        _, idx = lax.top_k(jnp.where(valid, x.astype(F32), -jnp.inf), kk)
        return idx

    t_idx, s_idx = top(teacher_btc), top(scores_btc)
    chosen = jnp.zeros(valid.shape, bool)
    b, t = valid.shape[:2]
    bi, ti = jnp.arange(b)[:, None, None], jnp.arange(t)[None, :, None]
    chosen = chosen.at[bi, ti, jnp.where(rank_ok, s_idx, 0)].max(rank_ok)
    hits = jnp.where(rank_ok, chosen[bi, ti, t_idx], False).sum()
    return hits.astype(jnp.int32), limit_bt.sum().astype(jnp.int32)
