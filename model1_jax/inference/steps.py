"""Prefill and decode over a `DecodeState` (docs/decode.md §3), with attention through the sparse decode kernel.

One step function serves every call: each sequence b feeds n_new[b] ≤ t tokens at positions
lengths[b] .. lengths[b] + n_new[b] − 1 (rows past n_new are padding and change nothing). Prefill is that
step with t = the state's chunk, a decode step t = 1, speculative verification t = 2, so prompts of
different lengths, chunked prefill and token-by-token decode are the same code.

Per attention layer and call:
  1. the new tokens' K=V rows go into the sliding ring (slot = position mod ring);
  2. each compressor gathers its buffered positions and the new ones into whole windows aligned to
     multiples of its rate, pools every window the call completes (`Compressor.windows`,
     `overlap_windows`, `pool`, `finish`, as the full-sequence forward) and writes those entries;
     the new tokens' raw values go into its buffer (slot = position mod buffer size);
  3. `sparse_mla_decode`: main scope = the ring, the query's window newest first (`topk_length`);
     extra scope = compressed entries — CSA: the indexer's top-k, HCA: every entry, both masked by the
     visibility rule "entry w is visible to query t iff (w+1)·rate − 1 ≤ t".
The model's own modules do the math (`Attention.queries/keys/output`, `Indexer.scores`,
`select_top_k`, the decoder layer's mHC, norms and MoE), so decode and the full forward cannot drift apart.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model1_jax.common import check_token_ids
from model1_jax.inference import drafter
from model1_jax.inference import sharded as sharded_decode
from model1_jax.inference.state import CompressorState, DecodeState, LayerState
from model1_jax.model.attention import Attention
from model1_jax.model.compressor import Compressor, overlap_windows, pool
from model1_jax.model.decoder import AttentionFn
from model1_jax.model.indexer import select_top_k, visible_entries
from model1_jax.model.layers import weight
from model1_jax.model.transformer import Model1
from model1_jax.parallel.distributed import to_host

F32 = jnp.float32


def _rows(x_bt, rows_bu):
    """Per-sequence row gather: out[b, u] = x[b, rows[b, u]]."""
    return jax.vmap(lambda x, r: x[r])(x_bt, rows_bu)


# ----------------------------------------------------------------------------------------------------
# Layers


def compressor_step(comp: Compressor, cs: CompressorState, x_btd: jax.Array, lengths_b: jax.Array,
                    n_new_b: jax.Array) -> tuple[jax.Array, jax.Array, CompressorState]:
    """Feeds a call's tokens to one compressor.

    Returns (entries [b, w, h], their entry indices [b, w] with −1 for windows this call does not complete,
    the new buffers). w = the most windows t tokens can complete.
    """
    m, slots = comp.rate, cs.kv.shape[1]
    lead = m if comp.overlap else 0  # CSA also gathers the previous window: its Ca half is the first entry's overlap
    t = x_btd.shape[1]
    kv_new, gate_new = comp.project(x_btd)
    num_windows = (m - 1 + t) // m
    count_b = lengths_b // m  # entries complete before this call
    pos_bu = (count_b * m - lead)[:, None] + jnp.arange(lead + num_windows * m)
    from_buffer_bu = pos_bu < lengths_b[:, None]
    new_row_bu = jnp.clip(pos_bu - lengths_b[:, None], 0, t - 1)

    def gather(buffer, new):
        old, fresh = _rows(buffer, jnp.mod(pos_bu, slots)), _rows(new, new_row_bu)
        mask = from_buffer_bu.reshape(from_buffer_bu.shape + (1,) * (new.ndim - 2))
        return jnp.where(mask, old, fresh)

    kv_w, logits_w = comp.windows(gather(cs.kv, kv_new), gather(cs.gate, gate_new))
    if comp.overlap:
        has_prior = (count_b > 0)[:, None, None]  # window 0 has no predecessor: weight exactly 0
        prior_kv = jnp.where(has_prior, kv_w[:, 0, :, 0], 0)
        prior_logits = jnp.where(has_prior, logits_w[:, 0, :, 0], -jnp.inf)
        kv_w, logits_w = overlap_windows(kv_w[:, 1:], logits_w[:, 1:], prior_kv, prior_logits)
    entries_bwh = comp.finish(pool(kv_w, logits_w), count_b)
    entry_bw = count_b[:, None] + jnp.arange(num_windows)
    entry_bw = jnp.where(entry_bw < ((lengths_b + n_new_b) // m)[:, None], entry_bw, -1)

    # Only the last `slots` new tokens can still be needed; writing just those keeps the scatter free of
    # duplicate targets.
    i_t = jnp.arange(t)
    keep_bt = (i_t < n_new_b[:, None]) & (i_t >= n_new_b[:, None] - slots)
    slot_bt = jnp.where(keep_bt, jnp.mod(lengths_b[:, None] + i_t, slots), slots)  # `slots` is dropped
    b_b1 = jnp.arange(x_btd.shape[0])[:, None]
    new_cs = CompressorState(kv=cs.kv.at[b_b1, slot_bt].set(kv_new.astype(cs.kv.dtype), mode="drop"),
                             gate=cs.gate.at[b_b1, slot_bt].set(gate_new.astype(cs.gate.dtype), mode="drop"))
    return entries_bwh, entry_bw, new_cs


def page_slots(table_bu: jax.Array, entry, page_size: int) -> jax.Array:
    """Flat pool slots (`page · page_size + offset`) of a sequence's entry indices through its block table.

    table [b, u]; entry int [b, ...] (−1 = none). −1 where the entry is negative, past the table, or in a page
    the table does not hold (−1): such entries are neither written nor read."""
    width = table_bu.shape[1]
    page_idx = entry // page_size
    ok = (entry >= 0) & (page_idx < width)
    flat = jnp.clip(page_idx, 0, width - 1).reshape(entry.shape[0], -1)
    page_id = jnp.take_along_axis(table_bu, flat, axis=1).reshape(entry.shape)
    return jnp.where(ok & (page_id >= 0), page_id * page_size + entry % page_size, -1).astype(jnp.int32)


def block_tables(spec, rates, batch: int) -> dict:
    """A static state's block tables: sequence b owns pages b·P … (b+1)·P − 1 of each rate's page arrays."""
    return {rate: jnp.arange(batch, dtype=jnp.int32)[:, None] * spec.table_width(rate)
            + jnp.arange(spec.table_width(rate), dtype=jnp.int32) for rate in rates}


def attention_step(attn: Attention, ls: LayerState, x_btd: jax.Array, positions_bt: jax.Array,
                   lengths_b: jax.Array, n_new_b: jax.Array, spec, tables: dict | None = None
                   ) -> tuple[jax.Array, LayerState]:
    """One attention block over the caches (see the module docstring); returns its output [b, t, d].

    `tables` maps a compression rate to the block table [b, pages per sequence] of its entries and indexer keys
    (default: the static state's own pages)."""
    cfg = attn.config
    b, t = x_btd.shape[:2]
    h, window = cfg.head_dim, cfg.sliding_window
    kv_format, page = spec.kv_format, spec.page_size
    b_b1 = jnp.arange(b)[:, None]
    valid_bt = jnp.arange(t) < n_new_b[:, None]
    active_b = n_new_b > 0
    q_btnh, q_lat_btq = attn.queries(x_btd, positions_bt)

    ring = spec.ring
    slots_bt = jnp.where(valid_bt, b_b1 * ring + jnp.mod(positions_bt, ring), -1)
    kv_bth = attn.keys(x_btd, positions_bt)
    ring_cache = sharded_decode.write_kv(attn.layout, ls.window, slots_bt.reshape(-1), kv_bth.reshape(b * t, h),
                                         kv_format=kv_format, page_size=page, batch=b)
    key_pos_btk = positions_bt[..., None] - jnp.arange(window)  # newest first: the valid keys are a prefix
    ok_btk = valid_bt[..., None] & (key_pos_btk >= 0)
    window_idx = jnp.where(ok_btk, b_b1[..., None] * ring + jnp.mod(key_pos_btk, ring), -1).astype(jnp.int32)
    window_len = jnp.where(active_b, jnp.minimum(lengths_b + n_new_b, window), 0).astype(jnp.int32)

    ls = ls.replace(window=ring_cache)
    extra = {}
    if attn.compressor is not None:
        rate = attn.compressor.rate
        table_bu = (tables or block_tables(spec, (rate,), b))[rate]
        cap = table_bu.shape[1] * page  # entry slots one sequence can address
        entries_bwh, entry_bw, cs = compressor_step(attn.compressor, ls.compressor, x_btd, lengths_b, n_new_b)
        entries = sharded_decode.write_kv(attn.layout, ls.entries, page_slots(table_bu, entry_bw, page).reshape(-1),
                                          entries_bwh.reshape(-1, h), kv_format=kv_format, page_size=page, batch=b)
        ls = ls.replace(entries=entries, compressor=cs)
        visible_count_b = jnp.where(active_b, (lengths_b + n_new_b) // rate, 0)
        if attn.indexer is not None:
            keys_bwj, key_bw, ics = compressor_step(attn.indexer.compressor, ls.index_compressor, x_btd,
                                                    lengths_b, n_new_b)
            index_keys = sharded_decode.write_index_keys(attn.layout, ls.index_keys,
                                                         page_slots(table_bu, key_bw, page).reshape(-1),
                                                         keys_bwj.reshape(-1, keys_bwj.shape[-1]), page_size=page,
                                                         batch=b)
            ls = ls.replace(index_keys=index_keys, index_compressor=ics)
            keys_bsj = sharded_decode.gather_index_keys(attn.layout, index_keys, table_bu, page_size=page)
            scores_bts = attn.indexer.scores(x_btd, q_lat_btq, keys_bsj, positions_bt)
            picks_btk = select_top_k(scores_bts, positions_bt, rate, attn.indexer.top_k)
            extra_ok = (picks_btk >= 0) & valid_bt[..., None]
            extra_idx = jnp.where(extra_ok, page_slots(table_bu, picks_btk, page), -1)
            extra_len = jnp.minimum(visible_count_b, picks_btk.shape[-1])  # picks are sorted: valid ones first
        else:
            slots_bs = page_slots(table_bu, jnp.broadcast_to(jnp.arange(cap), (b, cap)), page)
            extra_ok = visible_entries(positions_bt, cap, rate) & valid_bt[..., None]
            extra_idx = jnp.where(extra_ok, slots_bs[:, None, :], -1)
            extra_len = visible_count_b
        extra = dict(extra_kv_cache=entries, extra_indices=extra_idx.astype(jnp.int32), extra_page_size=page,
                     extra_topk_length=extra_len.astype(jnp.int32))

    # Per shard (sequences, heads) under a sharding layout; the plain kernel call without one. The Pallas kernel
    # takes bf16 queries, as FlashMLA's does.
    q_in = q_btnh.astype(jnp.bfloat16) if spec.uses_kernel else q_btnh
    backend = dict(backend="pallas" if spec.uses_kernel else "xla", interpret=spec.attention_backend == "interpret")
    o_btnh, _ = sharded_decode.sparse_mla_decode(attn.layout, q_in, ring_cache, window_idx, kv_format=kv_format,
                                                 page_size=page, topk_length=window_len,
                                                 attn_sink=weight(attn.sinks, F32), softmax_scale=h ** -0.5,
                                                 **backend, **extra)
    return attn.output(o_btnh.astype(q_btnh.dtype), positions_bt), sharded_decode.constrain_state(attn.layout, ls, b)


def cached_attention(ls: LayerState, positions_bt: jax.Array, lengths_b: jax.Array, n_new_b: jax.Array, spec,
                     updated: list, tables: dict | None = None) -> AttentionFn:
    """An `attention=` replacement for a `DecoderLayer` that runs its block against the layer's caches
    (`attention_step`, through the block `tables`) and appends the layer's new state to `updated`."""
    def attention(attn: Attention, x_btd: jax.Array) -> jax.Array:
        y_btd, new_ls = attention_step(attn, ls, x_btd, positions_bt, lengths_b, n_new_b, spec, tables)
        updated.append(new_ls)
        return y_btd

    return attention


# ----------------------------------------------------------------------------------------------------
# Whole model


def model_step(model: Model1, state: DecodeState, ids_bt: jax.Array, n_new_b: jax.Array, capture: bool = False):
    """Main model over n_new[b] tokens per sequence: (final residual streams [b, t, c, d], new state); with
    `capture`, (streams, the DSpark drafter's captured rows [b, t, k·d], new state)."""
    lengths_b = state.lengths
    positions_bt = lengths_b[:, None] + jnp.arange(ids_bt.shape[1], dtype=jnp.int32)
    updated: list[LayerState] = []

    def attention(i: int, attn: Attention, x_btd: jax.Array) -> jax.Array:
        return cached_attention(state.layers[i], positions_bt, lengths_b, n_new_b, state.spec, updated,
                                state.block_tables)(attn, x_btd)

    out = model.streams(ids_bt, positions_bt, attention=attention, capture=capture)
    state = state.replace(layers=tuple(updated), lengths=lengths_b + n_new_b)
    return (*out, state) if capture else (out, state)


def mtp_step(model: Model1, state: DecodeState, streams_bucd: jax.Array, next_ids_bu: jax.Array,
             start_b: jax.Array, target_b: jax.Array, all_logits: bool = False
             ) -> tuple[jax.Array, DecodeState]:
    """Advances the MTP block to `target` positions.

    Row r of `streams_bucd` holds the main streams of position start + r and row r of `next_ids_bu` the
    token at position start + r + 1; the block consumes positions mtp_lengths .. target − 1 (each pairs
    h_t with token t+1 to predict token t+2). Returns the MTP logits of the last consumed position [b, v]
    (of every row [b, u, v], row i = position mtp_lengths_before + i, with `all_logits`) and the new state.
    """
    mtp = model.mtp
    u = streams_bucd.shape[1]
    mtp_len_b = state.mtp_lengths
    n_b = jnp.clip(target_b - mtp_len_b, 0, u)
    rows_bu = jnp.clip(mtp_len_b - start_b, 0, u - 1)[:, None] + jnp.arange(u)
    rows_bu = jnp.minimum(rows_bu, u - 1)
    ids_bu = _rows(next_ids_bu, rows_bu)
    positions_bu = mtp_len_b[:, None] + jnp.arange(u, dtype=jnp.int32)
    updated: list[LayerState] = []
    x_bucd = mtp(_rows(streams_bucd, rows_bu), model.embed_tokens(ids_bu), positions_bu,
                 cached_attention(state.mtp, positions_bu, mtp_len_b, n_b, state.spec, updated, state.block_tables))
    if not all_logits:
        x_bucd = _rows(x_bucd, jnp.maximum(n_b - 1, 0)[:, None])
    logits = model.logits(mtp.hidden(x_bucd))
    return (logits if all_logits else logits[:, 0]), state.replace(mtp=updated[0], mtp_lengths=mtp_len_b + n_b)


def last_rows(x_bt, n_new_b):
    """x[b, n_new[b] − 1] (row 0 for n_new = 0), keeping a length-1 row axis."""
    return _rows(x_bt, jnp.maximum(n_new_b - 1, 0)[:, None])


def chunk_step(model: Model1, state: DecodeState, ids_bt: jax.Array, n_new_b: jax.Array, all_logits: bool = False):
    """Prefill / decode call: main model, then (if the state has one) the MTP block over every position whose
    next token is in this call. Returns (logits, mtp_logits or None, state); logits are [b, v] at each
    sequence's last fed token, or [b, t, v] for every row with `all_logits`."""
    lengths_b = state.lengths
    if state.spec.dspark:  # the drafter's rings take every committed position (docs/dspark.md §6 step 2)
        streams_btcd, hidden_btk, state = model_step(model, state, ids_bt, n_new_b, capture=True)
        state = drafter.write_rings(model, state, hidden_btk, lengths_b, n_new_b)
    else:
        streams_btcd, state = model_step(model, state, ids_bt, n_new_b)
    last_btcd = last_rows(streams_btcd, n_new_b)
    logits = model.head(streams_btcd if all_logits else last_btcd)
    mtp_logits = None
    if state.spec.mtp:
        prev = state.last_streams[:, None].astype(streams_btcd.dtype)
        ext_streams = jnp.concatenate([prev, streams_btcd], axis=1)  # positions lengths − 1 ..
        ext_ids = jnp.concatenate([ids_bt, jnp.zeros_like(ids_bt[:, :1])], axis=1)
        target_b = jnp.where(n_new_b > 0, lengths_b + n_new_b - 1, state.mtp_lengths)
        mtp_logits, state = mtp_step(model, state, ext_streams, ext_ids, lengths_b - 1, target_b, all_logits)
        last = jnp.where((n_new_b > 0)[:, None, None], last_btcd[:, 0], state.last_streams)
        state = state.replace(last_streams=last.astype(state.last_streams.dtype))
    return (logits if all_logits else logits[:, 0]), mtp_logits, state


@functools.partial(jax.jit, static_argnames=("graphdef", "all_logits"), donate_argnames=("state",))
def _chunk_step(graphdef, params, state, ids_bt, n_new_b, all_logits: bool = False):
    return chunk_step(nnx.merge(graphdef, params), state, ids_bt, n_new_b, all_logits)


# ----------------------------------------------------------------------------------------------------
# Public entry points (host side: checks, chunking)


def check_state(model: Model1, state: DecodeState) -> None:
    spec = state.spec
    if len(state.layers) != model.config.num_hidden_layers or spec.head_dim != model.config.head_dim:
        raise ValueError("decode state was allocated for a different config")
    if spec.compute_dtype != jnp.dtype(model.dtype).name:
        raise ValueError(f"decode state was allocated for compute dtype {spec.compute_dtype}, the model computes "
                         f"in {jnp.dtype(model.dtype).name}")
    if spec.mtp and model.mtp is None:
        raise ValueError("decode state has MTP caches but the model has no MTP block")
    if spec.dspark and (model.dspark is None or len(model.dspark.stages) != spec.dspark_stages):
        raise ValueError("decode state has DSpark rings but the model has no such drafter")
    if spec.paged:
        raise ValueError("decode state is paged (pool_pages): its block tables belong to a Scheduler, which drives "
                         "it; prefill / decode_step take a static state (init_state)")


def prefill(model: Model1, state: DecodeState, ids, lengths=None, *, all_logits: bool = False,
            return_mtp: bool = False):
    """Feeds prompts (or continuations) into the state, `state.spec.chunk` tokens per call.

    ids: int [b, t] with b = the state's max_batch; sequence b feeds ids[b, :lengths[b]] (default: all t;
    0 leaves it untouched) from its current length on. Returns (logits, state): float32 [b, v] at each
    sequence's last fed token (zeros where it fed none), or [b, t, v] for every fed token with `all_logits`.
    `return_mtp` (state with MTP caches) adds the MTP block's logits before the state: [b, v] for the last
    position it consumed, or with `all_logits` [b, t, v] whose row j is the MTP logits of the j-th fed
    position (predicting the token two ahead; rows from lengths[b] − 1 on are left zero: the block needs
    the next token first). The state is donated: use only the returned one.
    """
    check_state(model, state)
    spec = state.spec
    if return_mtp and not spec.mtp:
        raise ValueError("prefill: return_mtp=True needs a state allocated with mtp=True")
    check_token_ids(ids, model.config.vocab_size, "prefill ids")
    ids = to_host(ids).astype(np.int32)
    b, t = ids.shape
    lengths = np.full((b,), t, np.int32) if lengths is None else np.asarray(lengths, np.int32)
    if b != spec.max_batch:
        raise ValueError(f"prefill: ids has batch {b}, the state holds {spec.max_batch} sequences (pad the batch "
                         "with rows of length 0)")
    if lengths.shape != (b,) or (lengths < 0).any() or (lengths > t).any():
        raise ValueError(f"prefill: lengths must be [{b}] integers in [0, {t}], got {lengths.tolist()}")
    start = to_host(state.lengths)
    if (start + lengths > spec.max_len).any():
        raise ValueError(f"prefill: sequences would reach {(start + lengths).max()} tokens, over the state's "
                         f"max_len {spec.max_len}")
    graphdef, params = nnx.split(model)
    chunk = spec.chunk
    ids = np.pad(ids, ((0, 0), (0, -(-t // chunk) * chunk - t)))
    outputs, mtp_out = [], np.zeros((b, t, model.config.vocab_size), np.float32) if all_logits and return_mtp else None
    last = last_mtp = None
    for offset in range(0, max(int(lengths.max()), 1), chunk):
        n_new = np.clip(lengths - offset, 0, chunk).astype(np.int32)
        mtp_before = to_host(state.mtp_lengths) if mtp_out is not None else None
        logits, mtp_logits, state = _chunk_step(graphdef, params, state, ids[:, offset:offset + chunk], n_new,
                                                all_logits=all_logits)
        if all_logits:
            outputs.append(logits)
            if mtp_out is not None:  # row i of this call is position mtp_before + i; keep this prefill's own
                consumed, rows = to_host(state.mtp_lengths) - mtp_before, to_host(mtp_logits)
                for row in range(b):
                    for i in range(consumed[row]):
                        j = mtp_before[row] + i - start[row]
                        if j >= 0:
                            mtp_out[row, j] = rows[row, i]
        else:
            ends_here = jnp.asarray((n_new > 0) & (lengths <= offset + chunk))[:, None]
            last = jnp.where(ends_here, logits, 0.0 if last is None else last)
            if return_mtp:
                last_mtp = jnp.where(jnp.asarray(n_new > 0)[:, None], mtp_logits, 0.0 if last_mtp is None else last_mtp)
    main = jnp.concatenate(outputs, axis=1)[:, :t] if all_logits else last
    if return_mtp:
        return main, (jnp.asarray(mtp_out) if all_logits else last_mtp), state
    return main, state


def decode_step(model: Model1, state: DecodeState, ids, active=None, *, return_mtp: bool = False):
    """One token per active sequence: ids int [b] → (logits float32 [b, v], state). The state is donated.

    With `return_mtp` (state with MTP caches): (logits, MTP logits of position lengths − 1 [b, v], state).
    """
    check_state(model, state)
    spec = state.spec
    if return_mtp and not spec.mtp:
        raise ValueError("decode_step: return_mtp=True needs a state allocated with mtp=True")
    ids = to_host(ids)
    check_token_ids(ids.reshape(-1, 1), model.config.vocab_size, "decode ids")
    if ids.shape != (spec.max_batch,):
        raise ValueError(f"decode_step: ids must have shape [{spec.max_batch}], got {ids.shape}")
    active = np.ones(ids.shape, bool) if active is None else np.asarray(active, bool)
    if active.shape != ids.shape:
        raise ValueError(f"decode_step: active must have shape [{spec.max_batch}], got {active.shape}")
    if ((to_host(state.lengths) + active) > spec.max_len).any():
        raise ValueError(f"decode_step: a sequence would exceed the state's max_len {spec.max_len}")
    graphdef, params = nnx.split(model)
    # all_logits passed as prefill passes it: the same jit cache entry serves a chunk-1 prefill and decode.
    logits, mtp_logits, state = _chunk_step(graphdef, params, state, ids[:, None].astype(np.int32),
                                            active.astype(np.int32), all_logits=False)
    return (logits, mtp_logits, state) if return_mtp else (logits, state)
