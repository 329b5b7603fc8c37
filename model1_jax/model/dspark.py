"""The DSpark drafter of the 0731 / 0813 checkpoints (docs/dspark.md §5–§7).

A drafting call for a sequence whose target has committed positions 0 .. P−1 and sampled the anchor x₀ for P:

  main_x   = main_norm(main_proj(main_hidden))         the target's captured rows (k layers' output streams,
                                                        averaged over c, concatenated) → [t, d]
  ring_s   = stage s's K=V rows of main_x (its own kv_proj, kv_norm, rope), the last W committed positions
  h        = embed([x₀, NOISE × (G−1)]) on c streams at positions P .. P+G−1
  stage s  = an ordinary sliding-window V4 block (`DecoderLayer`) whose attention sees, for every block query,
             ring_s ++ the block's own G rows (bidirectional inside the block)
  x        = hc_head(h)                                 (the sigmoid stream collapse, no Sinkhorn)
  U        = lm_head(norm(x))                           float32 [G, v], the target's head
  Markov   : out[0] = x₀;  ℓ_i = U_i + markov_w2 · markov_w1[out[i]];  out[i+1] ~ ℓ_i (argmax when greedy)
  conf_i   = confidence · [x_i ; markov_w1[out[i]]]     float32, on the pre-norm x

The stages are `DecoderLayer`s: the residual and mHC wiring is the trunk's own, only the attention block is
replaced (`attention=`), by `ring_attention` here (plain arrays) or by the decode path's function over the
decode state's rings (`inference.speculative`). Embedding and lm_head are the target's; `Model1` wires them in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import MOE, SLIDING, Config
from model1_jax.model.attention import Attention, attend
from model1_jax.model.decoder import DecoderLayer
from model1_jax.model.hyper import HyperHead
from model1_jax.model.layers import Linear, RMSNorm, normal_param, weight

F32 = jnp.float32

# (stage index, the stage's attention module, normed block input x [b, g, d]) -> attention output [b, g, d]
StageAttentionFn = Callable[[int, Attention, jax.Array], jax.Array]
# (draft index i, biased logits ℓ_i float32 [b, v]) -> the token drawn for slot i+1 [b] int32
DrawFn = Callable[[int, jax.Array], jax.Array]


class Draft(NamedTuple):
    """One drafting call: `tokens` [b, g] (the drafts), `logits` ℓ float32 [b, g, v] (Markov bias included; each
    row is what its draft was drawn from), `confidence` float32 [b, g] (logits; sigmoid = the estimated chance
    the draft is accepted given the one before was), `hidden` x [b, g, d] (hc_head output before the norm)."""

    tokens: jax.Array
    logits: jax.Array
    confidence: jax.Array
    hidden: jax.Array


def greedy(_: int, logits_bv: jax.Array) -> jax.Array:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


def ring_attention(rings_bsh: Sequence[jax.Array], ring_visible_bs: jax.Array, positions_bg: jax.Array
                   ) -> StageAttentionFn:
    """DSpark attention over plain arrays: stage s's block queries all see the visible rows of `rings_bsh[s]`
    [b, s, h] and the block's own rows; one sink logit per head; output rope undone at the query's position."""
    def attention(stage: int, attn: Attention, x_bgd: jax.Array) -> jax.Array:
        q_bgnh, _ = attn.queries(x_bgd, positions_bg)
        block_bgh = attn.keys(x_bgd, positions_bg)
        keys_bsh = jnp.concatenate([rings_bsh[stage].astype(block_bgh.dtype), block_bgh], axis=1)
        b, g = positions_bg.shape
        visible = jnp.concatenate([jnp.broadcast_to(ring_visible_bs[:, None, :], (b, g, ring_visible_bs.shape[1])),
                                   jnp.ones((b, g, g), bool)], axis=-1)
        o_bgnh = attend(q_bgnh, keys_bsh, visible, weight(attn.sinks, F32), attn.config.head_dim ** -0.5)
        return attn.output(o_bgnh, positions_bg)

    return attention


class DSpark(nnx.Module):
    """main_proj [k·d, d], main_norm, `num_stages` sliding-window MoE blocks, hc_head, norm, the Markov head
    (markov_w1 [v, r] an embedding, markov_w2 [r, v]) and the confidence head [d + r, 1]."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        ds = config.dspark
        if ds is None:
            raise ValueError("DSpark: the config has no dspark sub-config")
        d, v, r, k = config.hidden_size, config.vocab_size, ds.markov_rank, len(ds.target_layer_ids)
        std = config.initializer_range
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.block_size = ds.block_size
        self.noise_token_id = ds.noise_token_id
        self.window = config.sliding_window
        self.hc_mult = config.hc_mult
        self.main_proj = Linear("btk,kd->btd", (k * d, d), (None, "embed"), std=std, **kw)
        self.main_norm = RMSNorm(d, config.rms_norm_eps, "embed")
        self.stages = nnx.List([DecoderLayer(config, SLIDING, MOE, **kw) for _ in range(ds.num_stages)])
        self.hc_head = HyperHead(config, rngs=rngs)
        self.norm = RMSNorm(d, config.rms_norm_eps, "embed")
        self.markov_w1 = normal_param(rngs, (v, r), ("vocab", None), std, param_dtype)
        # The Markov bias and the confidence are computed in float32 (the draft's argmax chain depends on them).
        self.markov_w2 = Linear("br,rv->bv", (r, v), (None, "vocab"), std=std, rngs=rngs, dtype=F32,
                                param_dtype=param_dtype)
        self.confidence = Linear("bx,xo->bo", (d + r, 1), (None, None), std=std, rngs=rngs, dtype=F32,
                                 param_dtype=param_dtype)

    # -- pieces (the decode path composes them with its own attention) --------------------------------

    def combine(self, main_hidden_btk: jax.Array) -> jax.Array:
        """Captured target rows [b, t, k·d] → main_x [b, t, d], shared by the stages."""
        return self.main_norm(self.main_proj(main_hidden_btk))

    def ring_rows(self, main_x_btd: jax.Array, positions_bt: jax.Array) -> list[jax.Array]:
        """What each stage keeps for a committed position: its K=V row of main_x (kv_proj, kv_norm, rope) [b, t, h]."""
        return [stage.self_attn.keys(main_x_btd, positions_bt) for stage in self.stages]

    def block_ids(self, anchor_b: jax.Array) -> jax.Array:
        """[anchor, NOISE, …, NOISE] [b, g]."""
        noise = jnp.full((anchor_b.shape[0], self.block_size - 1), self.noise_token_id, jnp.int32)
        return jnp.concatenate([anchor_b[:, None].astype(jnp.int32), noise], axis=1)

    def block(self, embed_bgd: jax.Array, positions_bg: jax.Array, attention: StageAttentionFn) -> jax.Array:
        """The stages chained on the block's embedded ids [b, g, d]; returns x = hc_head(streams) [b, g, d]."""
        streams_bgcd = jnp.broadcast_to(embed_bgd[:, :, None, :], (*embed_bgd.shape[:2], self.hc_mult,
                                                                     embed_bgd.shape[-1]))
        for s, stage in enumerate(self.stages):
            streams_bgcd = stage(streams_bgcd, None, positions_bg, lambda attn, x, s=s: attention(s, attn, x))
        return self.hc_head(streams_bgcd)

    def markov(self, base_logits_bgv: jax.Array, x_bgd: jax.Array, anchor_b: jax.Array, draw: DrawFn = greedy
               ) -> Draft:
        """The sequential Markov head and the confidence head over the block's base logits U [b, g, v]."""
        table_vr = self.markov_w1.get_value()
        prev_b = anchor_b.astype(jnp.int32)
        tokens, logits, confidence = [], [], []
        for i in range(base_logits_bgv.shape[1]):
            e_br = jnp.take(table_vr, prev_b, axis=0).astype(F32)
            ell_bv = base_logits_bgv[:, i].astype(F32) + self.markov_w2(e_br)
            confidence.append(self.confidence(jnp.concatenate([x_bgd[:, i].astype(F32), e_br], axis=-1))[:, 0])
            prev_b = draw(i, ell_bv).astype(jnp.int32)
            tokens.append(prev_b)
            logits.append(ell_bv)
        return Draft(jnp.stack(tokens, 1), jnp.stack(logits, 1), jnp.stack(confidence, 1), x_bgd)

    # -- the whole call over plain arrays ------------------------------------------------------------------

    def draft(self, main_hidden_bpk: jax.Array, anchor_b: jax.Array, embed: Callable[[jax.Array], jax.Array],
              logits: Callable[[jax.Array], jax.Array], draw: DrawFn = greedy) -> Draft:
        """Drafts from the captured rows of every committed position 0 .. P−1 [b, P, k·d] (P ≥ 1) and the anchor
        [b] at P, with the target's `embed` (ids → [.., d]) and `logits` (normed hidden → float32 [.., v])."""
        b, p = main_hidden_bpk.shape[:2]
        positions_bp = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        keep = min(self.window, p)  # a ring holds the last W committed positions
        rings = [rows[:, p - keep:] for rows in self.ring_rows(self.combine(main_hidden_bpk), positions_bp)]
        positions_bg = jnp.broadcast_to(p + jnp.arange(self.block_size, dtype=jnp.int32), (b, self.block_size))
        attention = ring_attention(rings, jnp.ones((b, keep), bool), positions_bg)
        x_bgd = self.block(embed(self.block_ids(anchor_b)), positions_bg, attention)
        return self.markov(logits(self.norm(x_bgd)), x_bgd, anchor_b, draw)
