"""Multi-token prediction block (docs/model.md §4.10; HF does not build it).

For main-model streams X at position t and the embedding of token t+1 it predicts token t+2:
  X0 = e_proj(enorm(embed(ids[t+1])))  (broadcast over the c streams)  +  h_proj(hnorm(X))  (per stream)
  X1 = DecoderLayer(X0)          (attention type `mtp_layer_type`, sliding in the released models; moe)
  h  = norm(hc_head(X1))         → the model's shared lm_head gives the logits
The block receives what it needs (embedded next tokens, streams) and knows nothing of the model around it;
`Model1.mtp_logits` wires it to the shared embedding and head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import MOE, Config
from model1_jax.model.decoder import AttentionFn, DecoderLayer
from model1_jax.model.hyper import HyperHead
from model1_jax.model.layers import Linear, RMSNorm


class MTPBlock(nnx.Module):
    def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        d = config.hidden_size
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.e_proj = Linear("btd,de->bte", (d, d), ("embed", "embed_out"), std=config.initializer_range, **kw)
        self.h_proj = Linear("btcd,de->btce", (d, d), ("embed", "embed_out"), std=config.initializer_range, **kw)
        self.enorm = RMSNorm(d, config.rms_norm_eps, "embed")
        self.hnorm = RMSNorm(d, config.rms_norm_eps, "embed")
        self.layer = DecoderLayer(config, config.mtp_layer_type, MOE, **kw)
        self.hc_head = HyperHead(config, rngs=rngs)
        self.norm = RMSNorm(d, config.rms_norm_eps, "embed")

    def __call__(self, streams_btcd: jax.Array, next_embed_btd: jax.Array, positions_bt: jax.Array,
                 attention: AttentionFn | None = None) -> jax.Array:
        """Main streams [b, t, c, d] and embeddings of the next tokens [b, t, d] → the block's streams
        [b, t, c, d]. `attention` as in `DecoderLayer` (the block's layer routes by score, not by id)."""
        e_btd = self.e_proj(self.enorm(next_embed_btd))
        x0_btcd = e_btd[:, :, None, :] + self.h_proj(self.hnorm(streams_btcd))
        return self.layer(x0_btcd, None, positions_bt, attention)

    def hidden(self, streams_btcd: jax.Array) -> jax.Array:
        """The block's final hidden state [b, t, d] (its own hc_head and norm), ready for the shared lm_head."""
        return self.norm(self.hc_head(streams_btcd))
