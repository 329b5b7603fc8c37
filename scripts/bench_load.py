#!/usr/bin/env python
"""Benchmark checkpoint loading: plain reads, `from_pretrained`, the converter and `m1.load`, in one run.

Writes (or reuses) a synthetic checkpoint with V4-Flash's widths in the released storage (FP8 linears with
128×128 UE8M0 scales, packed FP4 experts with per-32-column scales, the rest BF16/F32; DeepSeek's names,
sharded with an index) under `--dir` (default /tmp/model1_bench_load, never the repository), sized by
`--size-gb` through the number of routed experts. Then, each stage in a fresh process so that its peak host
memory is its own (Linux VmHWM, reset after start-up), `--repeat` times:

  read                  plain reads of the checkpoint's files (one thread, one reused buffer): the read ceiling
  read_new              the files read into new memory of the process, kept to the end (a thread per CPU, 32 MiB
                        pieces, each in its own anonymous map with the kernel's defaults): the ceiling of any loader
                        that holds the checkpoint's bytes in host memory, which must create that much new memory
  fill_new              as much new memory as the dense bf16 model takes (2.8 times the checkpoint), written by a
                        thread per CPU and read from nowhere: what creating a dense load's memory costs alone
  copy                  the files copied into new files through the page cache and fsynced (a thread per file, up
                        to the CPUs): what writing costs a converter that writes the ordinary way
  copy_direct           the same copy with direct I/O writes (from an aligned buffer to the disk): the ceiling of a
                        conversion whose output is as large as its source (fp8), written as the converter writes
  from_pretrained       dense bf16 (FP8/FP4 dequantized exactly)
  from_pretrained_q     `quantized=True` (FP8/FP4 kept block-quantized)
  convert_bf16 / _fp8   the converter (`io.convert.convert`, as scripts/convert_checkpoint.py --weights bf16 / fp8)
  load_bf16 / _fp8      `m1.load` of those outputs

The converter and the copies write into an empty directory (one per code under comparison, so that each code's `load`
reads what its own converter wrote): the previous run's output is deleted before the clock
starts (deleting a 4 GB checkpoint took 1.5-1.8 s here, and is not conversion). The converter drops each item
from the page cache once it is on disk, so `load` stages first read the Orbax files once (before the clock)
and, like `read`, measure loading from the page cache.

Memory conditions. On this project's virtual machines the host takes back guest memory that has been free for
about two seconds (free-page reporting), and a page it took back costs far more to fill again than one just
freed (2.3 s per GiB of kernel time in huge pages, against 0.2 s just freed; io/hostmem.py). Stages run one
after another, so without a pause each would find the previous stage's memory just freed, a condition no
user's fresh process meets. Each stage therefore waits `--settle` seconds (default 5) after its preparation,
then starts the clock: it gets its memory, and the page cache its pages, as a process started on an idle
machine does.

Page cache. The stages read their source from the page cache, as `read` does: the targets are set against it. On
this project's machines that does not happen by itself: the kernel runs DAMON's proactive reclaim, which pages out
file pages that no process maps and nobody has read for a few seconds (of a 1.4 GB checkpoint just read, 22 % was
gone 15 s later, 64 % after 60 s, 95 % after 90 s). So the benchmark holds the checkpoint's files, and for a `load`
stage the converter output it reads, mapped in its own process while the stages run (`held_in_page_cache`; the
kernel keeps mapped pages), and each row records the share of its source cached when the clock started
(`cached_at_start`, from `mincore`). Runs before the hold (JSON without `held_in_page_cache`; `--no-hold` repeats
them) read an unknown part of their sources from the disk.

Throughput is bytes of the checkpoint a stage reads (the safetensors files; for `load` the Orbax
directory) per second of the call (process start-up and imports excluded), GB = 1e9 bytes. Beside it, the
CPU time of the call (all threads) as GB per CPU-second, split into user time (the loader's own work) and
system time (the kernel's: page-cache copies, page faults), and the machine's load average: on a shared
machine the wall-clock rate depends on how much of the cores the stage got, the CPU-time rate much less. The
minimum, median and maximum over the repeats are reported (the user and system times: their medians). JSON
goes to benchmarks/results/load_<label>_<date>.json.

Ceiling. Beside each loader's median rate stands the rate it would reach were it as fast, at each thing it must
do, as the plain stages were in the same run (their medians): read its source from the page cache (`read`), create
the host memory it keeps (at the rate of `read_new` or `fill_new`, whichever created the nearer amount: the first
gigabyte or so of new memory often comes cheaper here than the next ones), write its output (`copy_direct`, which
reads and writes with direct I/O) — the slowest of the three bounding it. A dense load keeps its weights
dequantized, 2.8 times the bytes of the released storage, so it must create that much new memory; the fp8
conversion writes as many bytes as it reads. It is an estimate, not a bound: the cost of new memory changes from
minute to minute here (`read_new` spans 0.7-4.9 GB/s across runs), so a stage may meet cheaper memory than the
plain one did.

To compare code, give `--baseline` a checkout of the other version (`git worktree add /tmp/base COMMIT`): each
stage then runs with the baseline's library and with this checkout's, one right after the other, the first of
the two alternating from repeat to repeat, so that both meet the same moments of a shared machine; the JSON holds
both (`baseline`: its commit, summary and runs). The script itself, and the checkpoint, are this checkout's.

  python scripts/bench_load.py [--size-gb 1.4] [--repeat 3] [--stages read,from_pretrained_q,...] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS_DIR = ROOT / "benchmarks" / "results"
STAGES = ("read", "read_new", "fill_new", "copy", "copy_direct", "from_pretrained", "from_pretrained_q", "convert_bf16",
          "convert_fp8", "load_bf16", "load_fp8")
GENERATOR_VERSION = 1


# -- the synthetic checkpoint -------------------------------------------------------------------------

def bench_config(layers: int, experts: int, vocab: int):
    """V4-Flash widths; layers alternate sliding / CSA / HCA so that every tensor kind is present; the
    vocabulary is smaller than the released 129,280 so that the embeddings do not dominate the bytes."""
    import model1_jax as m1

    kinds = tuple((m1.SLIDING, m1.CSA, m1.HCA)[i % 3] for i in range(layers))
    flash = m1.Config.v4_flash()
    return flash.replace(num_hidden_layers=layers, layer_types=kinds, n_routed_experts=experts, vocab_size=vocab,
                         mlp_layer_types=tuple(m1.HASH_MOE if i < 3 else m1.MOE for i in range(layers)),
                         num_nextn_predict_layers=0)


def checkpoint_bytes(cfg) -> int:
    from tests import synthetic as syn

    return sum(_stored_nbytes(name, shape, dtype) for name, (shape, dtype, _) in syn.layout(cfg, mtp=False).items())


def _stored_nbytes(name: str, shape, dtype) -> int:
    from model1_jax.model import quant
    from tests import synthetic as syn

    n = int(np.prod(shape))
    if syn.is_fp8(name):
        return n + int(np.prod(quant.scale_shape(shape, (128, 128))))
    if syn.is_fp4(name):
        return n // 2 + int(np.prod(quant.scale_shape(shape, quant.FP4_BLOCK)))
    return n * np.dtype(dtype).itemsize


def _random_tensor(rng, name: str, shape, dtype, kind: str, cfg) -> dict[str, np.ndarray]:
    """One tensor in released storage with random content (fast: random bytes with a valid bit pattern)."""
    import jax.numpy as jnp

    from model1_jax.model import quant
    from tests import synthetic as syn

    if syn.is_fp8(name) or syn.is_fp4(name):
        fp8 = syn.is_fp8(name)
        scale = rng.integers(118, 128, quant.scale_shape(shape, (128, 128) if fp8 else quant.FP4_BLOCK), np.uint8)
        values = rng.integers(0, 256, (shape[0], shape[1] if fp8 else shape[1] // 2), np.uint8)
        if fp8:
            values[(values & 0x7F) == 0x7F] ^= 1  # no e4m3 NaN codes
        return {name: values.view(quant.E4M3 if fp8 else np.int8), name[:-len(".weight")] + ".scale":
                scale.view(quant.E8M0)}
    if kind == "tid2eid":
        return {name: np.argsort(rng.random((shape[0], cfg.n_routed_experts)), axis=1)[:, :shape[1]].astype(np.int64)}
    if np.dtype(dtype) == np.dtype(jnp.bfloat16):  # sign, exponent 2^-8..2^-1, random mantissa
        bits = rng.integers(0, 1 << 16, shape, np.uint16)
        return {name: ((bits & 0x807F) | ((119 + (bits >> 7 & 7)) << 7).astype(np.uint16)).view(jnp.bfloat16)}
    return {name: (0.1 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)}


def write_checkpoint(path: pathlib.Path, cfg, shards: int, seed: int = 0) -> None:
    """config.json + `shards` safetensors files (+ index), written one shard at a time."""
    from model1_jax.io.safetensors_file import write
    from tests import synthetic as syn

    layout = syn.layout(cfg, mtp=False)
    sizes = {name: _stored_nbytes(name, shape, dtype) for name, (shape, dtype, _) in layout.items()}
    total, groups, current, size = sum(sizes.values()), [], [], 0
    for name in layout:
        current.append(name)
        size += sizes[name]
        if size >= total * (len(groups) + 1) / shards and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups = [g for g in groups + [current] if g]
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    config = cfg.to_hf()
    config["quantization_config"] = syn.QUANTIZATION_CONFIG
    (path / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in group:
            tensors |= _random_tensor(rng, name, *layout[name], cfg)
        write(str(path / file), tensors)
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))


def ensure_checkpoint(directory: pathlib.Path, size_gb: float, layers: int, vocab: int, shards: int):
    """The checkpoint under `directory` for these parameters, written unless an identical one is there."""
    per_expert = checkpoint_bytes(bench_config(layers, 8, vocab)) - checkpoint_bytes(bench_config(layers, 7, vocab))
    base = checkpoint_bytes(bench_config(layers, 8, vocab)) - 8 * per_expert
    experts = max(8, -(-int(size_gb * 1e9 - base) // per_expert))
    cfg = bench_config(layers, experts, vocab)
    stamp = dict(generator=GENERATOR_VERSION, layers=layers, experts=experts, vocab=vocab, shards=shards,
                 bytes=checkpoint_bytes(cfg))
    path = directory / f"flash_l{layers}_e{experts}_v{vocab}_s{shards}"
    marker = path / "bench_stamp.json"
    if not (marker.is_file() and json.loads(marker.read_text()) == stamp):
        print(f"writing {stamp['bytes'] / 1e9:.2f} GB synthetic checkpoint to {path} ...", flush=True)
        start = time.perf_counter()
        write_checkpoint(path, cfg, shards)
        marker.write_text(json.dumps(stamp))
        print(f"  written in {time.perf_counter() - start:.0f} s", flush=True)
    return path, stamp


# -- one stage, in its own process -------------------------------------------------------------------

def _harness():
    """This checkout's host-memory helpers (model1_jax/common.py, loaded by its path): a stage measures with them
    whatever the library under test, which may predate them (`--baseline`)."""
    import importlib.util

    if "bench_load_common" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_load_common", ROOT / "model1_jax" / "common.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["bench_load_common"] = module
    return sys.modules["bench_load_common"]


def _status(field: str) -> int:
    value = _harness().process_memory(field)
    if value is None:
        raise RuntimeError(f"/proc/self/status has no {field}: the benchmark measures memory on Linux")
    return value


def _files(path: pathlib.Path, suffix: str = "") -> list[pathlib.Path]:
    """The files under `path` whose names end in `suffix`, sorted."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffix))


