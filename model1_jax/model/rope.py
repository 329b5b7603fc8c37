"""Rotary embeddings (docs/model.md §3.2): two frequency tables, interleaved pairs on the trailing channels.

* "main": base `rope_theta` (10000), plain RoPE — sliding-only layers and the MTP block.
* "compress": base `compress_rope_theta` (160000) with YaRN — CSA/HCA layers, their compressors and
  the indexer.

Only the last `r` channels of a vector are rotated; pair i is channels (d−r+2i, d−r+2i+1). This is
not Llama's rotate-half layout. Angles and the rotation are computed in fp32 from absolute
positions (HF rounds cos/sin to the activation dtype; fp32 is exact in the fp32 parity tests and
better at 1M positions in bf16).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from model1_jax.config import SLIDING, Config, RopeScaling

MAIN = "main"
COMPRESS = "compress"


def rope_kind(layer_type: str) -> str:
    """Which table a layer uses: sliding layers the main one, CSA/HCA layers the compress one."""
    return MAIN if layer_type == SLIDING else COMPRESS


@functools.lru_cache(maxsize=64)
def _inverse_frequencies(rope_dim: int, theta: float, scaling: RopeScaling | None) -> tuple[np.ndarray, float]:
    exponents = np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim
    base_freq = 1.0 / theta ** exponents
    if scaling is None:
        return base_freq.astype(np.float32), 1.0

    # YaRN (docs/model.md §3.2): pairs rotating fast enough keep their frequency, slow ones are divided by
    # `factor`, with a linear blend between the two correction dimensions.
    def correction_dim(rotations: float) -> float:
        return rope_dim * math.log(scaling.original_max_position_embeddings / (rotations * 2 * math.pi)) / (
            2 * math.log(theta))

    lo = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    hi = min(math.ceil(correction_dim(scaling.beta_slow)), rope_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)
    freq = base_freq * (1.0 - ramp) + (base_freq / scaling.factor) * ramp
    return freq.astype(np.float32), scaling.attention_factor


def inverse_frequencies(config: Config, kind: str) -> np.ndarray:
    """Per-pair inverse frequencies `f_i`, float32 [r/2]."""
    return _table(config, kind)[0]


def _table(config: Config, kind: str) -> tuple[np.ndarray, float]:
    if kind == MAIN:
        return _inverse_frequencies(config.qk_rope_head_dim, float(config.rope_theta), None)
    if kind == COMPRESS:
        return _inverse_frequencies(config.qk_rope_head_dim, float(config.compress_rope_theta), config.rope_scaling)
    raise ValueError(f"rope kind must be {MAIN!r} or {COMPRESS!r}, got {kind!r}")


def cos_sin(config: Config, kind: str, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin of `position · f_i`, float32 [*positions.shape, r/2]."""
    freq_r, magnitude = _table(config, kind)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freq_r)
    return jnp.cos(angles) * magnitude, jnp.sin(angles) * magnitude


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array, *, inverse: bool = False) -> jax.Array:
    """Rotates the trailing `2·cos.shape[-1]` channels of x pairwise; `inverse` rotates by −φ.

    `cos`/`sin` must broadcast against x's leading axes with x's last axis replaced by r/2.
    """
    r = 2 * cos.shape[-1]
    nope, rope = x[..., :-r], x[..., -r:].astype(jnp.float32)
    a, b = rope[..., 0::2], rope[..., 1::2]
    if inverse:
        sin = -sin
    rotated = jnp.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rope.shape)
    return jnp.concatenate([nope, rotated.astype(x.dtype)], axis=-1)
