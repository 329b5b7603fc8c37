"""The MODEL1 causal LM (docs/model.md §2, §4.1–4.2, §4.9), its MTP head (§4.10) or DSpark drafter (docs/dspark.md).

ids [b, t] → embed → c identical streams X [b, t, c, d]
each layer:  X = mHC_attn(X, attention(input_layernorm(·)));  X = mHC_ffn(X, moe(post_attention_layernorm(·), ids))
logits = lm_head(norm(hc_head(X)))   float32 [b, t, v]

The full-sequence forward, prefill, decode and speculative verification all run `streams`; decode passes
an `attention` function that replaces each layer's attention block by one over its caches, and
`capture=True` also returns the rows a DSpark drafter reads (docs/dspark.md §5).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.common import check_token_ids
from model1_jax.config import Config
from model1_jax.model.attention import Attention
from model1_jax.model.decoder import DecoderLayer
from model1_jax.model.dspark import Draft, DrawFn, DSpark, greedy
from model1_jax.model.hyper import HyperHead
from model1_jax.model.layers import Embed, Linear, RMSNorm, constrain
from model1_jax.model.mtp import MTPBlock
from model1_jax.parallel.layout import Layout

F32 = jnp.float32

# (layer index, its attention module, normed input x [b, t, d]) -> attention output [b, t, d]
LayerAttentionFn = Callable[[int, Attention, jax.Array], jax.Array]


def _call_layer(layer: DecoderLayer, streams_btcd: jax.Array, ids_bt: jax.Array, positions_bt: jax.Array
                ) -> jax.Array:
    return layer(streams_btcd, ids_bt, positions_bt)


_remat_layer = nnx.remat(_call_layer)


class Model1(nnx.Module):
    """DeepSeek MODEL1 / V4 causal LM.

    `dtype` is the compute dtype, `param_dtype` the storage dtype of the large weights; norms, mHC,
    sinks, position biases and the router bias stay float32 as in the reference.
    """

    def __init__(self, config: Config, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.config = config
        self.dtype = dtype
        # Set by `parallel.attach` (through flax's `set_attributes`); None runs on one device.
        self.layout: Layout | None = None
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        std = config.initializer_range
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, **kw, std=std)
        self.layers = nnx.List([
            DecoderLayer(config, lt, mt, **kw) for lt, mt in zip(config.layer_types, config.mlp_layer_types)])
        self.hc_head = HyperHead(config, rngs=rngs)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, "embed")
        self.lm_head = None if config.tie_word_embeddings else Linear(
            "btd,dv->btv", (config.hidden_size, config.vocab_size), ("embed", "vocab"), std=std, **kw)
        self.mtp = MTPBlock(config, **kw) if config.num_nextn_predict_layers else None
        self.dspark = DSpark(config, **kw) if config.dspark is not None else None

    # -- pieces ------------------------------------------------------------------------------------

    def embed(self, ids_bt: jax.Array) -> jax.Array:
        """Token embeddings copied onto the c residual streams: [b, t, c, d]."""
        e_btd = self.embed_tokens(ids_bt)
        streams_btcd = jnp.broadcast_to(e_btd[:, :, None, :], (*e_btd.shape[:2], self.config.hc_mult, e_btd.shape[-1]))
        return constrain(streams_btcd, self.layout, "batch", "seq", None, "act_embed")

    def logits(self, h_btd: jax.Array) -> jax.Array:
        """lm_head (or the tied embedding) on final hidden states, float32 [b, t, v]."""
        out = self.embed_tokens.attend(h_btd) if self.lm_head is None else self.lm_head(h_btd)
        return constrain(out.astype(F32), self.layout, "batch", "seq", "act_vocab")

    def head(self, streams_btcd: jax.Array) -> jax.Array:
        return self.logits(self.norm(self.hc_head(streams_btcd)))

    def streams(self, input_ids: jax.Array, positions_bt: jax.Array | None = None, *,
                attention: LayerAttentionFn | None = None, remat: bool = False, capture: bool = False):
        """Residual streams after the last layer, before the head: [b, t, c, d].

        `positions_bt` default to 0..t−1 (a full sequence). `attention(i, attn, x)` replaces layer i's
        attention block (decode runs it over its caches). `remat=True` recomputes each decoder layer in the
        backward pass instead of keeping its activations (training memory); the values are identical.
        `capture=True` returns (streams, main_hidden [b, t, k·d]): the output streams of the drafter's target
        layers averaged over c, concatenated in `dspark.target_layer_ids` order (docs/dspark.md §5).
        """
        taps = self.config.dspark.target_layer_ids if capture and self.config.dspark is not None else ()
        if capture and not taps:
            raise ValueError("Model1.streams: capture=True needs a config with a DSpark drafter (config.dspark)")
        captured = {}
        check_token_ids(input_ids, self.config.vocab_size)
        ids_bt = jnp.asarray(input_ids, jnp.int32)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(ids_bt.shape[1], dtype=jnp.int32), ids_bt.shape)
        streams_btcd = self.embed(ids_bt)
        for i, layer in enumerate(self.layers):
            if attention is not None:
                streams_btcd = layer(streams_btcd, ids_bt, positions_bt,
                                     lambda attn, x_btd, i=i: attention(i, attn, x_btd))
            else:
                streams_btcd = (_remat_layer if remat else _call_layer)(layer, streams_btcd, ids_bt, positions_bt)
            streams_btcd = constrain(streams_btcd, self.layout, "batch", "seq", None, "act_embed")
            if i in taps:
                captured[i] = jnp.mean(streams_btcd, axis=2)
        if capture:
            return streams_btcd, jnp.concatenate([captured[i] for i in taps], axis=-1)
        return streams_btcd

    # -- public forward ----------------------------------------------------------------------------

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """Full-sequence forward from position 0: int [b, t] → float32 logits [b, t, v]."""
        return self.head(self.streams(input_ids))

    def forward_with_mtp(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(logits [b, t, v], mtp_logits [b, t−1, v]); mtp_logits[:, t] predicts token t+2 from the
        main streams at t and the embedding of token t+1 (DeepSeek-V3 MTP alignment)."""
        if self.mtp is None:
            raise ValueError("forward_with_mtp: this config has num_nextn_predict_layers=0 (no MTP block)")
        streams_btcd = self.streams(input_ids)
        ids_bt = jnp.asarray(input_ids, jnp.int32)
        mtp_logits = self.mtp_logits(streams_btcd[:, :-1], ids_bt[:, 1:])
        return self.head(streams_btcd), mtp_logits

    def mtp_logits(self, streams_btcd: jax.Array, next_ids_bt: jax.Array, positions_bt: jax.Array | None = None,
                   attention=None) -> jax.Array:
        """MTP logits [b, t, v] for main-model streams at positions t and the ids of tokens t+1, through the
        shared embedding and lm_head. `attention` replaces the block's attention as in `DecoderLayer`."""
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(next_ids_bt.shape[1], dtype=jnp.int32), next_ids_bt.shape)
        x_btcd = self.mtp(streams_btcd, self.embed_tokens(next_ids_bt), positions_bt, attention)
        return self.logits(self.mtp.hidden(x_btcd))


    def draft(self, main_hidden_bpk: jax.Array, anchor_b: jax.Array, draw: DrawFn = greedy) -> Draft:
        """One DSpark drafting call over plain arrays (docs/dspark.md §6): the captured rows of committed positions
        0 .. P−1 [b, P, k·d] and the anchor token at P [b] → `Draft` (G tokens, their logits, confidence).
        `draw(i, logits_bv)` picks each draft (default greedy). Decoding uses `inference.speculative` instead."""
        if self.dspark is None:
            raise ValueError("Model1.draft: this model has no DSpark drafter (config.dspark is None)")
        return self.dspark.draft(main_hidden_bpk, anchor_b, self.embed_tokens, self.logits, draw)


