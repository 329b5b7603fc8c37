"""The sparse-attention kernels in the static compile check (docs/compile_check.md, docs/training.md §3.3).

`sparse_attention(backend="pallas")` runs three Pallas-Triton kernels (triton_sparse_attention.py): the forward,
and in the backward dQ and dKV. Each is compiled, like the decode variants, at the shapes V4 trains with: h = 512,
bf16, n = 64 heads with 640 indices per query (V4-Flash CSA: a 128-token window + 512 picks) and n = 128 with 1152
(V4-Pro: 128 + 1024; the forward and dQ run two head-block programs, dKV loops over both head blocks in one).

One lowering of `jax.value_and_grad` of the public entry point yields all three kernels of a shape (what training
runs). b 1, t 128 queries and s 160 key rows (128 raw + 32 CSA entries) only set the grid and two constants of the
kernels' code (the key count and dKV's spare row); n, h, k and the dtype shape it.

Letters: as in sparse_attention.py.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp

from pallas_kernels import compile_check
from pallas_kernels.compile_check import KernelIR, lower_for_cuda, triton_kernels
from pallas_kernels.sparse_attention import sparse_attention
from pallas_kernels.triton_sparse_attention import BLOCK_H

KINDS = ("fwd", "dq", "dkv")  # the kernels' Pallas names are sparse_attention_<kind>
INDICES = {64: 640, 128: 1152}  # heads -> indices per query: V4-Flash, V4-Pro
B, T, S, H = 1, 128, 160, 512

# Spill budget per thread: the decode kernels' 2048 B, for the same reason (docs/compile_check.md §3): these kernels
# hold the same [64, 512] fp32 accumulator at 8 warps (128 of 255 registers), spill at most 1.04 KB today, and Triton
# versions alone move such figures up to 3x (docs/compile_check.md §1), so a tighter guard would trip on the
# compiler, not on the kernel.
SPILL_BUDGET_BYTES = 2048

# The test compiles these on sm_90a: the forward (most spills of the V4-Flash kernels on sm_90a) and dKV (the most
# shared memory at V4-Flash shape, the head-summing loop and the atomics).
REPRESENTATIVE = ("attention-fwd-n64", "attention-dkv-n64")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One sparse-attention kernel: `kind` (fwd / dq / dkv) at `n` heads and `k` indices per query (bf16, h 512)."""

    kind: str
    n: int
    k: int
    family: ClassVar[str] = "sparse_attention"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def name(self) -> str:
        return f"attention-{self.kind}-n{self.n}"

    @property
    def block_h(self) -> int:
        """Heads per logit matmul (M): the kernels' head block."""
        return min(self.n, BLOCK_H)

    @property
    def spill_budget(self) -> int:
        return SPILL_BUDGET_BYTES

    def d_chunk(self, arch: str, forced: int | None = None) -> None:
        """These kernels have no V-column chunk: the same IR for every architecture."""
        return None

    def capture(self, d_chunk: None = None) -> KernelIR:
        kernels = _kernels(self.n, self.k)
        name = f"sparse_attention_{self.kind}"
        if name not in kernels:
            raise RuntimeError(f"no {name} kernel in the lowered training step (found {sorted(kernels)})")
        return kernels[name]


def configurations() -> list[AttentionConfig]:
    """forward, dQ, dKV at V4-Flash (n 64) and V4-Pro (n 128) shapes."""
    return [AttentionConfig(kind, n, k) for n, k in INDICES.items() for kind in KINDS]


def all_configurations() -> list:
    """Every kernel the check compiles: the decode variants (compile_check.configurations()), then these. Here, not
    in compile_check, because this module builds on that one (imports flow one way)."""
    return compile_check.configurations() + configurations()


@functools.lru_cache(maxsize=None)
def _kernels(n: int, k: int) -> dict[str, KernelIR]:
    """{Pallas name: IR} of the kernels in one lowered value-and-gradient of `sparse_attention` (cached: the
    three kernels of a shape come from one lowering)."""
    spec = jax.ShapeDtypeStruct
    specs = (spec((B, T, n, H), jnp.bfloat16), spec((B, S, H), jnp.bfloat16), spec((B, T, k), jnp.int32),
             spec((n,), jnp.float32))

    def loss(q_btnh, keys_bsh, idx_btk, sinks_n):
        o_btnh, lse_btn = sparse_attention(q_btnh, keys_bsh, idx_btk, sinks_n, backend="pallas")
        return jnp.sum(o_btnh.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse_btn), lse_btn, 0.0))

    lowered = lower_for_cuda(jax.value_and_grad(loss, argnums=(0, 1, 3)), *specs)
    return {kernel.name: kernel for kernel in triton_kernels(lowered)}
