"""MODEL1 attention (docs/model.md §4.3): one shared K=V head, per-head sinks, sliding window, compressed entries.

Data flow for normed input x [b, t, d]:
  q_lat = q_a_norm(x · q_a)              [b, t, q]  (also the indexer's input)
  q     = rope(rms(q_lat · q_b))          [b, t, n, h]  per-head unweighted RMSNorm (q_b_norm)
  kv    = rope(kv_norm(x · kv_proj))      [b, t, h]  the key AND the value of every head
  keys  = sliding window of kv (W most recent, incl. itself) ++ compressed entries (CSA: indexer
          picks, HCA: all visible)
  o     = Σ_s softmax(q·k_s/√h ∪ sink_n) · k_s, then inverse rope at the query position
  y     = grouped low-rank projection: per group of n/g heads → o_lora, then → d.

The full-sequence forward runs `pallas_kernels.sparse_attention` over per-query index lists (window rows,
then the CSA picks; `model/index_lists.py`), linear in t (docs/training.md §1). An HCA layer attends to every
visible entry, so gathering them per query costs more than a matmul: it runs the window through
`sparse_attention` and the t/m entries as a dense masked softmax (`entries_attention`), merged into the one
softmax by log-sum-exp (`merge_with_entries`).
`full_attention` picks its backend: "auto" (Pallas kernels on a GPU, else jnp), "xla", "pallas",
"interpret", or "dense" — the masked softmax `attend` over all rows, quadratic, kept as the reference.
Decode runs the sparse FP8 decode kernel instead (`inference/steps.py`).

Indexer training (docs/training.md §4): with `indexer_stage` set ("warmup" or "sparse", see
`train_indexer`), a CSA layer also sows `IndexerTerms` — the KL of its indexer to the joint-softmax teacher,
summed over queries, and the recall@k counts — for `nnx.capture` to collect. The indexer's inputs are
detached there, so its parameters learn only from the KL and the trunk never sees it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import CSA, HCA, SLIDING, Config
from model1_jax.model import rope
from model1_jax.model.compressor import Compressor
from model1_jax.model.index_lists import all_entry_indices, attention_indices, entry_bounds, window_indices
from model1_jax.model.indexer import Indexer, blockwise, query_blocks, visible_entries
from model1_jax.model.indexer_objective import kl_per_query, recall_at_k, teacher
from model1_jax.model.layers import Linear, RMSNorm, const_param, constrain, rms_norm, weight
from model1_jax.parallel.layout import Layout
from pallas_kernels.sparse_attention import sparse_attention

F32 = jnp.float32
FULL_ATTENTION = ("auto", "xla", "pallas", "interpret", "dense")
INDEXER_STAGES = ("warmup", "sparse")


class IndexerTerms(nnx.Intermediate):
    """One CSA layer's (Σ_t KL_t, recall hits, recall slots) of an indexer-training forward (f32, i32, i32)."""


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


def entries_attention(q_btnh: jax.Array, entries_bsh: jax.Array, first_bt: jax.Array, end_bt: jax.Array,
                      scale: float) -> tuple[jax.Array, jax.Array]:
    """Softmax of every head over the entries w with first ≤ w < end (no sink): (o [b, t, n, h] f32, lse [b, t, n]
    f32, −inf for a query that sees no entry, its o then 0). Computed over blocks of queries whose backward
    recomputes the block, so only one block's [b, block, n, s] logits exist at a time."""
    b, t, n, _ = q_btnh.shape
    s = entries_bsh.shape[1]

    @jax.checkpoint
    def block(q_btnh, first_bt, end_bt):
        w_s = jnp.arange(s, dtype=jnp.int32)
        visible_bt1s = ((w_s >= first_bt[..., None]) & (w_s < end_bt[..., None]))[:, :, None, :]
        nonempty_bt1 = (end_bt > first_bt)[..., None]
        z_btns = jnp.einsum("btnh,bsh->btns", q_btnh, entries_bsh, preferred_element_type=F32) * scale
        z_btns = jnp.where(visible_bt1s, z_btns, -jnp.inf)
        # lse and o do not depend on the shift m, so it carries no gradient.
        m_btn = jax.lax.stop_gradient(jnp.where(nonempty_bt1, z_btns.max(axis=-1, initial=-jnp.inf), 0.0))
        e_btns = jnp.where(visible_bt1s, jnp.exp(z_btns - m_btn[..., None]), 0.0)
        l_btn = jnp.where(nonempty_bt1, e_btns.sum(axis=-1), 1.0)
        p_btns = (e_btns / l_btn[..., None]).astype(entries_bsh.dtype)  # as `attend`: cast before the values
        o_btnh = jnp.einsum("btns,bsh->btnh", p_btns, entries_bsh, preferred_element_type=F32)
        return o_btnh, jnp.where(nonempty_bt1, jnp.log(l_btn) + m_btn, -jnp.inf)

    return blockwise(block, query_blocks(b, t, n * s), q_btnh, first_bt, end_bt)


