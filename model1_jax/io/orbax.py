"""Orbax checkpoints of a Model1: the format, `save`, and the `Writer` the streaming converter shares
(`io.orbax_load` restores them).

Layout of a checkpoint directory DIR:

    DIR/checkpoint-000007/        the committed checkpoint (normally the only one)
        model1.json               format version, the Config, and for every parameter its Orbax item,
                                  shape, dtype, and FP8/FP4 block layout when stored quantized
        params-00000/ …           Orbax PyTree checkpoints of the arrays, nested by parameter path
                                  (`save` writes one; the converter starts a new one whenever its
                                  host buffer reaches a budget, which bounds its memory)
    DIR/.tmp-checkpoint-000008-…  a save in progress: ignored by `load`, removed by the next save

A save writes the new version beside the old one, commits it with one atomic `rename`, and only
then deletes older versions, so a save interrupted at any point — exception or killed process —
leaves the previous checkpoint loadable (Orbax's own commit is per item, which is not enough here).
Every file of the version is on disk (fsync) before the rename. TensorStore fsyncs each file as it
writes it, which serialises an item's write on the disk (about 0.8 GB/s here against 3 GB/s into the
page cache); the streaming converter's `Writer(defer_sync=True)` instead writes host arrays without it
and fsyncs each finished item from a second thread while the next ones are read and written. Once on
disk, an item's pages are dropped from the page cache: the next items' writes reuse that memory rather than
take pages the kernel has not touched yet — which a virtual machine may first have to obtain from its host,
at several times the cost of the copy (the fp8 conversion ran 0.39 → 0.65 GB/s here with it).
FP8 values and UE8M0 scales are stored as their uint8 bit patterns (bit-exact, and independent of
which float8 types a given Orbax/TensorStore version supports); the manifest records their dtype.

"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import sys
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from model1_jax.config import Config, DSparkConfig, RopeScaling
from model1_jax.io import direct_write
from model1_jax.io.hf import CheckpointError
from model1_jax.model import quant
from model1_jax.model.transformer import Model1, abstract_model

# Version 2 keeps the routed experts output axis first ([e, f, d] gate/up, [e, d, f] down), as the released
# checkpoints store them; version 1 (input axis first) is refused with the way out (`read_manifest`).
FORMAT, FORMAT_VERSION = "model1-jax", 2
MANIFEST = "model1.json"
_VERSION_RE = re.compile(r"^checkpoint-(\d{6,})$")
QUANT_ARRAYS = ("values", "scales")


# -- config ----------------------------------------------------------------------------------------

def config_to_json(config: Config) -> dict[str, Any]:
    """Every Config field as JSON (faithful: `Config.to_hf` drops fields such as `mtp_layer_type`)."""
    return dataclasses.asdict(config)


def config_from_json(d: Mapping[str, Any]) -> Config:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    if d.get("dspark") is not None:
        d["dspark"] = DSparkConfig(**d["dspark"])
    unknown = set(d) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ValueError(f"checkpoint config has fields this version does not know: {sorted(unknown)}")
    return Config(**d)


# -- directory layout ------------------------------------------------------------------------------

def _versions(directory: str) -> list[tuple[int, str]]:
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), e) for e in os.listdir(directory) if (m := _VERSION_RE.match(e))]
    return sorted(found)


def resolve(directory: str | os.PathLike) -> str:
    """The committed checkpoint a path refers to: DIR/checkpoint-N (latest) or a checkpoint-N itself.

    Absolute, because Orbax refuses relative paths."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isfile(os.path.join(directory, MANIFEST)):
        return directory
    versions = _versions(directory)
    if not versions:
        raise FileNotFoundError(f"{directory!r} holds no model1-jax checkpoint (no {MANIFEST} and no "
                                "checkpoint-NNNNNN/ inside)")
    return os.path.join(directory, versions[-1][1])


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether `path` is a checkpoint directory written by `save` or the converter."""
    try:
        resolve(path)
        return True
    except FileNotFoundError:
        return False


def _fsync(path: str, drop: bool = False) -> None:
    """fsync of a file or a directory (through a read-only descriptor, which Linux allows for both); with `drop`,
    the file's pages then leave the page cache (they are clean: on disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        if drop and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _fsync_tree(path: str, drop: bool = False) -> None:
    """fsyncs every file and directory under `path` (files first, then their directories); `drop` as `_fsync`."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            _fsync(os.path.join(root, name), drop)
        _fsync(root)


def path_key(path: tuple) -> str:
    return "/".join(map(str, path))


def nest(flat: dict[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return tree


# -- Orbax items ------------------------------------------------------------------------------------

class _DirectNumpyHandler(ocp.type_handlers.NumpyHandler):
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

    async def _open_and_write(self, value, tspec, ts_context):  # NumpyHandler's step for one array
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


_NO_OCDBT_MERGE_WARNING = _NoOcdbtMergeWarning()


def _handler(sync: bool = True) -> ocp.PyTreeCheckpointHandler:
    """PyTree handler whose NumPy leaves are written without the defensive host copy (the copy would double the
    converter's buffer while it is written). `sync`: TensorStore writes and fsyncs every file, into OCDBT (`save`);
    else `_DirectNumpyHandler` writes the arrays, one zarr array each, and the Writer fsyncs them."""
    numpy_handler = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False) if sync else _DirectNumpyHandler()
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, numpy_handler), (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    # Uncompressed: zstd costs more time than it saves on FP8/FP4 codes and bf16 mantissas, and its
    # output buffers would add a copy of each item to the converter's peak memory.
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False, use_ocdbt=sync)


_bitcast = jax.jit(jax.lax.bitcast_convert_type, static_argnums=1)  # keeps the input's sharding


def _as_bits(array):
    """uint8 bit pattern of a float8 array (host or device; a device array keeps its sharding)."""
    if np.dtype(array.dtype) == np.uint8:
        return array
    return array.view(np.uint8) if isinstance(array, np.ndarray) else _bitcast(array, jnp.uint8)


def check_destination(directory: str | os.PathLike, *, overwrite: bool) -> None:
    """Raises FileExistsError unless a checkpoint may be written to `directory` (nothing is touched).

    Allowed: a missing or empty directory, or one holding a checkpoint when `overwrite` is set. Any
    other content is never deleted.
    """
    directory = os.fspath(directory)
    if not os.path.exists(directory):
        return
    if not os.path.isdir(directory):
        raise FileExistsError(f"{directory!r} exists and is not a directory")
    if _versions(directory) and not overwrite:
        raise FileExistsError(f"{directory!r} already holds a checkpoint; pass overwrite=True "
                              "(--overwrite) to replace it")
    foreign = [e for e in os.listdir(directory) if not _VERSION_RE.match(e)
               and not e.startswith((".tmp-checkpoint-", ".trash-checkpoint-"))]
    if foreign:
        raise FileExistsError(f"{directory!r} is not empty and not a model1-jax checkpoint "
                              f"(found {sorted(foreign)[:5]}); refusing to write into it")


class Writer:
    """Writes one checkpoint version into a temporary directory and commits it atomically.

    `add` parameters one at a time; they are buffered and written as Orbax items, a new item
    whenever the buffer would exceed `budget_bytes` (None: one item). With `background`, an item is written
    by a thread while the next one is filled (at most one at a time; `writing_bytes` says how much it
    holds). With `defer_sync` (host arrays only), items are written without TensorStore's per-file fsync
    and a third thread fsyncs each finished item (then drops its pages from the page cache) while the next
    ones are written; the commit waits for it, so the guarantee is the same. Use as a context manager: the
    version is committed on normal exit and discarded if an exception escapes.
    """

    def __init__(self, directory: str | os.PathLike, config: Config, *, overwrite: bool = False,
                 budget_bytes: int | None = None, background: bool = False, defer_sync: bool = False):
        if jax.process_count() > 1:
            raise NotImplementedError(
                f"m1.save writes from a single process, and this run has {jax.process_count()} (jax.distributed): "
                "save from a single-process run, or keep Orbax training checkpoints (train.loop.TrainCheckpointer), "
                "which every process writes")
        self.directory = directory = os.path.abspath(os.fspath(directory))  # Orbax refuses relative paths
        self.config = config
        self.budget_bytes = budget_bytes
        check_destination(directory, overwrite=overwrite)
        self.committed = _versions(directory)
        os.makedirs(directory, exist_ok=True)
        number = (self.committed[-1][0] if self.committed else 0) + 1
        self.final = os.path.join(directory, f"checkpoint-{number:06d}")
        self.tmp = os.path.join(directory, f".tmp-checkpoint-{number:06d}-{uuid.uuid4().hex[:12]}")
        os.mkdir(self.tmp)
        self.entries: dict[str, dict] = {}
        self.items: list[str] = []
        self._buffer: dict[tuple, Any] = {}
        self.buffer_bytes = self.writing_bytes = 0
        self.saved = 0  # items whose Orbax save has returned: their arrays are no longer used
        self.defer_sync = defer_sync
        self._checkpointer = ocp.Checkpointer(_handler(sync=not defer_sync))
        if defer_sync:
            logging.getLogger("absl").addFilter(_NO_OCDBT_MERGE_WARNING)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="model1-write") if background else None
        self._syncer = ThreadPoolExecutor(1, thread_name_prefix="model1-fsync") if defer_sync else None
        self._writing: Future | None = None
        self._syncing: list[Future] = []

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise

    @property
    def _item(self) -> str:
        return f"params-{len(self.items):05d}"

    def reserve(self, nbytes: int) -> None:
        """Flushes first if `nbytes` more would overflow the budget (call before building a parameter)."""
        if self.budget_bytes is not None and self._buffer and self.buffer_bytes + nbytes > self.budget_bytes:
            self.flush()

    def add(self, path: tuple, value) -> None:
        """Buffers one parameter: a NumPy/JAX array or a `BlockQuantized` of either."""
        key = path_key(path)
        if key in self.entries:
            raise ValueError(f"Writer.add: {key} added twice")
        entry: dict[str, Any] = {"item": self._item, "shape": list(value.shape)}
        if isinstance(value, quant.BlockQuantized):
            value.check()
            entry.update(format=value.fmt, block=list(value.block), pack_axis=value.pack_axis,
                         values_dtype=np.dtype(value.values.dtype).name)
            stored = {"values": _as_bits(value.values), "scales": _as_bits(value.scales)}
            self._buffer.update({(*path, k): v for k, v in stored.items()})
            self.buffer_bytes += value.nbytes
        else:
            entry["dtype"] = np.dtype(value.dtype).name
            self._buffer[path] = value
            self.buffer_bytes += value.size * np.dtype(value.dtype).itemsize
        self.entries[key] = entry
        if self.budget_bytes is not None and self.buffer_bytes >= self.budget_bytes:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered parameters as one Orbax item (waiting for the one being written, if any)."""
        if not self._buffer:
            return
        self.wait()
        item, tree = self._item, nest(self._buffer)
        self.items.append(item)
        self._buffer, self.writing_bytes, self.buffer_bytes = {}, self.buffer_bytes, 0
        if self._thread is None:
            self._save(item, tree)
            self.writing_bytes, self.saved = 0, len(self.items)
        else:
            self._writing = self._thread.submit(self._save, item, tree)

    def _save(self, item: str, tree: dict) -> None:
        if self.defer_sync:  # only the NumPy handler skips the fsync: a device array would be synced twice
            kinds = {type(leaf).__name__ for leaf in jax.tree.leaves(tree) if not isinstance(leaf, np.ndarray)}
            if kinds:
                raise TypeError(f"Writer(defer_sync=True) writes NumPy arrays only, got {sorted(kinds)}")
        path = os.path.join(self.tmp, item)
        self._checkpointer.save(path, args=ocp.args.PyTreeSave(tree))
        del tree
        gc.collect(1)  # Orbax's save leaves (young) reference cycles that hold the arrays until collected
        if self._syncer is not None:
            self._syncing.append(self._syncer.submit(_fsync_tree, path, True))

    def wait(self) -> None:
        """Returns when no item is being written; raises what writing it raised."""
        writing, self._writing = self._writing, None
        if writing is not None:
            writing.result()
        self.writing_bytes, self.saved = 0, len(self.items)
        for future in self._syncing:  # a failed fsync stops the conversion now rather than at the commit
            if future.done() and future.exception() is not None:
                future.result()

    @property
    def writing(self) -> bool:
        """Whether an item is being written in the background."""
        return self._writing is not None

    def wait_synced(self) -> None:
        """Returns when every written item is on disk (defer_sync); raises what an fsync raised."""
        syncing, self._syncing = self._syncing, []
        for future in syncing:
            future.result()

    def commit(self) -> str:
        """Flushes, writes the manifest, renames the version into place, then removes older versions."""
        self.flush()
        self.wait()
        self.wait_synced()
        self._close()
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_to_json(self.config),
                    "items": self.items, "params": self.entries}
        with open(os.path.join(self.tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        _fsync(os.path.join(self.tmp, MANIFEST))
        _fsync(self.tmp)
        os.rename(self.tmp, self.final)  # the commit point
        _fsync(self.directory)
        for name in os.listdir(self.directory):
            stale = (_VERSION_RE.match(name) and os.path.join(self.directory, name) != self.final) or \
                name.startswith((".tmp-checkpoint-", ".trash-checkpoint-"))
            if stale:
                # Renamed first, so a half-deleted directory never looks like a committed version.
                trash = os.path.join(self.directory, name if name.startswith(".") else f".trash-{name}")
                os.rename(os.path.join(self.directory, name), trash)
                shutil.rmtree(trash, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        self._buffer.clear()
        for wait in (self.wait, self.wait_synced):
            try:
                wait()
            except BaseException:  # noqa: BLE001 - the version is being discarded anyway
                pass
        self._close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _close(self) -> None:
        for pool in (self._thread, self._syncer):
            if pool is not None:
                pool.shutdown()
        self._checkpointer.close()
        logging.getLogger("absl").removeFilter(_NO_OCDBT_MERGE_WARNING)


# -- save / load ------------------------------------------------------------------------------------

def save(model_or_state: Model1 | nnx.State, directory: str | os.PathLike, *, config: Config | None = None,
         overwrite: bool = False) -> str:
    """Saves a model's parameters and config as an Orbax checkpoint; returns the committed path.

    `model_or_state` is a `Model1` or its `nnx.state(...)` (then `config` is required). Parameters may
    be dense or `BlockQuantized`, on any devices and shardings. An existing checkpoint in `directory` is
    replaced only with `overwrite=True`, atomically (see the module docstring).
    """
    if isinstance(model_or_state, Model1):
        config = config or model_or_state.config
        state = nnx.state(model_or_state)
    elif isinstance(model_or_state, nnx.State):
        if config is None:
            raise ValueError("save: pass config= when saving an nnx.State")
        state = model_or_state
    else:
        raise TypeError(f"save: expected a Model1 or an nnx.State, got {type(model_or_state).__name__}")
    flat = list(nnx.to_flat_state(state))
    _check_against_config({p: v.get_value() for p, v in flat}, config, "save")
    with Writer(directory, config, overwrite=overwrite) as writer:
        for path, var in flat:
            writer.add(path, var.get_value())
    return writer.final


def _check_against_config(values: dict[tuple, Any], config: Config, where: str) -> None:
    _, abstract = abstract_model(config, jnp.float32)
    want = {p: tuple(v.get_value().shape) for p, v in abstract}
    problems = [f"missing parameter {path_key(p)}" for p in want if p not in values]
    problems += [f"unexpected parameter {path_key(p)}" for p in values if p not in want]
    problems += [f"{path_key(p)}: shape {list(values[p].shape)}, the config needs {list(want[p])}"
                 for p in want if p in values and tuple(values[p].shape) != want[p]]
    if problems:
        raise CheckpointError(where, problems)


def read_config(directory: str | os.PathLike) -> Config:
    """The Config stored in a checkpoint."""
    return config_from_json(read_manifest(resolve(directory))["config"])


def read_manifest(root: str) -> dict:
    with open(os.path.join(root, MANIFEST)) as f:
        manifest = json.load(f)
    if manifest.get("format") == FORMAT and manifest.get("format_version") == 1:
        raise CheckpointError(root, [f"{MANIFEST}: format version 1 keeps the routed experts input axis first "
                                     f"([e, d, f] gate/up), this version output axis first (version "
                                     f"{FORMAT_VERSION}); convert the released checkpoint again "
                                     "(scripts/convert_checkpoint.py), or load this one with the model1-jax "
                                     "that wrote it and move the experts' last two axes"])
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(root, [f"{MANIFEST}: format {manifest.get('format')!r} version "
                                     f"{manifest.get('format_version')!r}, expected {FORMAT!r} {FORMAT_VERSION}"])
    return manifest
