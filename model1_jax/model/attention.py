"""MODEL1 attention (docs/model.md §4.3): one shared K=V head, per-head sinks, sliding window, compressed entries.

Data flow for normed input x [b, t, d]:
  q_lat = q_a_norm(x · q_a)              [b, t, q]  (also the indexer's input)
  q     = rope(rms(q_lat · q_b))          [b, t, n, h]  per-head unweighted RMSNorm (q_b_norm)
  kv    = rope(kv_norm(x · kv_proj))      [b, t, h]  the key AND the value of every head
  keys  = sliding window of kv (W most recent, incl. itself) ++ compressed entries (CSA: indexer
          picks, HCA: all visible)
  o     = Σ_s softmax(q·k_s/√h ∪ sink_n) · k_s, then inverse rope at the query position
  y     = grouped low-rank projection: per group of n/g heads → o_lora, then → d.
The softmax core is `attend`, the one function a kernel replaces (decode uses the sparse FP8 kernel).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import CSA, HCA, SLIDING, Config
from model1_jax.model import rope
from model1_jax.model.compressor import Compressor
from model1_jax.model.indexer import Indexer, visible_entries
from model1_jax.model.layers import Linear, RMSNorm, const_param, constrain, rms_norm, weight
from model1_jax.parallel.layout import Layout

F32 = jnp.float32


def attend(q_btnh: jax.Array, keys_bsh: jax.Array, visible_bts: jax.Array, sinks_n: jax.Array,
           scale: float) -> jax.Array:
    """Softmax attention of every head over shared K=V rows, with a per-head sink logit.

    o[t, n] = Σ_s exp(z_s) k_s / (Σ_s exp(z_s) + exp(sink_n)),  z_s = scale · q[t, n]·k_s over visible s.
    Masking is by selection, so hidden rows never contribute, whatever they hold. Returns q's dtype.
    """
    logits_btns = jnp.einsum("btnh,bsh->btns", q_btnh, keys_bsh, preferred_element_type=F32) * scale
    logits_btns = jnp.where(visible_bts[:, :, None, :], logits_btns, -jnp.inf)
    sinks_n = sinks_n.astype(F32)
    # The sink joins the max, so exp never overflows; it is finite, so rows are never all −inf.
    top_btn = jnp.maximum(jnp.max(logits_btns, axis=-1), sinks_n)
    probs_btns = jnp.exp(logits_btns - top_btn[..., None])
    denom_btn = jnp.sum(probs_btns, axis=-1) + jnp.exp(sinks_n - top_btn)
    probs_btns = (probs_btns / denom_btn[..., None]).astype(keys_bsh.dtype)
    return jnp.einsum("btns,bsh->btnh", probs_btns, keys_bsh, preferred_element_type=F32).astype(q_btnh.dtype)


def sliding_visible(q_positions_bt: jax.Array, k_positions_bs: jax.Array, window: int) -> jax.Array:
    """Key at position p is visible to the query at t iff t − window < p ≤ t. [b, t, s] bool."""
    delta_bts = q_positions_bt[:, :, None] - k_positions_bs[:, None, :]
    return (delta_bts >= 0) & (delta_bts < window)


def picks_visible(picks_btk: jax.Array, num_entries: int) -> jax.Array:
    """One-hot union of the indexer's picks (−1 = none) over the entry axis. [b, t, s] bool."""
    return jnp.any(picks_btk[..., None] == jnp.arange(num_entries), axis=-2)


