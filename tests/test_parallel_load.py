"""The parallel read path (io/reader.py, io/relayout.py, io/regions.py, io/placement.py): the same bytes whatever
the number of workers and the chunk size; a worker's error surfaces as the one error a single worker raises; an
interrupted conversion leaves nothing half-written; sharded loading on 8 simulated CPU devices equals the unsharded
load, and every shard is read from the byte ranges that hold it."""

import os
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.io import convert, direct_write, hf, reader, regions, relayout
from model1_jax.io import orbax as checkpoint
from model1_jax.io.names import Slot, to_model_arrangement
from model1_jax.model import quant
from tests import synthetic as syn
from tests.util import takes_direct_io

# Wide enough that every split of the presets below divides the FP8/FP4 scale grids too (heads of 128 with
# 128-row blocks, 4 indexer heads of 64, expert width 256), still a few MiB.
CFG = syn.CONFIG.replace(hidden_size=256, moe_intermediate_size=256, q_lora_rank=256, o_lora_rank=256,
                         index_n_heads=4)
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def stored():
    return syn.quantize_tensors(syn.original_tensors(CFG, seed=1))


@pytest.fixture(scope="module")
def checkpoints(stored, tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    qc = syn.QUANTIZATION_CONFIG
    return {"original": syn.write_checkpoint(root / "original", CFG, stored, shards=3, quantization_config=qc),
            "hf": syn.write_checkpoint(root / "hf", CFG, syn.hf_module_names(stored, CFG), shards=2,
                                       quantization_config=qc)}


def bits(model) -> dict:
    """path → the raw bytes of every array (values and scales of a quantized parameter) and its dtype."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        for i, leaf in enumerate(jax.tree.leaves(value)):
            array = np.asarray(leaf)
            out[(*path, i)] = (str(array.dtype), array.shape, array.tobytes())
    return out


def dense(model) -> dict:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        out[path] = np.asarray(value.dequantize(jnp.float32) if isinstance(value, quant.BlockQuantized) else value)
    return out


# -- kernels against their references ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [quant.FP8, quant.FP4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_lookup_table_equals_dequantize_for_every_byte_and_scale(fmt, dtype):
    """Every (scale byte, value byte) pair: the table's bits are those of `BlockQuantized.dequantize`."""
    per_byte = 2 if fmt == quant.FP4 else 1
    values = np.tile(np.arange(256, dtype=np.uint8), (256, 1))               # row s: every byte
    scales = np.arange(256, dtype=np.uint8)[:, None].view(quant.E8M0)      # row s: scale byte s
    block = (1, 256 * per_byte)
    with np.errstate(over="ignore"):  # the largest scales overflow, in both
            want = quant.BlockQuantized(values if fmt == quant.FP4 else values.view(quant.E4M3), scales, fmt, block,
                                    1 if fmt == quant.FP4 else None).dequantize(dtype)
    got = np.empty((256, 256 * per_byte), dtype)
    relayout.dequantize_rows(fmt, values, scales, np.arange(256), block[1], got, np.empty(256 * 256, np.uint16))
    np.testing.assert_array_equal(got.view(np.uint8), np.asarray(want).view(np.uint8))


@pytest.mark.parametrize("slot, shape", [
    (Slot(("w",), "linear", 1), (96, 3, 40)),
    (Slot(("w",), "linear", 2), (2, 40, 96)),
    (Slot(("w",), "grouped", 3), (2, 3, 8, 40)),
    (Slot(("w",), "reshape", 1), (8, 2, 40)),
    (Slot(("w",), "copy", 1), (120,)),
    (Slot(("w",), "copy", 1), (3, 40, 24)),
])
def test_place_in_chunks_equals_to_model_arrangement(slot, shape):
    """Rows written in random chunks through `relayout.place` give `names.to_model_arrangement`."""
    from model1_jax.io.names import source_shape

    src = RNG.integers(0, 1 << 16, source_shape(slot, shape), dtype=np.uint16).view(jnp.bfloat16)
    want = to_model_arrangement(slot, src, shape)
    got = np.zeros(shape, jnp.bfloat16)
    leads, rows, cols = reader.matrix_shape(src.shape)
    matrices = src.reshape(leads, rows, cols)
    for lead in range(leads):
        r = 0
        while r < rows:
            n = int(RNG.integers(1, rows + 1))
            relayout.place(slot, got, matrices[lead, r:r + n], lead, rows, r)
            r += n
    np.testing.assert_array_equal(got.view(np.uint16), np.asarray(want).view(np.uint16))


def test_transpose_into_strided_destinations():
    # (1000, 3000): several bands of the two-pass path and a partial last one; bytes of (200, 300) and (99, 4100):
    # rows of no whole words (the tiled path), as float32 everywhere
    for shape in [(3, 5), (200, 300), (1000, 3000), (99, 4100)]:
        for dtype in (np.uint8, np.uint16, np.float32):
            src = RNG.integers(0, 200, shape).astype(dtype)
            dst = np.zeros((shape[1], shape[0] + 7), dtype)
            relayout.transpose_into(src, dst[:, 3:3 + shape[0]])
            np.testing.assert_array_equal(dst[:, 3:3 + shape[0]], src.T)
            assert not dst[:, :3].any() and not dst[:, 3 + shape[0]:].any()


def test_reshaped_view_never_copies():
    band = np.arange(24, dtype=np.uint16).reshape(4, 6)[:, :4]  # rows not contiguous with each other
    view = relayout.reshaped_view(band, (4, 2, 2))
    view[0, 0, 0] = 99
    assert band[0, 0] == 99
    with pytest.raises(ValueError, match="no view of shape"):
        relayout.reshaped_view(band, (16,))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_transpose_into_unaligned_and_banded_sources(dtype):
    """Sources the two-pass path must not take as words (misaligned, odd row strides) and column bands of a
    wider matrix (rows that are not contiguous with each other) all transpose exactly."""
    wide = RNG.integers(0, 250, (300, 1040)).astype(dtype)
    sources = [wide[:, 8:520], wide[:, 1:513], wide[::2, 16:528]]
    flat = RNG.integers(0, 250, 300 * 512 + 1).astype(dtype)
    sources.append(flat[1:].reshape(300, 512))  # the data starts off an 8-byte boundary
    for src in sources:
        dst = np.zeros((src.shape[1], src.shape[0]), dtype)
        relayout.transpose_into(src, dst)
        np.testing.assert_array_equal(dst, src.T)


# -- the same bytes whatever the workers and chunks ----------------------------------------------------------

@pytest.mark.parametrize("quantized", [False, True])
def test_same_bytes_for_any_workers_and_chunk_size(quantized, checkpoints, stored, monkeypatch):
    reference = bits(m1.from_pretrained(checkpoints["original"], dtype=jnp.bfloat16, quantized=quantized,
                                        workers=1))
    with monkeypatch.context() as patch:
        patch.setattr(reader, "CHUNK_BYTES", 3000)  # many chunks per tensor, none aligned to a scale block
        for workers in (2, 5):
            got = bits(m1.from_pretrained(checkpoints["original"], dtype=jnp.bfloat16, quantized=quantized,
                                          workers=workers))
            assert got.keys() == reference.keys()
            assert [k for k in reference if got[k] != reference[k]] == []
    # and the values are the checkpoint's, exactly (HF names: merged gate_up_proj)
    want = syn.dequantize_tensors(stored)
    model = m1.from_pretrained(checkpoints["hf"], dtype=jnp.float32, quantized=quantized, workers=3)
    up = dense(model)[("layers", 2, "mlp", "experts", "up_proj")]
    np.testing.assert_array_equal(up[1], want["layers.2.ffn.experts.1.w3.weight"])


# -- errors ----------------------------------------------------------------------------------------------------

def test_first_failing_task_in_order_is_raised():
    started = []

    def task(i):
        def run():
            started.append(i)
            if i == 3:
                time.sleep(0.3)  # fails last in time, first in order
                raise ValueError("task 3")
            if i == 5:
                raise ValueError("task 5")
            if i > 5:
                time.sleep(0.05)
            return 1
        return run

    for workers in (1, 4):
        with pytest.raises(ValueError, match="task 3"):
            reader.run_tasks([task(i) for i in range(40)], workers=workers)
    assert max(started) < 39  # later tasks were cancelled


def _fail_reading(monkeypatch, names):
    original = reader.Files.read

    def read(self, info, offset, out):
        if info.name in names:
            raise reader.SafetensorsError(info.file, [f"injected: cannot read {info.name}"])
        return original(self, info, offset, out)
    monkeypatch.setattr(reader.Files, "read", read)


def test_a_worker_error_is_the_same_one_error(checkpoints, monkeypatch):
    # two tensors fail; whatever the workers, the one raised is the first in reading order
    _fail_reading(monkeypatch, {"layers.2.ffn.experts.3.w2.weight", "layers.0.attn.wq_b.weight"})
    messages = set()
    for workers in (1, 2, 6):
        with pytest.raises(reader.SafetensorsError) as info:
            m1.from_pretrained(checkpoints["original"], dtype=jnp.float32, workers=workers)
        messages.add(str(info.value))
    assert len(messages) == 1 and "layers.0.attn.wq_b.weight" in messages.pop()


@pytest.mark.parametrize("where", ["reader", "writer", "fsync"])
def test_interrupted_conversion_leaves_nothing_half_written(where, checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert.convert(checkpoints["original"], out, dtype=jnp.float32, progress=False)
    before = bits(m1.load(out, dtype=jnp.float32))
    with monkeypatch.context() as patch:
        if where == "reader":  # Ctrl-C in a worker, after several items were written
            count = {"n": 0}
            original = reader.run_chunk

            def interrupted(*args):
                count["n"] += 1
                if count["n"] == 60:
                    raise KeyboardInterrupt
                return original(*args)
            patch.setattr(reader, "run_chunk", interrupted)
            error = KeyboardInterrupt
        elif where == "fsync":  # the deferred fsync of an item fails (a disk error shows up there)
            def failing_sync(path, drop=False):
                if path.endswith("params-00001"):
                    raise OSError("injected: I/O error")
                return sync(path, drop)
            sync = checkpoint._fsync_tree
            patch.setattr(checkpoint, "_fsync_tree", failing_sync)
            error = OSError
        else:  # the background Orbax save of an item fails
            save = checkpoint.Writer._save

            def failing(self, item, tree):
                if item == "params-00002":
                    raise OSError("injected: disk full")
                return save(self, item, tree)
            patch.setattr(checkpoint.Writer, "_save", failing)
            error = OSError
        with pytest.raises(error):
            convert.convert(checkpoints["original"], out, dtype=jnp.bfloat16, quantized=True, overwrite=True,
                            progress=False, budget_bytes=200_000, workers=3)
    assert sorted(os.listdir(out)) == ["checkpoint-000001"]  # the new version was removed, the old one kept
    assert bits(m1.load(out, dtype=jnp.float32)) == before
    assert threading.active_count() < 20  # no reader or writer threads left behind


def test_ring_reuse_keeps_every_byte(checkpoints, tmp_path, monkeypatch):
    """With a tiny item budget the converter's ring is reused many times over; what it wrote equals what
    `from_pretrained` (fresh buffers, no Orbax) reads from the same files."""
    carved, capacity, take = [], [], convert.Ring._take

    def counting_take(ring, n, writer):
        carved.append(n)
        capacity.append(ring.capacity)
        return take(ring, n, writer)

    monkeypatch.setattr(convert.Ring, "_take", counting_take)
    stats = convert.convert(checkpoints["hf"], tmp_path / "out", dtype=jnp.bfloat16, quantized=True,
                            progress=False, workers=3, budget_bytes=100_000)
    assert stats.items > 8 and sum(carved) > 4 * capacity[0]  # every byte of the ring reused about four times
    want = bits(m1.from_pretrained(checkpoints["hf"], dtype=jnp.bfloat16, quantized=True, workers=1))
    assert bits(m1.load(tmp_path / "out", dtype=jnp.bfloat16)) == want


@pytest.mark.parametrize("quantized", [True, False])
def test_only_a_dense_conversions_ring_asks_for_huge_pages(quantized, checkpoints, tmp_path, monkeypatch):
    """Huge pages speed the transposes of a dense conversion; kept quantized, few bytes are transposed and small
    pages are cheaper to create (docs/checkpoints.md §9)."""
    asked, empty = [], convert.hostmem.empty

    def recording_empty(shape, dtype, *, huge_pages=False, align=64):
        asked.append((shape, huge_pages, align))
        return empty(shape, dtype, huge_pages=huge_pages, align=align)

    monkeypatch.setattr(convert.hostmem, "empty", recording_empty)
    stats = convert.convert(checkpoints["original"], tmp_path / "out", dtype=jnp.bfloat16, quantized=quantized,
                            progress=False, workers=2)
    [(shape, huge)] = [(shape, huge) for shape, huge, align in asked if align == convert.ALIGN]  # the ring
    assert huge == (not quantized) and shape[0] >= stats.output_bytes // 8


def test_deferred_sync_puts_every_file_on_disk_before_the_commit(checkpoints, tmp_path, monkeypatch):
    synced, dropped, unsynced_at_commit = set(), set(), []
    fsync, rename = checkpoint._fsync, os.rename

    def recording_fsync(path, drop=False):
        synced.add(os.path.abspath(path))
        if drop:
            dropped.add(os.path.abspath(path))
        fsync(path, drop)

    def checking_rename(src, dst):
        if os.path.basename(src).startswith(".tmp-checkpoint-"):
            paths = {os.path.join(root, name) for root, dirs, files in os.walk(src) for name in dirs + files}
            unsynced_at_commit.append(sorted((paths | {os.path.abspath(src)}) - synced))
        rename(src, dst)
    monkeypatch.setattr(checkpoint, "_fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", checking_rename)
    stats = convert.convert(checkpoints["original"], tmp_path / "out", dtype=jnp.bfloat16, progress=False,
                            budget_bytes=200_000)
    assert stats.items > 2 and unsynced_at_commit == [[]]
    # every file of every item left the page cache once synced (the next items' writes reuse its pages)
    final = {os.path.relpath(os.path.join(root, name), stats.path)
             for root, _, files in os.walk(stats.path) for name in files if name != checkpoint.MANIFEST}
    tmp = os.path.dirname(next(iter(dropped)))
    while not os.path.basename(tmp).startswith(".tmp-checkpoint-"):
        tmp = os.path.dirname(tmp)
    assert final and {os.path.relpath(p, tmp) for p in dropped} == final


def test_converted_bytes_do_not_depend_on_workers(checkpoints, tmp_path):
    runs = []
    for workers in (1, 4):
        convert.convert(checkpoints["hf"], tmp_path / str(workers), dtype=jnp.bfloat16, quantized=True,
                        progress=False, workers=workers, budget_bytes=300_000)
        runs.append(bits(m1.load(tmp_path / str(workers), dtype=jnp.bfloat16)))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("quantized", [True, False])
def test_the_converter_writes_every_array_from_the_ring_to_the_disk_directly(quantized, checkpoints, tmp_path,
                                                                              monkeypatch):
    """Every array of every item is one zarr chunk written by `direct_write` (not by TensorStore through the page
    cache), straight from its block-aligned place in the ring; the whole blocks of each went direct wherever the
    file system takes O_DIRECT. What was written loads as what `from_pretrained` reads."""
    written, write = [], direct_write.write_new_file

    def recording_write(path, array):
        direct = write(path, array)
        written.append((array.nbytes, array.ctypes.data % direct_write.BLOCK, direct))
        return direct

    monkeypatch.setattr(direct_write, "write_new_file", recording_write)
    stats = convert.convert(checkpoints["hf"], tmp_path / "out", dtype=jnp.bfloat16, quantized=quantized,
                            progress=False, budget_bytes=300_000)
    manifest = checkpoint.read_manifest(stats.path)["params"]
    arrays = sum(2 if "format" in entry else 1 for entry in manifest.values())
    assert stats.items > 2 and len(written) == arrays
    assert all(offset == 0 for _, offset, _ in written)
    assert sum(n for n, _, _ in written) == stats.output_bytes
    if takes_direct_io(tmp_path):
        assert all(direct == n // direct_write.BLOCK * direct_write.BLOCK for n, _, direct in written)
    want = bits(m1.from_pretrained(checkpoints["hf"], dtype=jnp.bfloat16, quantized=quantized, workers=1))
    assert bits(m1.load(stats.path, dtype=jnp.bfloat16)) == want


def test_plain_orbax_restores_the_converters_items(checkpoints, tmp_path):
    """The items written without OCDBT are ordinary Orbax checkpoints: Orbax's own PyTreeCheckpointer, with none of
    this library's handlers, restores every array with the bytes `from_pretrained` reads."""
    stats = convert.convert(checkpoints["hf"], tmp_path / "out", dtype=jnp.bfloat16, quantized=True,
                            progress=False, budget_bytes=300_000)
    manifest = checkpoint.read_manifest(stats.path)
    restored = {}
    for item in manifest["items"]:
        tree = ocp.PyTreeCheckpointer().restore(os.path.join(stats.path, item))
        restored.update({tuple(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                         for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]})
    want = m1.from_pretrained(checkpoints["hf"], dtype=jnp.bfloat16, quantized=True, workers=1)
    compared = 0
    for path, var in nnx.to_flat_state(nnx.state(want)):
        value = var.get_value()
        key = tuple(map(str, path))
        arrays = {key + (k,): getattr(value, k) for k in checkpoint.QUANT_ARRAYS} if isinstance(
            value, quant.BlockQuantized) else {key: value}
        for k, array in arrays.items():
            array = np.asarray(array)
            assert restored[k].tobytes() == array.view(restored[k].dtype).tobytes(), k
            compared += 1
    assert compared == len(restored)


def test_progress_bar_reports_a_rate(checkpoints, capsys):
    m1.from_pretrained(checkpoints["original"], dtype=jnp.float32, quantized=True, progress=True)
    err = capsys.readouterr().err
    assert "loading" in err and "B/s" in err


# -- direct placement on 8 devices ------------------------------------------------------------------------------

@pytest.mark.usefixtures("eight_devices")
@pytest.mark.parametrize("preset", ["tensor_parallel", "fsdp"])
@pytest.mark.parametrize("quantized", [False, True])
def test_sharded_load_equals_the_unsharded_one(preset, quantized, checkpoints, monkeypatch):
    reads = []
    original = reader.Files.read
    monkeypatch.setattr(reader.Files, "read", lambda self, info, offset, out: (
        reads.append(out.nbytes), original(self, info, offset, out))[1])
    layout = m1.Layout.build("data=2,expert=2,tensor=2", preset)
    model = m1.from_pretrained(checkpoints["original"], dtype=jnp.float32, quantized=quantized, layout=layout)
    sharded_bytes = sum(reads)
    reads.clear()
    reference = m1.from_pretrained(checkpoints["original"], dtype=jnp.float32, quantized=quantized)
    assert sharded_bytes <= 1.02 * sum(reads)  # replicas share one read: nothing is read twice
    assert bits(model) == bits(reference)
    kernel = model.layers[1].self_attn.q_b_proj.kernel.get_value()
    array = kernel.values if quantized else kernel
    assert array.sharding.spec == jax.sharding.PartitionSpec(None, "tensor", None)
    assert len({str(s.index) for s in array.addressable_shards}) == 2
    assert model.layers[1].self_attn.layout is layout


def _plan(path, quantized):
    p = hf.plan_checkpoint(path, dtype=jnp.float32, keep_quantized=quantized)
    by_path = {}
    for unit in p.units:
        for a in unit.assignments:
            by_path.setdefault(a.slot.path, []).append(a)
    return p, by_path


@pytest.mark.parametrize("path, part, box, tensor", [
    # q_b [q, n, h] split over heads: rows [n0·h, n1·h) of wq_b [n·h, q]
    (("layers", 1, "self_attn", "q_b_proj", "kernel"), "values", (slice(None), slice(1, 2), slice(None)),
     "layers.1.attn.wq_b.weight"),
    # q_a [d, q] split over the hidden size (fsdp): a column band of wq_a [q, d], one read per row
    (("layers", 1, "self_attn", "q_a_proj", "kernel"), "dense", (slice(128, 256), slice(None)),
     "layers.1.attn.wq_a.weight"),
    # routed experts [e, f, d] split over experts and width: experts 2-3, rows [128, 256) of each w3 [f, d/2]
    (("layers", 2, "mlp", "experts", "up_proj"), "values", (slice(2, 4), slice(128, 256), slice(None)),
     "layers.2.ffn.experts.{e}.w3.weight"),
])
def test_each_shard_is_read_from_its_byte_range(path, part, box, tensor, checkpoints, monkeypatch):
    p, by_path = _plan(checkpoints["original"], quantized=part != "dense")
    target = p.targets[path]
    reference = m1.from_pretrained(checkpoints["original"], dtype=jnp.float32, quantized=part != "dense")
    want = dict(nnx.to_flat_state(nnx.state(reference)))[path].get_value()
    want = np.asarray(want if part == "dense" else want.values)
    reads = []
    original = reader.Files.read
    monkeypatch.setattr(reader.Files, "read", lambda self, info, offset, out: (
        reads.append((info.name, offset, out.nbytes)), original(self, info, offset, out))[1])
    assignments = by_path[path]
    buffer = regions.parameter_buffer(path, assignments[0], target, keep_quantized=part != "dense")
    shape, dtype = buffer.parts[part]
    got = regions.read_shard(assignments, shape, dtype, box, part)
    np.testing.assert_array_equal(got.view(np.uint8), np.ascontiguousarray(want[box]).view(np.uint8))
    # the bytes read: exactly those of the shard's rows / columns, nothing else
    expected = set()
    infos = {a.info.name: a.info for a in assignments}
    if "{e}" in tensor:
        for e in range(box[0].start, box[0].stop):
            info = infos[tensor.format(e=e)]
            row = info.shape[1]
            expected |= {(info.name, r * row, row) for r in range(box[1].start, box[1].stop)}
        merged = {}
        for name, offset, n in reads:
            for k in range(0, n, infos[name].shape[1]):
                merged[(name, offset + k, infos[name].shape[1])] = True
        assert set(merged) == expected
    elif part == "dense":  # one read per row, of the columns in the box (FP8: whole 128-column scale blocks)
        info = infos[tensor]
        rows, cols = info.shape
        values = [(o, n) for name, o, n in reads if name == tensor]
        assert sorted(values) == [(r * cols + box[0].start, box[0].stop - box[0].start) for r in range(rows)]
    else:
        info = infos[tensor]
        row = info.shape[1]
        h = target.shape[2]
        first, last = box[1].start * h, box[1].stop * h
        assert [(o, n) for name, o, n in reads if name == tensor] == [(first * row, (last - first) * row)]
