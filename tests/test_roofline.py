"""Roofline formulas against the figures of docs/kernels.md §8.1–8.4; the comparison rule of docs/kernels.md §7.1."""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.compare import close_report, decode_report
from pallas_kernels.roofline import GPU_PEAKS, decode_flop_and_bytes, gpu_peak, roofline_seconds

H100 = GPU_PEAKS["H100"]


def _distinct(b, s_q, topk, start=0):
    """Index tensor with no repeated value (docs/kernels.md §8.4's 'nominal' case)."""
    return start + np.arange(b * s_q * topk).reshape(b, s_q, topk)


def _config(name, b, s_q=2):
    """(h_q, d_qk, scopes) of the production configurations of docs/kernels.md §8.3 at their nominal/mean lengths."""
    main = (_distinct(b, s_q, 128), None)
    if name == "V3.2":
        return 128, 576, [(_distinct(b, s_q, 2048), None)]
    if name in ("CONFIG1", "CONFIG2"):
        extra_topk = 512 if name == "CONFIG1" else 1024
        return (64 if name == "CONFIG1" else 128), 512, [main, (_distinct(b, s_q, extra_topk, 10**8), None)]
    # CONFIG3/4 at the mean extra length 512 of U{0..1024}
    h_q = 64 if name == "CONFIG3" else 128
    return h_q, 512, [main, (_distinct(b, s_q, 1024, 10**8), np.full(b, 512))]


@pytest.mark.parametrize("name,gflop,mbytes", [
    ("V3.2", 1.1409, 3.2440), ("CONFIG1", 0.1678, 0.9994), ("CONFIG2", 0.6040, 1.8514),
    ("CONFIG3", 0.1678, 0.9994), ("CONFIG4", 0.3355, 1.2616)])
def test_per_batch_element_figures(name, gflop, mbytes):
    """docs/kernels.md §8.4 table, per batch element (s_q = 2), measured over 64 elements: in CONFIG3/4 the -1 of the
    masked positions counts as one token per call, which the nominal per-element figure leaves out."""
    b = 64
    h_q, d_qk, scopes = _config(name, b)
    flop, nbytes = decode_flop_and_bytes(h_q, d_qk, scopes)
    assert flop / b / 1e9 == pytest.approx(gflop, rel=5e-4)
    assert nbytes / b / 1e6 == pytest.approx(mbytes, rel=5e-4)


@pytest.mark.parametrize("name,b,gflop,mbytes,t_roof_us", [
    ("V3.2", 128, 146.03, 415.2, 147.7), ("V3.2", 2, 2.28, 6.49, 2.31),
    ("CONFIG1", 64, 10.74, 63.96, 19.1), ("CONFIG1", 148, 24.83, 147.9, 44.2),
    ("CONFIG2", 148, 89.39, 274.0, 90.4), ("CONFIG4", 128, 42.95, 161.5, 48.2)])
def test_h100_roofline_table(name, b, gflop, mbytes, t_roof_us):
    """docs/kernels.md §8.2, §8.4 (H100 SXM: 989 TFLOP/s, 3.35 TB/s)."""
    h_q, d_qk, scopes = _config(name, b)
    flop, nbytes = decode_flop_and_bytes(h_q, d_qk, scopes)
    assert flop / 1e9 == pytest.approx(gflop, rel=3e-3)
    assert nbytes / 1e6 == pytest.approx(mbytes, rel=3e-3)
    assert roofline_seconds(flop, nbytes, H100) * 1e6 == pytest.approx(t_roof_us, rel=3e-3)


def test_retrieved_tokens_follow_lib_py():
    """Duplicates and the two MTP rows' overlap count once; positions past topk_length become -1."""
    idx = np.array([[[5, 5, 7, -1], [7, 9, 1, 2]]])  # b 1, s_q 2, topk 4
    flop, nbytes = decode_flop_and_bytes(64, 512, [(idx, None)])
    assert flop == 2 * 64 * 8 * 1024
    assert nbytes == 2 * 2 * 64 * 512 + 6 * 576 + 2 * 2 * 64 * 512  # {5, 7, -1, 9, 1, 2}
    flop, nbytes = decode_flop_and_bytes(64, 512, [(idx, np.array([2]))])
    assert flop == 2 * 64 * 4 * 1024
    assert nbytes == 2 * 2 * 64 * 512 + 4 * 576 + 2 * 2 * 64 * 512  # {5, -1, 7, 9}


def test_gpu_peak_lookup():
    assert gpu_peak("NVIDIA H100 80GB HBM3") is H100
    assert gpu_peak("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert gpu_peak("NVIDIA H200").hbm_bytes_per_s == 4.8e12
    assert gpu_peak("Tesla T4") is None


def test_comparison_rule_rejects_what_it_should():
    r = np.array([1.0, -2.0, np.inf, 0.5])
    assert close_report(r, r, abs_tol=1e-6, rel_tol=1e-6) is None
    assert "inf" in close_report(np.array([1.0, -2.0, 3.0, 0.5]), r, abs_tol=1e-6, rel_tol=1e-6)
    assert "tolerance" in close_report(r + np.array([0, 0, 0, 1e-3]), r, abs_tol=1e-6, rel_tol=1e-6, cos_tol=1)
    finite = np.array([1.0, -2.0, 3.0, 0.5])
    assert "cos_diff" in close_report(-finite, finite, abs_tol=10, rel_tol=10)
    out = np.ones((1, 1, 1, 4), np.float32)
    assert decode_report(out, np.zeros(2), out, np.zeros(2)) is None
    assert decode_report(out * 1.05, np.zeros(2), out, np.zeros(2)).startswith("out")
