"""Host buffers for loaded weights: page-aligned, in small pages, faulted in at once.

Loading creates gigabytes of new host memory that is written once (read or dequantized into) and then handed
to XLA or to the checkpoint writer. NumPy asks the kernel for transparent huge pages on every array of 4 MiB or
more (`madvise(MADV_HUGEPAGE)`), which the kernel follows in its default THP mode `madvise`. On virtual machines
whose host takes back guest memory that has been free for a while (free-page reporting, as on this project's
machines), clearing such a 2 MiB page costs far more than small pages do (the host provides it again). Measured here
(docs/checkpoints.md §7.4): touching 1 GiB of such memory costs 1.65-2.68 s of kernel time with the advice and
0.30-0.33 s without; memory freed a moment earlier costs 0.17-0.21 s in huge pages. So the loaders' buffers come
from private anonymous maps advised `MADV_NOHUGEPAGE` and populated in one call (`MADV_POPULATE_WRITE`): at
worst about 0.1 s per GiB more than huge pages, at best 2 s per GiB less.

`empty` is the allocator of every loader buffer, `m1.load`'s included (`reused=True` for a long-lived buffer refilled
many times, the converter's ring, which keeps huge pages).
"""

from __future__ import annotations

import math
import mmap

import numpy as np

# Below this NumPy does not ask for huge pages either, and a map per array would cost more than it saves.
MAP_BYTES = 4 << 20
ALIGN = 64  # JAX's CPU backend adopts (does not copy) a buffer aligned to 64 bytes in `device_put`

_NOHUGEPAGE = getattr(mmap, "MADV_NOHUGEPAGE", None)  # Linux only; elsewhere a plain map
_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if _NOHUGEPAGE is not None else None)  # Linux ≥ 5.14


def empty(shape, dtype, *, reused: bool = False, populate: bool = True) -> np.ndarray:
    """An uninitialised C-contiguous array, 64-byte aligned; from 4 MiB up in its own anonymous map (freed, like
    any array, when the last reference goes). A buffer written once (the default) is advised against huge pages
    and faulted in at once. A `reused` one — long-lived, refilled over and over, like the converter's ring — is
    advised to use huge pages and faulted lazily by the threads that first write it: their first touch is paid
    once, and the transposes writing into it again and again gain from the TLB's reach (the bf16 conversion ran
    0.141 / 0.115 GB/s against 0.123 / 0.086 in small pages, two interleaved pairs)."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MAP_BYTES:
        raw = np.empty(nbytes + ALIGN, np.uint8)
        start = -raw.ctypes.data % ALIGN
        return raw[start:start + nbytes].view(dtype).reshape(shape)
    # private (Python's default for an anonymous map is shared: tmpfs pages), page-aligned, zero-filled
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for advice in (_HUGEPAGE,) if reused else (_NOHUGEPAGE, _POPULATE_WRITE) if populate else (_NOHUGEPAGE,):
        # Populating faults every page in one call, the kernel's loop instead of one trap per page as the
        # copies first write it (half the kernel time here). Older kernels refuse it: pages then come lazily.
        if advice is not None:
            try:
                region.madvise(advice)
            except OSError:
                pass
    return np.frombuffer(region, dtype, math.prod(shape)).reshape(shape)


def populate(array: np.ndarray) -> None:
    """Faults in the pages of an `empty(..., populate=False)` array in one call (see `empty`). Safe while other
    threads write to it: pages already present are left as they are, contents are never touched."""
    region = array
    while isinstance(region, np.ndarray | memoryview):
        region = region.base if isinstance(region, np.ndarray) else region.obj
    if _POPULATE_WRITE is None or not isinstance(region, mmap.mmap):
        return
    try:
        region.madvise(_POPULATE_WRITE)
    except (OSError, AttributeError):
        pass
