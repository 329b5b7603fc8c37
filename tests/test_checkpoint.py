"""Orbax save/load: bit-exact round trips (dense and FP8/FP4), restore onto an 8-device mesh with given
shardings, dtype casts, overwrite rules, and atomicity under injected failures and killed writers."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import model1_jax as m1
from model1_jax.io import orbax as checkpoint
from model1_jax.model import quant
from tests.util import random_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = m1.Config.tiny()


def quantize_some(model: m1.Model1) -> m1.Model1:
    """FP8 attention projections (blocks spanning heads; ceil-blocks) and FP4 routed experts."""
    for layer in model.layers:
        attn, experts = layer.self_attn, layer.mlp.experts
        for var, block in ((attn.q_b_proj.kernel, (16, 2, 16)), (attn.o_a_proj.kernel, (1, 2, 16, 12))):
            var.set_value(jax.tree.map(jnp.asarray, quant.quantize(np.asarray(var[...]), quant.FP8, block)))
        for var in (experts.gate_proj, experts.up_proj, experts.down_proj):
            var.set_value(jax.tree.map(jnp.asarray, quant.quantize(np.asarray(var[...]), quant.FP4, (1, 1, 32), 2)))
    return model


@pytest.fixture(scope="module")
def dense():
    return random_model(CFG, seed=1)


@pytest.fixture(scope="module")
def quantized():
    return quantize_some(random_model(CFG, seed=2))


def arrays(model) -> dict:
    """path → everything that must survive a round trip: format data, dtypes, shapes and bits."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        if isinstance(value, quant.BlockQuantized):
            for name in ("values", "scales"):
                a = np.asarray(getattr(value, name))
                out[(*path, name)] = (value.fmt, value.block, value.pack_axis, type(var), a.dtype, a.shape,
                                      a.tobytes())
        else:
            a = np.asarray(value)
            out[path] = (type(var), a.dtype, a.shape, a.tobytes())
    return out


@pytest.mark.parametrize("which", ["dense", "quantized"])
def test_round_trip_is_bit_exact(which, dense, quantized, tmp_path):
    model = dense if which == "dense" else quantized
    path = m1.save(model, tmp_path / "ckpt")
    assert os.path.basename(path) == "checkpoint-000001"
    restored = m1.load(tmp_path / "ckpt", dtype=jnp.float32)
    assert restored.config == CFG
    assert arrays(restored) == arrays(model)
    if which == "quantized":
        assert isinstance(restored.layers[0].mlp.experts.up_proj.get_value(), quant.BlockQuantized)
        assert restored.layers[1].self_attn.q_b_proj.kernel.get_value().values.dtype == jnp.float8_e4m3fn
    # from_pretrained accepts the Orbax directory too (and the committed version directory itself).
    assert arrays(m1.from_pretrained(path, dtype=jnp.float32)) == arrays(model)
    m1.save(nnx.state(model), tmp_path / "from_state", config=CFG)
    assert arrays(m1.load(tmp_path / "from_state", dtype=jnp.float32)) == arrays(model)


def shard_largest_axis(mesh):
    """Shards each array's first axis divisible by the 'model' axis size; replicates the rest."""
    def sharding(path, sds):
        for axis, n in enumerate(sds.shape):
            if n % mesh.shape["model"] == 0 and n >= mesh.shape["model"]:
                spec = [None] * len(sds.shape)
                spec[axis] = "model"
                return NamedSharding(mesh, P(*spec))
        return NamedSharding(mesh, P())
    return sharding


def test_restore_onto_8_device_mesh_with_given_shardings(quantized, tmp_path):
    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    m1.save(quantized, tmp_path / "ckpt")
    fn = shard_largest_axis(mesh)
    restored = m1.load(tmp_path / "ckpt", dtype=jnp.float32, shardings=fn)
    assert arrays(restored) == arrays(quantized)
    sharded = 0
    for path, var in nnx.to_flat_state(nnx.state(restored)):
        value = var.get_value()
        parts = {"values": value.values, "scales": value.scales} if isinstance(value, quant.BlockQuantized) \
            else {None: value}
        for name, array in parts.items():
            key = path if name is None else (*path, name)
            want = fn(key, jax.ShapeDtypeStruct(array.shape, array.dtype))
            assert array.sharding.is_equivalent_to(want, array.ndim), key
            sharded += want.spec != P()
            assert len(array.addressable_shards) == 8
            assert {s.data.shape for s in array.addressable_shards} == {want.shard_shape(array.shape)}
    assert sharded > 50

    # A mapping keyed by parameter path; one entry covers both arrays of a quantized parameter.
    experts = ("layers", 0, "mlp", "experts", "down_proj")
    mapping = {p: NamedSharding(mesh, P()) for p, _ in nnx.to_flat_state(nnx.state(quantized))}
    mapping[experts] = NamedSharding(mesh, P("model"))
    restored = m1.load(tmp_path / "ckpt", dtype=jnp.float32, shardings=mapping)
    down = restored.layers[0].mlp.experts.down_proj.get_value()
    for array in (down.values, down.scales):
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, P("model")), 3)
    del mapping[experts]
    with pytest.raises(ValueError, match="no entry for 2 array"):
        m1.load(tmp_path / "ckpt", dtype=jnp.float32, shardings=mapping)
    replicated = m1.load(tmp_path / "ckpt", dtype=jnp.float32, mesh=mesh)
    assert replicated.embed_tokens.embedding.get_value().sharding.spec == P()


