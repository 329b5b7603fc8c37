"""The sparse-attention kernels (forward, dQ, dKV) lower for CUDA on a CPU-only machine.

Interpret mode accepts what Triton cannot compile (non power-of-two arrays, value slices, unsupported casts or
atomics); lowering runs the whole Pallas -> Triton IR pipeline, so such code fails here. Shapes: V4-Flash and
V4-Pro attention (n = 64 / 128, h = 512, 128 window + 512 / 1024 picks) and a small fp32 one with padding.
"""

from __future__ import annotations

import contextlib
import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.sparse_attention import sparse_attention

S = jax.ShapeDtypeStruct


def _cuda_target():
    """jax >= 0.11 asks the (abstract) device for its GPU kind; jax 0.10 assumes sm_90 when none is present."""
    if jax.__version_info__ < (0, 11) or jax.default_backend() == "gpu":
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))


def _triton_kernels(fn, *specs) -> list[str]:
    with _cuda_target():
        text = jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()
    return [name for name in re.findall(r"custom_call @(\S+)\(", text) if "triton" in name]


@pytest.mark.parametrize("b,t,n,h,s,k,dtype", [
    (1, 64, 64, 512, 96, 640, jnp.bfloat16),     # Flash CSA: 128 window + 512 picks over raw keys + entries
    (2, 16, 128, 512, 40, 1152, jnp.bfloat16),   # Pro CSA: 128 + 1024
    (1, 8, 6, 48, 30, 70, jnp.float32),          # padded heads / head dim / index tiles, IEEE fp32 dots
], ids=["flash", "pro", "small-fp32"])
def test_forward_and_backward_lower_for_cuda(b, t, n, h, s, k, dtype):
    specs = [S((b, t, n, h), dtype), S((b, s, h), dtype), S((b, t, k), jnp.int32), S((n,), jnp.float32)]

    def loss(q, keys, idx, sinks):
        o, lse = sparse_attention(q, keys, idx, sinks, backend="pallas")
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    assert len(_triton_kernels(lambda *a: sparse_attention(*a, backend="pallas"), *specs)) == 1
    # value_and_grad: the forward, then the dQ and dKV kernels.
    assert len(_triton_kernels(jax.value_and_grad(loss, argnums=(0, 1, 3)), *specs)) == 3
