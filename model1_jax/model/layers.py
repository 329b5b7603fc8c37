"""Small building blocks shared by every module: projections, RMSNorms, embedding, buffers.

The project's one letter table, for shape suffixes (`q_btnh`) and einsum strings (`"btd,dq->btq"`) in both
`model1_jax` and `pallas_kernels` (README and docs/model.md §0 carry the same table):

  b batch (sequences)        t query tokens of a call       s key positions / cache slots / entries
  k picks per query (top-k)  d hidden size                  n query heads
  h head dim (the 512-wide K=V vector; a compressor's width)                r rope channels (64)
  q q-lora rank              o o-lora rank                  g output groups
  e routed experts           f expert FFN width             a (token, pick) assignments of the MoE
  c mHC streams              x mHC mix width ((2+c)·c)      v vocabulary
  i indexer heads            j indexer head dim             l LoRA rank
  m slots of a compression window   w compressed windows    p halves of a CSA window (Ca / Cb)
  u cache pages (page blocks)       y bytes                 z KV splits of a decode kernel

Every parameter carries its logical axis names as `logical_axes` metadata; `model1_jax.parallel` maps
them to mesh axes. Flax's own `out_sharding` metadata is not used because it requires a mesh at creation
time, and the model must run on one device with no ceremony.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from model1_jax.model.quant import is_quantized


class Buffer(nnx.Variable):
    """Non-trainable model state that lives in checkpoints (hash table, router correction bias)."""


def normal_param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float,
                 dtype) -> nnx.Param:
    return nnx.Param(std * jax.random.normal(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def const_param(value: float, shape: Sequence[int], axes: Sequence[str | None], dtype) -> nnx.Param:
    return nnx.Param(jnp.full(tuple(shape), value, dtype), logical_axes=tuple(axes))


def weight(variable: nnx.Variable, dtype) -> jax.Array:
    """Reads a weight for compute in `dtype`.

    Every weight read goes through here so that storage formats other than a plain array
    (block-quantized FP8/FP4 values with scales) can be expanded at the point of use.
    """
    return dequantize(variable.get_value(), dtype)


def dequantize(value, dtype) -> jax.Array:
    """A stored weight value (an array, or a `BlockQuantized` FP8/FP4 block) as an array of `dtype`."""
    if is_quantized(value):
        return value.dequantize(dtype)
    return value.astype(dtype)


def constrain(x: jax.Array, layout, *logical_axes: str | None) -> jax.Array:
    """Sharding constraint on an activation by logical axis names (`sharding.Layout.constrain`); a no-op
    without a layout, so the single-device model carries no sharding code."""
    return x if layout is None else layout.constrain(x, logical_axes)


class Linear(nnx.Module):
    """A bias-free projection `y = einsum(eqn, x, W)` with an explicitly shaped kernel.

    The kernel is stored input axes first (JAX convention), so HF's `[out, in]` matrices are
    transposed and reshaped on load. Shaped kernels (e.g. q_b as [q, n, h]) keep heads and
    groups as their own axes so they can be sharded by name.
    """

    def __init__(self, eqn: str, shape: Sequence[int], axes: Sequence[str | None], *, rngs: nnx.Rngs,
                 std: float, dtype=jnp.float32, param_dtype=jnp.float32):
        self.eqn = eqn
        self.dtype = dtype
        self.kernel = normal_param(rngs, shape, axes, std, param_dtype)
        self.lora = nnx.data(None)  # a low-rank adapter beside the kernel (model1_jax.lora), not merged here

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum(self.eqn, x.astype(self.dtype), weight(self.kernel, self.dtype))
        if self.lora is not None:
            y = y + self.lora(x)
        return y


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """Unweighted RMSNorm over the last axis: statistics in fp32, the scale cast back to x's dtype."""
    inv = jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True) + eps)
    return x * inv.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Weighted RMSNorm: normalise in fp32, multiply by the fp32 weight, cast once at the end."""

    def __init__(self, size: int, eps: float, axis_name: str | None = None):
        self.eps = eps
        self.weight = const_param(1.0, (size,), (axis_name,), jnp.float32)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (weight(self.weight, jnp.float32) * x32).astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding table [v, d]."""

    def __init__(self, vocab_size: int, hidden_size: int, *, rngs: nnx.Rngs, std: float,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.dtype = dtype
        self.embedding = normal_param(rngs, (vocab_size, hidden_size), ("vocab", "embed"), std, param_dtype)

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        return jnp.take(weight(self.embedding, self.dtype), ids_bt, axis=0)

    def attend(self, h_btd: jax.Array) -> jax.Array:
        """Logits through the embedding matrix (tied lm_head)."""
        return jnp.einsum("btd,vd->btv", h_btd, weight(self.embedding, self.dtype))
