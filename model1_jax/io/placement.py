"""Direct placement of an HF-format checkpoint under a sharding `Layout`: every array is read shard by shard.

For each parameter (and for the values and scales of one kept block-quantized) the layout gives a
`NamedSharding`; this process's devices and the index box each one holds come from
`sharding.addressable_devices_indices_map`. Devices holding the same box (replicas) share one read. Each
distinct box becomes a host buffer filled by `io.regions` from the byte ranges that hold it — so a process
reads only its own shards — and is put on its devices as soon as its last chunk is written, then released;
`jax.make_array_from_single_device_arrays` assembles the global arrays. Host memory therefore holds the
shards in flight, not the model (with JAX's CPU backend the device buffer is the host buffer itself).

A dense load of FP8/FP4 weights in a single process reads them kept quantized, shard by shard, and dequantizes
them on their devices into the dense sharding (`io.device_dequant`): a GPU receives the stored bytes, not the
two to four times larger dense ones. Several processes would each see only their own shards' scales and could
disagree on whether the device gives the exact product, so there every weight is dequantized on the host.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Collection

import jax
import numpy as np
from jax.sharding import NamedSharding

from model1_jax.io import device_dequant, regions
from model1_jax.io.hf import CheckpointPlan, output_arrangement
from model1_jax.io.names import quant_arrangement
from model1_jax.io.reader import Buffer, read_pieces
from model1_jax.model import quant
from model1_jax.parallel.layout import Layout


def _arrays(plan: CheckpointPlan, keep_quantized: bool | Collection[tuple]) -> dict[tuple, dict]:
    """path → {part: (shape, dtype)} and, for a quantized parameter, its (format, block, pack_axis)."""
    out = {}
    for unit in plan.units:
        for path in unit.paths:
            first = next(a for a in unit.assignments if a.slot.path == path)
            target = plan.targets[path]
            if regions.kept(keep_quantized, path) and first.fmt:
                values, scales, pack_axis = output_arrangement(first, tuple(target.shape))
                block, _ = quant_arrangement(first.slot, tuple(target.shape), first.hf_block)
                values_dtype = quant.E4M3 if first.fmt == quant.FP8 else np.dtype(np.uint8)
                out[path] = {"values": (values, values_dtype), "scales": (scales, quant.E8M0),
                             "quant": (first.fmt, block, pack_axis)}
            else:
                out[path] = {"dense": (tuple(target.shape), np.dtype(target.dtype))}
    return out


def shardings(plan: CheckpointPlan, layout: Layout, keep_quantized: bool | Collection[tuple]
              ) -> dict[tuple[tuple, str], NamedSharding]:
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


def _on_device(plan: CheckpointPlan, layout: Layout) -> frozenset[tuple]:
    """The weights a dense load dequantizes on their devices (module docstring): one process only, and only
    where the layout also splits their values and scales evenly."""
    if jax.process_count() > 1:
        return frozenset()
    candidates = device_dequant.dequantized_on_device(plan)
    arrays = _arrays(plan, candidates)
    axes = {path: var.get_metadata()["logical_axes"] for path, var in plan.flat}
    kept = set()
    for path in candidates:
        try:
            for part in ("values", "scales"):
                layout.sharding(axes[path], arrays[path][part][0])
        except ValueError:
            continue
        kept.add(path)
    return frozenset(kept)


def read_sharded(plan: CheckpointPlan, layout: Layout, *, keep_quantized: bool, workers: int | None = None,
                 bar=None) -> dict[tuple, jax.Array | quant.BlockQuantized]:
    """Every parameter as a global `jax.Array` (or `BlockQuantized` of two) placed by `layout`."""
    on_device = frozenset() if keep_quantized else _on_device(plan, layout)
    specs = _arrays(plan, keep_quantized or on_device)
    placed = shardings(plan, layout, keep_quantized or on_device)
    axes = {path: var.get_metadata()["logical_axes"] for path, var in plan.flat}
    assignments = defaultdict(list)
    for unit in plan.units:
        for a in unit.assignments:
            assignments[a.slot.path].append(a)
    lock = threading.Lock()
    device_arrays: dict[tuple, dict[str, list]] = defaultdict(dict)  # path → part → shards
    pending: dict[tuple, int] = defaultdict(int)  # path → its buffers not yet on their devices
    exact: dict[tuple, bool] = defaultdict(lambda: True)  # path → every scale byte passed `scales_exact`
    values = {}
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
            pending[path] += 1
            pieces += regions.shard_pieces(assignments[path], shape, region, part, buffer)

    def assemble(path: tuple, shards: dict[str, list]) -> None:
        """The global arrays of a parameter whose shards are all on their devices; a weight read quantized for a
        dense load is dequantized there at once, so its quantized shards are freed as the load goes on."""
        parts = specs[path]
        arrays = {part: jax.make_array_from_single_device_arrays(spec[0], placed[(path, part)], shards.get(part, []))
                  for part, spec in parts.items() if part != "quant"}
        if "quant" not in parts:
            values[path] = arrays["dense"]
            return
        weight = quant.BlockQuantized(arrays["values"], arrays["scales"], *parts["quant"])
        if path in on_device:
            target = plan.targets[path]
            sharding = layout.sharding(axes[path], target.shape, "/".join(map(str, path)))
            weight = device_dequant.to_dense_sharded(weight, target.dtype, sharding, exact_on_device=exact[path])
        values[path] = weight

    def done(buffer: Buffer) -> None:
        path, part, box, region, devices = buffer.key
        array = buffer.arrays[part]
        if region != box:
            array = np.ascontiguousarray(array[tuple(slice(b.start - r.start, b.stop - r.start)
                                                     for b, r in zip(box, region))])
        ok = part != "scales" or path not in on_device or device_dequant.scales_exact(specs[path]["quant"][0], array)
        shards = [jax.device_put(array, device) for device in devices]
        buffer.arrays = None
        with lock:
            device_arrays[path].setdefault(part, []).extend(shards)
            exact[path] &= ok
            pending[path] -= 1
            complete = device_arrays.pop(path) if pending[path] == 0 else None
        if complete is not None:
            assemble(path, complete)

    read_pieces(pieces, workers=workers, bar=bar, on_complete=done)
    for path in specs:
        if path not in values:  # no shard on this process's devices
            assemble(path, {})
    return values