def test_load_casts_dense_weights_only(quantized, tmp_path):
    m1.save(quantized, tmp_path / "ckpt")
    restored = m1.load(tmp_path / "ckpt", dtype=jnp.bfloat16)
    assert restored.dtype == jnp.bfloat16
    got, want = arrays(restored), arrays(quantized)
    kernel = ("layers", 0, "self_attn", "q_a_proj", "kernel")
    assert got[kernel][1] == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored.layers[0].self_attn.q_a_proj.kernel[...]),
                                  np.asarray(quantized.layers[0].self_attn.q_a_proj.kernel[...]).astype(jnp.bfloat16))
    for key in want:
        if key[-1] in ("values", "scales", "weight", "sinks", "tid2eid", "e_score_correction_bias", "position_bias"):
            assert got[key] == want[key], key  # block-quantized and float32-kept parameters are untouched


def test_relative_paths(dense, tmp_path, monkeypatch):
    """Orbax needs absolute paths; `save` and `load` take relative ones like any file API."""
    monkeypatch.chdir(tmp_path)
    assert m1.save(dense, "ckpt") == str(tmp_path / "ckpt" / "checkpoint-000001")
    assert arrays(m1.load("ckpt", dtype=jnp.float32)) == arrays(dense)
    assert arrays(m1.load(os.path.join("ckpt", "checkpoint-000001"), dtype=jnp.float32)) == arrays(dense)


def test_overwrite_rules(dense, quantized, tmp_path):
    target = tmp_path / "ckpt"
    m1.save(dense, target)
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        m1.save(quantized, target)
    assert m1.save(quantized, target, overwrite=True).endswith("checkpoint-000002")
    assert sorted(os.listdir(target)) == ["checkpoint-000002"]
    assert arrays(m1.load(target, dtype=jnp.float32)) == arrays(quantized)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model1-jax checkpoint"):
        m1.save(dense, tmp_path / "other", overwrite=True)
    assert os.listdir(tmp_path / "other") == ["notes.txt"]
    with pytest.raises(FileNotFoundError, match="holds no model1-jax checkpoint"):
        m1.load(tmp_path / "other", dtype=jnp.float32)


def test_save_checks_the_state_against_the_config(dense, tmp_path):
    with pytest.raises(m1.CheckpointError, match="layers/0/self_attn/sinks: shape"):
        m1.save(nnx.state(dense), tmp_path / "x", config=CFG.replace(num_attention_heads=8, o_groups=2))
    assert not os.path.exists(tmp_path / "x")


def _fail_on_commit_rename(monkeypatch):
    rename = os.rename

    def failing(src, dst, *a, **k):
        if os.path.basename(str(dst)).startswith("checkpoint-"):
            raise OSError("injected: crash at the commit rename")
        return rename(src, dst, *a, **k)
    monkeypatch.setattr(checkpoint.os, "rename", failing)


def _fail_in_item_write(monkeypatch):
    def failing(self, *a, **k):
        raise OSError("injected: disk full while writing an Orbax item")
    monkeypatch.setattr(ocp.Checkpointer, "save", failing)


def _fail_in_manifest(monkeypatch):
    def failing(*a, **k):
        raise OSError("injected: crash while writing the manifest")
    monkeypatch.setattr(checkpoint.json, "dump", failing)


