"""Which box of which stored tensor fills which buffer: whole parameters, or one shard of one.

For a whole parameter every assignment of the plan (`io.hf`) becomes one `reader.Piece` (two when kept
block-quantized: values and scales), covering its tensor — HF's merged `gate_up_proj` gives the gate buffer
its first f rows and the up buffer the rest, so each byte is still read once.

For a shard (an index box of the parameter, or of its values or scales array, in the model's arrangement)
the box is carried back to the stored tensor through the slot's arrangement (docs/checkpoints.md §6): each
stored axis is the row-major flattening of some model axes, and a box of those model axes is one contiguous
range of the stored axis as long as only its outermost non-trivial axis is partial — true of every split the
sharding rules make (heads, groups, experts, vocabulary, expert width, hidden size). The piece then reads
that range only. A box that is not contiguous there (an unusual rule) reads the whole stored axis and the
shard is cut from it afterwards.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Sequence

import jax
import numpy as np

from model1_jax.io import hostmem
from model1_jax.io.hf import Assignment, Unit, output_arrangement
from model1_jax.io.names import Slot, quant_arrangement
from model1_jax.io.reader import Buffer, Piece, matrix_shape, read_pieces
from model1_jax.model import quant

# -- whole parameters ---------------------------------------------------------------------------------------


def parameter_buffer(path: tuple, assignment: Assignment, target: jax.ShapeDtypeStruct, keep_quantized: bool
                     ) -> Buffer:
    """The host buffer of one parameter: dense in the target dtype, or values + scales when kept quantized."""
    shape = tuple(target.shape)
    if keep_quantized and assignment.fmt:
        values_shape, scales_shape, pack_axis = output_arrangement(assignment, shape)
        block, _ = quant_arrangement(assignment.slot, shape, assignment.hf_block)
        values_dtype = quant.E4M3 if assignment.fmt == quant.FP8 else np.dtype(np.uint8)
        return Buffer(path, {"values": (values_shape, values_dtype), "scales": (scales_shape, quant.E8M0)},
                      (assignment.fmt, block, pack_axis))
    return Buffer(path, {"dense": (shape, np.dtype(target.dtype))})


def _virtual(slot: Slot, stored_rows: int) -> tuple[Slot, tuple, tuple[int, int]]:
    """(arrangement used by `relayout.place`, index of the destination in the buffer, stored rows it takes)."""
    if slot.kind in ("gate", "up"):  # a half of [e, 2f, d]: its rows, copied as an [e, f, d] tensor
        f = stored_rows // 2
        return Slot(slot.path, "copy"), (), (0, f) if slot.kind == "gate" else (f, 2 * f)
    if slot.expert is not None:
        return Slot(slot.path, slot.kind, slot.n_in), (slot.expert,), (0, stored_rows)
    return slot, (), (0, stored_rows)


def parameter_pieces(assignment: Assignment, buffer: Buffer) -> list[Piece]:
    """The pieces that fill `buffer` (a whole parameter) from one assignment."""
    a = assignment
    leads, rows, cols = matrix_shape(a.info.shape)
    slot, index, (r0, r1) = _virtual(a.slot, rows)
    if "dense" in buffer.parts:
        if a.fmt is None:
            return [Piece(a.info, buffer, "dense", index, slot, range(leads), (r0, r1), (0, cols))]
        per_byte = 2 if a.fmt == quant.FP4 else 1
        return [Piece(a.info, buffer, "dense", index, slot, range(leads), (r0, r1), (0, cols * per_byte),
                      (a.fmt, a.scale, tuple(a.hf_block[-2:])))]
    bo = a.hf_block[-2]
    _, _, scale_cols = matrix_shape(a.scale.shape)
    return [Piece(a.info, buffer, "values", index, slot, range(leads), (r0, r1), (0, cols)),
            Piece(a.scale, buffer, "scales", index, slot, range(leads), (r0 // bo, -(-r1 // bo)), (0, scale_cols))]


def kept(keep_quantized: bool | Collection[tuple], path: tuple) -> bool:
    """Whether a block-quantized parameter is kept quantized: `keep_quantized` is True / False for every one, or
    the collection of the paths to keep."""
    return keep_quantized if isinstance(keep_quantized, bool) else path in keep_quantized


def unit_buffers(unit: Unit, targets: dict, keep_quantized: bool | Collection[tuple]
                 ) -> tuple[dict[tuple, Buffer], list[Piece]]:
    """Buffers of a unit's parameters and the pieces that fill them (`keep_quantized`: all, or these paths)."""
    buffers, pieces = {}, []
    for a in unit.assignments:
        if a.slot.path not in buffers:
            buffers[a.slot.path] = parameter_buffer(a.slot.path, a, targets[a.slot.path],
                                                    kept(keep_quantized, a.slot.path))
        pieces += parameter_pieces(a, buffers[a.slot.path])
    return buffers, pieces