class Attention(nnx.Module):
    def __init__(self, config: Config, layer_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        self.config = config
        self.layer_type = layer_type
        self.layout: Layout | None = None  # set by `parallel.attach`: queries and outputs split over heads
        self.rope_kind = rope.rope_kind(layer_type)
        d, n, h = config.hidden_size, config.num_attention_heads, config.head_dim
        q, g, o = config.q_lora_rank, config.o_groups, config.o_lora_rank
        kw = dict(rngs=rngs, std=config.initializer_range, dtype=dtype, param_dtype=param_dtype)
        self.q_a_proj = Linear("btd,dq->btq", (d, q), ("embed", "q_lora"), **kw)
        self.q_a_norm = RMSNorm(q, config.rms_norm_eps, "q_lora")
        self.q_b_proj = Linear("btq,qnh->btnh", (q, n, h), ("q_lora", "heads", "head_dim"), **kw)
        self.kv_proj = Linear("btd,dh->bth", (d, h), ("embed", "head_dim"), **kw)
        self.kv_norm = RMSNorm(h, config.rms_norm_eps, "head_dim")
        self.o_a_proj = Linear("btgmh,gmho->btgo", (g, n // g, h, o),
                               ("o_groups", "heads_per_group", "head_dim", "o_lora"), **kw)
        self.o_b_proj = Linear("btgo,god->btd", (g, o, d), ("o_groups", "o_lora", "embed"), **kw)
        self.sinks = const_param(0.0, (n,), ("heads",), F32)
        ckw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        if layer_type not in (SLIDING, CSA, HCA):
            raise ValueError(f"Attention: unknown layer_type {layer_type!r}")
        # Sliding layers have neither; HCA a plain compressor; CSA an overlapping one plus the indexer.
        self.compressor = None if layer_type == SLIDING else Compressor(
            config, width=h, rate=config.compress_rate(layer_type), overlap=layer_type == CSA, **ckw)
        self.indexer = Indexer(config, **ckw) if layer_type == CSA else None

    # -- pieces shared by the full-sequence forward and the decode path ---------------------------

    def queries(self, x_btd: jax.Array, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(q [b, t, n, h] rotated, q_lat [b, t, q_lora])."""
        q_lat_btq = self.q_a_norm(self.q_a_proj(x_btd))
        q_btnh = constrain(self.q_b_proj(q_lat_btq), self.layout, "batch", "seq", "heads", "head_dim")
        q_btnh = rms_norm(q_btnh, self.config.rms_norm_eps)
        cos, sin = rope.cos_sin(self.config, self.rope_kind, positions_bt)
        return rope.apply_rope(q_btnh, cos[:, :, None], sin[:, :, None]), q_lat_btq

    def keys(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """The shared K=V vector of each token, normed and rotated: [b, t, h]."""
        cos, sin = rope.cos_sin(self.config, self.rope_kind, positions_bt)
        return rope.apply_rope(self.kv_norm(self.kv_proj(x_btd)), cos, sin)

    def output(self, o_btnh: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """Undo the rope carried by the values, then the grouped low-rank projection: [b, t, d]."""
        cos, sin = rope.cos_sin(self.config, self.rope_kind, positions_bt)
        o_btnh = constrain(o_btnh, self.layout, "batch", "seq", "heads", "head_dim")
        o_btnh = rope.apply_rope(o_btnh, cos[:, :, None], sin[:, :, None], inverse=True)
        b, t, n, h = o_btnh.shape
        g = self.config.o_groups
        return self.o_b_proj(self.o_a_proj(o_btnh.reshape(b, t, g, n // g, h)))

    # -- full-sequence forward (training / one-shot prefill) -------------------------------------

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        """x [b, t, d] holds positions 0..t−1 of each sequence (`positions_bt` = arange)."""
        q_btnh, q_lat_btq = self.queries(x_btd, positions_bt)
        keys_bsh = self.keys(x_btd, positions_bt)
        visible_bts = sliding_visible(positions_bt, positions_bt, self.config.sliding_window)
        if self.compressor is not None:
            entries_bsh = self.compressor(x_btd)
            num_entries = entries_bsh.shape[1]
            if self.indexer is not None:
                picks_btk = self.indexer(x_btd, q_lat_btq, positions_bt)
                entries_visible = picks_visible(picks_btk, num_entries)
            else:
                entries_visible = visible_entries(positions_bt, num_entries, self.compressor.rate)
            keys_bsh = jnp.concatenate([keys_bsh, entries_bsh.astype(keys_bsh.dtype)], axis=1)
            visible_bts = jnp.concatenate([visible_bts, entries_visible], axis=-1)
        o_btnh = attend(q_btnh, keys_bsh, visible_bts, weight(self.sinks, F32), self.config.head_dim ** -0.5)
        return self.output(o_btnh, positions_bt)
