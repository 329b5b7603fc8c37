"""The model as pure Flax NNX math: layers and the letter table, FP8/FP4 weight blocks, RoPE, mHC, the
compressors and lightning indexer, attention, MoE, the decoder layer, the MTP block and `Model1`."""

from model1_jax.model.attention import Attention
from model1_jax.model.decoder import DecoderLayer
from model1_jax.model.moe import MoE, record_routing
from model1_jax.model.mtp import MTPBlock
from model1_jax.model.quant import BlockQuantized
from model1_jax.model.transformer import Model1, abstract_model, abstract_module

__all__ = ["Attention", "BlockQuantized", "DecoderLayer", "MTPBlock", "MoE", "Model1", "abstract_model",
           "abstract_module", "record_routing"]
