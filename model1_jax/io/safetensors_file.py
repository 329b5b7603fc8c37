"""Reading (and writing) safetensors files with NumPy, including FP8 tensors.

The format is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the raw
little-endian tensor bytes, offsets relative to the end of the header. The `safetensors` package's
NumPy backend cannot return F8_E4M3 / F8_E8M0 tensors, and torch must not be needed at runtime, so
the reader here parses the header itself and reads each tensor with one `pread` into a NumPy array
of the exact dtype (JAX's NumPy dtypes: bfloat16 and the float8 types). Headers are checked fully
(dtype, shape, offsets within the file, no overlaps), so a truncated or corrupt file is reported
before any data is read.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8), "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32), "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16), "BF16": np.dtype(jnp.bfloat16),
    "F32": np.dtype(np.float32), "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(jnp.float8_e4m3fn), "F8_E5M2": np.dtype(jnp.float8_e5m2),
    "F8_E8M0": np.dtype(jnp.float8_e8m0fnu),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes are, without reading them."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset in the file
    nbytes: int = 0


class SafetensorsError(ValueError):
    def __init__(self, file: str, problems: list[str]):
        self.file = file
        self.problems = problems
        super().__init__(f"{file}: " + "; ".join(problems))


def read_header(file: str) -> list[TensorInfo]:
    """Every tensor's name, dtype, shape and byte range; raises `SafetensorsError` listing all problems."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(file, [f"file too short for a safetensors header ({size} bytes)"])
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(file, [f"header length {n} exceeds the file ({size} bytes): truncated or "
                                          "not a safetensors file"])
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(file, [f"header is not valid JSON ({e})"]) from None
    if not isinstance(header, dict):
        raise SafetensorsError(file, ["header is not a JSON object"])
    data_start, data_len = 8 + n, size - 8 - n
    infos, problems, ranges = [], [], []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            problems.append(f"tensor {name!r}: malformed header entry {entry!r}")
            continue
        if dtype not in DTYPES:
            problems.append(f"tensor {name!r}: unsupported dtype {dtype}")
            continue
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
                isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            problems.append(f"tensor {name!r}: bad shape {list(shape)} or offsets [{begin}, {end}]")
            continue
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != nbytes:
            problems.append(f"tensor {name!r}: {end - begin} bytes for {dtype}{list(shape)} ({nbytes} expected)")
            continue
        if end > data_len:
            problems.append(f"tensor {name!r}: bytes [{begin}, {end}) lie past the end of the data "
                            f"({data_len} bytes): file truncated")
            continue
        ranges.append((begin, end, name))
        infos.append(TensorInfo(file, name, dtype, shape, data_start + begin, nbytes))
    ranges.sort()
    for (_, e0, n0), (b1, _, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            problems.append(f"tensors {n0!r} and {n1!r} overlap")
    if problems:
        raise SafetensorsError(file, problems)
    return infos


def read_tensor(info: TensorInfo) -> np.ndarray:
    """The tensor's data as a fresh NumPy array of its exact dtype (one read, no intermediate copy)."""
    out = np.empty(info.shape, DTYPES[info.dtype])
    if info.nbytes:
        with open(info.file, "rb", buffering=0) as f:
            view = memoryview(out.reshape(-1).view(np.uint8))
            done = 0
            while done < info.nbytes:
                got = os.preadv(f.fileno(), [view[done:]], info.offset + done)
                if got <= 0:
                    raise SafetensorsError(info.file, [f"tensor {info.name!r}: file ended while reading"])
                done += got
    return out


def write(file: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes NumPy arrays (any dtype in `DTYPES`, incl. float8 and bfloat16) as a safetensors file."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    arrays = []
    for name, array in tensors.items():
        array = np.ascontiguousarray(array)
        if array.dtype not in _NAMES:
            raise ValueError(f"safetensors write: {name!r} has unsupported dtype {array.dtype}")
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
        arrays.append(array)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