@pytest.mark.parametrize("inject", [_fail_in_item_write, _fail_in_manifest, _fail_on_commit_rename])
def test_injected_failure_leaves_previous_checkpoint(inject, dense, quantized, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    m1.save(dense, target)
    with monkeypatch.context() as patch:
        inject(patch)
        with pytest.raises(OSError, match="injected"):
            m1.save(quantized, target, overwrite=True)
    assert sorted(os.listdir(target)) == ["checkpoint-000001"]  # the failed version was cleaned up
    assert arrays(m1.load(target, dtype=jnp.float32)) == arrays(dense)
    m1.save(quantized, target, overwrite=True)
    assert arrays(m1.load(target, dtype=jnp.float32)) == arrays(quantized)


WRITER = textwrap.dedent("""
    import os, sys, time
    import model1_jax as m1
    from model1_jax.io import orbax as checkpoint
    from tests.util import random_model
    target, marker, mode = sys.argv[1:4]
    model = random_model(m1.Config.tiny(), seed=7)
    if mode == "pause":  # stop for good right after the first Orbax item is on disk, mid-save
        flush = checkpoint.Writer.flush
        def paused(self):
            flush(self)
            open(marker, "w").close()
            time.sleep(600)
        checkpoint.Writer.flush = paused
        m1.save(model, target, overwrite=True)
    else:  # save over and over; the parent kills at an arbitrary moment
        open(marker, "w").close()
        while True:
            m1.save(model, target, overwrite=True)
""")


@pytest.mark.parametrize("mode", ["pause", "anytime"])
def test_killed_writer_leaves_a_loadable_checkpoint(mode, dense, tmp_path):
    target, marker = tmp_path / "ckpt", tmp_path / "marker"
    m1.save(dense, target)
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(target), str(marker), mode], cwd=ROOT, env=env,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the writer never started"
            time.sleep(0.05)
        if mode == "anytime":
            time.sleep(1.5 + np.random.default_rng().uniform(0, 1.0))
        if mode == "pause":
            assert any(e.startswith(".tmp-checkpoint-") for e in os.listdir(target))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stderr.close()
    restored = arrays(m1.load(target, dtype=jnp.float32))
    if mode == "pause":
        assert restored == arrays(dense)
    else:  # whatever version is committed is complete: the first one or one of the child's
        assert restored == arrays(dense) or restored == arrays(random_model(CFG, seed=7))
    m1.save(dense, target, overwrite=True)  # the next save clears what the killed writer left behind
    assert len(os.listdir(target)) == 1


def test_load_lists_mismatches(dense, tmp_path):
    path = m1.save(dense, tmp_path / "ckpt")
    with open(os.path.join(path, "model1.json")) as f:
        manifest = json.load(f)
    manifest["config"].update(num_hidden_layers=3, layer_types=manifest["config"]["layer_types"][:3],
                              mlp_layer_types=manifest["config"]["mlp_layer_types"][:3])
    del manifest["params"]["layers/0/self_attn/sinks"]
    manifest["params"]["norm/weight"]["shape"] = [3]
    with open(os.path.join(path, "model1.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(m1.CheckpointError) as info:
        m1.load(tmp_path / "ckpt", dtype=jnp.float32)
    message = str(info.value)
    for needle in ("missing parameter layers/0/self_attn/sinks", "norm/weight: stored shape [3]",
                   "unexpected parameter layers/3/self_attn/q_a_proj/kernel"):
        assert needle in message, message


@pytest.mark.parametrize("version, needle", [
    (1, "format version 1 keeps the routed experts input axis first"),
    (99, "version 99, expected 'model1-jax' 2"),
])
def test_other_format_versions_are_refused_by_name(version, needle, dense, tmp_path):
    """Version 1 stored the routed experts [e, d, f]; its arrays would not fit today's [e, f, d] parameters."""
    path = m1.save(dense, tmp_path / "ckpt")
    with open(os.path.join(path, "model1.json")) as f:
        manifest = json.load(f)
    manifest["format_version"] = version
    with open(os.path.join(path, "model1.json"), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(m1.CheckpointError, match=needle):
        m1.load(tmp_path / "ckpt", dtype=jnp.float32)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_restore_reads_shards_into_host_buffers_the_cpu_backend_adopts(tmp_path):
    """`m1.load`'s Orbax handler reads each distinct shard once, into an `io.hostmem` map (small pages, `nh`) that
    the CPU backend adopts: replicas share the buffer, and no array is copied into memory of XLA's own (Orbax's
    reads, 16-byte aligned, were). Values are exact, cast where the target dtype differs."""
    from model1_jax.io import orbax_load
    from tests.test_hostmem import _mapping

    x = np.arange(2048 * 2048, dtype=np.float32).reshape(2048, 2048) / 7  # 16 MiB: mapped by io.hostmem
    ocp.PyTreeCheckpointer().save(tmp_path / "item", {"w": jnp.asarray(x), "b": jnp.asarray(x[0])})
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("rows", "copies"))
    sharding = NamedSharding(mesh, P("rows"))
    restored = orbax_load._restore_item(str(tmp_path / "item"), {
        ("w",): jax.ShapeDtypeStruct(x.shape, np.float32, sharding=sharding),
        ("b",): jax.ShapeDtypeStruct(x[0].shape, jnp.bfloat16, sharding=sharding)})
    w, b = restored[("w",)], restored[("b",)]
    np.testing.assert_array_equal(np.asarray(w), x)
    np.testing.assert_array_equal(np.asarray(b), x[0].astype(jnp.bfloat16))
    pointers = {}
    for shard in w.addressable_shards:
        pointers.setdefault(shard.index[0].start, set()).add(shard.data.unsafe_buffer_pointer())
    assert sorted(pointers) == [0, 1024] and all(len(p) == 1 for p in pointers.values())  # one buffer per box
    for (pointer,) in pointers.values():
        assert "nh" in _mapping(pointer)["VmFlags"]
