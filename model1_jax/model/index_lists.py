"""Per-query index lists of the sparse full-sequence attention: window rows and compressed entries.

A layer's key rows are the t raw K=V vectors of the call (row r = token r) followed by its compressed
entries (row t + w = entry w). Query r attends to

* its window: rows r − W + 1 … r of its own document;
* CSA: the indexer's picks (entry numbers, −1 = none), shifted by t;
* HCA: every complete entry of its own document: w in [first, end).

`positions_bt` is each token's position inside its document (0 at a document start). Documents packed in
one row must start at multiples of every compression rate (the data path pads them so), which makes
"same document" a bound on rows: the document of token r starts at row r − positions[r], its first entry is
(r − positions[r]) / m, and entry w is complete at r iff w < ⌊(r + 1)/m⌋. For an unpacked sequence
(positions = arange) these are the usual causal rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def window_indices(positions_bt: jax.Array, window: int) -> jax.Array:
    """Rows r − W + 1 … r (ascending) of each query's window, −1 before its document's start. [b, t, W]."""
    t = positions_bt.shape[1]
    back_w = jnp.arange(window - 1, -1, -1, dtype=jnp.int32)  # how far back each slot looks
    rows_tw = jnp.arange(t, dtype=jnp.int32)[:, None] - back_w[None, :]
    return jnp.where(back_w <= positions_bt[..., None], rows_tw, -1).astype(jnp.int32)


def entry_bounds(positions_bt: jax.Array, rate: int) -> tuple[jax.Array, jax.Array]:
    """(first, end) [b, t]: the entries of the query's document that are complete at the query: [first, end)."""
    rows_t = jnp.arange(positions_bt.shape[1], dtype=jnp.int32)
    return (rows_t - positions_bt) // rate, (rows_t + 1) // rate + jnp.zeros_like(positions_bt)


def visible_entries(positions_bt: jax.Array, num_entries: int, rate: int) -> jax.Array:
    """Entry w is visible to query r iff first ≤ w < end (see `entry_bounds`). [b, t, s] bool."""
    first_bt, end_bt = entry_bounds(positions_bt, rate)
    w = jnp.arange(num_entries, dtype=jnp.int32)
    return (w >= first_bt[..., None]) & (w < end_bt[..., None])


def all_entry_indices(positions_bt: jax.Array, num_entries: int, rate: int) -> jax.Array:
    """Every visible entry of each query, ascending, −1-padded to `num_entries`: [b, t, num_entries]."""
    first_bt, end_bt = entry_bounds(positions_bt, rate)
    w_btw = first_bt[..., None] + jnp.arange(num_entries, dtype=jnp.int32)
    return jnp.where(w_btw < end_bt[..., None], w_btw, -1).astype(jnp.int32)


def attention_indices(window_btw: jax.Array, entries_btk: jax.Array | None, num_tokens: int) -> jax.Array:
    """One list per query over [raw rows ++ entries]: window rows, then entry numbers shifted by t."""
    if entries_btk is None:
        return window_btw
    shifted = jnp.where(entries_btk >= 0, entries_btk + num_tokens, -1).astype(jnp.int32)
    return jnp.concatenate([window_btw, shifted], axis=-1)
