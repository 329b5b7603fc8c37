"""The Orbax handlers that write a checkpoint item's arrays (`io.orbax`'s `save` and `Writer`).

`save` writes OCDBT items through TensorStore, which fsyncs every file. The streaming converter writes its items
without OCDBT: each array is a zarr v2 array of its own whose single chunk file holds exactly the array's bytes
(uncompressed, C order), and that file is written with direct I/O from the converter's buffer to the disk
(`io.direct_write`, docs/checkpoints.md §8.3), not by TensorStore through the page cache. Orbax reads both
layouts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from model1_jax.io import direct_write


class DirectNumpyHandler(ocp.type_handlers.NumpyHandler):
    """The streaming converter's NumPy leaves. The item is written without OCDBT, so that every array is a zarr
    array of its own whose single chunk file holds exactly the array's bytes (uncompressed, C order). TensorStore
    creates the array (its `.zarray`), and the chunk file is written here with `direct_write`, from the array's
    memory to the disk rather than through the page cache. Where the array is not such a chunk (another Orbax
    layout), TensorStore writes it. No per-file fsync: the Writer fsyncs the item afterwards, through a child
    context per Orbax context (Orbax makes one per save)."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)

    async def serialize(self, values, infos, args=None):
        children: dict[int, ts.Context] = {}  # by id of the parent, which the infos keep alive meanwhile
        for info in infos:
            parent = info.ts_context
            if id(parent) not in children:
                children[id(parent)] = ts.Context(ts.Context.Spec({"file_io_sync": False}), parent)
            info.ts_context = children[id(parent)]
        return await super().serialize(values, infos, args)

    # NumpyHandler's step for one array (private to Orbax: were a version to stop calling it, TensorStore would
    # write every array, correctly but through the page cache, and test_parallel_load would say so)
    async def _open_and_write(self, value, tspec, ts_context):
        store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        chunk = raw_chunk_file(store, value)
        if chunk is None:
            await store.write(value, can_reference_source_data_indefinitely=True)  # as NumpyHandler does
        else:
            await asyncio.to_thread(direct_write.write_new_file, chunk, value)


def raw_chunk_file(store: ts.TensorStore, value: np.ndarray) -> str | None:
    """The path of the file holding `store`'s data if that is a single uncompressed chunk whose bytes are
    `value`'s own (zarr v2 on the local file system, one chunk of the whole shape, C order, no filters, the
    same element width, little-endian), else None."""
    spec = store.spec().to_json()
    meta, kvstore = spec.get("metadata", {}), spec.get("kvstore", {})
    raw = (spec.get("driver") == "zarr" and kvstore.get("driver") == "file" and meta.get("compressor") is None
           and not meta.get("filters") and meta.get("order") == "C" and list(meta.get("chunks", ())) ==
           list(value.shape) and list(meta.get("shape", ())) == list(value.shape) and value.flags.c_contiguous
           and store.dtype.numpy_dtype.itemsize == value.dtype.itemsize and sys.byteorder == "little"
           and not str(meta.get("dtype", "")).startswith(">"))
    if not raw:
        return None
    key = meta.get("dimension_separator", ".").join("0" * value.ndim) or "0"
    return os.path.join(kvstore["path"], key)


class _NoOcdbtMergeWarning(logging.Filter):
    """Drops the warning Orbax logs after saving every item written without OCDBT, that it found no OCDBT files
    to merge (it tries unconditionally): the converter's items are written so on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping merge of OCDBT checkpoints" not in str(record.msg)


NO_OCDBT_MERGE_WARNING = _NoOcdbtMergeWarning()


def handler(sync: bool = True) -> ocp.PyTreeCheckpointHandler:
    """PyTree handler whose NumPy leaves are written without the defensive host copy (the copy would double the
    converter's buffer while it is written). `sync`: TensorStore writes and fsyncs every file, into OCDBT (`save`);
    else `DirectNumpyHandler` writes the arrays, one zarr array each, and the Writer fsyncs them."""
    numpy_handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False) if sync else DirectNumpyHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, numpy_handler), (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    # Uncompressed: zstd costs more time than it saves on FP8/FP4 codes and bf16 mantissas, and its
    # output buffers would add a copy of each item to the converter's peak memory.
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False, use_ocdbt=sync)
