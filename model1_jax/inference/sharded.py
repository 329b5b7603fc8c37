"""Decode under a sharding layout: the decode state split by sequence, the sparse decode kernel per shard.

Every decode-state array has the sequence as its leading dimension (the paged caches are
sequence-major: sequence b owns pages [b·P, (b+1)·P)), so one rule places them all: dimension 0 over
the layout's `batch` mesh axes — the leading ones that divide the batch — and the rest whole (the
single shared K=V head is never split).

XLA cannot partition a Pallas kernel, so `sparse_mla_decode` runs under `shard_map`: each device
takes its sequences with their pages and, under tensor parallelism, its query heads and their sinks
(h_q / tensor per device: 64 heads over 4 devices gives the kernel 16). Token indices are global
slots (`page · page_size + offset`); each shard shifts them to its own pages. Cache writes run the
same way, so neither the caches nor the kernel's inputs are ever gathered. Without a layout both
functions are exactly `pallas_kernels`' own.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk
from model1_jax.config import Config
from model1_jax.inference import state as decode_state
from model1_jax.parallel.layout import Layout
from model1_jax.parallel.mesh import spec_entry
from pallas_kernels import index_format


def batch_axes(layout: Layout, batch: int) -> tuple[str, ...]:
    """The `batch` mesh axes a batch of this size is split over (the leading ones that divide it)."""
    part = layout.activation_spec(("batch",), (batch,))[0]
    return () if part is None else ((part,) if isinstance(part, str) else tuple(part))


def head_axes(layout: Layout, heads: int) -> tuple[str, ...]:
    part = layout.activation_spec(("heads",), (heads,))[0]
    return () if part is None else ((part,) if isinstance(part, str) else tuple(part))


def batch_shards(layout: Layout | None, batch: int) -> int:
    """How many parts a batch of this size is split into (1 without a layout)."""
    return 1 if layout is None else math.prod(layout.mesh.shape[a] for a in batch_axes(layout, batch))


def state_shardings(layout: Layout, state: Any, batch: int) -> Any:
    """NamedShardings for a decode state (arrays or ShapeDtypeStructs): dimension 0 split by sequence.

    Shared page pools split the same way: shard i holds the i-th part of the pages, and the scheduler gives
    the sequences of shard i only pages of that part (docs/serving.md §2)."""
    axes = batch_axes(layout, batch)
    shards = batch_shards(layout, batch)

    def place(x):
        if x.shape[0] % shards:
            raise ValueError(f"decode state: an array of shape {x.shape} does not split into the {shards} parts of "
                             f"the {batch} sequences")
        return NamedSharding(layout.mesh, P(spec_entry(axes), *([None] * (len(x.shape) - 1))))

    return jax.tree.map(place, state)


def constrain_state(layout: Layout | None, state: Any, batch: int) -> Any:
    """Keeps (part of) a decode state on its placement inside a step, so the donated buffers are reused."""
    if layout is None:
        return state
    return jax.lax.with_sharding_constraint(state, state_shardings(layout, state, batch))


def state_plan(layout: Layout, config: Config, spec: decode_state.CacheSpec) -> decode_state.DecodeState:
    """The decode state as ShapeDtypeStructs carrying their shardings: per-device bytes before allocation."""
    shapes = decode_state.state_shapes(config, spec)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        state_shardings(layout, shapes, spec.max_batch))


def allocate(layout: Layout | None, config: Config, spec: decode_state.CacheSpec) -> decode_state.DecodeState:
    """`decode_state.allocate`, each device allocating only its own sequences' part under a layout."""
    if layout is None:
        return decode_state.allocate(config, spec)
    shapes = decode_state.state_shapes(config, spec)
    shardings = state_shardings(layout, shapes, spec.max_batch)
    return jax.jit(lambda: decode_state.allocate(config, spec), out_shardings=shardings)()


def _shift(index, offset):
    """Global slots → this shard's slots; −1 (no token) stays −1 and other shards' slots fall out of range."""
    return jnp.where(index >= 0, index - offset, -1).astype(index.dtype)


