"""Fine-tuning: the training step (`Trainer`), optimizers, MoE load balancing, LoRA, data and the loop."""

from model1_jax.train.balance import BalanceConfig
from model1_jax.train.loop import TrainCheckpointer, fit
from model1_jax.train.lora import LoRAConfig, apply_lora, load_adapters, merge_lora, save_adapters
from model1_jax.train.optim import OptimizerConfig
from model1_jax.train.trainer import TrainConfig, Trainer

__all__ = ["BalanceConfig", "LoRAConfig", "OptimizerConfig", "TrainCheckpointer", "TrainConfig", "Trainer",
           "apply_lora", "fit", "load_adapters", "merge_lora", "save_adapters"]
