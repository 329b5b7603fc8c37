"""The indexer's teacher, KL and recall@k against hand-computed values (docs/training.md §4.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model1_jax.model.indexer_objective import kl_per_query, recall_at_k, teacher
from pallas_kernels.sparse_attention import sparse_attention

# Two heads, one window key (row 0), two entries (rows 1, 2), sinks 0; keys are unit vectors, so the logits
# are q's coordinates: head 1 window 4, entries (1, 0); head 2 window 0, entries (0, 2).
KEYS = jnp.eye(3, dtype=jnp.float32)[None]
Q = jnp.array([[[[4.0, 1.0, 0.0], [0.0, 0.0, 2.0]]]])
CAND = jnp.array([[[1, 2]]], jnp.int32)
JOINT_TEACHER = (0.16327967, 0.83672033)     # Σ_n P_n(w) / Σ over entries, P_n of the joint softmax
ENTRIES_ONLY_TEACHER = (0.42513075, 0.57486925)  # each head softmaxed over the entries alone, mean over heads


def _logz(q, keys, idx, sinks):
    _, lse = sparse_attention(q, keys, idx, sinks, scale=1.0, backend="xla")
    return jnp.logaddexp(lse, sinks)


def _kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return float(np.sum(p * np.log(p / q)))


def test_joint_softmax_teacher_hand_computed():
    sinks = jnp.zeros((2,))
    logz = _logz(Q, KEYS, jnp.array([[[0, 1, 2]]], jnp.int32), sinks)
    p = teacher(Q, KEYS, CAND, logz, scale=1.0)
    np.testing.assert_allclose(p[0, 0], JOINT_TEACHER, atol=1e-6)
    # The same P_n by hand: exp(z) / (exp(window) + Σ exp(entries) + exp(sink)).
    z1, z2 = np.exp([4.0, 1.0, 0.0]), np.exp([0.0, 0.0, 2.0])
    by_hand = z1[1:] / (z1.sum() + 1) + z2[1:] / (z2.sum() + 1)
    np.testing.assert_allclose(p[0, 0], by_hand / by_hand.sum(), atol=1e-6)


def test_entries_only_teacher_is_detected_as_different():
    """Normalising each head over the entries alone (ℓ from the entries, no window, no sink) gives another
    distribution, 0.158 nats away; with one head the two agree."""
    no_sink = jnp.full((2,), -jnp.inf)
    wrong_logz = _logz(Q, KEYS, jnp.array([[[1, 2, -1]]], jnp.int32), no_sink)
    wrong = teacher(Q, KEYS, CAND, wrong_logz, scale=1.0)[0, 0]
    np.testing.assert_allclose(wrong, ENTRIES_ONLY_TEACHER, atol=1e-6)
    assert abs(_kl(JOINT_TEACHER, wrong) - 0.1578) < 1e-3

    one_head = Q[:, :, 1:]
    right = teacher(one_head, KEYS, CAND, _logz(one_head, KEYS, jnp.array([[[0, 1, 2]]], jnp.int32),
                                                  jnp.zeros((1,))), scale=1.0)
    entries_only = teacher(one_head, KEYS, CAND, _logz(one_head, KEYS, CAND, jnp.full((1,), -jnp.inf)), scale=1.0)
    np.testing.assert_allclose(right, entries_only, atol=1e-6)


def test_teacher_blockwise_matches_dense_numpy():
    rng = np.random.default_rng(0)
    b, t, n, h, s, c = 2, 11, 3, 8, 9, 5
    q, keys = rng.normal(size=(b, t, n, h)), rng.normal(size=(b, s, h))
    cand = rng.integers(-2, s + 2, size=(b, t, c)).astype(np.int32)
    cand[0, 3] = -1  # a row without candidates: all zeros
    logz = rng.normal(size=(b, t, n)) + 3.0
    got = teacher(jnp.asarray(q, jnp.float32), jnp.asarray(keys, jnp.float32), jnp.asarray(cand),
                  jnp.asarray(logz, jnp.float32), scale=0.3, block_t=4)
    want = np.zeros((b, t, c))
    for bi, ti, ci in np.ndindex(b, t, c):
        if 0 <= cand[bi, ti, ci] < s:
            want[bi, ti, ci] = np.exp(0.3 * q[bi, ti] @ keys[bi, cand[bi, ti, ci]] - logz[bi, ti]).sum()
    want /= np.maximum(want.sum(-1, keepdims=True), 1e-300)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_kl_value_and_gradient():
    p = jnp.array([[[0.2, 0.0, 0.8, 0.0]]])
    valid = jnp.array([[[True, True, True, False]]])
    scores = jnp.array([[[0.5, -1.0, 2.0, 100.0]]])  # the invalid candidate's score must not matter
    q = np.exp([0.5, -1.0, 2.0]) / np.exp([0.5, -1.0, 2.0]).sum()
    kl, grad = jax.value_and_grad(lambda x: kl_per_query(p, x, valid).sum())(scores)
    np.testing.assert_allclose(kl, 0.2 * np.log(0.2 / q[0]) + 0.8 * np.log(0.8 / q[2]), rtol=1e-6)
    np.testing.assert_allclose(grad[0, 0], [*(q - [0.2, 0.0, 0.8]), 0.0], atol=1e-6)  # softmax − p
    assert float(kl_per_query(p, jnp.log(jnp.where(p > 0, p, 1e-30)), valid).sum()) < 1e-6
    assert float(kl_per_query(p, scores, jnp.zeros_like(valid)).sum()) == 0.0


def test_recall_at_k():
    p = jnp.array([[[0.5, 0.3, 0.1, 0.1, 0.0], [0.6, 0.4, 0.0, 0.0, 0.0]]])
    scores = jnp.array([[[3.0, 0.0, 2.0, 1.0, 9.0], [0.0, 1.0, 5.0, 5.0, 5.0]]])
    valid = jnp.array([[[True, True, True, True, False], [True, True, False, False, False]]])
    hits, slots = recall_at_k(p, scores, valid, 2)
    # Row 0: teacher top-2 {0, 1}, scores top-2 among valid {0, 2}: 1 hit. Row 1: 2 valid, both chosen.
    assert (int(hits), int(slots)) == (3, 4)
