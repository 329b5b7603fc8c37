"""Streaming conversion of a DeepSeek-V4 checkpoint (HF or DeepSeek names; dense or FP8/FP4) to Orbax.

The whole checkpoint is checked first (`hf.plan_checkpoint`: names, shapes, dtypes, block scales, config)
and nothing is written unless it is sound. Then the plan's units are read in batches of about the item
budget by the parallel reader (`regions.read_units`: chunks of tensors read with `preadv` by a thread pool,
dequantized or kept packed, re-laid-out once into each parameter's buffer) and handed to an
`orbax.Writer`, which writes an Orbax item in a background thread whenever its buffer reaches
`budget_bytes`, and fsyncs written items from another (`defer_sync`) — so reading the next batch
overlaps writing the last and putting earlier ones on disk. The parameters in flight live in one `Ring`
of max(2 × budget, largest unit) bytes, reused batch after batch:

    peak ≈ runtime + max(2 × budget, largest unit) + workers × per-worker scratch

where a unit is one parameter (two for HF's merged gate_up_proj) in the output format and the scratch is
a worker's reused buffers (`SCRATCH_BYTES`: three chunks of `reader.CHUNK_BYTES` and 3 MiB). With the default budget
(half the largest source file) this is the runtime plus about one largest file plus a few MiB per
worker, as long as no single output parameter is larger. `memory_plan` computes the bound for a given
checkpoint; `describe` prints it (`--dry-run` reads only headers).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
import time

import jax.numpy as jnp
import numpy as np

from model1_jax.common import human_bytes
from model1_jax.io import direct_write, hostmem
from model1_jax.io import orbax as checkpoint
from model1_jax.io.hf import CheckpointPlan, Unit, plan_checkpoint, unit_output_bytes
from model1_jax.io.reader import CHUNK_BYTES, Buffer, default_workers, new_pool, progress_bar
from model1_jax.io.regions import read_units

# A worker's reused buffers: a chunk of raw bytes (and, for a cast, its converted copy), plus the lookup
# indices and dense band of a dequantization and the words of a transpose band (under 3 MiB:
# `relayout.LOOKUP_BYTES`, `relayout.PLACE_BYTES`, `relayout.WORDS_BYTES`).
SCRATCH_BYTES = 3 * CHUNK_BYTES + (3 << 20)
# Every array in the ring starts on a block boundary, so that the writer sends it to the disk with direct I/O
# (`io.direct_write`): at most this much padding per array.
ALIGN = direct_write.BLOCK


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    source_bytes: int
    output_bytes: int
    largest_file: int
    budget: int             # Orbax item: parameters written together
    largest_unit: int       # output bytes of the largest unit
    in_flight: int          # parameters held at once: the item being written + the batch being read
    ring: int               # the host memory holding them (in_flight + alignment padding), reused throughout
    workers: int
    scratch: int            # per worker
    peak_bound: int         # excluding the runtime (Python, JAX, Orbax)


@dataclasses.dataclass(frozen=True)
class ConversionStats:
    path: str
    tensors: int
    parameters: int
    items: int
    source_bytes: int
    output_bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        """Source bytes read and converted per second (GB = 1e9 bytes)."""
        return self.source_bytes / self.seconds / 1e9


def memory_plan(plan: CheckpointPlan, *, quantized: bool, budget_bytes: int | None = None,
                workers: int | None = None) -> MemoryPlan:
    """Bytes read and written, and the bound on host memory the conversion will need."""
    largest_file = max(os.path.getsize(f) for f in plan.files)
    budget = max(1, largest_file // 2) if budget_bytes is None else budget_bytes
    workers = default_workers() if workers is None else workers
    outputs = [unit_output_bytes(u, plan.targets, quantized) for u in plan.units]
    in_flight = max(2 * budget, max(outputs))
    ring = in_flight + 2 * ALIGN * len(plan.targets)  # values + scales per parameter at most
    source = sum(u.source_bytes for u in plan.units)
    return MemoryPlan(source, sum(outputs), largest_file, budget, max(outputs), in_flight, ring, workers,
                      SCRATCH_BYTES, ring + workers * SCRATCH_BYTES)


# The first and last `budget` bytes go in batches (and items) of budget / EDGE_SPLIT: writing starts sooner, and
# what is left to write and fsync once the last byte is read is a quarter item.
EDGE_SPLIT = 4


def batches(units: list[Unit], sizes: list[int], budget: int) -> list[tuple[list[Unit], int, bool]]:
    """Consecutive units of at most `budget` output bytes together (a larger unit alone): (units, bytes, edge),
    where `edge` batches lie within `budget` bytes of either end and hold at most budget / EDGE_SPLIT."""
    out, current, size, done, total, edge = [], [], 0, 0, sum(sizes), False
    for unit, n in zip(units, sizes):
        at_edge = done < budget or total - done <= budget
        if current and (size + n > budget or edge != at_edge or (at_edge and size + n > budget // EDGE_SPLIT)):
            out.append((current, size, edge))
            current, size = [], 0
        current.append(unit)
        size, done, edge = size + n, done + n, at_edge
    return out + [(current, size, edge)] if current else out


class Ring:
    """The host memory of the parameters in flight: one allocation, carved into the buffers of each batch in order
    and reused once the Orbax item holding them is written — so the conversion touches `capacity` bytes of fresh
    memory once, instead of the kernel zeroing new pages for every parameter (a fifth of the CPU time). Each
    buffer is contiguous; a batch may wrap around the end between two buffers. Faulted in by the readers as they
    first fill it: in huge pages when most of its bytes are transposed into it (`huge_pages`, the dense conversions:
    the TLB's reach speeds them, io.hostmem), in small pages otherwise — kept quantized, most bytes (the experts)
    arrive as stored, and small pages are cheaper to create where the host has taken back free memory."""

    def __init__(self, capacity: int, huge_pages: bool = True):
        self.capacity = capacity
        self.memory = hostmem.empty((capacity,), np.uint8, huge_pages=huge_pages, align=ALIGN)
        # [start, end, item] of each buffer in order; item: the Orbax item holding it (None until handed over)
        self.regions: collections.deque[list] = collections.deque()

    def _fit(self, n: int) -> int | None:
        if not self.regions:
            return 0 if n <= self.capacity else None
        tail, head = self.regions[0][0], self.regions[-1][1]
        if self.regions[-1][0] < tail:  # wrapped: [tail, capacity) and [0, head) are used
            return head if tail - head >= n else None
        if self.capacity - head >= n:
            return head
        return 0 if tail >= n else None

    def _take(self, n: int, writer: checkpoint.Writer) -> int:
        """The start of `n` free bytes, waiting for (or starting) the writing of earlier items while none are."""
        while True:
            while self.regions and self.regions[0][2] is not None and self.regions[0][2] < writer.saved:
                self.regions.popleft()
            start = self._fit(n)
            if start is not None:
                self.regions.append([start, start + n, None])
                return start
            if writer.writing:
                writer.wait()
            elif writer.buffer_bytes:
                writer.flush()  # the buffered parameters become the item being written
            else:
                raise AssertionError(f"Ring: {n} bytes do not fit in {self.capacity}")

    def carve(self, buffers: list[Buffer], writer: checkpoint.Writer) -> None:
        """Sets every buffer's arrays to a free piece of the ring (64-byte aligned parts)."""
        for buffer in buffers:
            sizes = [math.prod(shape) * np.dtype(dtype).itemsize for shape, dtype in buffer.parts.values()]
            offset = self._take(max(ALIGN, sum(-(-n // ALIGN) * ALIGN for n in sizes)), writer)
            buffer.arrays = {}
            for (part, (shape, dtype)), n in zip(buffer.parts.items(), sizes):
                buffer.arrays[part] = self.memory[offset:offset + n].view(dtype).reshape(shape)
                offset += -(-n // ALIGN) * ALIGN

    def handed_over(self, writer: checkpoint.Writer) -> None:
        """Records which item holds the buffers carved since the last call: the one being filled, or the one
        their last parameter just completed."""
        item = len(writer.items) if writer.buffer_bytes else len(writer.items) - 1
        for region in reversed(self.regions):
            if region[2] is not None:
                break
            region[2] = item


def describe(plan: CheckpointPlan, mem: MemoryPlan, *, quantized: bool) -> str:
    """A readable summary of a checked checkpoint and of the conversion's memory plan."""
    cfg = plan.config
    tensors = {a.info.name for u in plan.units for a in u.assignments}
    formats = sorted({a.fmt for u in plan.units for a in u.assignments if a.fmt})
    kept = "kept block-quantized" if quantized else "dequantized exactly"
    hb = human_bytes
    return "\n".join([
        f"source      {plan.path}: {len(plan.files)} file(s), {len(tensors)} tensors, {human_bytes(mem.source_bytes)}",
        f"schema      {plan.schema.describe()}",
        f"model       {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.n_routed_experts} experts"
        f"{', MTP block' if cfg.num_nextn_predict_layers else ''}"
        f"{f', DSpark drafter ({cfg.dspark.num_stages} stages)' if cfg.dspark else ''}; {len(plan.targets)} "
        f"parameters in {len(plan.units)} units",
        f"storage     {', '.join(formats) + ' (' + kept + ')' if formats else 'dense'}",
        f"output      {human_bytes(mem.output_bytes)}",
        f"memory      item budget {hb(mem.budget)} (largest source file {hb(mem.largest_file)}), largest "
        f"parameter unit {hb(mem.largest_unit)}, {hb(mem.in_flight)} of parameters in flight, "
        f"{mem.workers} workers × {hb(mem.scratch)} scratch",
        f"            peak host memory ≤ {human_bytes(mem.peak_bound)} + runtime (Python/JAX/Orbax)",
    ])


def convert(source: str | os.PathLike, output: str | os.PathLike, *, dtype=jnp.bfloat16, quantized: bool = False,
            overwrite: bool = False, budget_bytes: int | None = None, progress: bool | None = True,
            workers: int | None = None) -> ConversionStats:
    """Converts a checkpoint directory to an Orbax checkpoint that `model1_jax.load` reads.

    dtype:     storage dtype of the dense parameters (FP8/FP4 dequantized exactly into it unless
               `quantized`); the parameters the reference keeps in float32 stay float32.
    quantized: keep FP8 linears as float8_e4m3fn values + UE8M0 scales and FP4 experts as packed
               e2m1 codes + scales, in the model layout (the model dequantizes them on the fly).
    budget_bytes: parameters per Orbax item (default: half the largest source file); `workers`: reading
               threads (default: the CPUs); `progress`: a bar with the rate (None: when stderr is a terminal).
    Raises `CheckpointError` (every problem listed) or FileExistsError before anything is written; an
    error or interruption while converting leaves no new checkpoint (nor anything half-written) behind.
    """
    checkpoint.check_destination(output, overwrite=overwrite)
    plan = plan_checkpoint(source, dtype=dtype, keep_quantized=quantized)
    mem = memory_plan(plan, quantized=quantized, budget_bytes=budget_bytes, workers=workers)
    start = time.perf_counter()
    sizes = [unit_output_bytes(u, plan.targets, quantized) for u in plan.units]
    ring = Ring(mem.ring, huge_pages=not quantized)
    with progress_bar(mem.source_bytes, "converting", progress) as bar, new_pool(mem.workers) as pool, \
            checkpoint.Writer(output, plan.config, overwrite=overwrite, budget_bytes=mem.budget,
                              background=True, defer_sync=True) as writer:
        for batch, size, edge in batches(plan.units, sizes, mem.budget):
            writer.reserve(size)  # flushes the buffer (in the background) if the batch would overflow it
            values = read_units(batch, plan.targets, keep_quantized=quantized, bar=bar, pool=pool,
                                allocate=lambda buffers: ring.carve(buffers, writer))
            for path in list(values):
                writer.add(path, values.pop(path))
            if edge:
                writer.flush()  # an item of its own: written while the next batch is read
            ring.handed_over(writer)
    tensors = {a.info.name for u in plan.units for a in u.assignments}
    return ConversionStats(writer.final, len(tensors), len(plan.targets), len(writer.items), mem.source_bytes,
                           mem.output_bytes, time.perf_counter() - start)
