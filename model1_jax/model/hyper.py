"""Manifold-constrained hyper-connections (docs/model.md §3.3) and the final stream collapse (§3.4).

The residual stream is c parallel copies `X [b, t, c, d]`. Around each block, an mHC computes from X
(all in fp32):
  pre  [c]    how to collapse the streams into the block's input,
  post [c]    how to spread the block's output back over the streams,
  comb [c, c] a doubly stochastic stream mixing (Sinkhorn), contracted over its FIRST index:
  X' = post ⊗ y + combᵀ · X.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import Config
from model1_jax.model.layers import const_param, normal_param, rms_norm, weight

F32 = jnp.float32


def sinkhorn(comb: jax.Array, iters: int, eps: float) -> jax.Array:
    """Alternating normalisation exactly as the reference: one column pass, then (iters−1) × (row, column).

    Axis −2 is the "column" sum (over the first index j), axis −1 the row sum (over k). eps sits in
    every denominator, so the result is doubly stochastic only up to eps.
    """
    comb = comb / (comb.sum(axis=-2, keepdims=True) + eps)

    def row_then_column(_, m):
        m = m / (m.sum(axis=-1, keepdims=True) + eps)
        return m / (m.sum(axis=-2, keepdims=True) + eps)

    return jax.lax.fori_loop(0, iters - 1, row_then_column, comb)


def _normed_flat(streams_btcd: jax.Array, eps: float) -> jax.Array:
    """Unweighted RMSNorm over the flattened c·d axis (stream-major), returned as [b, t, c, d] fp32."""
    b, t, c, d = streams_btcd.shape
    return rms_norm(streams_btcd.reshape(b, t, c * d).astype(F32), eps).reshape(b, t, c, d)


def collapse(pre_btc: jax.Array, streams_btcd: jax.Array) -> jax.Array:
    """Σ_c pre[c] · X[c], accumulated in fp32 and cast to the streams' dtype."""
    return jnp.einsum("btc,btcd->btd", pre_btc, streams_btcd.astype(F32)).astype(streams_btcd.dtype)


def expand(post_btc: jax.Array, comb_btjk: jax.Array, y_btd: jax.Array, streams_bjd: jax.Array) -> jax.Array:
    """X'[k] = post[k] · y + Σ_j comb[j, k] · X[j]; post/comb cast to the streams' dtype first (as HF)."""
    dtype = streams_bjd.dtype
    spread = post_btc.astype(dtype)[..., None] * y_btd.astype(dtype)[:, :, None, :]
    return spread + jnp.einsum("btjk,btjd->btkd", comb_btjk.astype(dtype), streams_bjd)


class HyperConnection(nnx.Module):
    """One mHC site (`attn_hc` or `ffn_hc`): fn [c, d, (2+c)·c], base [(2+c)·c], scale [3]."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        c, d = config.hc_mult, config.hidden_size
        self.hc_mult = c
        self.eps = config.rms_norm_eps
        self.hc_eps = config.hc_eps
        self.sinkhorn_iters = config.hc_sinkhorn_iters
        mix = (2 + c) * c
        self.fn = normal_param(rngs, (c, d, mix), ("hc", "embed", "hc_mix"), config.initializer_range, F32)
        self.base = const_param(0.0, (mix,), ("hc_mix",), F32)
        self.scale = const_param(1.0, (3,), (None,), F32)

    def __call__(self, streams_btcd: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Returns (post [b,t,c], comb [b,t,c,c], collapsed block input [b,t,d])."""
        c = self.hc_mult
        z_btcd = _normed_flat(streams_btcd, self.eps)
        mix_btx = jnp.einsum("btcd,cdx->btx", z_btcd, weight(self.fn, F32))
        base, (s_pre, s_post, s_comb) = weight(self.base, F32), weight(self.scale, F32)
        pre = jax.nn.sigmoid(mix_btx[..., :c] * s_pre + base[:c]) + self.hc_eps
        post = 2.0 * jax.nn.sigmoid(mix_btx[..., c:2 * c] * s_post + base[c:2 * c])
        logits_btjk = (mix_btx[..., 2 * c:] * s_comb + base[2 * c:]).reshape(*mix_btx.shape[:2], c, c)
        comb = jax.nn.softmax(logits_btjk, axis=-1) + self.hc_eps
        comb = sinkhorn(comb, self.sinkhorn_iters, self.hc_eps)
        return post, comb, collapse(pre, streams_btcd)


class HyperHead(nnx.Module):
    """Final collapse of the c streams (`hc_head`): hc_fn [c, d, c], hc_base [c], hc_scale [1]."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        c, d = config.hc_mult, config.hidden_size
        self.eps = config.rms_norm_eps
        self.hc_eps = config.hc_eps
        self.hc_fn = normal_param(rngs, (c, d, c), ("hc", "embed", "hc"), config.initializer_range, F32)
        self.hc_base = const_param(0.0, (c,), ("hc",), F32)
        self.hc_scale = const_param(1.0, (1,), (None,), F32)

    def __call__(self, streams_btcd: jax.Array) -> jax.Array:
        z_btcd = _normed_flat(streams_btcd, self.eps)
        mix_btc = jnp.einsum("btcd,cdk->btk", z_btcd, weight(self.hc_fn, F32))
        pre = jax.nn.sigmoid(mix_btc * weight(self.hc_scale, F32) + weight(self.hc_base, F32)) + self.hc_eps
        return collapse(pre, streams_btcd)
