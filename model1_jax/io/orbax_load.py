"""Restoring the Orbax checkpoints of `io.orbax` (`m1.save`, the converter) as a `Model1`.

The model is built abstractly (`nnx.eval_shape`), the manifest is checked against it, and every array is
restored straight into its target sharding (TensorStore reads each device's slice, with Orbax's specs), never
through a full host copy. FP8/FP4 parameters, stored as their bit patterns, are bit-cast back on the device.
TensorStore reads the files through memory maps where it can (`file_io_mode`), copying from the page cache
straight into each array instead of through a read buffer of its own, and the arrays are 64-byte-aligned host
buffers that JAX's CPU backend adopts without a copy: one fresh allocation per array (fresh pages are dear in a
virtual machine: docs/checkpoints.md §8.4).
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from model1_jax.io import hostmem
from model1_jax.io.hf import CheckpointError
from model1_jax.io.orbax import QUANT_ARRAYS, config_from_json, nest, path_key, read_manifest, resolve
from model1_jax.io.reader import default_workers, progress_bar
from model1_jax.model import quant
from model1_jax.model.transformer import Model1, abstract_model, merge

ShardingSpec = Callable[[tuple, jax.ShapeDtypeStruct], Sharding] | Mapping[tuple, Sharding]
_bitcast_donated = jax.jit(jax.lax.bitcast_convert_type, static_argnums=1, donate_argnums=0)  # reuses the buffer


def _reinterpret(array: jax.Array, dtype) -> jax.Array:
    """The same bits as `dtype` (uint8 → float8). On the host backend each shard's buffer is viewed as `dtype`
    and adopted again (no copy, and no compilation — which per distinct shape would cost more than the read);
    on accelerators a jitted bitcast that donates its input."""
    if all(d.platform == "cpu" for d in array.sharding.device_set):
        shards = [jax.device_put(np.asarray(s.data).view(dtype), s.device) for s in array.addressable_shards]
        return jax.make_array_from_single_device_arrays(array.shape, array.sharding, shards)
    return _bitcast_donated(array, dtype)


def _sharding_fn(mesh: jax.sharding.Mesh | None, shardings: ShardingSpec | None
                 ) -> Callable[[tuple, jax.ShapeDtypeStruct], Sharding]:
    if shardings is None:
        default = NamedSharding(mesh, PartitionSpec()) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        return lambda path, sds: default
    if callable(shardings):
        return shardings
    if isinstance(shardings, Mapping):
        def lookup(path, sds):
            if path in shardings:
                return shardings[path]
            if path[-1] in QUANT_ARRAYS and path[:-1] in shardings:
                return shardings[path[:-1]]
            raise KeyError(path_key(path))
        return lookup
    raise TypeError(f"load: shardings must be a mapping or a callable, got {type(shardings).__name__}")


@functools.cache
def _memmap_spec() -> ts.Context.Spec | None:
    """The TensorStore context that reads files through memory maps; None where TensorStore lacks the option."""
    try:
        spec = ts.Context.Spec({"file_io_mode": {"mode": "memmap"}})
        ts.Context(spec)
        return spec
    except ValueError:
        return None


class _HostArrayHandler(ocp.type_handlers.ArrayHandler):
    """Orbax's jax.Array handler with the reads done here. Orbax reads each shard into an `np.zeros` array, which
    NumPy aligns to 16 bytes only, so JAX's CPU backend copies every array once more into memory of its own (a
    second fresh allocation and copy: `m1.load` of the benchmark's fp8 output took 0.43 → 0.89 GB per CPU-second
    without it, docs/checkpoints.md §8.4).
    Here each distinct shard of this process's devices is read by TensorStore — through memory maps where it can
    (`file_io_mode`), a child of the restore's context — into an `io.hostmem` buffer (64-byte aligned: adopted, not
    copied, by the CPU backend) in the target dtype, and put on its devices. The TensorStore spec is Orbax's
    (`get_json_tspec_read`); `load` has checked every shape against the manifest, so no padding or truncation is
    involved, and a stored shape that still differs is an error."""

    async def deserialize(self, infos, args=None):
        if args is None or len(args) != len(infos) or any(getattr(a, "sharding", None) is None for a in args):
            return await super().deserialize(infos, args)  # not `load`'s restore: Orbax's own reads
        await asyncio.gather(*[info.await_path_creation() for info in infos])
        children: dict[int, ts.Context] = {}  # by id of the parent, which the infos keep alive meanwhile
        for info in infos:
            parent = info.ts_context
            if id(parent) not in children:
                children[id(parent)] = ts.Context(_memmap_spec(), parent) if _memmap_spec() else parent
        return await asyncio.gather(*[_read_array(info, arg, children[id(info.ts_context)])
                                      for info, arg in zip(infos, args)])


async def _read_array(info, arg, context: ts.Context) -> jax.Array:
    """One array (`arg`: its global shape, dtype and sharding) read shard by shard into `io.hostmem` buffers."""
    spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=info.is_ocdbt_checkpoint)
    store = await ts.open(ts.Spec(spec), open=True, context=context)
    shape = tuple(store.shape) if arg.global_shape is None else tuple(arg.global_shape)
    sharding = arg.sharding
    if tuple(store.shape) != shape:
        raise CheckpointError(str(info.parent_dir), [f"{info.name}: stored shape {list(store.shape)}, the model "
                                                     f"needs {list(shape)}"])
    dtype = np.dtype(arg.dtype) if arg.dtype is not None else store.dtype.numpy_dtype
    boxes: dict[tuple, list[jax.Device]] = {}  # devices holding the same box (replicas) share one read
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        box = tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))
        boxes.setdefault(tuple((b.start, b.stop) for b in box), []).append(device)

    async def read(key: tuple) -> list[jax.Array]:
        out = hostmem.empty(tuple(stop - start for start, stop in key), dtype)
        source = store[tuple(slice(*k) for k in key)]
        if source.dtype.numpy_dtype != dtype:  # TensorStore converts only when told (rounding to nearest even)
            source = ts.cast(source, ts.dtype(dtype.name))
        await ts.array(out).write(source.translate_to[0] if store.rank else source)
        return [jax.device_put(out, device) for device in boxes[key]]

    shards = [shard for group in await asyncio.gather(*map(read, boxes)) for shard in group]
    return jax.make_array_from_single_device_arrays(shape, sharding, shards)


def _restore_handler() -> ocp.PyTreeCheckpointHandler:
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, _HostArrayHandler()))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_item(directory: str, targets: dict[tuple, jax.ShapeDtypeStruct]) -> dict[tuple, jax.Array]:
    """One Orbax item's arrays, each straight into its target sharding."""
    tree = nest(targets)
    checkpointer = ocp.Checkpointer(_restore_handler())
    try:
        result = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree)))
    finally:
        checkpointer.close()
    out = {}
    for path in targets:
        node = result
        for part in path:
            node = node[str(part)]
        out[path] = node
    jax.block_until_ready(list(out.values()))
    return out