def read_units(units: Sequence[Unit], targets: dict, *, keep_quantized: bool | Collection[tuple],
               workers: int | None = None, bar=None, on_complete=None, pool=None, allocate=None
               ) -> dict[tuple, np.ndarray | quant.BlockQuantized]:
    """Reads whole parameters on the host, in the model's arrangement: path → array or `BlockQuantized`
    (dense ones in the target dtype, FP8/FP4 dequantized exactly unless kept: `keep_quantized` is True for every
    block-quantized parameter, or the collection of the paths to keep). With
    `on_complete(path, value)` each parameter is handed over when done and nothing is returned. With
    `allocate(buffers)`, the caller sets every buffer's `arrays` (in memory it reuses) before reading starts."""
    buffers, pieces = {}, []
    for unit in units:
        b, p = unit_buffers(unit, targets, keep_quantized)
        buffers.update(b)
        pieces += p
    if allocate is not None:
        allocate(list(buffers.values()))
    out = {}

    def complete(buffer: Buffer) -> None:
        value = buffer.value()
        buffer.arrays = None  # the receiver holds the only reference
        if on_complete is None:
            out[buffer.key] = value
        else:
            on_complete(buffer.key, value)

    read_pieces(pieces, workers=workers, bar=bar, on_complete=complete, pool=pool)
    return out


# -- shards ---------------------------------------------------------------------------------------------------

def _flat_range(box: Sequence[slice], dims: Sequence[int]) -> tuple[int, int] | None:
    """[start, stop) of a box of `dims` in their row-major flattening, or None when it is not one range
    (the box lies between its first and last element, so it is that range exactly when the counts agree)."""
    strides = [math.prod(dims[i + 1:]) for i in range(len(dims))]
    sizes = [s.stop - s.start for s in box]
    first = sum(s.start * st for s, st in zip(box, strides))
    if math.prod(sizes) == 0:
        return first, first
    last = sum((s.stop - 1) * st for s, st in zip(box, strides))
    return (first, last + 1) if last - first + 1 == math.prod(sizes) else None