def _files_bytes(path: pathlib.Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in _files(path, suffix))


def plain_read(path: pathlib.Path, suffix: str = ".safetensors") -> int:
    """Reads every file under `path` ending in `suffix` once, sequentially, into one reused 64 MiB buffer."""
    buffer = bytearray(64 << 20)
    view, total = memoryview(buffer), 0
    for file in _files(path, suffix):
        fd = os.open(file, os.O_RDONLY)
        try:
            while (n := os.readv(fd, [view])) > 0:
                total += n
        finally:
            os.close(fd)
    return total


def _map(file: pathlib.Path):
    """A read-only shared map of `file`, or None for an empty file (which cannot be mapped)."""
    import mmap

    if not file.stat().st_size:
        return None
    with open(file, "rb") as f:
        return mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)


def resident_fraction(files: list[pathlib.Path]) -> float:
    """The share of the files' pages in the page cache now (`mincore` on a fresh map of each, which reads nothing)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    pages = resident = 0
    for file in files:
        region = _map(file)
        if region is None:
            continue
        vector = np.zeros(-(-len(region) // mmap.PAGESIZE), np.uint8)
        view = np.frombuffer(region, np.uint8)
        try:
            failed = libc.mincore(view.ctypes.data, len(region), vector.ctypes.data)
        finally:
            del view  # before the map closes
            region.close()
        if failed:
            raise OSError(ctypes.get_errno(), f"mincore {file}")
        pages, resident = pages + vector.size, resident + int(np.count_nonzero(vector & 1))
    return resident / pages if pages else 1.0


@contextlib.contextmanager
def held_in_page_cache(files: list[pathlib.Path]):
    """Keeps the files in the page cache while open: each is mapped (read-only, shared) and a byte of every page read.
    This project's kernel pages out file pages that no process maps and nobody has read for some seconds (DAMON's
    proactive reclaim, docstring), so a stage would otherwise read part of its source from the disk."""
    import mmap

    regions = []
    try:
        for file in files:
            region = _map(file)
            if region is None:
                continue
            regions.append(region)
            view = np.frombuffer(region, np.uint8)
            int(view[::mmap.PAGESIZE].max())  # faults every page in (reading it from the disk where it is not cached)
            del view
        yield
    finally:
        for region in regions:
            region.close()


NEW_PIECE_BYTES = 32 << 20


def read_into_new_memory(path: pathlib.Path, suffix: str = ".safetensors") -> list:
    """Reads every file under `path` ending in `suffix` into new memory: pieces of NEW_PIECE_BYTES, each into its own
    private anonymous map (no advice: the kernel's defaults), by a thread per CPU. Returns the maps, which the caller
    keeps past the clock as a loader keeps the model."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    pieces = []
    for file in _files(path, suffix):
        size = file.stat().st_size
        pieces += [(file, offset, min(NEW_PIECE_BYTES, size - offset)) for offset in range(0, size, NEW_PIECE_BYTES)]

    def read(piece):
        file, offset, n = piece
        region = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        fd = os.open(file, os.O_RDONLY)
        try:
            with memoryview(region) as view:
                done = 0
                while done < n:
                    got = os.preadv(fd, [view[done:]], offset + done)
                    if got <= 0:
                        raise OSError(f"{file}: ended while reading")
                    done += got
        finally:
            os.close(fd)
        return region

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(read, pieces))