class _ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` where only shapes are wanted: every draw is the same key. `nnx.Rngs` counts its
    draws in a Variable, and under tracing each count update asks the traced count for its `.sharding`, whose
    error message JAX builds by scanning every equation traced so far: quadratic in the parameters (V4-Flash's
    abstract model took 7.5-8.8 s)."""

    @staticmethod
    def params() -> jax.Array:
        return jax.random.key(0)


def abstract_module(config: Config, *, dtype=jnp.float32, param_dtype=jnp.float32) -> Model1:
    """The model with abstract (shape-only) variables, as `nnx.eval_shape` builds it; nothing is allocated."""
    return nnx.eval_shape(lambda: Model1(config, rngs=_ShapeOnlyRngs(), dtype=dtype, param_dtype=param_dtype))


def abstract_model(config: Config, dtype) -> tuple[nnx.GraphDef, list]:
    """The model's graph and flat state of abstract (shape-only) variables; nothing is allocated."""
    graphdef, state = nnx.split(abstract_module(config, dtype=dtype, param_dtype=dtype))
    return graphdef, list(nnx.to_flat_state(state))


def merge(graphdef: nnx.GraphDef, flat: list, values: dict) -> Model1:
    """The model from its graph, abstract flat state and a value (array or BlockQuantized) per path."""
    return nnx.merge(graphdef, nnx.from_flat_state([(p, v.replace(values[p])) for p, v in flat]))
