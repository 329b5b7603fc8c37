"""DSpark speculative decoding: draft G tokens, verify G + 1 in one target call, keep the accepted prefix.

One compiled step per call (`dspark_step`, the state donated), for every sequence b with its pending token x
(sampled, not yet fed) at position P = lengths[b] (docs/dspark.md §8):
  1. the drafter proposes d_1 .. d_G from its rings and x, each drawn from its reported distribution p_j
     (after the same temperature / top-k / top-p as the target's);
  2. the target runs once on [x, d_1, …, d_G] at positions P .. P+G through the cached attention (the sparse
     decode kernel with s_q = G + 1), capturing its target layers' rows;
  3. `sampling.accept_block`: a drafts accepted by the lossless rule (greedy: equal to the argmax), then one
     more token — the replacement at the first rejection or the bonus after the last draft;
  4. commit P .. P+a: lengths = P + a + 1 (the rejected tail's cache writes are never read again: see
     `inference.state`), and those rows go into the drafter's rings. The emitted token is the next pending one.
Sequences near their capacity verify fewer tokens (the rows past it are padding); inactive ones feed nothing.
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


def dspark_step(model: Model1, state: DecodeState, pending_b: jax.Array, active_b: jax.Array, key: jax.Array,
                sampling) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, DecodeState]:
    """One draft-verify-commit step (see the module docstring).

    Returns (emitted [b, G+1]: the accepted drafts then the new token, count [b]: tokens emitted (a + 1, 0 when
    inactive), next pending [b], accepted drafts a [b], the drafts' confidence sigmoid(conf) [b, G], state).
    """
    spec = state.spec
    g = model.dspark.block_size
    draft_key, accept_key = jax.random.split(key)
    probs = []

    def draw(i: int, logits_bv: jax.Array) -> jax.Array:
        p_bv = sampling_lib.probabilities(logits_bv, sampling)
        probs.append(p_bv)
        return sampling_lib.draw(jax.random.fold_in(draft_key, i), p_bv)

    proposal, state = drafter.draft(model, state, pending_b, draw)
    lengths_b = state.lengths
    active_b = active_b.astype(jnp.int32)
    n_new_b = active_b * jnp.clip(spec.max_len - lengths_b, 0, g + 1)
    ids_bt = jnp.concatenate([pending_b[:, None].astype(jnp.int32), proposal.tokens], axis=1)
    streams_btcd, hidden_btk, state = decode.model_step(model, state, ids_bt, n_new_b, capture=True)
    logits_btv = model.head(streams_btcd)
    b, t, v = logits_btv.shape
    target_btv = sampling_lib.probabilities(logits_btv.reshape(b * t, v), sampling).reshape(b, t, v)
    accepted_b, token_b = sampling_lib.accept_block(accept_key, target_btv, jnp.stack(probs, axis=1),
                                                    proposal.tokens, jnp.maximum(n_new_b - 1, 0))
    count_b = jnp.where(active_b > 0, accepted_b + 1, 0)
    state = drafter.write_rings(model, state, hidden_btk, lengths_b, count_b)
    state = state.replace(lengths=lengths_b + count_b)
    j_t = jnp.arange(g + 1)
    emitted_bt = jnp.where(j_t < accepted_b[:, None], jnp.pad(proposal.tokens, ((0, 0), (0, 1))), token_b[:, None])
    return (emitted_bt, count_b, token_b, accepted_b, jax.nn.sigmoid(proposal.confidence), state)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def compiled_dspark_step(graphdef, params, state, pending_b, active_b, key, sampling):
    """`dspark_step` as one compiled call; the state is donated (its caches are updated in place)."""
    return dspark_step(nnx.merge(graphdef, params), state, pending_b, active_b, key, sampling)
