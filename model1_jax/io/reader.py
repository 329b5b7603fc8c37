"""The parallel read path of HF-format checkpoints: pieces of tensors, read in chunks by a thread pool.

A `Piece` is one stored tensor's contribution to one buffer: a box of the tensor (matrices × rows × columns of
its `[e, out, in]` storage) and the slot arrangement that puts it in the buffer (docs/checkpoints.md §6).
Every piece is split into chunks of whole rows of about `CHUNK_BYTES`. Rows that the buffer keeps as stored (the
routed experts, embeddings, norms: whole rows, no cast) are read with `preadv` straight into the buffer; any other
chunk is read into a buffer the worker reuses, dequantized (`relayout.dequantize_rows`) or cast when needed, and
written in place in the target buffer (`relayout.place`). NumPy releases the GIL in its copy and lookup loops, so
the workers run in parallel; nothing is copied twice and nothing goes through float32 unless it is the
target. Buffers are allocated when their first chunk starts (64-byte aligned, so that JAX's CPU backend
adopts them; their pages are faulted in by the workers' writes) and handed to
`on_complete` when their last chunk is done, so host memory holds the buffers in flight rather than the model.

Errors are deterministic: tasks are consumed in order, and the first failing one (in that order) is raised
once every earlier task has finished, so any number of workers raises what one worker would.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import numpy as np
from tqdm import tqdm

from model1_jax.io import hostmem, relayout
from model1_jax.io.names import Slot
from model1_jax.io.safetensors_file import DTYPES, SafetensorsError, TensorInfo
from model1_jax.model import quant

CHUNK_BYTES = 2 << 20  # source bytes per task: big enough for page-cache reads, small enough for the caches


def default_workers() -> int:
    """Worker threads: `MODEL1_LOAD_WORKERS` if set, else the CPUs this process may run on (at most 32)."""
    env = os.environ.get("MODEL1_LOAD_WORKERS")
    if env:
        return max(1, int(env))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(32, cpus))


def progress_bar(total: int, desc: str, progress: bool | None) -> tqdm:
    """A byte-counting bar showing GB/s; `progress=None` shows it when stderr is a terminal."""
    enabled = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled, smoothing=0.1)


# -- tasks ------------------------------------------------------------------------------------------------

def run_tasks(tasks: Sequence[Callable[[], int]], *, workers: int, bar: tqdm | None = None,
              pool: ThreadPoolExecutor | None = None) -> None:
    """Runs tasks (each returns the bytes it read) on `workers` threads (or on `pool`, kept across calls so
    that its threads keep their buffers). The first failing task in order is re-raised once every earlier one
    has finished; tasks that have not started are cancelled."""
    if pool is None and (workers <= 1 or len(tasks) <= 1):
        for task in tasks:
            n = task()
            if bar is not None:
                bar.update(n)
        return
    own = pool is None
    pool = pool or new_pool(workers)
    futures = [pool.submit(task) for task in tasks]
    try:
        for future in futures:
            n = future.result()  # raises the first failure in order; every earlier task succeeded
            if bar is not None:
                bar.update(n)
    except BaseException:
        for future in futures:
            future.cancel()
        wait(futures)  # the running ones: nothing writes to the buffers or reads the files after we return
        raise
    finally:
        if own:
            pool.shutdown(wait=True)


def new_pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, workers), thread_name_prefix="model1-read")


# -- files and scratch ------------------------------------------------------------------------------------

class Files:
    """Open file descriptors shared by the workers (`preadv` needs no file position)."""

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> Files:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, info: TensorInfo, offset: int, out: np.ndarray) -> None:
        """Fills `out` (contiguous) with the tensor's bytes from `offset` (relative to the tensor)."""
        view = memoryview(out.reshape(-1).view(np.uint8))
        fd, base, done, n = self.fd(info.file), info.offset + offset, 0, out.nbytes
        if offset + n > info.nbytes:
            raise SafetensorsError(info.file, [f"tensor {info.name!r}: read past its end"])
        while done < n:
            got = os.preadv(fd, [view[done:]], base + done)
            if got <= 0:
                raise SafetensorsError(info.file, [f"tensor {info.name!r}: file ended while reading"])
            done += got


_scratch = threading.local()


