"""Multi-token prediction block (spec §4.10; HF does not build it).

For main-model streams X at position t and the embedding of token t+1 it predicts token t+2:
  X0 = e_proj(enorm(embed(ids[t+1])))  (broadcast over the c streams)  +  h_proj(hnorm(X))  (per stream)
  X1 = DecoderLayer(X0)          (attention type `mtp_layer_type`, sliding in the released models; moe)
  logits = lm_head(norm(hc_head(X1)))
Embedding and lm_head are shared with the main model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.config import MOE, Config
from model1_jax.decoder import DecoderLayer
from model1_jax.hyper import HyperHead
from model1_jax.layers import Linear, RMSNorm

if TYPE_CHECKING:
    from model1_jax.model import Model1


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

    def inputs(self, streams_btcd: jax.Array, next_ids_bt: jax.Array, model: Model1) -> jax.Array:
        """The block's input streams X0 [b, t, c, d]."""
        e_btd = self.e_proj(self.enorm(model.embed_tokens(next_ids_bt)))
        return e_btd[:, :, None, :] + self.h_proj(self.hnorm(streams_btcd))

    def __call__(self, streams_btcd: jax.Array, next_ids_bt: jax.Array, positions_bt: jax.Array,
                 model: Model1) -> jax.Array:
        x1_btcd = self.layer(self.inputs(streams_btcd, next_ids_bt, model), next_ids_bt, positions_bt)
        return model.logits(self.norm(self.hc_head(x1_btcd)))
