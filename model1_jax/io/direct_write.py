"""Writing an array's bytes into a new file with direct I/O: from the array's memory to the disk, not through
the page cache.

A buffered write first copies every byte into the page cache, and on a virtual machine whose host takes back
guest memory that has been free for a while (docs/checkpoints.md §7.4) those pages are dear to create: writing
1 GiB into a new file cost 0.6–3 s of kernel time here, in the writing thread, before the fsync waited for the
disk. With `O_DIRECT` the kernel hands the array's own pages to the device instead: 1 GiB took 0.4–0.46 s, fsync
included, with no measurable CPU time (three runs each, side by side). Direct I/O asks for alignment — file
offsets, lengths and memory addresses in whole blocks of the device — and `BLOCK` (4096 bytes) covers the usual
ones. So the aligned bulk of the array goes direct and the rest is written the ordinary way: a tail shorter than
a block, an array whose memory does not start on a block, or everything where the file system refuses `O_DIRECT`
(tmpfs before Linux 6.6, some network file systems) or the platform lacks it. The file holds the same bytes
either way. Direct I/O does not make the file's size and block allocation durable: the caller fsyncs it, as
after any write.
"""

from __future__ import annotations

import errno
import fcntl
import os

import numpy as np

BLOCK = 4096  # alignment of direct writes: file offsets, lengths and memory addresses
PIECE = 64 << 20  # bytes per write call (a single call is limited to just under 2 GiB on Linux)
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # 0 where the platform has no direct I/O


def write_new_file(path: str | os.PathLike, array: np.ndarray) -> int:
    """Writes the bytes of C-contiguous `array` into the file `path` (created or truncated, mode 0644 before the
    umask) and returns how many of them were written with direct I/O (the rest went through the page cache)."""
    if not array.flags.c_contiguous:
        raise ValueError(f"write_new_file: the array of shape {array.shape} is not C-contiguous")
    data = memoryview(array.reshape(-1).view(np.uint8))
    whole = len(data) // BLOCK * BLOCK if array.ctypes.data % BLOCK == 0 else 0
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    fd, direct = None, bool(_O_DIRECT and whole)
    if direct:
        try:
            fd = os.open(path, flags | _O_DIRECT, 0o644)
        except OSError as e:
            if e.errno != errno.EINVAL:  # EINVAL: this file system does not do direct I/O
                raise
            direct = False
    if fd is None:
        fd = os.open(path, flags, 0o644)
    try:
        done = 0
        if direct:
            done = _write(fd, data, 0, whole, direct=True)
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        _write(fd, data, done, len(data), direct=False)
    finally:
        os.close(fd)
    return done


def _write(fd: int, data: memoryview, start: int, end: int, *, direct: bool) -> int:
    """Writes data[start:end] at the same file offsets; returns where it stopped: `end`, or for direct writes the
    first offset the device refused (EINVAL: an alignment it wants that `BLOCK` does not give), for the buffered
    writes to go on from."""
    offset = start
    while offset < end:
        try:
            written = os.pwrite(fd, data[offset:min(end, offset + PIECE)], offset)
        except OSError as e:
            if direct and e.errno == errno.EINVAL:
                return offset
            raise
        if direct and (written <= 0 or written % BLOCK):  # short (disk full at the next one): finish buffered
            return offset + max(written, 0) // BLOCK * BLOCK
        if written <= 0:
            raise OSError(errno.EIO, f"write returned {written} at offset {offset}")
        offset += written
    return offset
