"""An HCA layer's two-part attention (window through `sparse_attention`, every visible entry as a dense masked
softmax, merged by log-sum-exp) against one `attend` over window + visible entries + sink: values and the
gradients of q, keys, entries and sinks, with packed documents and queries that see no entry yet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model1_jax.model.attention import attend, entries_attention, merge_with_entries
from model1_jax.model.index_lists import entry_bounds, visible_entries, window_indices
from pallas_kernels.sparse_attention import sparse_attention

B, N, H, WINDOW, RATE = 2, 3, 16, 6, 4
SCALE = H ** -0.5


def _positions():
    """Row 0: one sequence of 40; row 1: documents of 12, 20 and 8 tokens (each starts at a multiple of RATE)."""
    packed = np.concatenate([np.arange(12), np.arange(20), np.arange(8)])
    return jnp.asarray(np.stack([np.arange(40), packed]), jnp.int32)


def _two_part(q, keys, entries, sinks, positions):
    o_w, lse_w = sparse_attention(q, keys, window_indices(positions, WINDOW), sinks, scale=SCALE, backend="xla")
    o_e, lse_e = entries_attention(q, entries, *entry_bounds(positions, RATE), SCALE)
    return merge_with_entries(o_w, lse_w, o_e, lse_e, sinks)


def _one_softmax(q, keys, entries, sinks, positions):
    t = positions.shape[1]
    rows = jnp.arange(t)
    back = rows[:, None] - rows[None, :]  # query row − key row
    window_bts = (back >= 0) & (back < WINDOW) & (back <= positions[:, :, None])  # same document, in the window
    visible_bts = jnp.concatenate([window_bts, visible_entries(positions, entries.shape[1], RATE)], axis=-1)
    return attend(q, jnp.concatenate([keys, entries], axis=1), visible_bts, sinks, SCALE)


def test_two_part_hca_attention_equals_one_softmax():
    positions = _positions()
    t = positions.shape[1]
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(B, t, N, H)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(B, t, H)), jnp.float32)
    entries = jnp.asarray(rng.normal(size=(B, t // RATE, H)), jnp.float32)
    sinks = jnp.asarray([0.5, -1.0, 2.0], jnp.float32)
    weights = jnp.asarray(rng.normal(size=(B, t, N, H)), jnp.float32)
    assert not visible_entries(positions, t // RATE, RATE)[:, :RATE - 1].any()  # some queries see no entry

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a, positions) * weights), argnums=(0, 1, 2, 3)))

    got_o, want_o = _two_part(q, keys, entries, sinks, positions), _one_softmax(q, keys, entries, sinks, positions)
    np.testing.assert_allclose(got_o, want_o, atol=1e-5, rtol=1e-5)
    (_, got), (_, want) = loss(_two_part)(q, keys, entries, sinks), loss(_one_softmax)(q, keys, entries, sinks)
    for name, g, w in zip(("q", "keys", "entries", "sinks"), got, want):
        assert np.isfinite(np.asarray(g)).all(), name
        assert np.abs(np.asarray(w)).max() > 0, name
        np.testing.assert_allclose(g, w, atol=1e-4 * np.abs(np.asarray(w)).max(), rtol=0, err_msg=name)


def test_no_entries_yet():
    """A call shorter than one compression window has no entries: o_e = 0, lse_e = −inf, the merge is o_w."""
    positions = jnp.arange(3, dtype=jnp.int32)[None]
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(1, 3, N, H)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(1, 3, H)), jnp.float32)
    sinks = jnp.zeros((N,), jnp.float32)
    o_e, lse_e = entries_attention(q, jnp.zeros((1, 0, H), jnp.float32), *entry_bounds(positions, RATE), SCALE)
    assert not np.asarray(o_e).any() and np.all(np.asarray(lse_e) == -np.inf)
    o_w, lse_w = sparse_attention(q, keys, window_indices(positions, WINDOW), sinks, scale=SCALE, backend="xla")
    np.testing.assert_allclose(merge_with_entries(o_w, lse_w, o_e, lse_e, sinks), o_w, rtol=1e-6, atol=1e-7)
