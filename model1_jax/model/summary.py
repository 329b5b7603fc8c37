"""Human-readable summaries of a model: parameter counts by module type, memory."""

from __future__ import annotations

import math
from collections import defaultdict

import jax
from flax import nnx

# First matching path component → group. Order matters (compressor/indexer before attention).
_GROUPS = (
    ("embed_tokens", "embedding"),
    ("lm_head", "lm_head"),
    ("mtp", "MTP block"),
    ("dspark", "DSpark drafter"),
    ("indexer", "lightning indexer"),
    ("compressor", "CSA/HCA compressors"),
    ("self_attn", "attention (q/kv/o, sinks)"),
    ("experts", "routed experts"),
    ("shared_experts", "shared expert"),
    ("gate", "router"),
    ("attn_hc", "mHC hyper-connections"),
    ("ffn_hc", "mHC hyper-connections"),
    ("hc_head", "mHC hyper-connections"),
)


def group_of(path: tuple) -> str:
    names = [p for p in path if isinstance(p, str)]
    for key, group in _GROUPS:
        if key in names:
            return group
    return "norms"


def parameter_counts(model: nnx.Module) -> dict[str, int]:
    """Trainable parameter counts by module type (buffers such as tid2eid excluded), largest first."""
    counts: dict[str, int] = defaultdict(int)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        counts[group_of(path)] += math.prod(var.shape)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def parameter_bytes(model: nnx.Module) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
