"""Direct placement of an HF-format checkpoint under a sharding `Layout`: every array is read shard by shard.

For each parameter (and for the values and scales of one kept block-quantized) the layout gives a
`NamedSharding`; this process's devices and the index box each one holds come from
`sharding.addressable_devices_indices_map`. Devices holding the same box (replicas) share one read. Each
distinct box becomes a host buffer filled by `io.regions` from the byte ranges that hold it — so a process
reads only its own shards — and is put on its devices as soon as its last chunk is written, then released;
`jax.make_array_from_single_device_arrays` assembles the global arrays. Host memory therefore holds the
shards in flight, not the model (with JAX's CPU backend the device buffer is the host buffer itself).
"""

from __future__ import annotations

import threading
from collections import defaultdict

import jax
import numpy as np
from jax.sharding import NamedSharding

from model1_jax.io import regions
from model1_jax.io.hf import CheckpointPlan, output_arrangement
from model1_jax.io.names import quant_arrangement
from model1_jax.io.reader import Buffer, read_pieces
from model1_jax.model import quant
from model1_jax.parallel.layout import Layout


def _arrays(plan: CheckpointPlan, keep_quantized: bool) -> dict[tuple, dict]:
    """path → {part: (shape, dtype)} and, for a quantized parameter, its (format, block, pack_axis)."""
    out = {}
    for unit in plan.units:
        for path in unit.paths:
            first = next(a for a in unit.assignments if a.slot.path == path)
            target = plan.targets[path]
            if keep_quantized and first.fmt:
                values, scales, pack_axis = output_arrangement(first, tuple(target.shape))
                block, _ = quant_arrangement(first.slot, tuple(target.shape), first.hf_block)
                values_dtype = quant.E4M3 if first.fmt == quant.FP8 else np.dtype(np.uint8)
                out[path] = {"values": (values, values_dtype), "scales": (scales, quant.E8M0),
                             "quant": (first.fmt, block, pack_axis)}
            else:
                out[path] = {"dense": (tuple(target.shape), np.dtype(target.dtype))}
    return out


def shardings(plan: CheckpointPlan, layout: Layout, keep_quantized: bool) -> dict[tuple[tuple, str], NamedSharding]:
    """The sharding of every array to build; raises one ValueError listing every split that does not divide."""
    axes = {path: var.get_metadata()["logical_axes"] for path, var in plan.flat}
    result, problems = {}, []
    for path, parts in _arrays(plan, keep_quantized).items():
        for part, spec in parts.items():
            if part == "quant":
                continue
            what = "/".join(map(str, path)) + ("" if part == "dense" else f" ({part})")
            try:
                result[(path, part)] = layout.sharding(axes[path], spec[0], what)
            except ValueError as e:
                problems.append(str(e).removeprefix("sharding: "))
    if problems:
        raise ValueError("sharding: the layout does not fit the checkpoint's parameters:\n  " + "\n  ".join(problems))
    return result


def read_sharded(plan: CheckpointPlan, layout: Layout, *, keep_quantized: bool, workers: int | None = None,
                 bar=None) -> dict[tuple, jax.Array | quant.BlockQuantized]:
    """Every parameter as a global `jax.Array` (or `BlockQuantized` of two) placed by `layout`."""
    specs = _arrays(plan, keep_quantized)
    placed = shardings(plan, layout, keep_quantized)
    assignments = defaultdict(list)
    for unit in plan.units:
        for a in unit.assignments:
            assignments[a.slot.path].append(a)
    lock = threading.Lock()
    device_arrays: dict[tuple[tuple, str], list] = defaultdict(list)
    pieces = []
    for (path, part), sharding in placed.items():
        shape, dtype = specs[path][part]
        boxes: dict[tuple, list] = defaultdict(list)
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
            boxes[tuple((s.start, s.stop) for s in box)].append(device)
        for key, devices in boxes.items():
            box = tuple(slice(*k) for k in key)
            region = regions.shard_region(assignments[path], shape, box)
            buffer = Buffer((path, part, box, region, tuple(devices)),
                            {part: (tuple(s.stop - s.start for s in region), dtype)})
            pieces += regions.shard_pieces(assignments[path], shape, region, part, buffer)

    def done(buffer: Buffer) -> None:
        path, part, box, region, devices = buffer.key
        array = buffer.arrays[part]
        if region != box:
            array = np.ascontiguousarray(array[tuple(slice(b.start - r.start, b.stop - r.start)
                                                     for b, r in zip(box, region))])
        shards = [jax.device_put(array, device) for device in devices]
        buffer.arrays = None
        with lock:
            device_arrays[(path, part)] += shards

    read_pieces(pieces, workers=workers, bar=bar, on_complete=done)
    values = {}
    for path, parts in specs.items():
        arrays = {part: jax.make_array_from_single_device_arrays(spec[0], placed[(path, part)],
                                                                 device_arrays[(path, part)])
                  for part, spec in parts.items() if part != "quant"}
        if "quant" in parts:
            fmt, block, pack_axis = parts["quant"]
            values[path] = quant.BlockQuantized(arrays["values"], arrays["scales"], fmt, block, pack_axis)
        else:
            values[path] = arrays["dense"]
    return values
