"""One compiled step over a batch of independent requests (docs/serving.md §3): prefill chunks, decode tokens
and speculative verification in the same call, each slot with its own sampling settings and random stream.

Per slot b the step feeds `n_new[b]` tokens (`ids[b, :n_new[b]]`):
  * a prompt chunk of a request being prefilled (`emit` false until the chunk that ends the prompt);
  * the pending token of a decoding request, and with `has_draft` the drafter's guess of the token after it
    (verified by the speculative-sampling rule; greedy: kept iff it is the argmax);
  * nothing (n_new = 0): the slot is idle and its state is untouched.
`fresh[b]` restarts the slot at length 0 (a newly admitted request): nothing else needs clearing, because every
cache slot is rewritten before it can be read again (docs/decode.md §2.5). The block tables come with the
inputs: the scheduler owns them.

The step is `verify` (the main model and the acceptance rule) followed by `mtp_draft` (the MTP block catches up
on every kept position and drafts the next token). With the DSpark drafter the prompt chunks go through `verify`
(which also writes the drafter's rings) and decoding slots through `dspark_batch_step` (`inference.speculative`:
G drafts, a G + 1-token verify), in calls of their own.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from model1_jax.inference import drafter, sampling
from model1_jax.inference import speculative as speculative_lib
from model1_jax.inference import steps as decode
from model1_jax.inference.state import DecodeState
from model1_jax.model.transformer import Model1


@struct.dataclass
class StepInput:
    ids_bt: jax.Array  # int32 [b, t]: prompt chunk, or [pending, draft?]; rows past n_new are ignored
    n_new_b: jax.Array  # int32 [b]
    fresh_b: jax.Array  # bool [b]: the slot starts a new request at this call
    emit_b: jax.Array  # bool [b]: draw the next token after this call
    has_draft_b: jax.Array  # bool [b]: ids[b, n_new − 1] is a draft to verify (n_new = 2)
    tables: dict  # compress rate -> int32 [b, pages per sequence] (paged state) — may be empty
    temperature_b: jax.Array  # float32 [b]
    top_k_b: jax.Array  # int32 [b]
    top_p_b: jax.Array  # float32 [b]
    seed_b: jax.Array  # uint32 [b]
    stream_b: jax.Array  # uint32 [b]
    counter_b: jax.Array  # int32 [b]: tokens the request has emitted before this call


@struct.dataclass
class StepOutput:
    tokens_b2: jax.Array  # int32 [b, 2]: emitted tokens, the first count[b] valid
    count_b: jax.Array  # int32 [b]: 0 (no emission), 1, or 2 (draft accepted + bonus token)
    accepted_b: jax.Array  # bool [b]
    draft_b: jax.Array  # int32 [b]: the next draft (MTP), meaningful where count > 0


def verify(model: Model1, state: DecodeState, inp: StepInput, draft_probs_bv: jax.Array, keys):
    """Main model over the fed tokens, then the next token per emitting slot (and the verdict on its draft).

    Returns (output without drafts, pending token [b], kept positions [b], streams [b, t, c, d], the state
    with lengths advanced by the kept positions, the streams before the call [b, c, d] or None)."""
    spec = state.spec
    t = inp.ids_bt.shape[1]
    lengths0_b = jnp.where(inp.fresh_b, 0, state.lengths)
    state = state.replace(lengths=lengths0_b, block_tables=inp.tables if spec.paged else None)
    if spec.mtp:
        state = state.replace(mtp_lengths=jnp.where(inp.fresh_b, 0, state.mtp_lengths))
    prev_streams = state.last_streams
    n_new_b = inp.n_new_b
    has_draft_b = inp.has_draft_b & inp.emit_b & (n_new_b >= 2)
    if spec.dspark:  # the drafter's rings take every committed position (no drafts are verified here)
        streams_btcd, hidden_btk, state = decode.model_step(model, state, inp.ids_bt, n_new_b, capture=True)
        state = drafter.write_rings(model, state, hidden_btk, lengths0_b, n_new_b)
    else:
        streams_btcd, state = decode.model_step(model, state, inp.ids_bt, n_new_b)

    # Row r0 predicts the token after the last certain one; row r0 + 1 the one after the draft.
    r0_b = jnp.maximum(n_new_b - 1 - has_draft_b, 0)
    rows_b2 = jnp.stack([r0_b, jnp.minimum(r0_b + 1, t - 1)], axis=1)
    logits_b2v = model.head(decode._rows(streams_btcd, rows_b2))
    settings = (inp.temperature_b, inp.top_k_b, inp.top_p_b)
    target_bv = sampling.row_probabilities(logits_b2v[:, 0], *settings)
    draft_b = jnp.take_along_axis(inp.ids_bt, rows_b2[:, 1:], axis=1)[:, 0]
    accepted_b, corrected_b = sampling.row_accept_draft(keys[:, 0], target_bv, draft_probs_bv, draft_b)
    accepted_b = accepted_b & has_draft_b
    first_b = jnp.where(has_draft_b, corrected_b, sampling.row_draw(keys[:, 1], target_bv))
    bonus_b = sampling.row_draw(keys[:, 2], sampling.row_probabilities(logits_b2v[:, 1], *settings))
    count_b = inp.emit_b * (1 + accepted_b)
    kept_b = n_new_b - (has_draft_b & ~accepted_b)  # a rejected draft is rolled back by the length alone
    state = state.replace(lengths=lengths0_b + kept_b)
    pending_b = jnp.where(accepted_b, bonus_b, first_b)
    out = StepOutput(tokens_b2=jnp.stack([first_b, bonus_b], axis=1), count_b=count_b.astype(jnp.int32),
                     accepted_b=accepted_b, draft_b=jnp.zeros_like(first_b))
    return out, pending_b, kept_b, streams_btcd, state, prev_streams, lengths0_b


def mtp_draft(model: Model1, state: DecodeState, inp: StepInput, pending_b, kept_b, streams_btcd, prev_streams,
              lengths0_b, key_b):
    """The MTP block consumes every kept position whose next token is known and drafts the token after the
    pending one. Returns (draft [b], its distribution [b, v], state)."""
    t = inp.ids_bt.shape[1]
    last = decode._rows(streams_btcd, jnp.maximum(kept_b - 1, 0)[:, None])[:, 0]
    state = state.replace(last_streams=jnp.where((kept_b > 0)[:, None, None], last, prev_streams).astype(
        prev_streams.dtype))
    ext_streams = jnp.concatenate([prev_streams[:, None].astype(streams_btcd.dtype), streams_btcd], axis=1)
    r_u = jnp.arange(t + 1)
    ids_bu = jnp.pad(inp.ids_bt, ((0, 0), (0, 1)))
    ext_ids = jnp.where(r_u < kept_b[:, None], ids_bu, jnp.where(r_u == kept_b[:, None], pending_b[:, None], 0))
    # Emitting slots know the token after their last kept position; a mid-prompt chunk does not know the next one.
    target_b = jnp.where(inp.emit_b, lengths0_b + kept_b,
                         jnp.where(inp.n_new_b > 0, lengths0_b + inp.n_new_b - 1, state.mtp_lengths))
    mtp_logits_bv, state = decode.mtp_step(model, state, ext_streams, ext_ids, lengths0_b - 1, target_b)
    probs_bv = sampling.row_probabilities(mtp_logits_bv, inp.temperature_b, inp.top_k_b, inp.top_p_b)
    return sampling.row_draw(key_b, probs_bv), probs_bv, state


def batch_step(model: Model1, state: DecodeState, inp: StepInput, draft_probs_bv: jax.Array):
    """`verify`, then (with MTP caches) `mtp_draft`: (StepOutput, draft distributions [b, v], state)."""
    keys = jax.vmap(lambda k: jax.random.split(k, 4))(sampling.row_keys(inp.seed_b, inp.stream_b, inp.counter_b))
    out, pending_b, kept_b, streams_btcd, state, prev_streams, lengths0_b = verify(model, state, inp,
                                                                                 draft_probs_bv, keys)
    if state.spec.mtp:
        draft_b, draft_probs_bv, state = mtp_draft(model, state, inp, pending_b, kept_b, streams_btcd, prev_streams,
                                                   lengths0_b, keys[:, 3])
        out = out.replace(draft_b=draft_b)
    return out, draft_probs_bv, state


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state", "draft_probs_bv"))
def compiled_batch_step(graphdef, params, state, inp: StepInput, draft_probs_bv):
    """`batch_step` compiled; the state and the draft distributions are donated (updated in place). One
    compilation per distinct number of fed rows t."""
    return batch_step(nnx.merge(graphdef, params), state, inp, draft_probs_bv)


@struct.dataclass
class DSparkOutput:
    tokens_bt: jax.Array  # int32 [b, G + 1]: emitted tokens, the first count[b] valid
    count_b: jax.Array  # int32 [b]: accepted drafts + 1 (0 for slots that fed nothing)
    accepted_b: jax.Array  # int32 [b]: drafts accepted
    confidence_bg: jax.Array  # float32 [b, G]: the drafter's sigmoid(confidence) of this call's drafts


def dspark_batch_step(model: Model1, state: DecodeState, inp: StepInput) -> tuple[DSparkOutput, DecodeState]:
    """DSpark decode for every slot with n_new > 0: ids[b, 0] is its pending token, n_new − 1 the drafts it may
    verify (its room left in the reserve, at most G). Each slot draws with its own key and settings."""
    state = state.replace(block_tables=inp.tables if state.spec.paged else None)
    keys_b = sampling.row_keys(inp.seed_b, inp.stream_b, inp.counter_b)
    tokens, count, _, accepted, confidence, state = speculative_lib.dspark_step(
        model, state, inp.ids_bt[:, 0], inp.n_new_b, keys_b, (inp.temperature_b, inp.top_k_b, inp.top_p_b))
    return DSparkOutput(tokens, count.astype(jnp.int32), accepted.astype(jnp.int32), confidence), state


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def compiled_dspark_batch_step(graphdef, params, state, inp: StepInput):
    """`dspark_batch_step` compiled (one shape: ids [b, 1]); the state is donated."""
    return dspark_batch_step(nnx.merge(graphdef, params), state, inp)


# ----------------------------------------------------------------------------------------------------
# A few slots of the batch (prefill chunks without the other slots riding along)


def take_slots(state: DecodeState, slots_p: jax.Array) -> DecodeState:
    """The state of slots `slots_p` [p] alone, as a state of p sequences that shares the page pools."""
    b, p = state.spec.max_batch, slots_p.shape[0]

    def take(x):
        rows = x.reshape(b, x.shape[0] // b, *x.shape[1:])[slots_p]  # a slot's ring pages / buffer rows
        return rows.reshape(-1, *x.shape[1:])

    def layer(ls):
        return ls.replace(window=take(ls.window), compressor=jax.tree.map(take, ls.compressor),
                          index_compressor=jax.tree.map(take, ls.index_compressor))

    return state.replace(layers=tuple(layer(ls) for ls in state.layers), lengths=take(state.lengths),
                         mtp=None if state.mtp is None else layer(state.mtp),
                         mtp_lengths=None if state.mtp_lengths is None else take(state.mtp_lengths),
                         last_streams=None if state.last_streams is None else take(state.last_streams),
                         dspark=None if state.dspark is None else tuple(take(r) for r in state.dspark),
                         block_tables=jax.tree.map(take, state.block_tables),
                         spec=dataclasses.replace(state.spec, max_batch=p))


def put_slots(state: DecodeState, sub: DecodeState, slots_p: jax.Array) -> DecodeState:
    """`state` with slots `slots_p` replaced by `sub` (from `take_slots`) and the page pools taken from `sub`."""
    b, p = state.spec.max_batch, slots_p.shape[0]

    def put(x, y):
        k = x.shape[0] // b
        return x.reshape(b, k, *x.shape[1:]).at[slots_p].set(y.reshape(p, k, *y.shape[1:])).reshape(x.shape)

    def layer(ls, sub_ls):
        return sub_ls.replace(window=put(ls.window, sub_ls.window),
                              compressor=jax.tree.map(put, ls.compressor, sub_ls.compressor),
                              index_compressor=jax.tree.map(put, ls.index_compressor, sub_ls.index_compressor))

    maybe = lambda x, y: None if x is None else put(x, y)  # noqa: E731
    return state.replace(layers=tuple(layer(a, c) for a, c in zip(state.layers, sub.layers)),
                         lengths=put(state.lengths, sub.lengths),
                         mtp=None if state.mtp is None else layer(state.mtp, sub.mtp),
                         mtp_lengths=maybe(state.mtp_lengths, sub.mtp_lengths),
                         last_streams=maybe(state.last_streams, sub.last_streams),
                         dspark=None if state.dspark is None else tuple(map(put, state.dspark, sub.dspark)),
                         block_tables=jax.tree.map(put, state.block_tables, sub.block_tables))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state", "draft_probs_bv"))
def compiled_slots_step(graphdef, params, state, slots_p, inp: StepInput, draft_probs_bv):
    """`batch_step` on slots `slots_p` [p] only (distinct; `inp` has p rows): the other slots are not computed.
    Returns (StepOutput of p rows, draft distributions of all slots, state)."""
    sub = take_slots(state, slots_p)
    out, probs_pv, sub = batch_step(nnx.merge(graphdef, params), sub, inp, draft_probs_bv[slots_p])
    return out, draft_probs_bv.at[slots_p].set(probs_pv), put_slots(state, sub, slots_p)
