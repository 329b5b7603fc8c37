"""Independent float64 NumPy oracle for `sparse_attention`: a dense masked softmax, values and gradients.

It shares no code with `pallas_kernels`. Each query row's index list becomes a dense multiplicity matrix
c[b, t, s] (how often key s is listed; invalid indices count 0), so the softmax runs over every key of the
sequence with weights c · exp(z) plus the sink column. The gradients use the dense softmax Jacobian
(dz = P ⊙ (dP − Σ P ⊙ dP)), not the output-based D = dO · o of the implementation.
"""

from __future__ import annotations

import numpy as np


def multiplicity(idx_btk: np.ndarray, s: int) -> np.ndarray:
    """c [b, t, s]: occurrences of each key row in each query's index list (only 0 <= index < s count)."""
    b, t, _ = idx_btk.shape
    c = np.zeros((b, t, s))
    for bi in range(b):
        for ti in range(t):
            for i in idx_btk[bi, ti]:
                if 0 <= i < s:
                    c[bi, ti, i] += 1
    return c


def _softmax_parts(q, keys, idx, sinks, scale):
    q, keys, sinks = (np.asarray(x, np.float64) for x in (q, keys, sinks))
    c = multiplicity(np.asarray(idx), keys.shape[1])[:, :, None, :]  # [b, t, 1, s]
    seen = c > 0
    # Unreferenced rows may hold NaN: their logits are replaced before use (the dense form reads every row).
    k_clean = np.where(np.isfinite(keys), keys, 0.0)
    z = scale * np.einsum("btnh,bsh->btns", q, k_clean)
    z = np.where(seen, z, -np.inf)
    top = np.maximum(z.max(axis=-1), sinks)  # [b, t, n]
    w = np.where(seen, c * np.exp(z - top[..., None]), 0.0)
    sink_w = np.exp(sinks - top)
    total = w.sum(axis=-1) + sink_w
    return k_clean, c, w / total[..., None], sink_w / total, w.sum(axis=-1), top


def forward(q, keys, idx, sinks, scale):
    """(o [b, t, n, h], lse [b, t, n]) in float64; lse excludes the sink and is +inf for an empty row."""
    k_clean, c, p, _, w_sum, top = _softmax_parts(q, keys, idx, sinks, scale)
    o = np.einsum("btns,bsh->btnh", p, k_clean)
    empty = (c.sum(axis=-1) == 0)[..., 0][..., None]
    with np.errstate(divide="ignore"):
        lse = np.where(empty, np.inf, np.log(w_sum) + top)
    return o, lse


def gradients(q, keys, idx, sinks, scale, do, dlse):
    """(dq, dkeys, dsinks) of Σ do·o + Σ dlse·lse (lse terms of empty rows excluded), float64."""
    q = np.asarray(q, np.float64)
    do, dlse = np.asarray(do, np.float64), np.asarray(dlse, np.float64)
    k_clean, c, p, p_sink, w_sum, _ = _softmax_parts(q, keys, idx, sinks, scale)
    dp = np.einsum("btnh,bsh->btns", do, k_clean)  # ∂/∂P of Σ do·o (the sink column has no value: 0)
    rowsum = (p * dp).sum(axis=-1)  # Σ over every column incl. the sink, whose dP is 0
    dz = p * (dp - rowsum[..., None])
    nonempty = w_sum > 0
    p_keys = np.where(nonempty[..., None], p / np.where(nonempty, 1.0 - p_sink, 1.0)[..., None], 0.0)
    dz += np.where(nonempty, dlse, 0.0)[..., None] * p_keys  # ∂lse/∂z = softmax over keys without the sink
    dq = scale * np.einsum("btns,bsh->btnh", dz, k_clean)
    dkeys = scale * np.einsum("btns,btnh->bsh", dz, q) + np.einsum("btns,btnh->bsh", p, do)
    dsinks = -(p_sink * rowsum).sum(axis=(0, 1))
    return dq, dkeys, dsinks