def merge_with_entries(o_w_btnh: jax.Array, lse_w_btn: jax.Array, o_e_btnh: jax.Array, lse_e_btn: jax.Array,
                       sinks_n: jax.Array) -> jax.Array:
    """The output of one softmax over window keys, entries and sink from its two parts, in q's dtype.

    (o_w, lse_w) come from `sparse_attention` (o_w normalised by Z_w + S, lse_w = log Z_w, +inf for an empty
    list), (o_e, lse_e) from `entries_attention` (normalised by Z_e). With ℓ_w = log(Z_w + S) and
    ℓ = log(Z_w + S + Z_e):  o = o_w · exp(ℓ_w − ℓ) + o_e · exp(lse_e − ℓ).
    """
    lse_w_btn = jnp.where(jnp.isfinite(lse_w_btn), lse_w_btn, -jnp.inf)  # no window key: Z_w = 0
    logz_w_btn = jnp.logaddexp(lse_w_btn, sinks_n.astype(F32))
    logz_btn = jnp.logaddexp(logz_w_btn, lse_e_btn)
    o_btnh = (o_w_btnh.astype(F32) * jnp.exp(logz_w_btn - logz_btn)[..., None]
              + o_e_btnh.astype(F32) * jnp.exp(lse_e_btn - logz_btn)[..., None])
    return o_btnh.astype(o_w_btnh.dtype)


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
        self.full_attention = "auto"  # see the module docstring; `use_full_attention` sets it model-wide
        self.indexer_stage: str | None = None  # "warmup" / "sparse" while training the indexer (`train_indexer`)
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
        """x [b, t, d]; `positions_bt` are positions inside documents (0..t−1 for one sequence; packed documents
        restart at 0 at multiples of every compression rate, docs/training.md §6)."""
        q_btnh, q_lat_btq = self.queries(x_btd, positions_bt)
        keys_bsh = self.keys(x_btd, positions_bt)
        if self.full_attention == "dense":
            return self.output(self._dense(x_btd, q_btnh, q_lat_btq, keys_bsh, positions_bt), positions_bt)
        t = x_btd.shape[1]
        window_btw = window_indices(positions_bt, self.config.sliding_window)
        lists_btk, picks_btk = window_btw, None
        sinks_n = weight(self.sinks, F32)
        if self.compressor is not None and self.indexer is None:  # HCA: window sparse, entries dense
            entries_bsh = self.compressor(x_btd, positions_bt).astype(keys_bsh.dtype)
            o_w_btnh, lse_w_btn = self._sparse(q_btnh, keys_bsh, window_btw, sinks_n)
            first_bt, end_bt = entry_bounds(positions_bt, self.compressor.rate)
            o_e_btnh, lse_e_btn = entries_attention(q_btnh, entries_bsh, first_bt, end_bt,
                                                    self.config.head_dim ** -0.5)
            return self.output(merge_with_entries(o_w_btnh, lse_w_btn, o_e_btnh, lse_e_btn, sinks_n), positions_bt)
        if self.compressor is not None:  # CSA: the indexer's picks join each query's list
            entries_bsh = self.compressor(x_btd, positions_bt)
            picks_btk = self.indexer(x_btd, q_lat_btq, positions_bt)
            keys_bsh = jnp.concatenate([keys_bsh, entries_bsh.astype(keys_bsh.dtype)], axis=1)
            lists_btk = attention_indices(window_btw, picks_btk, t)
        o_btnh, lse_btn = self._sparse(q_btnh, keys_bsh, lists_btk, sinks_n)
        if self.indexer is not None and self.indexer_stage is not None:
            self._indexer_terms(x_btd, q_lat_btq, q_btnh, keys_bsh, window_btw, picks_btk, lse_btn, sinks_n,
                                positions_bt)
        return self.output(o_btnh, positions_bt)

    def _sparse(self, q_btnh, keys_bsh, lists_btk, sinks_n):
        if self.full_attention not in FULL_ATTENTION:
            raise ValueError(f"Attention.full_attention must be one of {FULL_ATTENTION}, got {self.full_attention!r}")
        backend = {"interpret": "pallas"}.get(self.full_attention, self.full_attention)
        return sparse_attention(q_btnh, keys_bsh, lists_btk, sinks_n, scale=self.config.head_dim ** -0.5,
                                backend=backend, interpret=self.full_attention == "interpret")

    def _dense(self, x_btd, q_btnh, q_lat_btq, keys_bsh, positions_bt):
        """The quadratic reference (one unpacked sequence per row): masked softmax over every row."""
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
        return attend(q_btnh, keys_bsh, visible_bts, weight(self.sinks, F32), self.config.head_dim ** -0.5)

    def _indexer_terms(self, x_btd, q_lat_btq, q_btnh, keys_bsh, window_btw, picks_btk, lse_btn, sinks_n,
                       positions_bt) -> None:
        """Sows (Σ_t KL(teacher ‖ indexer), recall hits, slots). "sparse": candidates = the picks, ℓ from this
        forward; "warmup": every visible entry, ℓ recomputed over window + all of them + sink."""
        if self.indexer_stage not in INDEXER_STAGES:
            raise ValueError(f"Attention.indexer_stage must be None or one of {INDEXER_STAGES}, "
                             f"got {self.indexer_stage!r}")
        t = x_btd.shape[1]
        x_btd, q_lat_btq = jax.lax.stop_gradient(x_btd), jax.lax.stop_gradient(q_lat_btq)  # detached input
        index_keys_bsj = self.indexer.compressor(x_btd, positions_bt)
        if self.indexer_stage == "sparse":
            cand_btc = picks_btk
        else:
            cand_btc = all_entry_indices(positions_bt, index_keys_bsj.shape[1], self.indexer.rate)
            _, lse_btn = self._sparse(jax.lax.stop_gradient(q_btnh), jax.lax.stop_gradient(keys_bsh),
                                      attention_indices(window_btw, cand_btc, t), sinks_n)
        logz_btn = jnp.logaddexp(jax.lax.stop_gradient(lse_btn), sinks_n)
        valid_btc = cand_btc >= 0
        p_btc = teacher(q_btnh, keys_bsh, jnp.where(valid_btc, cand_btc + t, -1), logz_btn,
                        scale=self.config.head_dim ** -0.5)
        scores_btc = self.indexer.scores_at(x_btd, q_lat_btq, index_keys_bsj, cand_btc, positions_bt)
        kl = kl_per_query(p_btc, scores_btc, valid_btc).sum()
        hits, slots = recall_at_k(p_btc, scores_btc, valid_btc, self.indexer.top_k)
        self.sow(IndexerTerms, "indexer", (kl, hits, slots))


def use_full_attention(model: nnx.Module, backend: str) -> nnx.Module:
    """Sets every attention layer's full-sequence backend (one of `FULL_ATTENTION`); returns the model."""
    if backend not in FULL_ATTENTION:
        raise ValueError(f"full attention backend must be one of {FULL_ATTENTION}, got {backend!r}")
    model.set_attributes(Attention, full_attention=backend, raise_if_not_found=False)
    return model


def train_indexer(model: nnx.Module, stage: str | None) -> nnx.Module:
    """Makes every CSA layer sow `IndexerTerms` for `nnx.capture(fn, IndexerTerms)` ("warmup": KL over every
    visible entry; "sparse": over the picks); None switches it off. Call it on a copy used under capture."""
    if stage is not None and stage not in INDEXER_STAGES:
        raise ValueError(f"indexer stage must be None or one of {INDEXER_STAGES}, got {stage!r}")
    model.set_attributes(Attention, indexer_stage=stage, raise_if_not_found=False)
    return model
