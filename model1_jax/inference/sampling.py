"""Token sampling: greedy, temperature, top-k, top-p, and the speculative acceptance rule.

Everything is written in terms of the filtered next-token distribution `probabilities(...)`. Greedy
(temperature 0) is the one-hot distribution of the argmax, so speculative sampling needs no special case:
with one-hot target p and draft q the rule below accepts a draft iff it is the argmax and otherwise emits
the argmax — exactly plain greedy decoding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Sampling settings. temperature 0 = greedy; top_k 0 and top_p 1 = no filter.

    Compiled steps take them as arrays (`arrays()`), so changing them never recompiles.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not self.temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")

    def arrays(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return jnp.float32(self.temperature), jnp.int32(self.top_k), jnp.float32(self.top_p)


def probabilities(logits_bv: jax.Array, sampling: Sampling | tuple) -> jax.Array:
    """The distribution tokens are drawn from, float32 [b, v]: temperature, then top-k, then top-p."""
    temperature, top_k, top_p = sampling.arrays() if isinstance(sampling, Sampling) else sampling
    logits_bv = logits_bv.astype(F32)
    v = logits_bv.shape[-1]

    def greedy(logits):
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), v, dtype=F32)

    def sample(logits):
        logits = logits / temperature
        sorted_bv = -jnp.sort(-logits, axis=-1)
        kth_b1 = jnp.take(sorted_bv, jnp.clip(top_k - 1, 0, v - 1), axis=-1)[:, None]
        use_k = (top_k > 0) & (top_k < v)
        logits = jnp.where(use_k & (logits < kth_b1), -jnp.inf, logits)
        sorted_bv = jnp.where(use_k & (sorted_bv < kth_b1), -jnp.inf, sorted_bv)
        # Keep the smallest set of most likely tokens whose mass reaches top_p (always at least one).
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        kept_bv = (jnp.cumsum(probs_bv, axis=-1) - probs_bv < top_p) | (top_p >= 1)
        threshold_b1 = jnp.min(jnp.where(kept_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
        return jax.nn.softmax(jnp.where(logits < threshold_b1, -jnp.inf, logits), axis=-1)

    return jax.lax.cond(temperature == 0, greedy, sample, logits_bv)


def draw(key: jax.Array, probs_bv: jax.Array) -> jax.Array:
    """One token per row from [b, v] probabilities, with an independent key per row: int32 [b]."""
    keys = jax.random.split(key, probs_bv.shape[0])
    return jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p)))(keys, probs_bv).astype(jnp.int32)


def accept_draft(key: jax.Array, target_bv: jax.Array, draft_bv: jax.Array, draft_b: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling (Leviathan et al. 2023): keeps the output distributed as the target.

    Accept the draft token d with probability min(1, p(d) / q(d)); on rejection draw from
    normalise(max(p − q, 0)). Returns (accepted [b] bool, the token to emit at the draft's position [b]).
    """
    u_key, r_key = jax.random.split(key)
    p_b = jnp.take_along_axis(target_bv, draft_b[:, None], axis=-1)[:, 0]
    q_b = jnp.take_along_axis(draft_bv, draft_b[:, None], axis=-1)[:, 0]
    u_b = jax.random.uniform(u_key, p_b.shape)
    accepted_b = u_b * q_b < p_b  # u < p/q without dividing by a zero q
    residual_bv = jnp.maximum(target_bv - draft_bv, 0.0)
    # p == q everywhere leaves no residual, but then the draft is always accepted; fall back to p.
    residual_bv = jnp.where(residual_bv.sum(-1, keepdims=True) > 0, residual_bv, target_bv)
    corrected_b = draw(r_key, residual_bv / residual_bv.sum(-1, keepdims=True))
    return accepted_b, jnp.where(accepted_b, draft_b, corrected_b)


