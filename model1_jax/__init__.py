"""model1-jax: DeepSeek MODEL1 (released as DeepSeek-V4) in JAX and Flax NNX.

    import model1_jax as m1
    model = m1.Model1(m1.Config.tiny(), rngs=nnx.Rngs(0))
    logits = model(input_ids)                       # int32 [b, t] -> float32 [b, t, vocab]
    model = m1.from_pretrained("dir", dtype=jnp.float32)   # HF-format (dense or FP8/FP4) or Orbax
    gen = m1.generate(model, [[1, 2, 3]], max_new_tokens=32)   # gen.tokens, gen.stats
    m1.save(model, "ckpt")                          # Orbax, atomic
    model = m1.load("ckpt", dtype=jnp.bfloat16, mesh=mesh, shardings=...)
    layout = m1.Layout.build("data=2,expert=4", "tensor_parallel")       # sharded over 8 devices
    model = m1.sharding.load("ckpt", layout, dtype=jnp.bfloat16)       # or sharding.create / sharding.shard
    trainer = m1.Trainer(model, m1.OptimizerConfig("muon"), m1.TrainConfig(mtp_weight=0.3))   # fine-tuning
    metrics = trainer.step({"ids": ids_abt, "mask": mask_abt})
"""

from model1_jax import distributed, sharding
from model1_jax.balance import BalanceConfig
from model1_jax.checkpoint import load, save
from model1_jax.config import CSA, HASH_MOE, HCA, MOE, SLIDING, Config, RopeScaling
from model1_jax.decode import decode_step, prefill
from model1_jax.decode_state import (
    CACHE_DTYPES,
    CacheSpec,
    DecodeState,
    MemoryReport,
    init_state,
    make_spec,
    max_len_for_budget,
    memory_report,
)
from model1_jax.finetune import TrainCheckpointer, fit
from model1_jax.generation import Generation, GenerationStats, generate
from model1_jax.loading import CheckpointError, from_pretrained
from model1_jax.lora import LoRAConfig, apply_lora, load_adapters, merge_lora, save_adapters
from model1_jax.model import Model1
from model1_jax.optim import OptimizerConfig
from model1_jax.quant import BlockQuantized
from model1_jax.sampling import Sampling
from model1_jax.sharding import Layout, Rules, make_mesh
from model1_jax.training import TrainConfig, Trainer

__all__ = ["CACHE_DTYPES", "CSA", "HASH_MOE", "HCA", "MOE", "SLIDING", "BalanceConfig", "BlockQuantized", "CacheSpec",
           "CheckpointError", "Config", "DecodeState", "Generation", "GenerationStats", "Layout", "LoRAConfig",
           "MemoryReport", "Model1", "OptimizerConfig", "RopeScaling", "Rules", "Sampling", "TrainCheckpointer",
           "TrainConfig", "Trainer", "apply_lora", "decode_step", "distributed", "fit", "from_pretrained", "generate",
           "init_state", "load", "load_adapters", "make_mesh", "make_spec", "max_len_for_budget", "memory_report",
           "merge_lora", "prefill", "save", "save_adapters", "sharding"]
