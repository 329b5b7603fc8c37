"""Host buffers for loaded weights: 64-byte aligned, in small pages, faulted in by the threads that write them.

Loading creates gigabytes of new host memory that is written once (read or dequantized into) and then handed
to XLA or to the checkpoint writer. What the kernel charges to create a page then matters as much as the copies
(docs/checkpoints.md §7.4). NumPy asks the kernel for transparent huge pages on every array of 4 MiB or more
(`madvise(MADV_HUGEPAGE)`), which the kernel follows in its default THP mode `madvise`. On virtual machines
whose host takes back guest memory that has been free for a while (free-page reporting, as on this project's
machines), creating such a 2 MiB page costs far more than small pages do: 3.4 s against 1.0-1.1 s per 1.3 GB
here. So the loaders' buffers are private anonymous maps advised `MADV_NOHUGEPAGE`.

Their pages are faulted in by the writes that fill them, in every reading thread at once. Populating a buffer in
one call (`MADV_POPULATE_WRITE`) saves the traps, but on this machine's current kernel it does not run in
parallel: two threads populating 650 MB each took as long as one thread populating both, while two threads reading
into lazily faulted memory took half the time of one (1.35-1.45 s against 2.2-2.5 s for the 1.4 GB benchmark
checkpoint read into new memory by two threads, populated first or not).

`empty` is the allocator of every loader buffer, `m1.load`'s included (`huge_pages=True` for a long-lived buffer
refilled many times: the readers' scratch, the dense conversions' ring).
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


def empty(shape, dtype, *, huge_pages: bool = False, align: int = ALIGN) -> np.ndarray:
    """An uninitialised C-contiguous array starting on an `align`-byte boundary (64 by default; at most a page);
    from 4 MiB up in its own anonymous map (page-aligned; freed, like any array, when the last reference goes). A
    buffer written once (the default) is advised against huge pages; its writers fault its pages in. One that is
    long-lived and refilled over and over, like a dense conversion's ring, may ask for them (`huge_pages`): their
    first touch is paid once, and the transposes writing into it again and again gain from the TLB's reach (the bf16
    conversion ran 0.141 / 0.115 GB/s against 0.123 / 0.086 in small pages, two interleaved pairs)."""
    dtype = np.dtype(dtype)
    shape = tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if align > mmap.PAGESIZE:
        raise ValueError(f"hostmem.empty: alignment {align} is over a page ({mmap.PAGESIZE} bytes)")
    if nbytes < MAP_BYTES:
        raw = np.empty(nbytes + align, np.uint8)
        start = -raw.ctypes.data % align
        return raw[start:start + nbytes].view(dtype).reshape(shape)
    # private (Python's default for an anonymous map is shared: tmpfs pages), page-aligned, zero-filled
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = _HUGEPAGE if huge_pages else _NOHUGEPAGE
    if advice is not None:
        try:
            region.madvise(advice)
        except OSError:  # THP compiled out: small pages either way
            pass
    return np.frombuffer(region, dtype, math.prod(shape)).reshape(shape)
