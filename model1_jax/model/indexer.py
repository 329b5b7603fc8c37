"""Lightning indexer (docs/model.md §4.6): picks, per query, the top-k compressed entries a CSA layer attends.

Keys come from the indexer's own overlapping compressor at width j; queries from the attention's
q latent. Score of query t for entry s:
    I[t, s] = Σ_i ω[t, i] · ReLU(q[t, i] · K[s]) · j^(-1/2),   ω = (x · weights_proj) · i^(-1/2)
in fp32. Entries not yet visible (s ≥ ⌊(t+1)/m⌋) score −inf; picks that land on them anyway (fewer
than k visible) become −1. Ties break towards the lower index (`lax.top_k`), deterministically.
The indexer returns integers only: no gradient reaches it through the LM loss (as in the reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import CSA, Config
from model1_jax.model import rope
from model1_jax.model.compressor import Compressor
from model1_jax.model.layers import Linear

F32 = jnp.float32


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

    def scores(self, x_btd: jax.Array, q_lat_btq: jax.Array, keys_bsj: jax.Array,
               positions_bt: jax.Array) -> jax.Array:
        """Index scores I [b, t, s] in fp32 (before the causal mask)."""
        i, j = self.config.index_n_heads, self.config.index_head_dim
        cos, sin = rope.cos_sin(self.config, rope.COMPRESS, positions_bt)
        q_btij = rope.apply_rope(self.q_b_proj(q_lat_btq), cos[:, :, None], sin[:, :, None])
        dots_btis = jnp.einsum("btij,bsj->btis", q_btij.astype(F32), keys_bsj.astype(F32))
        weights_bti = self.weights_proj(x_btd).astype(F32) * i ** -0.5
        return jnp.einsum("btis,bti->bts", jax.nn.relu(dots_btis) * j ** -0.5, weights_bti)

    def __call__(self, x_btd: jax.Array, q_lat_btq: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """Full-sequence selection (positions start at 0): picks [b, t, k] into this call's entries."""
        keys_bsj = self.compressor(x_btd)
        scores_bts = self.scores(x_btd, q_lat_btq, keys_bsj, positions_bt)
        return select_top_k(scores_bts, positions_bt, self.rate, self.top_k)
