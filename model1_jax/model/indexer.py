"""Lightning indexer (docs/model.md §4.6): picks, per query, the top-k compressed entries a CSA layer attends.

Keys come from the indexer's own overlapping compressor at width j; queries from the attention's
q latent. Score of query t for entry s:
    I[t, s] = Σ_i ω[t, i] · ReLU(q[t, i] · K[s]) · j^(-1/2),   ω = (x · weights_proj) · i^(-1/2)
in fp32. Entries not yet visible (s ≥ ⌊(t+1)/m⌋) score −inf; picks that land on them anyway (fewer
than k visible) become −1. Ties break towards the lower index (`lax.top_k`), deterministically.
The indexer returns integers only: no gradient reaches it through the LM loss (as in the reference).
It is trained by its own objective (docs/training.md §4) through `scores_at`, the differentiable scores of
candidate entries. Full-sequence selection and scoring run over blocks of queries, so neither the
[t, i, s] per-head products nor the [t, s] score matrix is ever held whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import CSA, Config
from model1_jax.model import rope
from model1_jax.model.compressor import Compressor
from model1_jax.model.index_lists import entry_bounds
from model1_jax.model.layers import Linear

F32 = jnp.float32
BLOCK_ELEMENTS = 1 << 22  # most elements of one block's [b, block, i, s] dot products (16 MiB in fp32)


def visible_entries(positions_bt: jax.Array, num_entries: int, rate: int) -> jax.Array:
    """Causal rule for compressed entries: entry s is visible to query t iff s < ⌊(t+1)/rate⌋. [b, t, s] bool."""
    return jnp.arange(num_entries)[None, None, :] < ((positions_bt + 1) // rate)[..., None]


def select_top_k(scores_bts: jax.Array, positions_bt: jax.Array, rate: int, top_k: int) -> jax.Array:
    """Top-k visible entries per query, int32 [b, t, min(top_k, s)], −1 where fewer than k are visible."""
    visible_bts = visible_entries(positions_bt, scores_bts.shape[-1], rate)
    k = min(top_k, scores_bts.shape[-1])
    _, picks_btk = jax.lax.top_k(jnp.where(visible_bts, scores_bts, -jnp.inf), k)
    threshold_bt1 = ((positions_bt + 1) // rate)[..., None]
    return jnp.where(picks_btk < threshold_bt1, picks_btk, -1).astype(jnp.int32)


def entry_scores(q_btij: jax.Array, weights_bti: jax.Array, keys_bsj: jax.Array) -> jax.Array:
    """I [b, t, s] = Σ_i ω[t, i] · ReLU(q[t, i] · K[s]) · j^(-1/2), fp32 (ω already scaled by i^(-1/2))."""
    dots_btis = jnp.einsum("btij,bsj->btis", q_btij.astype(F32), keys_bsj.astype(F32))
    return jnp.einsum("btis,bti->bts", jax.nn.relu(dots_btis) * q_btij.shape[-1] ** -0.5, weights_bti)


def query_blocks(b: int, t: int, per_query: int) -> int:
    """Queries per block: the largest power of two with b · block · per_query <= BLOCK_ELEMENTS (>= 1)."""
    block = 1
    while block < t and 2 * block * b * per_query <= BLOCK_ELEMENTS:
        block *= 2
    return block


def blockwise(fn, block_t: int, *xs_bt):
    """`fn` over blocks of `block_t` queries of arrays [b, t, ...] (padded with zeros), results [b, t, ...]."""
    b, t = xs_bt[0].shape[:2]
    pad = -t % block_t

    nb = (t + pad) // block_t

    def split(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) if pad else x
        return jnp.moveaxis(x.reshape(b, nb, block_t, *x.shape[2:]), 1, 0)

    out = jax.lax.map(lambda xs: fn(*xs), tuple(split(x) for x in xs_bt))
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 1).reshape(b, nb * block_t, *y.shape[3:])[:, :t], out)


class Indexer(nnx.Module):
    """Parameters: compressor (overlapping, width j), q_b_proj [q, i, j], weights_proj [d, i]."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.rate = config.compress_rate(CSA)
        self.top_k = config.index_topk
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.compressor = Compressor(config, width=config.index_head_dim, rate=self.rate, overlap=True, **kw)
        i, j = config.index_n_heads, config.index_head_dim
        std = config.initializer_range
        self.q_b_proj = Linear("btq,qij->btij", (config.q_lora_rank, i, j),
                               ("q_lora", "index_heads", "index_head_dim"), std=std, **kw)
        self.weights_proj = Linear("btd,di->bti", (config.hidden_size, i), ("embed", "index_heads"),
                                   std=std, **kw)

    def queries(self, x_btd: jax.Array, q_lat_btq: jax.Array, positions_bt: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
        """(indexer queries q [b, t, i, j] rotated, fp32 head weights ω [b, t, i] scaled by i^(-1/2))."""
        cos, sin = rope.cos_sin(self.config, rope.COMPRESS, positions_bt)
        q_btij = rope.apply_rope(self.q_b_proj(q_lat_btq), cos[:, :, None], sin[:, :, None])
        return q_btij, self.weights_proj(x_btd).astype(F32) * self.config.index_n_heads ** -0.5

    def scores(self, x_btd: jax.Array, q_lat_btq: jax.Array, keys_bsj: jax.Array,
               positions_bt: jax.Array) -> jax.Array:
        """Index scores I [b, t, s] in fp32 (before the causal mask)."""
        return entry_scores(*self.queries(x_btd, q_lat_btq, positions_bt), keys_bsj)

    def select(self, x_btd: jax.Array, q_lat_btq: jax.Array, keys_bsj: jax.Array, positions_bt: jax.Array
               ) -> jax.Array:
        """Top-k visible entries per query of a full (possibly packed) sequence, int32 [b, t, min(k, s)],
        −1 where fewer are visible. Scored over blocks of queries, so no [t, i, s] or [t, s] array exists."""
        q_btij, w_bti = jax.lax.stop_gradient(self.queries(x_btd, q_lat_btq, positions_bt))
        keys_bsj = jax.lax.stop_gradient(keys_bsj)
        b, t, i, _ = q_btij.shape
        s = keys_bsj.shape[1]
        k = min(self.top_k, s)
        first_bt, end_bt = entry_bounds(positions_bt, self.rate)

        def block(q_btij, w_bti, first_bt, end_bt):
            w = jnp.arange(s, dtype=jnp.int32)
            visible_bts = (w >= first_bt[..., None]) & (w < end_bt[..., None])
            _, picks_btk = jax.lax.top_k(jnp.where(visible_bts, entry_scores(q_btij, w_bti, keys_bsj), -jnp.inf), k)
            ok_btk = (picks_btk >= first_bt[..., None]) & (picks_btk < end_bt[..., None])
            return jnp.where(ok_btk, picks_btk, -1).astype(jnp.int32)

        return blockwise(block, query_blocks(b, t, i * s), q_btij, w_bti, first_bt, end_bt)

    def scores_at(self, x_btd: jax.Array, q_lat_btq: jax.Array, keys_bsj: jax.Array, cand_btc: jax.Array,
                  positions_bt: jax.Array) -> jax.Array:
        """Differentiable scores I [b, t, c] of the candidate entries `cand` (−1 = none: score 0), over
        blocks of queries whose backward recomputes each block (the indexer's training student)."""
        q_btij, w_bti = self.queries(x_btd, q_lat_btq, positions_bt)
        b, t, i, j = q_btij.shape
        s = keys_bsj.shape[1]

        @jax.checkpoint
        def block(q_btij, w_bti, cand_btc):
            valid_btc = (cand_btc >= 0) & (cand_btc < s)
            rows_btcj = keys_bsj[jnp.arange(b)[:, None, None], jnp.where(valid_btc, cand_btc, 0)].astype(F32)
            dots_btic = jnp.einsum("btij,btcj->btic", q_btij.astype(F32), rows_btcj)
            scores_btc = jnp.einsum("btic,bti->btc", jax.nn.relu(dots_btic) * j ** -0.5, w_bti)
            return jnp.where(valid_btc, scores_btc, 0.0)

        c = cand_btc.shape[2]
        return blockwise(block, query_blocks(b, t, c * max(i, j)), q_btij, w_bti, cand_btc)

    def __call__(self, x_btd: jax.Array, q_lat_btq: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """Full-sequence selection: picks [b, t, k] into this call's entries (`positions_bt` inside documents)."""
        return self.select(x_btd, q_lat_btq, self.compressor(x_btd, positions_bt), positions_bt)
