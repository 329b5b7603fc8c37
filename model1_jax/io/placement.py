"""Direct placement of an HF-format checkpoint under a sharding `Layout`: every array is read shard by shard.

For each parameter (and for the values and scales of one kept block-quantized) the layout gives a
`NamedSharding`; this process's devices and the index box each one holds come from
`sharding.addressable_devices_indices_map`. Devices holding the same box (replicas) share one read. Each
distinct box becomes a host buffer filled by `io.regions` from the byte ranges that hold it — so a process
reads only its own shards — and is put on its devices as soon as its last chunk is written, then released;
`jax.make_array_from_single_device_arrays` assembles the global arrays. Host memory therefore holds the
shards in flight, not the model (with JAX's CPU backend the device buffer is the host buffer itself).

A dense load reads the FP8/FP4 weights kept quantized, shard by shard, and dequantizes them on their devices into
the dense sharding (`io.device_dequant`): a GPU receives the stored bytes, not the two to four times larger dense
ones. The device gives the exact product only if every scale byte of the weight is in range, and each process sees
only its own shards' bytes; so the scales are read first, the processes agree on the weights that pass (one
all-gather of a flag per weight, `parallel.distributed.all_processes`), and any other weight is read dense, its
dequantization done on the host by the reader's exact lookup.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Collection

import jax
import numpy as np
from jax.sharding import NamedSharding

from model1_jax.io import device_dequant, regions
from model1_jax.io.hf import CheckpointPlan, output_arrangement
from model1_jax.io.names import quant_arrangement
from model1_jax.io.reader import Buffer, read_pieces
from model1_jax.model import quant
from model1_jax.parallel import distributed
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
    axes = _axes(plan)
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


def _axes(plan: CheckpointPlan) -> dict[tuple, tuple]:
    return {path: var.get_metadata()["logical_axes"] for path, var in plan.flat}


def _candidates(plan: CheckpointPlan, layout: Layout) -> frozenset[tuple]:
    """The weights a dense load may dequantize on their devices (`device_dequant.dequantized_on_device`) whose
    values and scales the layout also splits evenly; each still needs every scale byte accepted (`_agreed`)."""
    candidates = device_dequant.dequantized_on_device(plan)
    arrays, axes = _arrays(plan, candidates), _axes(plan)
    kept = set()
    for path in candidates:
        try:
            for part in ("values", "scales"):
                layout.sharding(axes[path], arrays[path][part][0])
        except ValueError:
            continue
        kept.add(path)
    return frozenset(kept)


def _agreed(exact: dict[tuple, bool]) -> frozenset[tuple]:
    """The paths whose flag holds in every process (the plan, hence the keys, is the same in all of them)."""
    keys = sorted(exact, key=lambda path: "/".join(map(str, path)))  # one order everywhere (not set order)
    flags = distributed.all_processes([exact[k] for k in keys])
    return frozenset(k for k, ok in zip(keys, flags) if ok)


def _read(arrays: dict[tuple[tuple, str], NamedSharding], specs: dict[tuple, dict], assignments: dict[tuple, list],
          on_path: Callable[[tuple, dict[str, list]], None], *, check: Callable[[tuple, str, np.ndarray], None] | None,
          workers: int | None, bar) -> None:
    """Reads this process's shards of `arrays` ((path, part) → sharding), puts each on its devices as soon as it is
    read (`check(path, part, host shard)` sees it first) and calls `on_path(path, {part: device shards})` once the
    path's last shard here is placed. Devices holding the same box (replicas) share one read."""
    lock = threading.Lock()
    placed: dict[tuple, dict[str, list]] = defaultdict(dict)  # path → part → shards
    pending: dict[tuple, int] = defaultdict(int)  # path → its buffers not yet on their devices
    pieces = []
    for (path, part), sharding in arrays.items():
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

    def done(buffer: Buffer) -> None:
        path, part, box, region, devices = buffer.key
        array = buffer.arrays[part]
        if region != box:
            array = np.ascontiguousarray(array[tuple(slice(b.start - r.start, b.stop - r.start)
                                                     for b, r in zip(box, region))])
        if check is not None:
            check(path, part, array)
        shards = [jax.device_put(array, device) for device in devices]
        buffer.arrays = None
        with lock:
            placed[path].setdefault(part, []).extend(shards)
            pending[path] -= 1
            complete = placed.pop(path) if pending[path] == 0 else None
        if complete is not None:
            on_path(path, complete)

    read_pieces(pieces, workers=workers, bar=bar, on_complete=done)


def read_sharded(plan: CheckpointPlan, layout: Layout, *, keep_quantized: bool, workers: int | None = None,
                 bar=None) -> dict[tuple, jax.Array | quant.BlockQuantized]:
    """Every parameter as a global `jax.Array` (or `BlockQuantized` of two) placed by `layout`."""
    axes = _axes(plan)
    assignments = defaultdict(list)
    for unit in plan.units:
        for a in unit.assignments:
            assignments[a.slot.path].append(a)
    lock = threading.Lock()
    scale_shards: dict[tuple, list] = {}  # path → its scales' shards, read first (a dense load's candidates)
    on_device: frozenset[tuple] = frozenset()
    if not keep_quantized:
        # A dense load reads the scales of its candidates first: the device multiplies a weight exactly only if every
        # scale byte passes `scales_exact`, and each process sees its own shards' bytes, so the processes agree on
        # the weights to dequantize on the devices before any is read. The others are read dense on the host (their
        # scales are then read once more: only for scale bytes no trained weight has).
        candidates = _candidates(plan, layout)
        specs, placed = _arrays(plan, candidates), shardings(plan, layout, candidates)
        exact = dict.fromkeys(candidates, True)

        def check(path: tuple, part: str, scales: np.ndarray) -> None:
            ok = device_dequant.scales_exact(specs[path]["quant"][0], scales)
            with lock:
                exact[path] &= ok

        _read({(path, "scales"): placed[(path, "scales")] for path in candidates}, specs, assignments,
              lambda path, shards: scale_shards.__setitem__(path, shards["scales"]), check=check, workers=workers,
              bar=bar)
        on_device = _agreed(exact)
        scale_shards = {path: shards for path, shards in scale_shards.items() if path in on_device}
    kept = keep_quantized or on_device
    specs, placed = _arrays(plan, kept), shardings(plan, layout, kept)
    values = {}

    def assemble(path: tuple, shards: dict[str, list]) -> None:
        """The global arrays of a parameter whose shards are all on their devices; a weight read quantized for a
        dense load is dequantized there at once, so its quantized shards are freed as the load goes on."""
        parts = specs[path]
        if path in on_device:
            shards = {**shards, "scales": scale_shards.pop(path, [])}
        arrays = {part: jax.make_array_from_single_device_arrays(spec[0], placed[(path, part)], shards.get(part, []))
                  for part, spec in parts.items() if part != "quant"}
        if "quant" not in parts:
            values[path] = arrays["dense"]
            return
        weight = quant.BlockQuantized(arrays["values"], arrays["scales"], *parts["quant"])
        if path in on_device:
            target = plan.targets[path]
            sharding = layout.sharding(axes[path], target.shape, "/".join(map(str, path)))
            weight = device_dequant.to_dense_sharded(weight, target.dtype, sharding)
        values[path] = weight

    _read({key: sharding for key, sharding in placed.items() if not (key[0] in on_device and key[1] == "scales")},
          specs, assignments, assemble, check=None, workers=workers, bar=bar)
    for path in specs:
        if path not in values:  # no shard on this process's devices
            assemble(path, {})
    return values