def fill_new_memory(nbytes: int) -> list:
    """Writes `nbytes` of new memory and nothing else: pieces of NEW_PIECE_BYTES, each its own private anonymous map
    (the kernel's defaults), filled by a thread per CPU. Returns the maps, kept past the clock like a loaded model."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    def fill(n: int):
        region = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = np.frombuffer(region, np.uint8)
        view[:] = 1  # NumPy releases the GIL: the threads fault and write in parallel
        del view
        return region

    sizes = [min(NEW_PIECE_BYTES, nbytes - offset) for offset in range(0, nbytes, NEW_PIECE_BYTES)]
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        return list(pool.map(fill, sizes))


def dense_model_bytes(ckpt: pathlib.Path) -> int:
    """Bytes of the model a dense bf16 `from_pretrained` of `ckpt` keeps (with the parameters kept in float32)."""
    import jax.numpy as jnp

    from model1_jax.io.pretrained import read_config
    from model1_jax.model.summary import parameter_bytes
    from model1_jax.model.transformer import abstract_module

    return parameter_bytes(abstract_module(read_config(ckpt), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16))


COPY_SYNC_BYTES = 256 << 20  # the copy fsyncs and drops what it wrote this often (the converter: once per item)


def _copy_file(file: pathlib.Path, out: pathlib.Path) -> int:
    view, total, synced = memoryview(bytearray(64 << 20)), 0, 0
    src = os.open(file, os.O_RDONLY)
    dst = os.open(out / file.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while True:
            n = os.readv(src, [view])
            if n > 0:
                written = 0
                while written < n:
                    written += os.write(dst, view[written:n])
                total += n
            if total - synced >= COPY_SYNC_BYTES or (n <= 0 and total > synced):
                os.fsync(dst)  # then its pages are clean: drop them, as the converter does, for the next writes
                os.posix_fadvise(dst, synced, total - synced, os.POSIX_FADV_DONTNEED)
                synced = total
            if n <= 0:
                break
    finally:
        os.close(src)
        os.close(dst)
    return total


DIRECT_BLOCK = 4096  # direct writes in whole blocks from block-aligned memory (model1_jax.io.direct_write.BLOCK)


def _copy_file_direct(file: pathlib.Path, out: pathlib.Path) -> int:
    import fcntl
    import mmap

    buffer = mmap.mmap(-1, 64 << 20)  # page-aligned, reused
    view, total = memoryview(buffer), 0
    src = os.open(file, os.O_RDONLY)
    dst = os.open(out / file.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o644)
    try:
        while (n := os.readv(src, [view])) > 0:
            whole = n // DIRECT_BLOCK * DIRECT_BLOCK
            written = 0
            while written < whole:
                written += os.pwrite(dst, view[written:whole], total + written)
            if whole < n:  # the file's last piece: its tail is not a whole block
                fcntl.fcntl(dst, fcntl.F_SETFL, fcntl.fcntl(dst, fcntl.F_GETFL) & ~os.O_DIRECT)
                while written < n:
                    written += os.pwrite(dst, view[written:n], total + written)
            total += n
        os.fsync(dst)  # the file's size and blocks, and the device's cache
    finally:
        os.close(src)
        os.close(dst)
        view.release()
        buffer.close()
    return total


def plain_copy(path: pathlib.Path, out: pathlib.Path, direct: bool = False) -> int:
    """Copies every safetensors file into `out`, a thread per file (as many at once as CPUs) through a 64 MiB
    buffer each, fsyncing (and dropping from the page cache) every 256 MiB written, then the directory — as the
    converter did with each Orbax item and at its commit. `direct`: written with direct I/O instead, from the
    page-aligned buffer to the disk, as the converter writes its arrays now (`io.direct_write`), and fsynced at
    the end of each file."""
    from concurrent.futures import ThreadPoolExecutor

    out.mkdir(parents=True)
    files = sorted(path.glob("*.safetensors"))
    copy = _copy_file_direct if direct else _copy_file
    with ThreadPoolExecutor(min(len(files), os.cpu_count() or 1)) as pool:
        total = sum(pool.map(lambda f: copy(f, out), files))
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return total


def run_stage(stage: str, ckpt: pathlib.Path, work: pathlib.Path, settle: float = 0.0, fill_bytes: int = 0) -> dict:
    import ctypes

    import jax
    import jax.numpy as jnp
    from flax import nnx

    import model1_jax as m1
    from model1_jax.io import convert

    def ready(model):
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))

    source = _files_bytes(ckpt, ".safetensors")
    out = work / stage.split("_")[-1]
    if stage.startswith("convert_"):
        try:  # as scripts/convert_checkpoint.py does, so that RSS tracks what is live
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
        except (OSError, AttributeError):
            pass
    nbytes = _files_bytes(out) if stage.startswith("load_") else source
    if stage.startswith(("convert_", "copy")) and out.exists():
        shutil.rmtree(out)
    if stage.startswith("load_"):
        plain_read(out, "")  # the converter leaves its output out of the page cache: load it from there, as `read`
    time.sleep(settle)  # memory freed by the preparation (and earlier stages) goes back to the host (docstring)
    cached = resident_fraction(_files(out) if stage.startswith("load_") else _files(ckpt, ".safetensors"))
    _harness().reset_peak_memory(trim=False)  # VmHWM := VmRSS: the peak measured from here is the stage's own
    rss_start = _status("VmRSS")
    start, cpu, times = time.perf_counter(), time.process_time(), os.times()
    kept = None  # what a stage loaded lives past the clock (freeing it is not loading)
    if stage == "read":
        nbytes = plain_read(ckpt)
    elif stage == "read_new":
        kept = read_into_new_memory(ckpt)
        nbytes = sum(len(region) for region in kept)
    elif stage == "fill_new":
        kept = fill_new_memory(fill_bytes)
        nbytes = fill_bytes
    elif stage in ("copy", "copy_direct"):
        nbytes = plain_copy(ckpt, out, direct=stage == "copy_direct")
    elif stage in ("from_pretrained", "from_pretrained_q"):
        kept = m1.from_pretrained(ckpt, dtype=jnp.bfloat16, quantized=stage.endswith("_q"))
        ready(kept)
    elif stage in ("convert_bf16", "convert_fp8"):
        convert.convert(ckpt, out, dtype=jnp.bfloat16, quantized=stage.endswith("fp8"), overwrite=True,
                        progress=False)
    elif stage in ("load_bf16", "load_fp8"):
        kept = m1.load(out, dtype=jnp.bfloat16)
        ready(kept)
    else:
        raise ValueError(stage)
    seconds, cpu, end = time.perf_counter() - start, time.process_time() - cpu, os.times()
    row = dict(stage=stage, library=str(pathlib.Path(m1.__file__).parents[1]), device=jax.devices()[0].device_kind,
               bytes=nbytes, seconds=seconds,
               gb_per_s=nbytes / seconds / 1e9, cpu_seconds=cpu, user_seconds=end.user - times.user,
               system_seconds=end.system - times.system,
               gb_per_cpu_s=nbytes / cpu / 1e9, rss_start=rss_start, peak_rss=_status("VmHWM"),
               peak_growth=_status("VmHWM") - rss_start, cached_at_start=cached)
    if stage.startswith(("convert_", "copy")):
        row["output_bytes"] = _files_bytes(out)
    if stage.startswith(("from_pretrained", "load_")):
        row["kept_bytes"] = sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(kept)))
    return row


PLAIN = ("read", "read_new", "fill_new", "copy", "copy_direct")


def ceiling(row: dict, plain: dict[str, dict]) -> float | None:
    """GB/s of `row`'s stage at the plain stages' rates (`plain`: stage -> a row of it, or its median, with its
    bytes; docstring), or None for a plain stage, or without them. The memory it keeps is created at the rate of the
    plain stage that created the nearest amount (`read_new`: the checkpoint's size; `fill_new`: the dense model's):
    here the first gigabyte or so of new memory often comes cheaper than the next ones."""
    if row["stage"] in PLAIN or not {"read", "read_new", "copy_direct"} <= set(plain):
        return None
    kept = row.get("kept_bytes", 0)
    memory = min((plain[s] for s in ("read_new", "fill_new") if s in plain),
                 key=lambda m: abs(math.log(max(kept, 1) / m["bytes"])))
    seconds = [row["bytes"] / plain["read"]["gb_per_s"], kept / memory["gb_per_s"],
               row.get("output_bytes", 0) / plain["copy_direct"]["gb_per_s"]]
    return row["bytes"] / max(seconds)


def spawn(stage: str, ckpt: pathlib.Path, work: pathlib.Path, settle: float, code: pathlib.Path = ROOT,
          fill_bytes: int = 0) -> dict:
    """Runs one stage in a fresh process with the library of the checkout `code` (this one, or --baseline)."""
    env = {**os.environ, "PYTHONPATH": str(code)}  # JAX's default backend: a GPU where there is one
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--stage", stage, "--checkpoint", str(ckpt), "--work", str(work),
           "--settle", str(settle), "--code", str(code), "--fill-bytes", str(fill_bytes)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if result.returncode:
        raise RuntimeError(f"{stage} failed:\n{result.stderr[-3000:]}")
    row = json.loads(result.stdout.strip().splitlines()[-1])
    return {**row, "load_average": load}


def summarize(rows: list[dict]) -> dict:
    rates, cpu = [r["gb_per_s"] for r in rows], [r["gb_per_cpu_s"] for r in rows]
    return dict(stage=rows[0]["stage"], bytes=rows[0]["bytes"], runs=len(rows), gb_per_s_min=min(rates),
                gb_per_s_median=statistics.median(rates), gb_per_s_max=max(rates),
                gb_per_cpu_s_median=statistics.median(cpu),
                user_seconds_median=statistics.median(r["user_seconds"] for r in rows),
                system_seconds_median=statistics.median(r["system_seconds"] for r in rows),
                peak_growth_max=max(r["peak_growth"] for r in rows),
                cached_at_start_min=min(r["cached_at_start"] for r in rows),
                output_bytes=rows[0].get("output_bytes"), load_average=[r["load_average"] for r in rows])


def _git_commit(root: pathlib.Path = ROOT) -> str:
    try:
        return subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=pathlib.Path, default=pathlib.Path("/tmp/model1_bench_load"),
                   help="where the synthetic checkpoint and the converted outputs go (not the repository)")
    p.add_argument("--size-gb", type=float, default=1.4, help="checkpoint size; sets the number of routed experts")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--shards", type=int, default=3)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    p.add_argument("--label", default="", help="recorded in the JSON (e.g. before / after)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="seconds each stage waits before its clock starts (memory conditions, docstring)")
    p.add_argument("--no-hold", dest="hold", action="store_false",
                   help="do not keep the sources in the page cache (the runs before it did; docstring)")
    p.add_argument("--baseline", type=pathlib.Path,
                   help="a checkout of other code (e.g. `git worktree add /tmp/base COMMIT`): every stage runs with "
                        "it, then with this checkout, in turns, and both go in the JSON")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--code", type=pathlib.Path, default=ROOT, help=argparse.SUPPRESS)
    p.add_argument("--checkpoint", type=pathlib.Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=pathlib.Path, help=argparse.SUPPRESS)
    p.add_argument("--fill-bytes", type=int, default=0, help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.stage:
        sys.path.insert(0, str(ns.code))  # the library of the checkout under test, ahead of this one's
        print(json.dumps(run_stage(ns.stage, ns.checkpoint, ns.work, ns.settle, ns.fill_bytes)))
        return 0
    if ns.baseline is not None:
        ns.baseline = ns.baseline.resolve()
        if not (ns.baseline / "model1_jax" / "__init__.py").is_file():
            p.error(f"--baseline {ns.baseline}: not a checkout of this repository (no model1_jax/__init__.py)")
    if ROOT in ns.dir.resolve().parents or ns.dir.resolve() == ROOT:
        p.error("--dir must lie outside the repository")
    stages = [s for s in ns.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stages {unknown}; known: {STAGES}")
    ckpt, stamp = ensure_checkpoint(ns.dir, ns.size_gb, ns.layers, ns.vocab, ns.shards)
    work = ns.dir / "converted"
    work.mkdir(parents=True, exist_ok=True)
    fill_bytes = dense_model_bytes(ckpt) if "fill_new" in stages else 0  # fill_new creates the dense model's bytes
    print(f"checkpoint {ckpt}: {stamp['bytes'] / 1e9:.2f} GB, {ns.layers} layers, {stamp['experts']} experts, "
          f"{ns.shards} shards; commit {_git_commit()}", flush=True)
    if ns.baseline is not None:
        print(f"baseline {ns.baseline} (commit {_git_commit(ns.baseline)}): every stage runs with it and with this "
              "checkout, in turns", flush=True)
    codes = {"baseline": ns.baseline} if ns.baseline is not None else {}
    codes["current"] = ROOT
    for code in codes:  # each code's converter output, for its own `load` stages (the two formats may differ)
        (work / code).mkdir(exist_ok=True)
    runs: dict[str, dict[str, list[dict]]] = {code: {s: [] for s in stages} for code in codes}
    hold = held_in_page_cache if ns.hold else lambda files: contextlib.nullcontext()
    with hold(_files(ckpt, ".safetensors")):
        for repeat in range(ns.repeat):
            for stage in stages:
                # In turns, so that both meet the same moments of a shared machine; which one goes first alternates
                # (a stage finds the memory its predecessor freed, which the host may not have taken back yet).
                order = list(codes.items())[::-1 if repeat % 2 else 1]
                for code, root in order:
                    output = work / code / stage.split("_")[-1]  # a load stage's source: its code's converter output
                    with hold(_files(output) if stage.startswith("load_") else []):
                        row = spawn(stage, ckpt, work / code, ns.settle, root, fill_bytes)
                    runs[code][stage].append(row)
                    print(f"  {stage:<18} {code if len(codes) > 1 else '':<8} {row['gb_per_s']:7.3f} GB/s  "
                          f"{row['seconds']:7.2f} s  {row['gb_per_cpu_s']:7.3f} GB/CPU-s  "
                          f"peak +{row['peak_growth'] / 2**20:6.0f} MiB  cached {row['cached_at_start']:4.0%}  "
                          f"(load average {row['load_average']:.1f})", flush=True)
    summaries = {code: [summarize(rows) for rows in by_stage.values()] for code, by_stage in runs.items()}
    for code, by_stage in runs.items():  # each stage's ceiling, from the median rates of the plain stages
        plain = {s["stage"]: {"gb_per_s": s["gb_per_s_median"], "bytes": s["bytes"]} for s in summaries[code]
                 if s["stage"] in PLAIN}
        for s, rows in zip(summaries[code], by_stage.values()):
            s["ceiling_gb_per_s"] = ceiling(rows[0], plain)
            s["of_ceiling"] = s["gb_per_s_median"] / s["ceiling_gb_per_s"] if s["ceiling_gb_per_s"] else None
    print(f"\n{'stage':<18} {'':<8} {'GB/s min':>9} {'median':>8} {'max':>8} {'ceiling':>8} {'of it':>6} "
          f"{'GB/CPU-s':>9} {'user s':>7} {'sys s':>6} {'peak +MiB':>10}")
    for i, stage in enumerate(stages):
        for code in codes:
            s = summaries[code][i]
            limit = (f"{s['ceiling_gb_per_s']:8.3f} {s['of_ceiling']:6.0%}" if s["ceiling_gb_per_s"]
                     else f"{'':8} {'':6}")
            print(f"{stage:<18} {code if len(codes) > 1 else '':<8} {s['gb_per_s_min']:9.3f} "
                  f"{s['gb_per_s_median']:8.3f} {s['gb_per_s_max']:8.3f} {limit} {s['gb_per_cpu_s_median']:9.3f} "
                  f"{s['user_seconds_median']:7.2f} {s['system_seconds_median']:6.2f} "
                  f"{s['peak_growth_max'] / 2**20:10.0f}")
    header = dict(label=ns.label, commit=_git_commit(), settle_seconds=ns.settle, held_in_page_cache=ns.hold,
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  machine=dict(cpus=os.cpu_count(), platform=platform.platform(),
                               memory_bytes=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
                  checkpoint=dict(path=str(ckpt), **stamp, hidden=4096, widths="V4-Flash"))
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"load_{ns.label + '_' if ns.label else ''}{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    record = dict(**header, summary=summaries["current"], runs=runs["current"])
    if ns.baseline is not None:
        record["baseline"] = dict(path=str(ns.baseline), commit=_git_commit(ns.baseline),
                                  summary=summaries["baseline"], runs=runs["baseline"])
    path.write_text(json.dumps(record, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
