"""Host kernels of the checkpoint read path: re-layout into the target buffer and table-lookup dequantization.

A checkpoint tensor is read in chunks of whole rows of its `[out, in]` storage (`[e, out, in]` for HF's
stacked experts: rows of one expert at a time). Each chunk goes straight into the parameter's buffer in the
model's arrangement (docs/checkpoints.md §6): `row_segments` says which columns of which 2-D view of the
buffer a run of source rows becomes, and `place` writes them there — transposed, or copied as is. Every copy
works on unsigned-integer views of the same width, so bfloat16 and float8 move as bits. NumPy moves one
element per step of a strided copy, so a byte transpose runs at a tenth of memory speed done plainly; cache
blocks help (`transpose_into`), and narrow elements go faster still in two passes (`_transpose_narrow`): the
rows are transposed as 8-byte words (eight FP8 bytes, four bf16 at a time), then each word is split into its
elements with a copy whose source stride is one word, which the caches serve.

Dequantization (docs/checkpoints.md §5) is a lookup: a scale byte s and a value byte v index a 65,536-entry
table of `value(v) · 2^(s − 127)` in the target dtype — computed once with the same float32 product and cast
as `BlockQuantized.dequantize`, so every result has the same bits. For FP4 an entry holds the byte's two
elements (low nibble first), so the packed bytes are never unpacked. Scales are broadcast over their blocks
by a reshape, without expanding them.
"""

from __future__ import annotations

import functools
import math
import threading

import numpy as np

from model1_jax.io import hostmem
from model1_jax.io.names import Slot
from model1_jax.model import quant

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
# Transpose tiles (source rows × columns per copy) small enough for the L1/L2 caches. NumPy's inner loop runs
# along a destination row, over the tile's source rows: 32 of them, 64 once destination rows are long (≥ 16 KiB,
# where TLB and cache-set conflicts dominate). Measured over the uint8/bf16 matrices of a V4-Flash layer.
_LONG_ROW = 1 << 14
_SMALL = 1 << 14  # elements: below this a plain strided copy is as fast
# Source bytes dequantized per lookup: the indices (uint16 and their intp widening), the table and the dense
# band stay in the L2 cache.
LOOKUP_BYTES = 1 << 15
# Dense bytes placed (transposed) at once, in whole lookups: the band stays in the L2 cache, and the transpose
# gets source rows enough for its tiles (a 32 KiB lookup of packed FP4 experts is 16 rows, half a tile).
PLACE_BYTES = 1 << 19


def as_bits(array: np.ndarray) -> np.ndarray:
    """The same memory as unsigned integers of the same width (a view)."""
    return array.view(_UINT[array.dtype.itemsize]) if array.dtype.itemsize in _UINT else array


