"""sparse_attention (jnp reference and Pallas kernels in interpret mode) against the float64 dense oracle.

Every case mixes valid indices with invalid ones (−1, s, far out of range, negative), has a row without any
valid index, and poisons every key row no valid index reads with NaN: a kernel that reads such a row, or
multiplies it by 0 instead of selecting, returns NaN. Gradients are of Σ cos(o)·o-like functions of o and lse,
so every cotangent is non-trivial.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import BLOCK_ELEMENTS, default_block_t, sparse_attention
from tests import sparse_attention_oracle as oracle

INVALID = (-1, -7, 10**6)  # plus s itself, added per case


def make_case(b, t, n, h, s, k, *, seed, duplicates=False, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    idx = np.empty((b, t, k), np.int32)
    for bi in range(b):
        for ti in range(t):
            n_valid = rng.integers(0, min(k, s) + 1)
            row = list(rng.choice(s, n_valid, replace=False))
            if duplicates and n_valid and n_valid < k:
                row.append(row[0])
            fill = [(*INVALID, s)[i % 4] for i in range(k - len(row))]
            idx[bi, ti] = rng.permutation(np.array(row + fill, np.int64)).astype(np.int32)
    idx[0, t // 2] = -1  # a row without valid indices
    if s - 1 not in idx[-1, -1]:
        idx[-1, -1, 0] = s - 1  # the last key row is read
    q = rng.normal(size=(b, t, n, h))
    keys = rng.normal(size=(b, s, h))
    referenced = oracle.multiplicity(idx, s).sum(axis=1) > 0  # [b, s]
    keys[~referenced] = np.nan
    sinks = rng.normal(size=(n,))
    do = rng.normal(size=(b, t, n, h))
    dlse = rng.normal(size=(b, t, n))
    return (jnp.asarray(q, dtype), jnp.asarray(keys, dtype), jnp.asarray(idx), jnp.asarray(sinks, jnp.float32),
            do, dlse)


def run(q, keys, idx, sinks, do, dlse, **kw):
    """(o, lse, dq, dkeys, dsinks) of Σ do·o + Σ dlse·lse (finite lse only) through the custom VJP."""
    def f(q, keys, sinks):
        o, lse = sparse_attention(q, keys, idx, sinks, **kw)
        lse_term = jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse)
        return jnp.sum(o.astype(jnp.float32) * do) + lse_term, (o, lse)

    (_, (o, lse)), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, keys, sinks)
    return (o, lse, *grads)


def check_against_oracle(case, atol, **kw):
    q, keys, idx, sinks, do, dlse = case
    scale = kw.pop("scale", q.shape[-1] ** -0.5)
    got = run(q, keys, idx, sinks, do, dlse, scale=scale, **kw)
    want = (*oracle.forward(q, keys, idx, sinks, scale), *oracle.gradients(q, keys, idx, sinks, scale, do, dlse))
    for name, g, w in zip(["o", "lse", "dq", "dkeys", "dsinks"], got, want):
        g = np.asarray(g, np.float64)
        assert not np.isnan(g).any(), f"{name} has NaN (a poisoned row was read)"
        assert np.array_equal(np.isinf(g), np.isinf(w)), f"{name}: inf positions differ"
        g, w = np.where(np.isinf(w), 0.0, g), np.where(np.isinf(w), 0.0, w)
        np.testing.assert_allclose(g, w, rtol=atol, atol=atol * max(1.0, np.abs(w).max()), err_msg=name)


def test_oracle_gradients_match_finite_differences():
    """The oracle's dense-Jacobian gradients against central differences of its own forward (float64)."""
    q, keys, idx, sinks, do, dlse = make_case(1, 3, 2, 3, 5, 3, seed=1)
    keys = np.nan_to_num(np.asarray(keys, np.float64), nan=0.25)  # differentiate every row
    q, sinks = np.asarray(q, np.float64), np.asarray(sinks, np.float64)

    def f(q, keys, sinks):
        o, lse = oracle.forward(q, keys, idx, sinks, 0.7)
        return np.sum(o * do) + np.sum(np.where(np.isfinite(lse), lse, 0.0) * dlse)

    analytic = oracle.gradients(q, keys, idx, sinks, 0.7, do, dlse)
    args = [q, keys, sinks]
    for a, grad in enumerate(analytic):
        numeric = np.zeros_like(args[a])
        for pos in np.ndindex(args[a].shape):
            plus, minus = [x.copy() for x in args], [x.copy() for x in args]
            plus[a][pos] += 1e-6
            minus[a][pos] -= 1e-6
            numeric[pos] = (f(*plus) - f(*minus)) / 2e-6
        np.testing.assert_allclose(grad, numeric, atol=1e-6)


