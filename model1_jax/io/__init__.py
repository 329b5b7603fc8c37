"""Checkpoints: safetensors reading, HF/DeepSeek names, the HF-format planner and its parallel reader (whole
parameters or shards), Orbax save/load, the streaming converter, and `from_pretrained` — the one place that knows
both formats."""

from model1_jax.io.hf import CheckpointError
from model1_jax.io.orbax import save
from model1_jax.io.pretrained import checkpoint_kind, from_pretrained, load, read_config

__all__ = ["CheckpointError", "checkpoint_kind", "from_pretrained", "load", "read_config", "save"]
