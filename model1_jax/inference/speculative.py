"""DSpark speculative decoding: draft G tokens, verify G + 1 in one target call, keep the accepted prefix.

One compiled step per call (`dspark_step`, the state donated), for every sequence b with its pending token x
(sampled, not yet fed) at position P = lengths[b] (docs/dspark.md §8):
  1. the drafter proposes d_1 .. d_G from its rings and x, each drawn from its reported distribution p_j
     (after the same temperature / top-k / top-p as the target's, the sequence's own settings);
  2. the target runs once on [x, d_1, …, d_{n−1}] at positions P .. P+n−1 (n = n_new[b] ≤ G + 1) through the
     cached attention (the sparse decode kernel with s_q = G + 1), capturing its target layers' rows;
  3. `sampling.accept_block`: a ≤ n − 1 drafts accepted by the lossless rule (greedy: equal to the argmax), then
     one more token — the replacement at the first rejection or the bonus after the last verified draft;
  4. commit P .. P+a: lengths = P + a + 1 (the rejected tail's cache writes are never read again: see
     `inference.state`), and those rows go into the drafter's rings. The emitted token is the next pending one.
A sequence near the end of its reserve verifies fewer drafts (n < G + 1); n = 0 feeds nothing (an idle slot).
Every sequence draws with its own key, so its tokens never depend on its batch neighbours.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.inference import drafter
from model1_jax.inference import sampling as sampling_lib
from model1_jax.inference import steps as decode
from model1_jax.inference.state import DecodeState
from model1_jax.model.transformer import Model1


def dspark_step(model: Model1, state: DecodeState, pending_b: jax.Array, n_new_b: jax.Array, keys_b: jax.Array,
                settings: tuple[jax.Array, jax.Array, jax.Array]
                ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, DecodeState]:
    """One draft-verify-commit step (see the module docstring).

    pending [b]: the token at position lengths; n_new [b]: positions to verify (1 + drafts, ≤ G + 1; 0 = idle);
    keys [b]: one random key per sequence; settings: (temperature [b], top_k [b], top_p [b]).
    Returns (emitted [b, G+1]: the accepted drafts then the new token, count [b]: tokens emitted (a + 1, 0 when
    idle), next pending [b], accepted drafts a [b], the drafts' confidence sigmoid(conf) [b, G], state).
    """
    g = model.dspark.block_size
    split_bk = jax.vmap(lambda k: jax.random.split(k, 2))(keys_b)
    draft_keys_b, accept_keys_b = split_bk[:, 0], split_bk[:, 1]
    probs = []

    def draw(i: int, logits_bv: jax.Array) -> jax.Array:
        p_bv = sampling_lib.row_probabilities(logits_bv, *settings)
        probs.append(p_bv)
        return sampling_lib.row_draw(jax.vmap(lambda k: jax.random.fold_in(k, i))(draft_keys_b), p_bv)

    proposal, state = drafter.draft(model, state, pending_b, draw)
    lengths_b = state.lengths
    n_new_b = n_new_b.astype(jnp.int32)
    ids_bt = jnp.concatenate([pending_b[:, None].astype(jnp.int32), proposal.tokens], axis=1)
    streams_btcd, hidden_btk, state = decode.model_step(model, state, ids_bt, n_new_b, capture=True)
    logits_btv = model.head(streams_btcd)
    b, t, v = logits_btv.shape
    per_row = tuple(jnp.repeat(s, t) for s in settings)
    target_btv = sampling_lib.row_probabilities(logits_btv.reshape(b * t, v), *per_row).reshape(b, t, v)

    def accept(key, target_tv, draft_gv, drafts_g, limit):
        a, token = sampling_lib.accept_block(key, target_tv[None], draft_gv[None], drafts_g[None], limit[None])
        return a[0], token[0]

    accepted_b, token_b = jax.vmap(accept)(accept_keys_b, target_btv, jnp.stack(probs, axis=1), proposal.tokens,
                                           jnp.maximum(n_new_b - 1, 0))
    count_b = jnp.where(n_new_b > 0, accepted_b + 1, 0)
    state = drafter.write_rings(model, state, hidden_btk, lengths_b, count_b)
    state = state.replace(lengths=lengths_b + count_b)
    j_t = jnp.arange(g + 1)
    emitted_bt = jnp.where(j_t < accepted_b[:, None], jnp.pad(proposal.tokens, ((0, 0), (0, 1))), token_b[:, None])
    return (emitted_bt, count_b, token_b, accepted_b, jax.nn.sigmoid(proposal.confidence), state)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def compiled_dspark_step(graphdef, params, state, pending_b, n_new_b, keys_b, settings):
    """`dspark_step` as one compiled call; the state is donated (its caches are updated in place)."""
    return dspark_step(nnx.merge(graphdef, params), state, pending_b, n_new_b, keys_b, settings)