def accept_block(key: jax.Array, target_bjv: jax.Array, draft_bgv: jax.Array, drafts_bg: jax.Array,
                 limit_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling over a block of g drafts (docs/dspark.md §8.1), lossless like `accept_draft`.

    target [b, g+1, v]: q_0 .. q_g, the target's distributions after the pending token and after each draft;
    draft [b, g, v]: p_1 .. p_g, what each draft was drawn from; drafts [b, g]; limit [b]: at most this many
    drafts may be accepted (fewer than g when the sequence nears its capacity).
    In order, draft j is accepted with probability min(1, q_{j−1}(d_j) / p_j(d_j)); the first rejection emits a
    draw from normalise(max(q_{j−1} − p_j, 0)); after `limit` acceptances a draw from q_limit (the bonus token).
    With one-hot (greedy) distributions this accepts exactly the drafts that equal the target's argmax.
    Returns (accepted count a [b], the token emitted after the accepted drafts [b]).
    """
    b, g, v = draft_bgv.shape
    u_key, r_key, q_key = jax.random.split(key, 3)
    q_bg = jnp.take_along_axis(target_bjv[:, :g], drafts_bg[..., None], axis=-1)[..., 0]
    p_bg = jnp.take_along_axis(draft_bgv, drafts_bg[..., None], axis=-1)[..., 0]
    ok_bg = (jax.random.uniform(u_key, (b, g)) * p_bg < q_bg) & (jnp.arange(g) < limit_b[:, None])
    accepted_b = jnp.sum(jnp.cumprod(ok_bg.astype(jnp.int32), axis=1), axis=1)
    residual = jnp.maximum(target_bjv[:, :g] - draft_bgv, 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, target_bjv[:, :g])
    residual = residual / residual.sum(-1, keepdims=True)
    rejected_bg = draw(r_key, residual.reshape(b * g, v)).reshape(b, g)
    plain_bj = draw(q_key, target_bjv.reshape(b * (g + 1), v)).reshape(b, g + 1)
    at_b1 = accepted_b[:, None]
    replacement_b = jnp.take_along_axis(rejected_bg, jnp.minimum(at_b1, g - 1), axis=1)[:, 0]
    bonus_b = jnp.take_along_axis(plain_bj, at_b1, axis=1)[:, 0]
    return accepted_b, jnp.where(accepted_b < limit_b, replacement_b, bonus_b)

# ----------------------------------------------------------------------------------------------------
# Per-row settings and keys (a batch of independent requests)


def row_keys(seed_b: jax.Array, stream_b: jax.Array, counter_b: jax.Array) -> jax.Array:
    """One key per row from (seed, stream, counter): a request's draws depend on its own seed and on how many
    tokens it has emitted, never on its batch neighbours or its slot."""
    def one(seed, stream, counter):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stream), counter)

    return jax.vmap(one)(seed_b, stream_b, counter_b)


def row_probabilities(logits_bv: jax.Array, temperature_b: jax.Array, top_k_b: jax.Array, top_p_b: jax.Array
                      ) -> jax.Array:
    """`probabilities` with settings per row: float32 [b, v]."""
    def one(logits_v, temperature, top_k, top_p):
        return probabilities(logits_v[None], (temperature, top_k, top_p))[0]

    return jax.vmap(one)(logits_bv, temperature_b, top_k_b, top_p_b)


def row_draw(keys_b: jax.Array, probs_bv: jax.Array) -> jax.Array:
    """One token per row, row b drawn with keys[b]: int32 [b]."""
    return jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p)))(keys_b, probs_bv).astype(jnp.int32)


def row_accept_draft(keys_b: jax.Array, target_bv: jax.Array, draft_bv: jax.Array, draft_b: jax.Array
                     ) -> tuple[jax.Array, jax.Array]:
    """`accept_draft` with one key per row."""
    def one(key, target_v, dist_v, draft):
        accepted, token = accept_draft(key, target_v[None], dist_v[None], draft[None])
        return accepted[0], token[0]

    return jax.vmap(one)(keys_b, target_bv, draft_bv, draft_b)
