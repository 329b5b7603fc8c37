"""Host buffers of the loaders (io/hostmem.py): aligned, writable, private small-page maps that their writers fault
in, unmapped with their last reference."""

import gc
import mmap
import sys

import jax
import numpy as np
import pytest

from model1_jax.io import hostmem

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _mapping(address: int) -> dict | None:
    """The /proc/self/smaps entry of the mapping holding `address`: perms, size and fields (kB), VmFlags."""
    entry = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and all(c in "0123456789abcdef-" for c in head[0]):
                if entry is not None:
                    return entry
                start, end = (int(x, 16) for x in head[0].split("-"))
                entry = {"perms": head[1], "size": end - start} if start <= address < end else None
            elif entry is not None:
                key, _, value = line.partition(":")
                entry[key] = value.split() if key == "VmFlags" else int(value.split()[0]) * 1024
    return entry


@pytest.mark.parametrize("shape,dtype", [((3, 5), np.float32), ((0,), np.uint8), ((1024, 2048), np.uint16),
                                         ((4, 1 << 20), np.float32)])
@pytest.mark.parametrize("align", [hostmem.ALIGN, 4096])
def test_empty_is_an_aligned_writable_array(shape, dtype, align):
    array = hostmem.empty(shape, dtype, align=align)
    assert array.shape == shape and array.dtype == dtype
    assert array.flags.c_contiguous and array.flags.writeable
    assert array.size == 0 or array.ctypes.data % align == 0  # (an empty array has no data to align)
    values = np.arange(array.size, dtype=np.int64).astype(dtype).reshape(shape)
    array[...] = values
    np.testing.assert_array_equal(array, values)


def test_alignment_over_a_page_is_refused():
    with pytest.raises(ValueError, match="over a page"):
        hostmem.empty((8,), np.uint8, align=2 * mmap.PAGESIZE)


@linux
def test_large_buffers_are_private_small_page_maps_faulted_by_their_writers_and_freed():
    nbytes = 2 * hostmem.MAP_BYTES
    array = hostmem.empty((nbytes // 4,), np.float32)
    address = array.ctypes.data
    assert address % mmap.PAGESIZE == 0
    entry = _mapping(address)
    assert entry["size"] == nbytes, entry  # a map of its own
    assert entry["perms"] == "rw-p", entry  # private: not tmpfs pages (Python's default anonymous map is shared)
    assert "nh" in entry["VmFlags"], entry  # MADV_NOHUGEPAGE
    assert entry["Rss"] == 0, entry  # nothing faulted in before the writers get there (each thread its own pages)
    array[: nbytes // 8] = 2.0
    entry = _mapping(address)
    assert entry["Rss"] == nbytes // 2 and entry.get("AnonHugePages", 0) == 0, entry  # in small pages
    view = array[5:]  # a view keeps the map alive …
    del array
    gc.collect()
    assert _mapping(address) is not None
    del view  # … and the last reference unmaps it
    gc.collect()
    entry = _mapping(address)
    assert entry is None or entry["size"] != nbytes


@linux
def test_buffers_asking_for_huge_pages_are_advised_so_and_faulted_lazily():
    array = hostmem.empty((2 * hostmem.MAP_BYTES,), np.uint8, huge_pages=True)
    entry = _mapping(array.ctypes.data)
    assert entry["perms"] == "rw-p" and "hg" in entry["VmFlags"], entry  # MADV_HUGEPAGE
    assert entry["Rss"] == 0  # nothing faulted yet: the writers fault it as they go
    array[...] = 1
    assert int(array.sum()) == array.size


@pytest.mark.parametrize("shape", [(3, 5), (256, 4096)])  # a small (NumPy) and a mapped buffer
def test_host_backend_adopts_the_buffer(shape):
    """`device_put` on the CPU backend keeps the buffer (no copy: the loaders' peak memory counts on it)."""
    array = hostmem.empty(shape, np.float32)
    array[...] = 1.5
    placed = jax.device_put(array, jax.devices("cpu")[0])
    assert placed.unsafe_buffer_pointer() == array.ctypes.data
    assert float(placed.sum()) == 1.5 * array.size
