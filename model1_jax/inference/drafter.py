"""The DSpark drafter over a decode state (docs/dspark.md §6–§7): its rings, and one drafting call.

Each stage owns one paged cache per sequence in the state's KV format: slots [0, W) are the ring (the stage's
K=V row of committed position p at slot p mod W), slots [W, W+G) scratch for the block being drafted.

* `write_rings`: after the target has committed positions lengths .. lengths+n−1 (prefill chunks, accepted
  drafts), their captured rows become main_x and each stage's K=V rows, written into the ring. Only the last W
  rows of a call are written, so one scatter never has two rows for a slot.
* `draft`: G tokens per sequence from the anchor at position lengths (pending, not yet fed to the target).
  Each stage writes its block rows into the scratch slots and attends with the sparse decode kernel, every
  block query over the same index set: the block's G slots and the ring's min(W, lengths) filled slots
  (`topk_length` = G + filled; the order of keys does not matter). The rest is `model.dspark`'s own code.
Rejected drafts never reach the rings (only committed rows are written), so the drafter needs no rollback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from model1_jax.inference import sharded as sharded_decode
from model1_jax.inference.state import DecodeState
from model1_jax.model.attention import Attention
from model1_jax.model.dspark import Draft, DrawFn, greedy
from model1_jax.model.layers import weight
from model1_jax.model.transformer import Model1

F32 = jnp.float32


def write_rings(model: Model1, state: DecodeState, main_hidden_btk: jax.Array, lengths_b: jax.Array,
                n_new_b: jax.Array) -> DecodeState:
    """Writes rows 0 .. n_new−1 of the captured rows [b, t, k·d] (positions lengths ..) into every stage's ring."""
    ds, spec = model.dspark, state.spec
    b, t = main_hidden_btk.shape[:2]
    w, slots, h = spec.window, spec.dspark_slots, spec.head_dim
    i_t = jnp.arange(t)
    positions_bt = lengths_b[:, None] + i_t.astype(jnp.int32)
    keep_bt = (i_t < n_new_b[:, None]) & (i_t >= n_new_b[:, None] - w)
    slot_bt = jnp.where(keep_bt, jnp.arange(b)[:, None] * slots + jnp.mod(positions_bt, w), -1).reshape(-1)
    rows = ds.ring_rows(ds.combine(main_hidden_btk), positions_bt)
    rings = tuple(
        sharded_decode.write_kv(model.layout, ring, slot_bt, rows_bth.reshape(b * t, h), kv_format=spec.kv_format,
                                page_size=spec.page_size, batch=b)
        for ring, rows_bth in zip(state.dspark, rows))
    return state.replace(dspark=sharded_decode.constrain_state(model.layout, rings, b))


def draft(model: Model1, state: DecodeState, anchor_b: jax.Array, draw: DrawFn = greedy
          ) -> tuple[Draft, DecodeState]:
    """One drafting call from the rings (positions < lengths) and the anchor at position lengths [b]."""
    ds, spec = model.dspark, state.spec
    b, g, w, slots = anchor_b.shape[0], ds.block_size, spec.window, spec.dspark_slots
    lengths_b = state.lengths
    positions_bg = lengths_b[:, None] + jnp.arange(g, dtype=jnp.int32)
    base_b1 = jnp.arange(b)[:, None] * slots
    block_bg = base_b1 + w + jnp.arange(g)
    filled_b = jnp.minimum(lengths_b, w)
    ring_bw = jnp.where(jnp.arange(w) < filled_b[:, None], base_b1 + jnp.arange(w), -1)
    index_bgk = jnp.broadcast_to(jnp.concatenate([block_bg, ring_bw], axis=1)[:, None], (b, g, g + w))
    topk_length_b = (g + filled_b).astype(jnp.int32)
    rings = list(state.dspark)

    def attention(stage: int, attn: Attention, x_bgd: jax.Array) -> jax.Array:
        q_bgnh, _ = attn.queries(x_bgd, positions_bg)
        block_bgh = attn.keys(x_bgd, positions_bg)
        rings[stage] = sharded_decode.write_kv(model.layout, rings[stage], block_bg.reshape(-1),
                                               block_bgh.reshape(b * g, -1), kv_format=spec.kv_format,
                                               page_size=spec.page_size, batch=b)
        q_in = q_bgnh.astype(jnp.bfloat16) if spec.uses_kernel else q_bgnh
        o_bgnh, _ = sharded_decode.sparse_mla_decode(
            model.layout, q_in, rings[stage], index_bgk.astype(jnp.int32), kv_format=spec.kv_format,
            page_size=spec.page_size, topk_length=topk_length_b, attn_sink=weight(attn.sinks, F32),
            softmax_scale=spec.head_dim ** -0.5, backend="pallas" if spec.uses_kernel else "xla",
            interpret=spec.attention_backend == "interpret")
        return attn.output(o_bgnh.astype(q_bgnh.dtype), positions_bg)

    x_bgd = ds.block(model.embed_tokens(ds.block_ids(anchor_b)), positions_bg, attention)
    out = ds.markov(model.logits(ds.norm(x_bgd)), x_bgd, anchor_b, draw)
    return out, state.replace(dspark=sharded_decode.constrain_state(model.layout, tuple(rings), b))
