"""`io.direct_write` and the converter's zarr chunks: the file holds the array's bytes whichever way they went
(direct, buffered, or direct with a buffered tail), and a chunk written so reads back through TensorStore."""

import errno
import os

import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts

from model1_jax.io import direct_write, hostmem, orbax_handlers
from tests.util import takes_direct_io

BLOCK = direct_write.BLOCK


def _aligned(nbytes: int, seed: int = 0) -> np.ndarray:
    """Random bytes in a map of their own (page-aligned: hostmem maps from 4 MiB) or a 64-byte aligned array."""
    out = hostmem.empty((max(nbytes, hostmem.MAP_BYTES),), np.uint8)[:nbytes]
    out[...] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)
    return out


@pytest.mark.parametrize("nbytes", [0, 1, BLOCK - 1, BLOCK, 5 * BLOCK + 123, (3 << 20) + 7])
def test_bytes_are_the_arrays_and_whole_blocks_go_direct(nbytes, tmp_path, monkeypatch):
    monkeypatch.setattr(direct_write, "PIECE", 2 * BLOCK)  # several write calls per file
    array = _aligned(nbytes)
    path = tmp_path / "chunk"
    path.write_bytes(b"x" * (nbytes + 10_000))  # a longer file is truncated
    direct = direct_write.write_new_file(path, array)
    assert path.read_bytes() == array.tobytes()
    assert direct == (nbytes // BLOCK * BLOCK if takes_direct_io(tmp_path) else 0)


def test_unaligned_memory_is_written_buffered(tmp_path):
    array = _aligned(3 * BLOCK + 1)[1:]
    assert direct_write.write_new_file(tmp_path / "chunk", array) == 0
    assert (tmp_path / "chunk").read_bytes() == array.tobytes()


def test_file_systems_without_direct_io_get_the_same_bytes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    array = _aligned(4 * BLOCK + 5, seed=1)
    assert direct_write.write_new_file(tmp_path / "chunk", array) == 0
    assert (tmp_path / "chunk").read_bytes() == array.tobytes()


def test_a_device_refusing_the_alignment_midway_gets_a_buffered_rest(tmp_path, monkeypatch):
    if not takes_direct_io(tmp_path):
        pytest.skip("this file system does not take O_DIRECT")
    monkeypatch.setattr(direct_write, "PIECE", 2 * BLOCK)
    real_pwrite, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:  # the second direct write: as a device wanting a larger alignment would answer
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    array = _aligned(7 * BLOCK + 9, seed=2)
    assert direct_write.write_new_file(tmp_path / "chunk", array) == 2 * BLOCK
    assert (tmp_path / "chunk").read_bytes() == array.tobytes()


def test_other_errors_surface(tmp_path):
    with pytest.raises(FileNotFoundError):
        direct_write.write_new_file(tmp_path / "missing" / "chunk", _aligned(BLOCK))
    with pytest.raises(ValueError, match="not C-contiguous"):
        direct_write.write_new_file(tmp_path / "chunk", np.zeros((4, 4), np.uint8).T)


@pytest.mark.parametrize("shape,dtype", [((), np.float32), ((4097,), np.uint8), ((64, 96), jnp.bfloat16),
                                         ((3, 40, 33), np.float32)])
def test_a_raw_chunk_written_directly_reads_back_through_tensorstore(shape, dtype, tmp_path):
    """The chunk file `raw_chunk_file` names, filled by `write_new_file`, is the array TensorStore reads (the
    spec is the one Orbax writes for the converter's items: zarr v2, one chunk, uncompressed)."""
    value = hostmem.empty(shape, dtype)
    value[...] = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "a.b")},
            "metadata": {"shape": list(shape), "chunks": list(shape), "compressor": None},
            "dtype": np.dtype(dtype).name}
    store = ts.open(spec, create=True, open=True).result()
    chunk = orbax_handlers.raw_chunk_file(store, value)
    assert chunk is not None
    direct_write.write_new_file(chunk, value)
    got = ts.open({**spec, "metadata": {}}, open=True).result().read().result()
    assert got.dtype == value.dtype and got.tobytes() == value.tobytes()


@pytest.mark.parametrize("change", ["compressed", "two_chunks", "fortran", "wider_value"])
def test_other_layouts_are_left_to_tensorstore(change, tmp_path):
    value = np.zeros((64, 32), np.float32)
    meta = {"shape": [64, 32], "chunks": [64, 32], "compressor": None}
    if change == "compressed":
        meta["compressor"] = {"id": "zstd", "level": 1}
    elif change == "two_chunks":
        meta["chunks"] = [32, 32]
    elif change == "fortran":
        meta["order"] = "F"
    dtype = "float32" if change != "wider_value" else "uint16"
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(tmp_path / "a")}, "metadata": meta,
            "dtype": dtype}
    store = ts.open(spec, create=True, open=True).result()
    assert orbax_handlers.raw_chunk_file(store, value) is None