def load(directory: str | os.PathLike, *, dtype, mesh: jax.sharding.Mesh | None = None,
         shardings: ShardingSpec | None = None, progress: bool | None = None, workers: int | None = None) -> Model1:
    """Restores a checkpoint written by `save` or the converter as a `Model1` computing in `dtype`.

    Dense weights are restored in `dtype` (the parameters the reference keeps in float32 stay
    float32); FP8/FP4 parameters stay block-quantized and are dequantized on the fly by each layer.
    Every array is read directly into its sharding:
      shardings   a callable `(path, jax.ShapeDtypeStruct) -> Sharding`, or a mapping `{path: Sharding}`;
                  `path` is the parameter path of `nnx.to_flat_state` (e.g. `('layers', 0, 'self_attn',
                  'q_a_proj', 'kernel')`), plus `'values'` / `'scales'` for the two arrays of a quantized
                  parameter (a mapping entry for the parameter itself covers both);
      mesh        without shardings: replicate everything over this mesh;
      neither     the default device.
    `progress` shows a bar with the read rate, item by item (default: when stderr is a terminal); `workers`
    items are restored at a time (default: the CPUs).
    """
    root = resolve(directory)
    manifest = read_manifest(root)
    config = config_from_json(manifest["config"])
    graphdef, flat = abstract_model(config, dtype)
    stored = manifest["params"]
    problems, abstract = [], {}
    for path, var in flat:
        want, entry = var.get_value(), stored.get(path_key(path))
        if entry is None:
            problems.append(f"missing parameter {path_key(path)} {list(want.shape)}")
        elif tuple(entry["shape"]) != tuple(want.shape):
            problems.append(f"{path_key(path)}: stored shape {entry['shape']}, the model needs {list(want.shape)}")
        elif "format" in entry and not jnp.issubdtype(want.dtype, jnp.floating):
            problems.append(f"{path_key(path)}: stored block-quantized, but the model holds {want.dtype}")
        else:
            abstract[path] = want
    model_keys = {path_key(p) for p, _ in flat}
    problems += [f"unexpected parameter {k}" for k in stored if k not in model_keys]
    if problems:
        raise CheckpointError(root, problems)

    sharding_of = _sharding_fn(mesh, shardings)
    items: dict[str, dict[tuple, jax.ShapeDtypeStruct]] = {}
    missing = []
    for path, want in abstract.items():
        entry = stored[path_key(path)]
        if "format" in entry:
            values_shape = (quant.packed_shape(want.shape, entry["pack_axis"]) if entry["format"] == quant.FP4
                            else tuple(want.shape))
            arrays = {(*path, "values"): values_shape,
                      (*path, "scales"): quant.scale_shape(want.shape, entry["block"])}
            arrays = {p: jax.ShapeDtypeStruct(s, jnp.uint8) for p, s in arrays.items()}
        else:
            arrays = {path: jax.ShapeDtypeStruct(want.shape, want.dtype)}
        for p, sds in arrays.items():
            try:
                sharding = sharding_of(p, sds)
            except KeyError:
                missing.append(path_key(p))
                continue
            items.setdefault(entry["item"], {})[p] = jax.ShapeDtypeStruct(sds.shape, sds.dtype, sharding=sharding)
    if missing:
        raise ValueError(f"load: shardings has no entry for {len(missing)} array(s), e.g. {missing[:5]}")

    total = sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for ts in items.values() for t in ts.values())
    # Items are restored concurrently: Orbax's per-item work (metadata, its event loop) then overlaps the reads.
    # Under jax.distributed one at a time, as every process must restore the same item together.
    threads = 1 if jax.process_count() > 1 else min(len(items), default_workers() if workers is None else workers)
    restored: dict[tuple, jax.Array] = {}
    with progress_bar(total, "loading", progress) as bar, ThreadPoolExecutor(max(1, threads)) as pool:
        futures = [pool.submit(_restore_item, os.path.join(root, item), targets) for item, targets in items.items()]
        try:
            for future, targets in zip(futures, items.values()):
                restored.update(future.result())
                bar.update(sum(math.prod(t.shape) * np.dtype(t.dtype).itemsize for t in targets.values()))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    values = {}
    for path in abstract:
        entry = stored[path_key(path)]
        if "format" in entry:
            values_dtype = np.dtype(entry["values_dtype"])
            v, s = restored[(*path, "values")], restored[(*path, "scales")]
            values[path] = quant.BlockQuantized(
                v if values_dtype == np.uint8 else _reinterpret(v, values_dtype), _reinterpret(s, quant.E8M0),
                entry["format"], tuple(entry["block"]), entry["pack_axis"]).check()
        else:
            values[path] = restored[path]
    return merge(graphdef, flat, values)
