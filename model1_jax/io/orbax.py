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
Every file of the version is on disk (fsync) before the rename. `save` leaves that to TensorStore, which
fsyncs each file as it writes it (OCDBT items). The streaming converter's `Writer(defer_sync=True)`
writes host arrays differently: its items are written without OCDBT, one zarr array per parameter array
holding a single uncompressed chunk, and that chunk file is written with direct I/O from the array's
memory to the disk (`io.direct_write`), not copied through the page cache — whose new pages a virtual
machine may first have to obtain from its host, at several times the cost of the copy. A second thread
fsyncs each finished item (file sizes, metadata, the device's cache) while the next ones are read and
written, and drops what the page cache holds of it (the small metadata files). On the benchmark this took
the fp8 conversion from 0.60 to 1.11 GB/s and the bf16 one from 0.20 to 0.32 (docs/checkpoints.md §8.3).
Both layouts are Orbax's own, and `load` reads either.
FP8 values and UE8M0 scales are stored as their uint8 bit patterns (bit-exact, and independent of
which float8 types a given Orbax/TensorStore version supports); the manifest records their dtype.

"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from model1_jax.config import Config, DSparkConfig, RopeScaling
from model1_jax.io import orbax_handlers
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
    holds). With `defer_sync` (host arrays only), items are written without OCDBT and without per-file fsync,
    each array's bytes with direct I/O (`orbax_handlers.DirectNumpyHandler`: an array starting on a block goes
    direct in whole blocks), and a third thread fsyncs each finished item (then drops its pages
    from the page cache) while the next ones are written; the commit waits for it, so the guarantee is the
    same. Use as a context manager: the version is committed on normal exit and discarded if an exception
    escapes.
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
        self._checkpointer = ocp.Checkpointer(orbax_handlers.handler(sync=not defer_sync))
        if defer_sync:
            logging.getLogger("absl").addFilter(orbax_handlers.NO_OCDBT_MERGE_WARNING)
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
        logging.getLogger("absl").removeFilter(orbax_handlers.NO_OCDBT_MERGE_WARNING)


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