def transpose_into(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[...] = src.T for 2-D arrays (dst may be a strided view), copying cache-sized tiles."""
    if src.shape != dst.shape[::-1]:
        raise ValueError(f"transpose_into: {src.shape} into {dst.shape}")
    if src.dtype != dst.dtype:
        raise TypeError(f"transpose_into: {src.dtype} into {dst.dtype}")
    src, dst = as_bits(src), as_bits(dst)
    rows, cols = src.shape
    if rows * cols <= _SMALL or rows == 1 or cols == 1:
        dst[...] = src.T
        return
    if _narrow(src):
        _transpose_narrow(src, dst)
        return
    _transpose_tiled(src, dst)


def _transpose_tiled(src: np.ndarray, dst: np.ndarray) -> None:
    rows, cols = src.shape
    long = dst.strides[0] >= _LONG_ROW
    tile_rows, tile_cols = (64, 512) if long else (32, 1024)
    for r in range(0, rows, tile_rows):
        block = src[r:r + tile_rows]
        for c in range(0, cols, tile_cols):
            dst[c:c + tile_cols, r:r + tile_rows] = block[:, c:c + tile_cols].T


# Source bytes per band of the two-pass transpose: a whole reader chunk (`reader.CHUNK_BYTES`). Each band writes a
# short segment into every destination row, each row on pages of its own; four 512 KiB bands per chunk, whose words
# stayed in the L2 cache, cost more in those writes than one band's words coming back from the L3 (with two threads:
# 3.0 -> 2.0 CPU-ns per byte of a 4096 x 7168 byte matrix, 2.2 -> 1.4 for 2048 x 4096; medians of 3).
WORDS_BYTES = 1 << 21
_words = threading.local()  # each thread's reused band of words (WORDS_BYTES; more for rows wider than that)


def _narrow(src: np.ndarray) -> bool:
    """Whether `_transpose_narrow` applies: 1- or 2-byte elements, rows of whole aligned 8-byte words."""
    width = 8 // src.itemsize
    return (src.itemsize in (1, 2) and src.shape[1] % width == 0 and src.strides[1] == src.itemsize
            and src.strides[0] % 8 == 0 and src.ctypes.data % 8 == 0 and src.shape[0] >= 16)


def _transpose_narrow(src: np.ndarray, dst: np.ndarray) -> None:
    """dst = src.T in two passes over bands of source rows: the band's 8-byte words are transposed into a
    [cols / w, n] scratch (w elements per word), then element k of every word goes to destination row
    w·c + k — a copy whose source stride is one word and whose destination runs along whole rows."""
    rows, cols = src.shape
    width = 8 // src.itemsize
    band = max(16, WORDS_BYTES // (cols * src.itemsize))
    need = cols // width * min(band, rows)
    buf = getattr(_words, "buf", None)
    if buf is None or buf.size < need:
        buf = _words.buf = hostmem.empty((need,), np.uint64, huge_pages=True)
    # dst[w·c + k, r] as [c, k, r]: the same memory, strides from dst's own
    planes = np.lib.stride_tricks.as_strided(dst, (cols // width, width, rows),
                                             (width * dst.strides[0], dst.strides[0], dst.strides[1]))
    for r in range(0, rows, band):
        n = min(band, rows - r)
        words = buf[:cols // width * n].reshape(cols // width, n)
        _transpose_tiled(src[r:r + n].view(np.uint64), words)
        np.copyto(planes[:, :, r:r + n], words.view(src.dtype).reshape(cols // width, n, width).transpose(0, 2, 1))


def row_segments(slot: Slot, shape: tuple[int, ...], lead: int, rows: int, r0: int, r1: int
                 ) -> list[tuple[int, int, tuple, bool]]:
    """Where source rows [r0, r1) of matrix `lead` go in a buffer of model `shape` (per-expert slots: the
    expert's row of the stacked buffer): runs (first row, end row, index into the buffer's `view2d`,
    transposed). `rows` is the source matrix's row count.

    The same arithmetic as `names.to_model_arrangement`, applied to a run of rows (tests compare the two).
    """
    kind = slot.kind
    if kind in ("copy", "index", "reshape"):  # same element order: rows of the flattened source
        base = lead * rows
        return [(r0, r1, (slice(base + r0, base + r1),), False)]
    if kind == "linear":
        return [(r0, r1, (slice(None), slice(r0, r1)), True)]
    if kind == "grouped":  # [g·o, m·h] → [g, m, h, o]: rows of group gi fill column block gi of [g, m·h, o]
        o = shape[3]
        out = []
        for gi in range(r0 // o, (r1 - 1) // o + 1):
            lo, hi = max(r0, gi * o), min(r1, (gi + 1) * o)
            out.append((lo, hi, (gi, slice(None), slice(lo - gi * o, hi - gi * o)), True))
        return out
    raise ValueError(f"slot kind {kind!r} is not placed by rows")


def reshaped_view(array: np.ndarray, shape) -> np.ndarray:
    """`array` under another shape, always as a view: raises ValueError where that would need a copy (which
    assigning `.shape` did; NumPy 2.5 deprecates that assignment)."""
    out = array.reshape(shape)
    if out.size and not np.may_share_memory(out, array):
        raise ValueError(f"an array of shape {array.shape}, strides {array.strides} has no view of shape {shape}")
    return out


def view2d(slot: Slot, buffer: np.ndarray, source_cols: int) -> np.ndarray:
    """The buffer (model arrangement, contiguous) viewed so that `row_segments`' indices apply."""
    shape = buffer.shape
    if slot.kind in ("copy", "index", "reshape"):
        return reshaped_view(buffer, (-1, source_cols))
    if slot.kind == "linear":
        return reshaped_view(buffer, (math.prod(shape[:slot.n_in]), math.prod(shape[slot.n_in:])))
    if slot.kind == "grouped":
        g, m, h, o = shape
        return reshaped_view(buffer, (g, m * h, o))
    raise ValueError(f"slot kind {slot.kind!r} is not placed by rows")


def rows_in_place(slot: Slot, buffer: np.ndarray, cols: int, lead: int, rows: int, r0: int, n: int) -> np.ndarray:
    """For a `copy` slot (the routed experts), the buffer's rows that source rows [r0, r0 + n) of matrix `lead`
    become unchanged: a contiguous [n, cols] view to dequantize straight into (`row_segments`' one segment)."""
    [(_, _, index, _)] = row_segments(slot, buffer.shape, lead, rows, r0, r0 + n)
    return view2d(slot, buffer, cols)[index]


def place(slot: Slot, buffer: np.ndarray, chunk: np.ndarray, lead: int, rows: int, r0: int) -> None:
    """Writes source rows [r0, r0 + len(chunk)) of matrix `lead` (a [n, cols] array already in the buffer's
    dtype) into the buffer, in the model arrangement."""
    if buffer.dtype.itemsize != chunk.dtype.itemsize:
        raise TypeError(f"place: {chunk.dtype} rows into a {buffer.dtype} buffer")
    view = as_bits(view2d(slot, buffer, chunk.shape[1]))
    chunk = as_bits(chunk)
    for lo, hi, index, transposed in row_segments(slot, buffer.shape, lead, rows, r0, r0 + chunk.shape[0]):
        if transposed:
            transpose_into(chunk[lo - r0:hi - r0], view[index])
        else:
            view[index] = chunk[lo - r0:hi - r0]


# -- dequantization by table lookup ------------------------------------------------------------------------

@functools.cache
def dequant_table(fmt: str, dtype: np.dtype) -> np.ndarray:
    """[65536] entries indexed by (scale byte << 8) | value byte: value · scale in `dtype` (FP4: the pair of the
    byte's two elements, low nibble first), as unsigned integers (void for 16-byte pairs)."""
    dtype = np.dtype(dtype)
    scales = quant.e8m0_to_float32(np.arange(256, dtype=np.uint8).view(quant.E8M0))[:, None, None]
    codes = np.arange(256, dtype=np.uint8)
    if fmt == quant.FP8:
        values = codes.view(quant.E4M3).astype(np.float32)[None, :, None]
    elif fmt == quant.FP4:
        values = np.stack([quant.E2M1_VALUES[codes & 0x0F], quant.E2M1_VALUES[codes >> 4]], axis=-1)[None]
    else:
        raise ValueError(f"unknown format {fmt!r}")
    with np.errstate(over="ignore"):  # large scales overflow to inf, as the float32 product does
        table = np.ascontiguousarray((values * scales).astype(dtype))  # [256, 256, 1 or 2]
    width = table.shape[-1] * dtype.itemsize
    entry = _UINT.get(width, np.dtype((np.void, width)))
    return table.reshape(-1).view(entry)


def lookup_rows(width: int) -> int:
    """Rows dequantized per lookup for rows of `width` bytes (see LOOKUP_BYTES)."""
    return max(1, LOOKUP_BYTES // max(width, 1))


def band_rows(step: int, row_bytes: int) -> int:
    """Dense rows placed at once: whole lookups (`step` rows) filling about PLACE_BYTES."""
    return max(1, PLACE_BYTES // max(row_bytes, 1) // step) * step


def dequantize_rows(fmt: str, values: np.ndarray, scales: np.ndarray, row_scale: np.ndarray, block_cols: int,
                    out: np.ndarray, index: np.ndarray, wide: np.ndarray | None = None) -> None:
    """Dense rows of a block-quantized matrix: `out[n, cols]` (target dtype) from `values` [n, cols or cols/2]
    (bytes; column 0 starts a scale block) and `scales` [s, ⌈cols/bi⌉] (UE8M0 bytes), row i using scale row
    `row_scale[i]`. `block_cols` is bi, the elements per scale along a row. `index`: uint16 scratch of at least
    n · width elements (the index is built there in one pass, at uint16 width); `wide`: intp scratch as large,
    into which it is widened for `np.take` — which would otherwise widen it into a fresh allocation per call
    (page faults whenever malloc hands that memory back to the system)."""
    table = dequant_table(fmt, out.dtype)
    values, scales = as_bits(values), as_bits(scales)
    n, width = values.shape
    per_scale = block_cols // (2 if fmt == quant.FP4 else 1)  # bytes per scale
    whole = width // per_scale * per_scale
    shifted = scales[row_scale].astype(np.uint16) << 8  # [n, scale columns]: tiny
    idx = index[:n * width].reshape(n, width)
    if whole:  # whole blocks: scales broadcast over their bytes by a reshape
        blocks = reshaped_view(idx[:, :whole], (n, whole // per_scale, per_scale))
        np.bitwise_or(values[:, :whole].reshape(n, whole // per_scale, per_scale), shifted[:, :whole // per_scale,
                                                                                           None], out=blocks)
    if whole < width:  # a partial block at the end of the rows
        np.bitwise_or(values[:, whole:], shifted[:, whole // per_scale:whole // per_scale + 1], out=idx[:, whole:])
    if wide is not None:
        idx = wide[:n * width].reshape(n, width)
        np.copyto(idx, index[:n * width].reshape(n, width))
    # Every uint16 index is in the 65,536-entry table, so "wrap" never wraps (and is the fastest mode).
    np.take(table, idx, out=out.reshape(n, width, -1).view(table.dtype).reshape(n, width), mode="wrap")
