"""Static-shape decode state (docs/decode.md §2, §5): every cache a layer keeps between calls, allocated once.

Per sequence (up to `max_batch` of them) and per layer:
  * sliding window — a ring of `ring` token slots (slot = position mod ring) in the sparse decode kernel's
    paged layout: the kernel's *main* cache. It keeps `window + chunk` tokens (rounded up to whole pages):
    a call of n tokens must not overwrite a key its own first query still needs (n ≤ ring − window + 1),
    and n reaches chunk + 1 for the MTP block during speculative decoding.
  * compressed entries (CSA, HCA) — entry w of a sequence at its slot w, ⌈max_len / rate⌉ slots (whole
    pages): the kernel's *extra* cache. Entry w is visible to the query at t iff (w+1)·rate − 1 ≤ t; that
    rule, not a count, is what masks the unwritten tail. Slot w lives in page `block_tables[rate][b, w // B]`
    of the layer's page array: in a static state sequence b owns pages b·P … (b+1)·P − 1 (no table is
    stored); in a paged state (`pool_pages`) the pages form a pool shared by all sequences and the
    scheduler assigns them (docs/serving.md §2).
  * compressor buffers — the raw values C and gate logits Z of the most recent positions, slot =
    position mod B: B = rate for HCA, B = 2·rate for CSA (the previous complete window is the overlap
    half of the next entry), plus `drafts − 1` slots when a step verifies `drafts` speculative tokens.
    Nothing is ever cleared: a buffer slot, a ring slot or an entry slot is rewritten before any query can
    see it again. That is what makes rejecting speculative drafts exact by resetting `lengths` alone — no
    snapshot, no copy: a rejected token's ring slot held a key older than any window still needs (the ring
    has `chunk` ≥ drafts + 1 spare slots), its buffer slot a position no future window reads (B ≥ (1 + overlap)·
    rate + drafts − 1: the rejected positions end at most drafts − 1 past the kept length), and an entry it
    completed is recomputed when the real token arrives (docs/dspark.md §8.2).
  * CSA only: the indexer's compressed keys, paged exactly like the entries — in the serving engines' FP8
    format (132 bytes per key at j = 128, `pallas_kernels.index_format`; the default with the FP8 cache) or
    at compute precision — and the indexer compressor's buffers.
  * `lengths [b]` — tokens in the caches; the next position of sequence b is lengths[b].
With an MTP block: the same for its layer, `mtp_lengths [b]` and the main model's last residual streams
(the MTP block's input for the next position). With a DSpark drafter (docs/dspark.md §7): one paged cache per
stage, W ring slots (slot = position mod W, the stage's K=V rows of the last W committed positions; only
committed positions are ever written, so it needs no rollback) then G scratch slots for the drafted block.

Cache modes: "fp8" is FlashMLA's MODEL1 layout (448 fp8 + 64 bf16 dims, 584 bytes per token; needs
head_dim 512 with 64 RoPE dims); "bf16" and "float32" store plain `[pages, page_size, head_dim]` arrays
with the same indexing (exactness tests, and configs the FP8 layout does not fit).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import struct

import pallas_kernels as pk
from model1_jax.common import positive_int
from model1_jax.config import CSA, HCA, SLIDING, Config
from pallas_kernels import index_format

CACHE_DTYPES = ("auto", "fp8", "bf16", "float32")
# Indexer keys: "fp8" the serving engines' 132-byte rows, "compute" the compute dtype, "auto" fp8 with the fp8 cache.
INDEX_CACHES = ("auto", "fp8", "compute")
_DENSE_DTYPES = {"bf16": jnp.bfloat16, "float32": jnp.float32}
# How attention reads the caches: "xla" the pure-jnp reference, "pallas" the Pallas-Triton kernel (GPU),
# "interpret" that kernel in Pallas' interpreter (any device; tests), "auto" the kernel on a GPU when the
# cache format and head count allow it, else the reference.
ATTENTION_BACKENDS = ("auto", "xla", "pallas", "interpret")

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    """Static facts of a decode state (hashable: a static argument under jit)."""

    max_batch: int
    max_len: int
    chunk: int  # most tokens one sequence may feed in a single call
    cache_dtype: str
    page_size: int
    head_dim: int
    window: int
    compute_dtype: str  # dtype of compressor buffers, indexer keys and carried streams
    mtp: bool
    attention_backend: str = "xla"  # resolved: "xla", "pallas" or "interpret" (never "auto")
    dspark: bool = False  # the DSpark drafter's rings
    drafts: int = 0  # speculative tokens a step verifies after the pending one (MTP 1, DSpark G)
    dspark_stages: int = 0
    index_cache: str = "compute"  # resolved: "fp8" or "compute"
    pool_pages: tuple[tuple[int, int], ...] = ()  # (compress rate, pages) of each shared pool; () = static state

    @property
    def paged(self) -> bool:
        """Whether entries and indexer keys live in shared pools addressed by block tables."""
        return bool(self.pool_pages)

    def table_width(self, rate: int) -> int:
        """Pages one sequence can hold for a compressor of `rate` (the block table's width)."""
        return self.entries(rate) // self.page_size

    def pages(self, rate: int) -> int:
        """Pages of the rate's page arrays: the pool's size, or max_batch · table_width in a static state."""
        return dict(self.pool_pages)[rate] if self.paged else self.max_batch * self.table_width(rate)

    @property
    def uses_kernel(self) -> bool:
        """Whether attention runs the Pallas kernel (which takes bf16 queries, as FlashMLA does)."""
        return self.attention_backend in ("pallas", "interpret")

    @property
    def ring(self) -> int:
        """Sliding-window slots per sequence."""
        return _round_up(self.window + self.chunk, self.page_size)

    @property
    def dspark_slots(self) -> int:
        """Slots per sequence of a DSpark stage's cache: the W-slot ring, then the block's G scratch slots."""
        return _round_up(self.window + self.drafts, self.page_size)

    def entries(self, rate: int) -> int:
        """Compressed-entry slots per sequence for a compressor of `rate`."""
        return _round_up(max(1, -(-self.max_len // rate)), self.page_size)

    @property
    def kv_format(self) -> pk.KVFormat:
        if self.cache_dtype == "fp8":
            return pk.MODEL1
        return pk.DenseFormat(d_qk=self.head_dim, d_v=self.head_dim)

    @property
    def dense_dtype(self):
        return _DENSE_DTYPES.get(self.cache_dtype)

    def kv_cache_shape(self, tokens_per_sequence: int | None = None, pages: int | None = None
                       ) -> jax.ShapeDtypeStruct:
        """A paged cache holding `tokens_per_sequence` slots for each of `max_batch` sequences, or `pages` pages."""
        pages = self.max_batch * tokens_per_sequence // self.page_size if pages is None else pages
        shape = pk.cache_shape(pages, self.page_size, self.kv_format)
        return jax.ShapeDtypeStruct(shape, jnp.uint8 if self.cache_dtype == "fp8" else self.dense_dtype)


@struct.dataclass
class CompressorState:
    """Raw per-token values and gate logits (position_bias not yet added) of the last B positions."""

    kv: jax.Array  # [b, m or 2m, (p,) h], slot = position mod the buffer size
    gate: jax.Array  # [b, m or 2m, (p,) h]


@struct.dataclass
class LayerState:
    window: jax.Array  # sliding ring, kernel main cache
    entries: jax.Array | None = None  # compressed entries, kernel extra cache (CSA/HCA)
    compressor: CompressorState | None = None
    index_keys: jax.Array | None = None  # CSA: uint8 [u, (j + 4)·B] (fp8) or [u, B, j] (compute)
    index_compressor: CompressorState | None = None


@struct.dataclass
class DecodeState:
    layers: tuple[LayerState, ...]
    lengths: jax.Array  # [b] int32
    mtp: LayerState | None = None
    mtp_lengths: jax.Array | None = None  # [b] int32: positions the MTP block has seen
    last_streams: jax.Array | None = None  # [b, c, d] main streams at position lengths − 1 (MTP input)
    dspark: tuple[jax.Array, ...] | None = None  # per drafter stage: W ring slots + G scratch slots
    block_tables: dict | None = None  # paged state: compress rate -> [b, table_width] pool page ids (−1: none)
    spec: CacheSpec = struct.field(pytree_node=False, default=None)


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# ----------------------------------------------------------------------------------------------------
# Allocation


def fp8_fits(config: Config) -> bool:
    """Whether the FP8 FlashMLA v4 cache format (448 FP8 + 64 bf16 RoPE dims) fits the config's keys."""
    return (config.head_dim, config.qk_rope_head_dim) == (pk.MODEL1.d_qk, pk.MODEL1.d_rope)


def resolve_cache_dtype(config: Config, cache_dtype: str, dtype) -> str:
    """"auto" → "fp8" where the v4 format fits the config, else the model's compute dtype ("bf16"/"float32")."""
    if cache_dtype not in CACHE_DTYPES:
        raise ValueError(f"decode state: cache_dtype must be one of {CACHE_DTYPES}, got {cache_dtype!r}")
    if cache_dtype == "auto":
        cache_dtype = "fp8" if fp8_fits(config) else ("bf16" if jnp.dtype(dtype) == jnp.bfloat16 else "float32")
        logger.info("decode state: cache_dtype='auto' chose %r", cache_dtype)
    if cache_dtype == "fp8" and not fp8_fits(config):
        raise ValueError(
            f"decode state: cache_dtype='fp8' uses FlashMLA's v4 (MODEL1) format ({pk.MODEL1.d_nope} fp8 + "
            f"{pk.MODEL1.d_rope} bf16 RoPE dims), which needs head_dim {pk.MODEL1.d_qk} and qk_rope_head_dim "
            f"{pk.MODEL1.d_rope}; this config has {config.head_dim} and {config.qk_rope_head_dim}. "
            "Use cache_dtype='auto', 'bf16' or 'float32'.")
    return cache_dtype


def resolve_attention_backend(config: Config, backend: str, cache_dtype: str) -> str:
    """"auto" → "pallas" on a GPU when the kernel supports the cache and the head count, else "xla"; an explicit
    kernel backend that cannot run is an error naming why."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"decode state: attention_backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    kernel_ok = cache_dtype == "fp8" and pk.supported_heads(config.num_attention_heads)
    if backend == "auto":
        return "pallas" if kernel_ok and jax.default_backend() == "gpu" else "xla"
    if backend in ("pallas", "interpret") and not kernel_ok:
        raise ValueError(
            f"decode state: attention_backend={backend!r} runs the Pallas kernel, which reads the FP8 cache "
            f"(cache_dtype 'fp8', got {cache_dtype!r}) with 16, 32 or a multiple of 64 query heads (the config has "
            f"{config.num_attention_heads}); use attention_backend='xla'")
    return backend


def compress_rates(config: Config, mtp: bool) -> tuple[int, ...]:
    """The compression rates whose entries a state keeps (one pool, one block table each), ascending."""
    types = (*config.layer_types, *((config.mtp_layer_type,) if mtp else ()))
    return tuple(sorted({config.compress_rate(t) for t in types if t != SLIDING}))


def resolve_index_cache(index_cache: str, cache_dtype: str) -> str:
    if index_cache not in INDEX_CACHES:
        raise ValueError(f"decode state: index_cache must be one of {INDEX_CACHES}, got {index_cache!r}")
    return ("fp8" if cache_dtype == "fp8" else "compute") if index_cache == "auto" else index_cache


def make_spec(config: Config, *, max_batch: int, max_len: int, cache_dtype: str = "auto", chunk: int = 64,
              page_size: int = 64, dtype=jnp.float32, mtp: bool = False, attention_backend: str = "auto",
              speculative: str | None = None, index_cache: str = "auto", pool_pages: Mapping[int, int] | None = None
              ) -> CacheSpec:
    """Checks the request against the config and returns the static description of a state.

    `cache_dtype` "auto" picks "fp8" where FlashMLA's v4 format fits the config, else the compute dtype;
    `attention_backend` is one of `ATTENTION_BACKENDS`. `speculative` None, "mtp" (same as `mtp=True`) or
    "dspark" adds the drafter's state and sizes the buffers for exact rollback of its drafts. `index_cache` is
    one of `INDEX_CACHES` ("auto": the FP8 interop rows with the fp8 cache, else the compute dtype).
    `pool_pages` (compress rate -> pages, one entry per rate of `compress_rates`) makes a paged state whose
    entries and indexer keys live in shared pools (docs/serving.md §2); without it every sequence owns
    `max_len` tokens' worth. The returned spec holds the resolved choices.
    """
    for name, value in (("max_batch", max_batch), ("max_len", max_len), ("chunk", chunk), ("page_size", page_size)):
        positive_int(value, f"decode state: {name}")
    cache_dtype = resolve_cache_dtype(config, cache_dtype, dtype)
    backend = resolve_attention_backend(config, attention_backend, cache_dtype)
    index_cache = resolve_index_cache(index_cache, cache_dtype)
    if max_len > config.max_position_embeddings:
        raise ValueError(f"decode state: max_len {max_len} exceeds the config's max_position_embeddings "
                         f"{config.max_position_embeddings}")
    if speculative not in (None, "mtp", "dspark"):
        raise ValueError(f"decode state: speculative must be None, 'mtp' or 'dspark', got {speculative!r}")
    mtp = bool(mtp) or speculative == "mtp"
    if mtp and speculative == "dspark":
        raise ValueError("decode state: mtp=True and speculative='dspark' are two different drafters")
    if mtp and not config.num_nextn_predict_layers:
        raise ValueError("decode state: mtp=True but the config has no MTP block (num_nextn_predict_layers=0)")
    if speculative == "dspark" and config.dspark is None:
        raise ValueError("decode state: speculative='dspark' but the config has no DSpark drafter (config.dspark)")
    drafts = 1 if mtp else config.dspark.block_size if speculative == "dspark" else 0
    if drafts and chunk < drafts + 1:
        raise ValueError(f"decode state: speculative decoding verifies {drafts + 1} tokens per call; chunk must be "
                         f">= {drafts + 1}, got {chunk}")
    pools = ()
    if pool_pages is not None:
        rates = compress_rates(config, mtp)
        if sorted(pool_pages) != list(rates):
            raise ValueError(f"decode state: pool_pages needs one entry per compression rate {list(rates)}, got "
                             f"{sorted(pool_pages)}")
        for rate in rates:
            positive_int(pool_pages[rate], f"decode state: pool_pages[{rate}]")
        pools = tuple((rate, int(pool_pages[rate])) for rate in rates)
    return CacheSpec(max_batch=int(max_batch), max_len=int(max_len), chunk=int(chunk), cache_dtype=cache_dtype,
                     page_size=int(page_size), head_dim=config.head_dim, window=config.sliding_window,
                     compute_dtype=jnp.dtype(dtype).name, mtp=mtp, attention_backend=backend,
                     dspark=speculative == "dspark", drafts=drafts,
                     dspark_stages=config.dspark.num_stages if speculative == "dspark" else 0,
                     index_cache=index_cache, pool_pages=pools)


def compressor_slots(spec: CacheSpec, rate: int, overlap: bool) -> int:
    """Buffer slots of a compressor: its window (and the previous one for CSA), plus room for the rejected drafts
    of a speculative step to land where no future window reads (see the module docstring)."""
    return (2 * rate if overlap else rate) + max(spec.drafts - 1, 0)


def _compressor_shapes(spec: CacheSpec, rate: int, overlap: bool, width: int) -> CompressorState:
    slots = compressor_slots(spec, rate, overlap)
    shape = (spec.max_batch, slots, *((2,) if overlap else ()), width)
    buf = jax.ShapeDtypeStruct(shape, jnp.dtype(spec.compute_dtype))
    return CompressorState(kv=buf, gate=buf)


def layer_shapes(config: Config, spec: CacheSpec, layer_type: str) -> LayerState:
    window = spec.kv_cache_shape(spec.ring)
    if layer_type == SLIDING:
        return LayerState(window=window)
    rate = config.compress_rate(layer_type)
    entries = spec.kv_cache_shape(pages=spec.pages(rate))
    compressor = _compressor_shapes(spec, rate, layer_type == CSA, config.head_dim)
    if layer_type == HCA:
        return LayerState(window=window, entries=entries, compressor=compressor)
    fp8 = spec.index_cache == "fp8"
    index_keys = jax.ShapeDtypeStruct(
        index_format.cache_shape(spec.pages(rate), spec.page_size, config.index_head_dim, fp8=fp8),
        jnp.uint8 if fp8 else jnp.dtype(spec.compute_dtype))
    return LayerState(window=window, entries=entries, compressor=compressor, index_keys=index_keys,
                      index_compressor=_compressor_shapes(spec, rate, True, config.index_head_dim))


def state_shapes(config: Config, spec: CacheSpec) -> DecodeState:
    """The state as a tree of `jax.ShapeDtypeStruct` (nothing allocated)."""
    lengths = jax.ShapeDtypeStruct((spec.max_batch,), jnp.int32)
    extra = {}
    if spec.mtp:
        extra = dict(mtp=layer_shapes(config, spec, config.mtp_layer_type), mtp_lengths=lengths,
                     last_streams=jax.ShapeDtypeStruct((spec.max_batch, config.hc_mult, config.hidden_size),
                                                       jnp.dtype(spec.compute_dtype)))
    if spec.dspark:
        extra["dspark"] = tuple(spec.kv_cache_shape(spec.dspark_slots) for _ in range(spec.dspark_stages))
    if spec.paged:
        extra["block_tables"] = {rate: jax.ShapeDtypeStruct((spec.max_batch, spec.table_width(rate)), jnp.int32)
                                 for rate, _ in spec.pool_pages}
    layers = tuple(layer_shapes(config, spec, t) for t in config.layer_types)
    return DecodeState(layers=layers, lengths=lengths, spec=spec, **extra)


def init_state(config: Config, *, max_batch: int, max_len: int, cache_dtype: str = "auto", chunk: int = 64,
               page_size: int = 64, dtype=jnp.float32, mtp: bool = False, attention_backend: str = "auto",
               speculative: str | None = None, index_cache: str = "auto") -> DecodeState:
    """Allocates an empty state (all sequences at length 0). See `make_spec` for the arguments; the state's
    `spec` says which cache dtype and attention backend were picked.

    `dtype` is the model's compute dtype; `chunk` bounds the tokens per sequence of one prefill call.
    """
    spec = make_spec(config, max_batch=max_batch, max_len=max_len, cache_dtype=cache_dtype, chunk=chunk,
                     page_size=page_size, dtype=dtype, mtp=mtp, attention_backend=attention_backend,
                     speculative=speculative, index_cache=index_cache)
    return allocate(config, spec)


def allocate(config: Config, spec: CacheSpec) -> DecodeState:
    """Zero-filled state for `spec` (from `make_spec`); a paged state's block tables start empty (−1)."""
    state = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_shapes(config, spec))
    if spec.paged:
        state = state.replace(block_tables={r: jnp.full_like(t, -1) for r, t in state.block_tables.items()})
    return state