def scratch(name: str, shape, dtype) -> np.ndarray:
    """A per-thread buffer reused across tasks (grown when too small), viewed as `shape` / `dtype`."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.nbytes < nbytes:
        buf = buffers[name] = hostmem.empty((max(nbytes, 4096),), np.uint8, huge_pages=True)
    return buf[:nbytes].view(dtype).reshape(shape)


# -- buffers and pieces -----------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Buffer:
    """Host arrays being filled: `parts` maps "dense" (numeric: stored dtypes are cast to it) or "values" /
    "scales" (bit patterns: FP8/FP4 bytes, UE8M0 scales) to (shape, dtype). With `quant` = (format, block,
    pack_axis) the finished value is a `BlockQuantized` of the values and scales parts."""

    key: Any
    parts: dict[str, tuple[tuple[int, ...], np.dtype]]
    quant: tuple[str, tuple[int, ...], int | None] | None = None
    arrays: dict[str, np.ndarray] | None = None
    pending: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in self.parts.values())

    def allocate(self) -> None:
        """Allocates the arrays once, by the first of the workers reaching the buffer (the others wait for the map
        only); every worker faults in the pages it writes (`io.hostmem`)."""
        with self.lock:
            if self.arrays is None:
                self.arrays = {part: hostmem.empty(shape, dtype) for part, (shape, dtype) in self.parts.items()}

    def value(self):
        """The finished array, or a `BlockQuantized` when `quant` is set."""
        if self.quant is None:
            (array,) = self.arrays.values()
            return array
        fmt, block, pack_axis = self.quant
        return quant.BlockQuantized(self.arrays["values"], self.arrays["scales"], fmt, block, pack_axis)


@dataclasses.dataclass(frozen=True)
class Piece:
    """A box of one stored tensor and where it goes: `buffer.arrays[part][index]`, arranged by `slot` (whose
    kind is copy / index / reshape / linear / grouped / experts; its expert index is not used here).

    leads: matrices of a 3-D tensor (HF's stacked experts; `range(1)` otherwise); rows / cols: the box within
    each matrix in storage units (packed FP4 bytes). `dequant` = (format, scale tensor, block [bo, bi] in dense
    elements) when a stored FP8/FP4 tensor becomes a dense buffer; rows and cols are then dense-element
    coordinates of the matrix (FP4 columns: twice the bytes)."""

    info: TensorInfo
    buffer: Buffer
    part: str
    index: tuple
    slot: Slot
    leads: range
    rows: tuple[int, int]
    cols: tuple[int, int]
    dequant: tuple[str, TensorInfo, tuple[int, int]] | None = None


def matrix_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """A stored tensor as (matrices, rows, columns)."""
    shape = tuple(shape)
    if len(shape) == 0:
        return 1, 1, 1
    if len(shape) == 1:
        return 1, 1, shape[0]
    return math.prod(shape[:-2]), shape[-2], shape[-1]


def _chunks(piece: Piece) -> list[tuple[int, int, int]]:
    """(matrix, first row, end row) of each chunk."""
    r0, r1 = piece.rows
    c0, c1 = piece.cols
    itemsize = DTYPES[piece.info.dtype].itemsize
    width = (c1 - c0) * itemsize if piece.dequant is None or piece.dequant[0] == quant.FP8 else (c1 - c0) // 2
    step = max(1, CHUNK_BYTES // max(width, 1))
    return [(lead, r, min(r + step, r1)) for lead in piece.leads for r in range(r0, r1, step)]


def _row_offset(info: TensorInfo, lead: int, row: int) -> int:
    """Byte offset (within the tensor) of row `row` of matrix `lead` of its [matrices, rows, columns] storage."""
    _, rows, cols = matrix_shape(info.shape)
    return (lead * rows + row) * cols * DTYPES[info.dtype].itemsize


def _read_box(files: Files, info: TensorInfo, lead: int, r0: int, r1: int, c0: int, c1: int, name: str
              ) -> np.ndarray:
    """Rows [r0, r1) × columns [c0, c1) of matrix `lead` (storage units), into the thread's scratch `name`."""
    _, _, cols = matrix_shape(info.shape)
    dtype = DTYPES[info.dtype]
    row_bytes = cols * dtype.itemsize
    base = _row_offset(info, lead, r0)
    n = r1 - r0
    if c0 == 0 and c1 == cols:  # whole rows: one contiguous read
        out = scratch(name, (n, cols), dtype)
        files.read(info, base, out)
        return out
    out = scratch(name, (n, c1 - c0), dtype)
    for i in range(n):  # a column band (a shard split along the input axis): only its bytes, one read per row
        files.read(info, base + i * row_bytes + c0 * dtype.itemsize, out[i])
    return out


def _direct(piece: Piece, destination: np.ndarray) -> bool:
    """Whether a piece's rows land unchanged and contiguous in its buffer: a copy-like slot, whole stored rows, and
    no cast (the same dtype, or bit patterns of the same width)."""
    stored = DTYPES[piece.info.dtype]
    same = stored == destination.dtype if piece.part == "dense" else stored.itemsize == destination.dtype.itemsize
    return (same and piece.slot.kind in ("copy", "index", "reshape") and piece.cols == (0, matrix_shape(
        piece.info.shape)[2]) and destination.flags.c_contiguous)


def run_chunk(files: Files, piece: Piece, lead: int, r0: int, r1: int) -> int:
    """Reads one chunk of a piece and writes it into its buffer; returns the bytes read."""
    buffer = piece.buffer
    destination = buffer.arrays[piece.part][piece.index] if piece.index else buffer.arrays[piece.part]
    dtype, rows, c0, c1 = destination.dtype, piece.rows[1] - piece.rows[0], *piece.cols

    def put(chunk: np.ndarray, start: int) -> None:
        relayout.place(piece.slot, destination, chunk, lead - piece.leads.start, rows, start - piece.rows[0])

    if piece.dequant is None:
        if _direct(piece, destination):  # rows kept as stored, bit for bit: read straight into the buffer
            out = relayout.rows_in_place(piece.slot, destination, c1 - c0, lead - piece.leads.start, rows,
                                         r0 - piece.rows[0], r1 - r0)
            files.read(piece.info, _row_offset(piece.info, lead, r0), out)
            return out.nbytes
        chunk = _read_box(files, piece.info, lead, r0, r1, c0, c1, "raw")
        if piece.part == "dense" and chunk.dtype != dtype:
            converted = scratch("dense", chunk.shape, dtype)
            np.copyto(converted, chunk, casting="unsafe")
            put(converted, r0)
        else:
            put(chunk, r0)
        return chunk.nbytes
    fmt, scale_info, (bo, bi) = piece.dequant
    per_byte = 2 if fmt == quant.FP4 else 1
    b0 = c0 // bi * bi  # the lookup starts on a scale block (a narrow band of a shard may not)
    b1 = min(-(-c1 // bi) * bi, matrix_shape(piece.info.shape)[2] * per_byte)
    values = _read_box(files, piece.info, lead, r0, r1, b0 // per_byte, b1 // per_byte, "raw")
    scales = _read_box(files, scale_info, lead, r0 // bo, -(-r1 // bo), b0 // bi, -(-b1 // bi), "scales")
    width = values.shape[1]
    step = relayout.lookup_rows(width)
    band = relayout.band_rows(step, (b1 - b0) * dtype.itemsize)
    index = scratch("index", (step * width,), np.uint16)
    wide = scratch("wide", (step * width,), np.intp)
    # rows kept as stored (the routed experts) are looked up straight into the buffer, without the scratch band
    in_place = piece.slot.kind == "copy" and (b0, b1) == (c0, c1)
    dense = None if in_place else scratch("dense", (band, b1 - b0), dtype)
    row_scale = np.arange(r0, r1) // bo - r0 // bo
    for s in range(0, r1 - r0, band):  # dequantize a band that stays in the cache, then place it
        n = min(band, r1 - r0 - s)
        out = dense if not in_place else relayout.rows_in_place(
            piece.slot, destination, c1 - c0, lead - piece.leads.start, rows, r0 + s - piece.rows[0], n)
        for t in range(0, n, step):  # lookups small enough for their index to stay in the L1/L2 cache
            m = min(step, n - t)
            relayout.dequantize_rows(fmt, values[s + t:s + t + m], scales, row_scale[s + t:s + t + m], bi,
                                     out[t:t + m], index, wide)
        if not in_place:
            put(dense[:n, c0 - b0:c1 - b0], r0 + s)
    return values.nbytes + scales.nbytes


def read_pieces(pieces: Iterable[Piece], *, workers: int | None = None, bar: tqdm | None = None,
                on_complete: Callable[[Buffer], None] | None = None, pool: ThreadPoolExecutor | None = None) -> None:
    """Fills every piece's buffer (allocating each when its first chunk starts) and calls `on_complete(buffer)`
    (in a worker thread) as soon as a buffer's last chunk is written."""
    workers = default_workers() if workers is None else max(1, int(workers))
    pieces = list(pieces)
    lock = threading.Lock()
    chunks = [(piece, *c) for piece in pieces for c in _chunks(piece)]
    for piece, *_ in chunks:
        piece.buffer.pending += 1
    for buffer in {id(p.buffer): p.buffer for p in pieces}.values():
        if buffer.pending == 0:  # nothing to read (empty tensors)
            buffer.allocate()
            if on_complete is not None:
                on_complete(buffer)
    with Files() as files:
        def task(piece: Piece, lead: int, r0: int, r1: int) -> int:
            piece.buffer.allocate()
            n = run_chunk(files, piece, lead, r0, r1)
            with lock:
                piece.buffer.pending -= 1
                done = piece.buffer.pending == 0
            if done and on_complete is not None:
                on_complete(piece.buffer)
            return n

        run_tasks([lambda c=c: task(*c) for c in chunks], workers=workers, bar=bar, pool=pool)
