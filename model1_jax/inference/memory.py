"""Bytes of a decode state (docs/decode.md §7): per layer type, per token, per sequence, and its page pools."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from model1_jax.common import human_bytes
from model1_jax.config import CSA, HCA, SLIDING, Config
from model1_jax.inference.state import CacheSpec, layer_shapes, make_spec, state_shapes


def _nbytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass(frozen=True)
class MemoryRow:
    kind: str  # "sliding", "CSA (m=4)", "HCA (m=128)", "MTP (sliding)", ...
    layers: int
    fixed_per_sequence: int  # bytes per layer per sequence whatever the length (ring + buffers)
    per_token: float  # bytes per layer per token of context (compressed entries + indexer keys)
    total: int  # bytes of all such layers for the whole state


@dataclasses.dataclass(frozen=True)
class PoolRow:
    """One shared page pool of a paged state (docs/serving.md §2)."""

    rate: int  # compression rate of the entries it holds
    pages: int
    page_bytes: int  # bytes of one page over every layer that uses the pool (entries + indexer keys)
    tokens_per_page: int  # context tokens one page covers: page_size entries · rate
    in_use: int | None = None  # pages held by requests (a scheduler's report), None when unknown

    @property
    def total(self) -> int:
        return self.pages * self.page_bytes


@dataclasses.dataclass(frozen=True)
class MemoryReport:
    spec: CacheSpec
    rows: tuple[MemoryRow, ...]
    total: int  # bytes of the whole state
    pools: tuple[PoolRow, ...] = ()  # paged states only

    @property
    def per_token(self) -> float:
        """Bytes per token of context over all layers (the marginal cost of a longer context)."""
        return sum(r.layers * r.per_token for r in self.rows)

    @property
    def fixed_per_sequence(self) -> int:
        return sum(r.layers * r.fixed_per_sequence for r in self.rows)

    def __str__(self) -> str:
        s = self.spec
        index = f", {s.index_cache} indexer keys" if any(r.kind.startswith("CSA") for r in self.rows) else ""
        lines = [f"decode state: {s.cache_dtype} cache{index}, {s.max_batch} sequences x {s.max_len} tokens "
                 f"(window ring {s.ring} slots, pages of {s.page_size}; attention: {s.attention_backend})",
                 f"  {'layer type':<16}{'layers':>7}{'fixed/seq/layer':>18}{'bytes/token/layer':>19}{'total':>12}"]
        for r in self.rows:
            lines.append(f"  {r.kind:<16}{r.layers:>7}{human_bytes(r.fixed_per_sequence):>18}{r.per_token:>19.1f}"
                         f"{human_bytes(r.total):>12}")
        lines.append(f"  {'all':<16}{sum(r.layers for r in self.rows):>7}{human_bytes(self.fixed_per_sequence):>18}"
                     f"{self.per_token:>19.1f}{human_bytes(self.total):>12}")
        for p in self.pools:
            use = "" if p.in_use is None else (f", {p.in_use} in use ({p.in_use / p.pages:.0%}, "
                                               f"{human_bytes(p.in_use * p.page_bytes)})")
            lines.append(f"  pool m={p.rate}: {p.pages} pages of {p.tokens_per_page} tokens, "
                         f"{human_bytes(p.page_bytes)} each = {human_bytes(p.total)}{use}")
        return "\n".join(lines)


def memory_report(config: Config, spec: CacheSpec, pool_use: Mapping[int, int] | None = None) -> MemoryReport:
    """Bytes of the state `spec` describes, by layer type: fixed per sequence, per token, and in total; for a
    paged state also each pool's size, and its pages in use when `pool_use` (rate -> pages held) is given."""
    kinds = {SLIDING: "sliding", CSA: f"CSA (m={config.compress_rate_csa})", HCA: f"HCA (m={config.compress_rate_hca})"}
    groups = [(kinds[t], config.layer_types.count(t), t) for t in (SLIDING, CSA, HCA) if t in config.layer_types]
    if spec.mtp:
        groups.append((f"MTP ({kinds[config.mtp_layer_type]})", 1, config.mtp_layer_type))
    rows, page_bytes = [], {}
    for kind, count, layer_type in groups:
        shapes = layer_shapes(config, spec, layer_type)
        fixed = _nbytes(shapes.window) + _nbytes(shapes.compressor) + _nbytes(shapes.index_compressor)
        per_token = 0.0
        if layer_type != SLIDING:
            rate = config.compress_rate(layer_type)
            per_page = (_nbytes(shapes.entries) + _nbytes(shapes.index_keys)) / spec.pages(rate)
            page_bytes[rate] = page_bytes.get(rate, 0) + count * per_page
            per_token = per_page / spec.page_size / rate
        rows.append(MemoryRow(kind, count, round(fixed / spec.max_batch), per_token, count * _nbytes(shapes)))
    if spec.dspark:
        ring = spec.kv_cache_shape(spec.dspark_slots)
        rows.append(MemoryRow("DSpark ring", spec.dspark_stages, round(_nbytes(ring) / spec.max_batch), 0.0,
                              spec.dspark_stages * _nbytes(ring)))
    pools = tuple(PoolRow(rate, pages, round(page_bytes[rate]), spec.page_size * rate,
                          None if pool_use is None else int(pool_use.get(rate, 0)))
                  for rate, pages in spec.pool_pages)
    return MemoryReport(spec, tuple(rows), _nbytes(state_shapes(config, spec)), pools)


def max_len_for_budget(config: Config, budget_bytes: int, **spec_kwargs) -> int:
    """The largest `max_len` whose state fits in `budget_bytes` (other `make_spec` arguments as given).

    Weights are not included: pass the memory left after them. Raises if not even one token fits.
    """
    def fits(n: int) -> bool:
        return _nbytes(state_shapes(config, make_spec(config, max_len=n, **spec_kwargs))) <= budget_bytes

    lo, hi = 0, config.max_position_embeddings
    if not fits(1):
        raise ValueError(f"max_len_for_budget: {budget_bytes} bytes do not hold a state of even one token "
                         f"({human_bytes(_nbytes(state_shapes(config, make_spec(config, max_len=1, **spec_kwargs))))})")
    while lo < hi:  # invariant: fits(lo) or lo == 0; answer in [lo, hi]
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
