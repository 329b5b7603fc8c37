"""Layer-type names, the compress rope's YaRN block and the legacy-schedule helpers shared by the config modules."""

from __future__ import annotations

import dataclasses
from typing import Any

SLIDING = "sliding_attention"
CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
LAYER_TYPES = (SLIDING, CSA, HCA)
HASH_MOE = "hash_moe"
MOE = "moe"
MLP_LAYER_TYPES = (HASH_MOE, MOE)
SCORING_FUNCS = ("sqrtsoftplus", "sigmoid")

# Legacy `compress_ratios` entries select the layer type only; the rate itself comes from the
# per-type rate (docs/model.md §1.4).
RATIO_TO_LAYER_TYPE = {0: SLIDING, 4: CSA, 128: HCA}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters of the "compress" rope (CSA/HCA layers). The "main" rope is never scaled."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    # HF forces the cos/sin magnitude factor to 1.0 for this model unless a config sets it.
    attention_factor: float = 1.0

    def to_hf(self) -> dict[str, Any]:
        return {"rope_type": "yarn", **dataclasses.asdict(self)}


def default_mlp_types(num_layers: int, num_hash_layers: int) -> tuple[str, ...]:
    """The first `num_hash_layers` layers route by token id (hash_moe), the rest by score."""
    n_hash = min(num_layers, num_hash_layers)
    return (HASH_MOE,) * n_hash + (MOE,) * (num_layers - n_hash)


def rope_scaling_from_dict(d: dict[str, Any]) -> RopeScaling | None:
    """A YaRN block (HF `rope_scaling` / `rope_parameters.compress`) → RopeScaling; None for plain RoPE."""
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ValueError(f"Config.rope_scaling: rope_type must be 'yarn' or 'default', got {rope_type!r}")
    missing = [k for k in ("factor", "original_max_position_embeddings") if d.get(k) is None]
    if missing:
        raise ValueError(f"Config.rope_scaling: yarn needs {missing}")
    return RopeScaling(
        factor=float(d["factor"]),
        original_max_position_embeddings=int(d["original_max_position_embeddings"]),
        beta_fast=float(d.get("beta_fast") or 32.0),
        beta_slow=float(d.get("beta_slow") or 1.0),
        attention_factor=float(d["attention_factor"]) if d.get("attention_factor") is not None else 1.0,
    )
