"""KV compressors (docs/model.md §4.4–4.5): pool every `m` tokens into one compressed entry.

Each token t yields a value C_t and gate logits Z_t (one per channel). A window's entry is the
per-channel softmax over its slots of (Z + position_bias) weighting C, then kv_norm, then RoPE
(compress table) at the position of the window's first token.

* HCA (`overlap=False`): window w pools its own m tokens.
* CSA (`overlap=True`): each token yields two series (p = 0: Ca, p = 1: Cb). Entry w pools 2m
  slots: Ca of window w−1 then Cb of window w. Before the first window there is no Ca; those slots
  get value 0 and logit −inf (weight exactly 0). The same layout serves the indexer's compressor.

Entry w summarises tokens up to (w+1)·m − 1, so it is visible to query t iff w < ⌊(t+1)/m⌋.
The pieces (`project`, `overlap_windows`, `pool`, `finish`) are public so the decode path can
run them over its partial-window buffers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import Config
from model1_jax.model import rope
from model1_jax.model.layers import Linear, RMSNorm, const_param, weight

F32 = jnp.float32


def pool(kv_bwmh: jax.Array, logits_bwmh: jax.Array) -> jax.Array:
    """Per-channel softmax over the slot axis (fp32), weights cast to the values' dtype, weighted sum."""
    probs = jax.nn.softmax(logits_bwmh.astype(F32), axis=2).astype(kv_bwmh.dtype)
    return jnp.sum(kv_bwmh * probs, axis=2)


def overlap_windows(kv_bwmph: jax.Array, logits_bwmph: jax.Array, prior_kv_bmh: jax.Array | None = None,
                    prior_logits_bmh: jax.Array | None = None, starts_bw: jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array]:
    """CSA slot layout [b, w, 2m, h]: Ca of the previous window, then Cb of this window.

    `prior_*` is the Ca half (values and biased logits) of the window before the first one here;
    None means there is none (start of the sequence). `starts_bw` marks windows that begin a document
    (packed sequences): their first half is empty too, so no entry pools tokens of two documents.
    """
    b, _, m, _, c = kv_bwmph.shape
    ca_kv, cb_kv = kv_bwmph[..., 0, :], kv_bwmph[..., 1, :]
    ca_lg, cb_lg = logits_bwmph[..., 0, :], logits_bwmph[..., 1, :]
    if prior_kv_bmh is None:
        prior_kv_bmh = jnp.zeros((b, m, c), kv_bwmph.dtype)
        prior_logits_bmh = jnp.full((b, m, c), -jnp.inf, logits_bwmph.dtype)
    w = kv_bwmph.shape[1]
    # Window w's first half is window w−1's Ca; shifting by one keeps exactly w windows (also for w = 0).
    prev_kv = jnp.concatenate([prior_kv_bmh[:, None].astype(ca_kv.dtype), ca_kv], axis=1)[:, :w]
    prev_lg = jnp.concatenate([prior_logits_bmh[:, None].astype(ca_lg.dtype), ca_lg], axis=1)[:, :w]
    if starts_bw is not None:
        prev_kv = jnp.where(starts_bw[:, :, None, None], jnp.zeros((), prev_kv.dtype), prev_kv)
        prev_lg = jnp.where(starts_bw[:, :, None, None], -jnp.inf, prev_lg)
    return jnp.concatenate([prev_kv, cb_kv], axis=2), jnp.concatenate([prev_lg, cb_lg], axis=2)


class Compressor(nnx.Module):
    """One compressor at width h (the head dim for attention entries, the indexer's j for its keys).

    Parameters (HF names): kv_proj and gate_proj [d, (p,) h], position_bias [m, (p,) h] fp32,
    kv_norm [h]; p = 2 series for overlapping (CSA-style) compressors.
    """

    def __init__(self, config: Config, *, width: int, rate: int, overlap: bool, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.rate = rate
        self.overlap = overlap
        std = config.initializer_range
        d = config.hidden_size
        series = (2,) if overlap else ()
        series_axes = ("kv_series",) if overlap else ()
        eqn = "btd,dpc->btpc" if overlap else "btd,dc->btc"
        kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype)
        self.kv_proj = Linear(eqn, (d, *series, width), ("embed", *series_axes, "compress_dim"), **kw)
        self.gate_proj = Linear(eqn, (d, *series, width), ("embed", *series_axes, "compress_dim"), **kw)
        self.position_bias = const_param(0.0, (rate, *series, width), (None, *series_axes, "compress_dim"), F32)
        self.kv_norm = RMSNorm(width, config.rms_norm_eps, "compress_dim")

    def project(self, x_btd: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-token values C and raw gate logits Z (without position_bias): [b, t, (p,) h] each."""
        return self.kv_proj(x_btd), self.gate_proj(x_btd)

    def windows(self, kv_bth: jax.Array, gate_bth: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Groups whole windows [b, w, m, (p,) h] and adds position_bias to the gate logits."""
        b, t = kv_bth.shape[:2]
        w = t // self.rate
        shape = (b, w, self.rate, *kv_bth.shape[2:])
        kv = kv_bth[:, :w * self.rate].reshape(shape)
        logits = gate_bth[:, :w * self.rate].reshape(shape) + weight(self.position_bias, F32)
        return kv, logits

    def finish(self, pooled_bwh: jax.Array, first_window: jax.Array | int = 0,
               window_positions_bw: jax.Array | None = None) -> jax.Array:
        """kv_norm, then RoPE at each window's first-token position: (window index + first_window) · m, or
        `window_positions_bw` when given (positions inside packed documents)."""
        if window_positions_bw is None:
            w = pooled_bwh.shape[1]
            window_bw = jnp.asarray(first_window, jnp.int32)[..., None] + jnp.arange(w, dtype=jnp.int32)
            window_positions_bw = window_bw * self.rate
        cos, sin = rope.cos_sin(self.config, rope.COMPRESS, window_positions_bw)
        return rope.apply_rope(self.kv_norm(pooled_bwh), cos, sin)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array | None = None) -> jax.Array:
        """Stateless compression of whole sequences: entries [b, ⌊t/m⌋, h].

        `positions_bt` (default 0..t−1) are positions inside documents; packed documents start at multiples
        of m, so every window lies inside one document, and a window that starts a document gets no overlap
        half (docs/training.md §6). A trailing partial window produces nothing.
        """
        kv, logits = self.windows(*self.project(x_btd))
        w = kv.shape[1]
        window_positions_bw = None if positions_bt is None else positions_bt[:, :w * self.rate:self.rate]
        if self.overlap:
            starts_bw = None if window_positions_bw is None else window_positions_bw == 0
            kv, logits = overlap_windows(kv, logits, starts_bw=starts_bw)
        return self.finish(pool(kv, logits), window_positions_bw=window_positions_bw)