def _groups(slot: Slot, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Model axes whose flattening is each stored axis: [matrices?, rows, columns] of the stored tensor."""
    n = len(shape)
    if slot.kind in ("copy", "index", "gate", "up"):
        return [(i,) for i in range(n)] if n >= 2 else [(), tuple(range(n))]  # 0-/1-D: one row
    if slot.kind == "reshape":
        return [(0,), tuple(range(1, n))]
    if slot.kind == "linear":
        return [tuple(range(slot.n_in, n)), tuple(range(slot.n_in))]
    if slot.kind == "grouped":
        return [(0, 3), (1, 2)]
    raise ValueError(f"unknown slot kind {slot.kind!r}")


def _split_leading(slot: Slot, shape: tuple[int, ...], box: Sequence[slice]) -> bool:
    """Whether a linear slot's input axes are not one range but become one per index of the first: an mHC `fn`
    [c, d, x] split along d (the fsdp rules) is c column bands of the stored [x, c·d]."""
    if slot.kind != "linear" or slot.n_in < 2:
        return False
    axes = range(slot.n_in)
    return (_flat_range([box[i] for i in axes], [shape[i] for i in axes]) is None
            and _flat_range([box[i] for i in axes[1:]], [shape[i] for i in axes[1:]]) is not None)


def shard_region(assignments: Sequence[Assignment], shape: tuple[int, ...], box: tuple[slice, ...]
                 ) -> tuple[slice, ...]:
    """The box, widened to whole stored axes wherever it is not one range of them (nor bands of the
    first input axis, `_split_leading`)."""
    region = list(box)
    for a in assignments:
        offset = int(a.slot.expert is not None)
        sub, sub_shape = box[offset:], shape[offset:]
        if _split_leading(a.slot, sub_shape, sub):
            continue
        for axes in _groups(a.slot, sub_shape):
            if _flat_range([sub[i] for i in axes], [sub_shape[i] for i in axes]) is None:
                for i in axes:
                    region[i + offset] = slice(0, shape[i + offset])
    return tuple(region)


def shard_pieces(assignments: Sequence[Assignment], shape: tuple[int, ...], region: tuple[slice, ...], part: str,
                 buffer: Buffer) -> list[Piece]:
    """Pieces filling `buffer.arrays[part]` (shaped like `region`) with that region of one parameter's array of
    `shape`: the dense parameter ("dense"), or its values / scales ("values" / "scales", in their own units)."""
    pieces = []
    for a in assignments:
        slot, index, sub_shape, sub = a.slot, (), shape, region
        if slot.expert is not None:
            if not region[0].start <= slot.expert < region[0].stop:
                continue
            index, sub_shape, sub = (slot.expert - region[0].start,), shape[1:], region[1:]
            slot = Slot(slot.path, slot.kind, slot.n_in)
        if _split_leading(slot, sub_shape, sub):  # one piece per index of the first input axis
            stride = math.prod(sub_shape[1:slot.n_in])
            inner = Slot(slot.path, "linear", slot.n_in - 1)
            for i in range(sub[0].start, sub[0].stop):
                piece = _piece(a, part, buffer, (*index, i - sub[0].start), inner, sub_shape[1:], sub[1:])
                cols = (piece.cols[0] + i * stride, piece.cols[1] + i * stride)
                pieces.append(dataclasses.replace(piece, cols=cols))
        else:
            pieces.append(_piece(a, part, buffer, index, slot, sub_shape, sub))
    return pieces


def _piece(a: Assignment, part: str, buffer: Buffer, index: tuple, slot: Slot, shape: tuple[int, ...],
           box: Sequence[slice]) -> Piece:
    ranges = [_flat_range([box[i] for i in axes], [shape[i] for i in axes]) for axes in _groups(slot, shape)]
    leads, rows, cols = (range(*ranges[0]), *ranges[1:]) if len(ranges) == 3 else (range(1), *ranges)
    info = a.scale if part == "scales" else a.info
    if slot.kind in ("gate", "up"):  # the gate / up half of the stored [e, 2f, d] rows
        base = 0 if slot.kind == "gate" else matrix_shape(info.shape)[1] // 2
        rows = (rows[0] + base, rows[1] + base)
        slot = Slot(slot.path, "copy")
    dequant = (a.fmt, a.scale, tuple(a.hf_block[-2:])) if part == "dense" and a.fmt else None
    return Piece(info, buffer, part, index, slot, leads, rows, cols, dequant)


def read_shard(assignments: Sequence[Assignment], shape: tuple[int, ...], dtype, box: tuple, part: str = "dense",
               *, workers: int = 1, bar=None) -> np.ndarray:
    """One shard (`box`, a tuple of slices) of a parameter's dense array, values or scales, read from the byte
    ranges that hold it (docstring above); a 64-byte-aligned array in the model's arrangement."""
    box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(box, shape))
    region = shard_region(assignments, shape, box)
    buffer = Buffer(None, {part: (tuple(s.stop - s.start for s in region), np.dtype(dtype))})
    read_pieces(shard_pieces(assignments, shape, region, part, buffer), workers=workers, bar=bar)
    array = buffer.arrays[part]
    if region == box:
        return array
    inner = tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, region))
    out = hostmem.empty(array[inner].shape, array.dtype)
    out[...] = array[inner]
    return out
