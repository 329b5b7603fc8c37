"""Model configuration: `Config` (core.py), the DSpark drafter's `DSparkConfig` (dspark.py), the layer-type names
and the compress rope's `RopeScaling` (base.py)."""

from model1_jax.config.base import (
    CSA,
    HASH_MOE,
    HCA,
    LAYER_TYPES,
    MLP_LAYER_TYPES,
    MOE,
    SCORING_FUNCS,
    SLIDING,
    RopeScaling,
)
from model1_jax.config.core import Config
from model1_jax.config.dspark import DSparkConfig

__all__ = ["CSA", "HASH_MOE", "HCA", "LAYER_TYPES", "MLP_LAYER_TYPES", "MOE", "SCORING_FUNCS", "SLIDING", "Config",
           "DSparkConfig", "RopeScaling"]