def write_kv(layout: Layout | None, kv_cache: jax.Array, slots: jax.Array, k_new: jax.Array, *, kv_format,
             page_size: int, batch: int) -> jax.Array:
    """`pk.write_kv` with the cache split by sequence: slots [N] and rows [N, d] are sequence-major."""
    if layout is None:
        return pk.write_kv(kv_cache, slots, k_new, kv_format=kv_format, page_size=page_size)
    axes = batch_axes(layout, batch)

    def local(cache, slots, k_new):
        first = jax.lax.axis_index(axes) * cache.shape[0] * page_size if axes else 0
        return pk.write_kv(cache, _shift(slots, first), k_new, kv_format=kv_format, page_size=page_size)

    rows = P(spec_entry(axes))
    return jax.shard_map(local, mesh=layout.mesh, in_specs=(rows, rows, rows), out_specs=rows,
                         check_vma=False)(kv_cache, slots, k_new)


def write_index_keys(layout: Layout | None, cache: jax.Array, slots: jax.Array, k_new: jax.Array, *, page_size: int,
                     batch: int) -> jax.Array:
    """`index_format.write` with the pages split like the sequences: slots [N] and rows [N, j] sequence-major."""
    if layout is None:
        return index_format.write(cache, slots, k_new, page_size=page_size)
    axes = batch_axes(layout, batch)

    def local(cache, slots, k_new):
        first = jax.lax.axis_index(axes) * cache.shape[0] * page_size if axes else 0
        return index_format.write(cache, _shift(slots, first), k_new, page_size=page_size)

    rows = P(spec_entry(axes))
    return jax.shard_map(local, mesh=layout.mesh, in_specs=(rows, rows, rows), out_specs=rows,
                         check_vma=False)(cache, slots, k_new)


def gather_index_keys(layout: Layout | None, cache: jax.Array, table_bu: jax.Array, *, page_size: int) -> jax.Array:
    """`index_format.gather_pages`: every key of each sequence's pages, float32 [b, u·page_size, j], each shard
    reading its own pages."""
    if layout is None:
        return index_format.gather_pages(cache, table_bu, page_size=page_size)
    axes = batch_axes(layout, table_bu.shape[0])

    def local(cache, table_bu):
        first = jax.lax.axis_index(axes) * cache.shape[0] if axes else 0
        return index_format.gather_pages(cache, _shift(table_bu, first), page_size=page_size)

    rows = P(spec_entry(axes))
    return jax.shard_map(local, mesh=layout.mesh, in_specs=(rows, rows), out_specs=rows,
                         check_vma=False)(cache, table_bu)


def sparse_mla_decode(layout: Layout | None, q, kv_cache, indices, *, kv_format, page_size: int, topk_length=None,
                      extra_kv_cache=None, extra_indices=None, extra_page_size=None, extra_topk_length=None,
                      attn_sink=None, **kwargs):
    """`pk.sparse_mla_decode` (same arguments and results) with sequences
    split over the batch axes and query heads over the heads axes. `kwargs` (softmax_scale, backend, …)
    pass through."""
    args = dict(q=q, kv_cache=kv_cache, indices=indices, topk_length=topk_length, extra_kv_cache=extra_kv_cache,
                extra_indices=extra_indices, extra_topk_length=extra_topk_length, attn_sink=attn_sink)
    names = [k for k, v in args.items() if v is not None]
    call = dict(kv_format=kv_format, page_size=page_size, extra_page_size=extra_page_size, **kwargs)

    def kernel(values):
        a = dict(zip(names, values))
        return pk.sparse_mla_decode(a.pop("q"), a.pop("kv_cache"), a.pop("indices"), **a, **call)

    if layout is None:
        return kernel([args[k] for k in names])
    b, h_q = q.shape[0], q.shape[2]
    axes = batch_axes(layout, b)
    bx, hx = spec_entry(axes), spec_entry(head_axes(layout, h_q))
    specs = dict(q=P(bx, None, hx, None), kv_cache=P(bx), indices=P(bx), topk_length=P(bx), extra_kv_cache=P(bx),
                 extra_indices=P(bx), extra_topk_length=P(bx), attn_sink=P(hx))

    def local(*values):
        a = dict(zip(names, values))
        shard = jax.lax.axis_index(axes) if axes else 0
        a["indices"] = _shift(a["indices"], shard * a["kv_cache"].shape[0] * page_size)
        if "extra_indices" in a:
            a["extra_indices"] = _shift(a["extra_indices"], shard * a["extra_kv_cache"].shape[0] * extra_page_size)
        return kernel([a[k] for k in names])

    return jax.shard_map(local, mesh=layout.mesh, in_specs=tuple(specs[k] for k in names),
                         out_specs=(P(bx, None, hx, None), P(bx, hx, None)),
                         check_vma=False)(*(args[k] for k in names))
