"""One decoder layer (docs/model.md §4.2): attention and MoE blocks, each wrapped in its own mHC site.

  post, comb, u = attn_hc(X);  X = post ⊗ attention(input_layernorm(u)) + combᵀ·X
  post, comb, v = ffn_hc(X);   X = post ⊗ moe(post_attention_layernorm(v), ids) + combᵀ·X

This is the only place the residual wiring exists. The full-sequence forward, prefill, decode and
speculative verification all run it; they differ only in the attention block, which a caller may
replace (`attention=`) by one that reads and writes a decode state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import Config
from model1_jax.model.attention import Attention
from model1_jax.model.hyper import HyperConnection, expand
from model1_jax.model.layers import RMSNorm
from model1_jax.model.moe import MoE

# (the layer's attention module, normed input x [b, t, d]) -> attention output [b, t, d]
AttentionFn = Callable[[Attention, jax.Array], jax.Array]


class DecoderLayer(nnx.Module):
    def __init__(self, config: Config, layer_type: str, mlp_type: str, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_type = layer_type
        self.mlp_type = mlp_type
        self.attn_hc = HyperConnection(config, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed")
        self.self_attn = Attention(config, layer_type, **kw)
        self.ffn_hc = HyperConnection(config, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed")
        self.mlp = MoE(config, mlp_type, **kw)

    def __call__(self, streams_btcd: jax.Array, ids_bt: jax.Array | None, positions_bt: jax.Array,
                 attention: AttentionFn | None = None) -> jax.Array:
        """Streams [b, t, c, d] → streams. `ids_bt` routes the hash-MoE layers; `positions_bt` are the
        tokens' absolute positions; `attention` replaces `self_attn(x, positions)` (default)."""
        post, comb, u_btd = self.attn_hc(streams_btcd)
        x_btd = self.input_layernorm(u_btd)
        a_btd = self.self_attn(x_btd, positions_bt) if attention is None else attention(self.self_attn, x_btd)
        streams_btcd = expand(post, comb, a_btd, streams_btcd)
        post, comb, v_btd = self.ffn_hc(streams_btcd)
        return expand(post, comb, self.mlp(self.post_attention_layernorm(v_btd), ids_bt), streams_btcd)
