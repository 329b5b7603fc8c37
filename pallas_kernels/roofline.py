"""FLOP, byte and roofline figures of a sparse decode call, with the formulas of FlashMLA's tests/lib.py
(docs/kernels.md §8.1), so benchmark numbers compare with FlashMLA's.

FLOP = 2 · h_q · A · (d_qk + d_v), A = attended (row, token) pairs summed over both scopes.
bytes = Q + U · T + O, U = distinct index values per scope after masking positions >= topk_length to -1
(-1 counted once if present), T = 656 (d_qk 576) or 576 (d_qk 512; the 8 scale bytes are not counted).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class GpuPeak:
    name: str
    bf16_flops: float  # dense bf16 tensor-core FLOP/s
    hbm_bytes_per_s: float


# Datasheet peaks (dense, no sparsity). Matched against jax's device_kind, longest key first.
GPU_PEAKS = {
    "H100 PCIe": GpuPeak("H100 PCIe", 756e12, 2.0e12),
    "H100": GpuPeak("H100 SXM", 989e12, 3.35e12),
    "H800": GpuPeak("H800 SXM", 989e12, 3.35e12),
    "H200": GpuPeak("H200", 989e12, 4.8e12),
    "B200": GpuPeak("B200", 2250e12, 8.0e12),
}


def gpu_peak(device_kind: str) -> GpuPeak | None:
    for key in sorted(GPU_PEAKS, key=len, reverse=True):
        if key in device_kind:
            return GPU_PEAKS[key]
    return None


def _scope_counts(idx_btk, length_b):
    """(attended pairs A, distinct retrieved tokens U) of one scope."""
    idx = np.asarray(idx_btk)
    b, s_q, topk = idx.shape
    if length_b is None:
        return b * s_q * topk, len(np.unique(idx))
    length = np.asarray(length_b)
    masked = np.where(np.arange(topk)[None, None, :] < length[:, None, None], idx, -1)
    return s_q * int(length.sum()), len(np.unique(masked))


def decode_flop_and_bytes(h_q: int, d_qk: int, scopes, d_v: int = 512) -> tuple[float, float]:
    """FLOP and bytes of one call. `scopes`: [(indices [b, s_q, topk], topk_length [b] or None), ...]."""
    b, s_q, _ = np.shape(scopes[0][0])
    attended = retrieved = 0
    for idx_btk, length_b in scopes:
        a, u = _scope_counts(idx_btk, length_b)
        attended, retrieved = attended + a, retrieved + u
    token_bytes = 656 if d_qk == 576 else 576
    flop = 2.0 * h_q * attended * (d_qk + d_v)
    nbytes = 2.0 * b * s_q * h_q * d_qk + retrieved * token_bytes + 2.0 * b * s_q * h_q * d_v
    return flop, nbytes


def roofline_seconds(flop: float, nbytes: float, peak: GpuPeak) -> float:
    """max(compute time, memory time): the time no kernel can beat."""
    return max(flop / peak.bf16_flops, nbytes / peak.hbm_bytes_per_s)