@pytest.mark.parametrize("shape,block_t", [((2, 13, 3, 24, 17, 9), 4), ((1, 40, 4, 64, 45, 20), None),
                                           ((3, 6, 1, 16, 5, 7), 8)])
def test_reference_matches_oracle(shape, block_t):
    check_against_oracle(make_case(*shape, seed=sum(shape)), 1e-5, backend="xla", block_t=block_t)


def test_reference_counts_repeated_indices():
    """Indices are gathered: a key listed twice gets twice the weight (the oracle's multiplicity)."""
    check_against_oracle(make_case(2, 9, 2, 16, 12, 6, seed=3, duplicates=True), 1e-5, backend="xla", block_t=2)


def test_reference_bfloat16_close_to_oracle():
    case = make_case(2, 8, 4, 32, 20, 8, seed=4, dtype=jnp.bfloat16)
    check_against_oracle(case, 3e-2, backend="xla")


@pytest.mark.parametrize("shape", [(2, 5, 3, 24, 11, 40), (1, 3, 128, 64, 70, 33)],
                         ids=["odd-heads-and-dim", "two-head-blocks"])
def test_kernel_interpret_matches_oracle(shape):
    """Padding of heads / head dim / index tiles, several index tiles per row, two head blocks, NaN rows."""
    check_against_oracle(make_case(*shape, seed=7), 1e-5, backend="pallas", interpret=True)


def test_kernel_interpret_matches_reference_bfloat16():
    q, keys, idx, sinks, do, dlse = make_case(2, 4, 16, 32, 30, 36, seed=8, dtype=jnp.bfloat16)
    got = run(q, keys, idx, sinks, do, dlse, backend="pallas", interpret=True)
    want = run(q, keys, idx, sinks, do, dlse, backend="xla")
    for name, g, w in zip(["o", "lse", "dq", "dkeys", "dsinks"], got, want):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        finite = np.isfinite(w)
        assert np.array_equal(finite, np.isfinite(g)), name
        np.testing.assert_allclose(g[finite], w[finite], rtol=2e-2, atol=2e-2 * np.abs(w[finite]).max(),
                                   err_msg=name)


def _largest_intermediate(jaxpr) -> int:
    """Elements of the biggest value any equation produces, nested jaxprs (scan, map, custom VJP) included."""
    def inner(p):
        if isinstance(p, (tuple, list)):
            return [j for x in p for j in inner(x)]
        p = getattr(p, "jaxpr", p)
        return [p] if isinstance(p, jax.extend.core.Jaxpr) else []

    biggest = 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(v.aval, "shape", ()))))
        for sub in (j for p in eqn.params.values() for j in inner(p)):
            biggest = max(biggest, _largest_intermediate(sub))
    return biggest


def test_memory_is_linear_in_queries():
    """Value and gradient at t = 512 keep no array bigger than one block's gather or the inputs: nothing
    of size t · s or t · k · s is ever formed."""
    b, t, n, h, s, k = 1, 512, 2, 16, 600, 24
    q, keys = jnp.zeros((b, t, n, h)), jnp.zeros((b, s, h))
    idx, sinks = jnp.zeros((b, t, k), jnp.int32), jnp.zeros((n,))

    def loss(q, keys, sinks):
        return sparse_attention(q, keys, idx, sinks, backend="xla", block_t=16)[0].sum()

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, keys, sinks).jaxpr
    assert _largest_intermediate(jaxpr) <= max(b * t * k * n, b * t * n * h, b * 16 * k * h, b * s * h)
    assert default_block_t(1, 32768, 640, 512) * 640 * 512 <= BLOCK_ELEMENTS


@pytest.mark.parametrize("bad,message", [
    (dict(q=jnp.zeros((1, 2, 3), jnp.float32)), "q must be"),
    (dict(keys=jnp.zeros((1, 4, 8), jnp.bfloat16)), "keys must be float32"),
    (dict(indices=jnp.zeros((1, 2, 3), jnp.int64 if jax.config.x64_enabled else jnp.float32)), "indices must"),
    (dict(indices=jnp.zeros((1, 3, 2), jnp.int32)), "indices must be int32 \\[1, 2, k\\]"),
    (dict(sinks=jnp.zeros((2,), jnp.float32)), "sinks must be float32 \\[3\\]"),
    (dict(scale=-1.0), "scale must be"),
    (dict(backend="cuda"), "backend must be"),
    (dict(backend="xla", interpret=True), "interpret=True"),
])
def test_bad_input_is_named(bad, message):
    args = dict(q=jnp.zeros((1, 2, 3, 8)), keys=jnp.zeros((1, 4, 8)), indices=jnp.zeros((1, 2, 3), jnp.int32),
                sinks=jnp.zeros((3,)))
    kw = {key: bad.pop(key) for key in list(bad) if key not in args}
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        sparse_attention(args["q"], args["keys"], args["indices"], args["sinks"], **kw)
