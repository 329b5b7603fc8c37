"""Per-query index lists against a per-token rule written out directly (unpacked and packed documents)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from model1_jax.model.index_lists import (
    all_entry_indices,
    attention_indices,
    entry_bounds,
    visible_entries,
    window_indices,
)


def _positions(doc_lengths):
    """Positions inside documents laid out back to back (each length a multiple of the largest rate)."""
    return jnp.asarray(np.concatenate([np.arange(n) for n in doc_lengths])[None], jnp.int32)


def _doc_start(positions, r):
    return r - int(positions[0, r])


def test_window_rows_stay_inside_the_document():
    positions = _positions([16, 8, 24])
    got = np.asarray(window_indices(positions, 5))[0]
    for r in range(positions.shape[1]):
        want = [p if p >= _doc_start(positions, r) else -1 for p in range(r - 4, r + 1)]
        assert list(got[r]) == want, r


def test_entries_visible_once_complete_and_inside_the_document():
    positions = _positions([16, 8, 24])
    rate, num_entries = 4, 12
    vis = np.asarray(visible_entries(positions, num_entries, rate))[0]
    lists = np.asarray(all_entry_indices(positions, num_entries, rate))[0]
    for r in range(positions.shape[1]):
        start = _doc_start(positions, r)
        # Entry w pools tokens w·m … (w+1)·m − 1: visible iff they all lie in [start, r].
        want = [w for w in range(num_entries) if w * rate >= start and (w + 1) * rate - 1 <= r]
        assert list(np.flatnonzero(vis[r])) == want, r
        assert list(lists[r][lists[r] >= 0]) == want and (lists[r][len(want):] == -1).all(), r


def test_unpacked_sequences_use_the_causal_rules():
    positions = jnp.broadcast_to(jnp.arange(10, dtype=jnp.int32), (2, 10))
    first, end = entry_bounds(positions, 4)
    assert (np.asarray(first) == 0).all() and list(np.asarray(end)[0]) == [(r + 1) // 4 for r in range(10)]
    lists = attention_indices(window_indices(positions, 3), jnp.array([[[1, -1]] * 10] * 2, jnp.int32), 10)
    assert list(np.asarray(lists)[0, 5]) == [3, 4, 5, 11, -1]
