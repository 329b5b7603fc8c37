"""FlashMLA's comparison rule for kernel outputs (`tests/kernelkit/compare.py`, docs/kernels.md §7.1), used by the tests
and by the benchmark's correctness check."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

# Sparse decode tolerances (docs/kernels.md §7.1): out is bf16 compared with the bf16-rounded reference.
OUT_TOL = dict(abs_tol=1e-3, rel_tol=2.01 / 128, cos_tol=5e-6)
LSE_TOL = dict(abs_tol=1e-6, rel_tol=8.01 / 65536, cos_tol=1e-7)


def close_report(ans, ref, *, abs_tol: float, rel_tol: float, cos_tol: float = 1e-7) -> str | None:
    """None if `ans` passes against `ref`, else why not.

    inf/-inf/NaN positions must coincide (then count as 0); the cosine difference 1 - 2Σar / Σ(a² + r²) must be
    within cos_tol; every element needs |a - r| < abs_tol or |a - r| / (|r| + 1e-6) < rel_tol.
    """
    a = np.asarray(ans, np.float64)
    r = np.asarray(ref, np.float64)
    if a.shape != r.shape:
        return f"shape {a.shape} != {r.shape}"
    for what, mask_fn in [("+inf", np.isposinf), ("-inf", np.isneginf), ("nan", np.isnan)]:
        ma, mr = mask_fn(a), mask_fn(r)
        if not np.array_equal(ma, mr):
            return f"{what} positions differ ({ma.sum()} vs {mr.sum()})"
    special = ~np.isfinite(r)
    a, r = np.where(special, 0.0, a), np.where(special, 0.0, r)
    cos_diff = 0.0 if np.sum(r * r) < 1e-12 else 1.0 - 2.0 * np.sum(a * r) / np.sum(a * a + r * r)
    if abs(cos_diff) > cos_tol:
        return f"cos_diff {cos_diff:.3g} > {cos_tol}"
    err = np.abs(a - r)
    ok = (err < abs_tol) | (err / (np.abs(r) + 1e-6) < rel_tol)
    if not ok.all():
        k = np.unravel_index(np.argmax(np.where(ok, 0, err)), err.shape)
        return f"{np.sum(~ok)} elements out of tolerance; worst at {k}: {a[k]} vs {r[k]}"
    return None


def decode_report(out, lse, ref_out, ref_lse) -> str | None:
    """Sparse-decode check of (out, lse) against a float32/float64 reference; None if both pass."""
    ref_out_bf16 = np.asarray(jnp.asarray(ref_out, jnp.float32).astype(jnp.bfloat16), np.float32)
    problems = [f"{name}: {msg}" for name, msg in [
        ("out", close_report(np.asarray(out, np.float32), ref_out_bf16, **OUT_TOL)),
        ("lse", close_report(lse, ref_lse, **LSE_TOL))] if msg]
    return "; ".join(problems) or None
