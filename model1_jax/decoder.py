"""One decoder layer (spec §4.2): attention and MoE blocks, each wrapped in its own mHC site.

  post, comb, u = attn_hc(X);  X = post ⊗ attention(input_layernorm(u)) + combᵀ·X
  post, comb, v = ffn_hc(X);   X = post ⊗ moe(post_attention_layernorm(v), ids) + combᵀ·X
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.attention import Attention
from model1_jax.config import Config
from model1_jax.hyper import HyperConnection, expand
from model1_jax.layers import RMSNorm
from model1_jax.moe import MoE


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

    def ffn(self, streams_btcd: jax.Array, ids_bt: jax.Array | None) -> jax.Array:
        post, comb, v_btd = self.ffn_hc(streams_btcd)
        return expand(post, comb, self.mlp(self.post_attention_layernorm(v_btd), ids_bt), streams_btcd)

    def __call__(self, streams_btcd: jax.Array, ids_bt: jax.Array | None, positions_bt: jax.Array) -> jax.Array:
        post, comb, u_btd = self.attn_hc(streams_btcd)
        streams_btcd = expand(post, comb, self.self_attn(self.input_layernorm(u_btd), positions_bt), streams_btcd)
        return self.ffn(streams_btcd, ids_bt)
