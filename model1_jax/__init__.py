"""model1-jax: DeepSeek MODEL1 (released as DeepSeek-V4) in JAX and Flax NNX.

    import model1_jax as m1
    model = m1.Model1(m1.Config.tiny(), rngs=nnx.Rngs(0))
    logits = model(input_ids)                       # int32 [b, t] -> float32 [b, t, vocab]
    model = m1.from_pretrained("dir", dtype=jnp.float32)   # HF-format (dense or FP8/FP4) or Orbax
    gen = m1.generate(model, [[1, 2, 3]], max_new_tokens=32)   # gen.tokens, gen.stats
    m1.save(model, "ckpt")                          # Orbax, atomic
    layout = m1.Layout.build("data=2,expert=4", "tensor_parallel")    # sharded over 8 devices
    model = m1.load("ckpt", dtype=jnp.bfloat16, layout=layout)       # straight into the shards
    trainer = m1.Trainer(model, m1.OptimizerConfig("muon"), m1.TrainConfig(mtp_weight=0.3))   # fine-tuning

The package is layered (imports flow one way, `tests/test_layering.py` checks it):
  config, common, text  ←  parallel  ←  model  ←  io, inference  ←  train  ←  cli
Names below are loaded on first use, so `import model1_jax` pulls in neither optax, Orbax nor Pallas.
"""

import importlib

from model1_jax.config import CSA, HASH_MOE, HCA, MOE, SLIDING, Config, DSparkConfig, RopeScaling

# public name -> module that defines it
_LAZY = {
    "Model1": "model1_jax.model.transformer",
    "BlockQuantized": "model1_jax.model.quant",
    "Layout": "model1_jax.parallel.layout",
    "Rules": "model1_jax.parallel.rules",
    "make_mesh": "model1_jax.parallel.mesh",
    "CheckpointError": "model1_jax.io.hf",
    "ATTENTION_BACKENDS": "model1_jax.inference.state",
    "from_pretrained": "model1_jax.io.pretrained",
    "load": "model1_jax.io.pretrained",
    "save": "model1_jax.io.orbax",
    "CACHE_DTYPES": "model1_jax.inference.state",
    "CacheSpec": "model1_jax.inference.state",
    "DecodeState": "model1_jax.inference.state",
    "MemoryReport": "model1_jax.inference.memory",
    "init_state": "model1_jax.inference.state",
    "make_spec": "model1_jax.inference.state",
    "max_len_for_budget": "model1_jax.inference.memory",
    "memory_report": "model1_jax.inference.memory",
    "prefill": "model1_jax.inference.steps",
    "decode_step": "model1_jax.inference.steps",
    "Sampling": "model1_jax.inference.sampling",
    "Generation": "model1_jax.inference.generation",
    "GenerationStats": "model1_jax.inference.generation",
    "generate": "model1_jax.inference.generation",
    "Scheduler": "model1_jax.inference.scheduler",
    "Request": "model1_jax.inference.requests",
    "Completion": "model1_jax.inference.requests",
    "BalanceConfig": "model1_jax.train.balance",
    "OptimizerConfig": "model1_jax.train.optim",
    "TrainConfig": "model1_jax.train.trainer",
    "Trainer": "model1_jax.train.trainer",
    "TrainCheckpointer": "model1_jax.train.loop",
    "fit": "model1_jax.train.loop",
    "LoRAConfig": "model1_jax.train.lora",
    "apply_lora": "model1_jax.train.lora",
    "load_adapters": "model1_jax.train.lora",
    "merge_lora": "model1_jax.train.lora",
    "save_adapters": "model1_jax.train.lora",
}
_SUBPACKAGES = ("model", "parallel", "io", "inference", "train", "text", "cli", "common", "config")

__all__ = ["ATTENTION_BACKENDS", "BalanceConfig", "BlockQuantized", "CACHE_DTYPES", "CSA", "CacheSpec",
           "CheckpointError", "Completion", "Config", "DSparkConfig", "DecodeState", "Generation", "GenerationStats",
           "HASH_MOE", "HCA", "Layout", "LoRAConfig", "MOE", "MemoryReport", "Model1", "OptimizerConfig", "Request",
           "RopeScaling", "Rules", "SLIDING", "Sampling", "Scheduler", "TrainCheckpointer", "TrainConfig", "Trainer",
           "apply_lora", "decode_step", "fit", "from_pretrained", "generate", "init_state", "load", "load_adapters",
           "make_mesh", "make_spec", "max_len_for_budget", "memory_report", "merge_lora", "prefill", "save",
           "save_adapters"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"model1_jax.{name}")
    raise AttributeError(f"module 'model1_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY, *_SUBPACKAGES])
