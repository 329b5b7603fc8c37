"""The converter on synthetic checkpoints in the released FP8/FP4 formats: both naming schemes, sharded
with an index; logits equal a model holding the exactly dequantized weights; every bad-checkpoint case
gives one error and writes nothing; peak RSS stays within two largest files (measured in a subprocess)."""

import json
import os
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.io import convert
from model1_jax.model import quant
from tests import synthetic as syn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = syn.CONFIG
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 21))
forward = nnx.jit(lambda model, ids: model(ids))
MIB = 2**20


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same random model as released storage (DeepSeek names, 4 shards; HF names, 3 shards) and,
    as the reference, its exactly dequantized weights written densely in float32."""
    root = tmp_path_factory.mktemp("sources")
    stored = syn.quantize_tensors(syn.original_tensors(CFG, seed=0))
    qc = syn.QUANTIZATION_CONFIG
    syn.write_checkpoint(root / "original", CFG, stored, shards=4, quantization_config=qc)
    syn.write_checkpoint(root / "hf", CFG, syn.hf_module_names(stored, CFG), shards=3, quantization_config=qc)
    syn.write_checkpoint(root / "reference", CFG, syn.dequantize_tensors(stored))
    return root, stored


def committed(model):
    """Arrays committed to the default device, as `m1.load` returns them (so jit reuses one compile)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0])))


@pytest.fixture(scope="module")
def oracle(sources):
    root, _ = sources
    model = committed(m1.from_pretrained(root / "reference", dtype=jnp.float32))
    return model, np.asarray(forward(model, IDS))


def params(model) -> dict:
    """path → dense float32 value (block-quantized parameters dequantized) of every weight."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        out[path] = np.asarray(value.dequantize(jnp.float32) if isinstance(value, quant.BlockQuantized) else value)
    return out


@pytest.mark.oracle
def test_synthetic_checkpoints_are_named_and_shaped_like_transformers(tmp_path):
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    from tests.test_loading import tensors_of, to_original_names

    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**CFG.to_hf()))
    dense = syn.original_tensors(CFG, mtp=False)
    want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert {k: v.shape for k, v in syn.hf_module_names(dense, CFG).items()} == want
    hf.save_pretrained(tmp_path)
    saved = {k: tuple(v.shape) for k, v in to_original_names(tensors_of(tmp_path)).items()}
    assert {k: v.shape for k, v in dense.items()} == saved


@pytest.mark.parametrize("weights", ["fp32", "fp8"])
def test_converted_logits_equal_the_dequantized_model(weights, sources, oracle, tmp_path):
    root, stored = sources
    reference, want = oracle
    stats = convert.convert(root / "original", tmp_path / "out", dtype=jnp.float32, quantized=weights == "fp8",
                            progress=False)
    assert stats.items >= 2 and stats.tensors == len(stored) - sum(k.endswith(".scale") for k in stored)
    model = m1.load(tmp_path / "out", dtype=jnp.float32)
    if weights == "fp8":
        attn, experts = model.layers[1].self_attn, model.layers[1].mlp.experts
        q_b, gate = attn.q_b_proj.kernel.get_value(), experts.gate_proj.get_value()
        assert (q_b.fmt, q_b.values.dtype, q_b.block) == (quant.FP8, jnp.float8_e4m3fn, (128, 1, 128))
        assert (gate.fmt, gate.values.shape, gate.block, gate.pack_axis) == (quant.FP4, (4, 128, 64), (1, 1, 32), 2)
        assert attn.indexer.q_b_proj.kernel.get_value().block == (128, 2, 64)  # one block spans both heads
        assert isinstance(model.mtp.e_proj.kernel.get_value(), quant.BlockQuantized)
        assert not isinstance(attn.compressor.kv_proj.kernel.get_value(), quant.BlockQuantized)
    got = params(model)
    for path, value in params(reference).items():  # includes the MTP block, which the forward does not use
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    np.testing.assert_array_equal(np.asarray(forward(model, IDS)), want)


def test_hf_names_and_bf16(sources, oracle, tmp_path):
    root, _ = sources
    reference = {p: v for p, v in params(oracle[0]).items() if p[0] != "mtp"}  # HF checkpoints carry no MTP
    convert.convert(root / "hf", tmp_path / "fp8", dtype=jnp.float32, quantized=True, progress=False)
    got = params(m1.load(tmp_path / "fp8", dtype=jnp.float32))
    assert got.keys() == reference.keys()
    for path, value in reference.items():
        np.testing.assert_array_equal(got[path], value, err_msg=str(path))
    convert.convert(root / "hf", tmp_path / "bf16", dtype=jnp.bfloat16, progress=False)
    model = m1.load(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert model.layers[0].mlp.experts.up_proj.get_value().dtype == jnp.bfloat16
    for path, value in params(model).items():
        want = reference[path] if value.dtype != jnp.bfloat16 else reference[path].astype(jnp.bfloat16)
        np.testing.assert_array_equal(value, want, err_msg=str(path))  # dequantization is exact in bf16


def test_from_pretrained_reads_quantized_directories(sources, oracle):
    root, _ = sources
    reference = params(oracle[0])
    dense = m1.from_pretrained(root / "original", dtype=jnp.float32)
    kept = m1.from_pretrained(root / "original", dtype=jnp.float32, quantized=True)
    assert isinstance(kept.layers[2].mlp.experts.down_proj.get_value(), quant.BlockQuantized)
    for model in (dense, kept):
        got = params(model)
        for path, value in reference.items():
            np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def run_cli(*args) -> tuple[int, str, str]:
    """scripts/convert_checkpoint.py in this process (no second JAX start-up)."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["convert_checkpoint.py", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as code:
            runpy.run_path(os.path.join(ROOT, "scripts", "convert_checkpoint.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return code.value.code, out.getvalue(), err.getvalue()


def test_cli_dry_run_overwrite_and_stats(sources, tmp_path):
    root, _ = sources
    code, out, _ = run_cli(root / "original", tmp_path / "out", "--weights", "fp8", "--dry-run")
    assert code == 0 and "nothing written" in out and "peak host memory ≤" in out and "4 file(s)" in out
    assert not os.path.exists(tmp_path / "out")
    code, out, _ = run_cli(root / "original", tmp_path / "out", "--weights", "fp8", "--no-progress",
                           "--stats-json", tmp_path / "stats.json")
    assert code == 0 and "GB/s" in out
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["source_bytes"] > 0 and stats["peak_rss"] >= stats["rss_start"] > 0
    code, _, err = run_cli(root / "original", tmp_path / "out", "--no-progress")
    assert code == 1 and "already holds a checkpoint" in err and "--overwrite" in err
    code, out, _ = run_cli(root / "original", tmp_path / "out", "--no-progress", "--overwrite")
    assert code == 0 and "checkpoint-000002" in out
    assert sorted(os.listdir(tmp_path / "out")) == ["checkpoint-000002"]


def expect_error(source, output, needles: list[str], count: int | None = None):
    with pytest.raises(m1.CheckpointError) as info:
        convert.convert(source, output, dtype=jnp.float32, quantized=True, progress=False)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in\n{message}"
    if count is not None:
        assert len(info.value.problems) == count, message
    assert not os.path.exists(output), "nothing may be written for a bad checkpoint"


def test_bad_checkpoint_lists_every_problem(sources, tmp_path):
    _, stored = sources
    bad = dict(stored)
    for name in ("layers.1.attn.wq_a.weight", "layers.1.attn.wq_a.scale",        # missing
                 "layers.2.ffn.experts.3.w2.weight", "layers.2.ffn.experts.3.w2.scale",  # one expert missing
                 "layers.2.attn.wkv.weight",                                     # a scale left without weight
                 "layers.0.attn.wo_b.scale"):                                    # an FP8 weight without scale
        del bad[name]
    bad["layers.0.attn.bogus.weight"] = np.zeros(3, np.float32)                 # unexpected
    bad["layers.1.attn.compressor.wkv.weight"] = np.zeros((7, 128), jnp.bfloat16)  # mis-shaped
    bad["layers.0.ffn.gate.tid2eid"] = bad["layers.0.ffn.gate.tid2eid"].astype(np.float32)  # wrong type
    bad["layers.0.attn.wq_b.scale"] = bad["layers.0.attn.wq_b.scale"][:1]        # FP8 scale mis-shaped
    bad["layers.1.ffn.experts.0.w1.scale"] = bad["layers.1.ffn.experts.0.w1.scale"][:, :2]  # FP4 scale mis-shaped
    bad["layers.0.attn.wkv.scale"] = bad["layers.0.attn.wkv.scale"].astype(np.float32)  # scale of wrong dtype
    bad["layers.1.attn.compressor.wgate.scale"] = bad["layers.0.attn.wkv.scale"]  # scale beside a BF16 weight
    syn.write_checkpoint(tmp_path / "bad", CFG, bad, shards=2, quantization_config=syn.QUANTIZATION_CONFIG)
    expect_error(tmp_path / "bad", tmp_path / "out", [
        "missing tensor for layers.1.self_attn.q_a_proj.kernel",
        "missing experts [3] of layers.2.mlp.experts.down_proj",
        "block scale 'layers.2.attn.wkv.scale' has no weight",
        "layers.0.attn.wo_b.weight: F8_E4M3 weight without its block scale",
        "unexpected tensor 'layers.0.attn.bogus.weight'",
        "layers.1.attn.compressor.wkv.weight: shape [7, 128], expected [256, 128]",
        "layers.0.ffn.gate.tid2eid: dtype F32 cannot fill layers.0.mlp.gate.tid2eid",
        "layers.0.attn.wq_b.scale: shape [1, 1], expected [2, 1] (one scale per 128x128 block",
        "layers.1.ffn.experts.0.w1.scale: shape [128, 2], expected [128, 4] (one scale per 1x32 block",
        "layers.0.attn.wkv.scale: scale dtype F32, expected F8_E8M0",
        "layers.1.attn.compressor.wgate.weight: has a block scale but dtype BF16",
    ], count=12)  # + the missing layers.2 kv_proj behind the orphaned scale


def test_config_that_does_not_match_the_tensors(sources, tmp_path):
    _, stored = sources
    syn.write_checkpoint(tmp_path / "src", CFG.replace(moe_intermediate_size=256), stored,
                         quantization_config=syn.QUANTIZATION_CONFIG)
    expect_error(tmp_path / "src", tmp_path / "out", [
        "layers.0.ffn.experts.0.w1.weight: shape [128, 64], expected [256, 64] (FP4: two codes per byte)",
        "layers.0.ffn.shared_experts.w2.weight: shape [128, 128], expected [128, 256] for "
        "layers.0.mlp.shared_experts.down_proj.kernel"])


def test_truncated_and_corrupt_shards(sources, tmp_path):
    root, _ = sources
    src = tmp_path / "src"
    src.mkdir()
    for f in os.listdir(root / "original"):
        (src / f).write_bytes((root / "original" / f).read_bytes())
    shard2, shard3 = src / "model-00002-of-00004.safetensors", src / "model-00003-of-00004.safetensors"
    shard2.write_bytes(shard2.read_bytes()[:-1000])
    shard3.write_bytes(shard3.read_bytes()[:8] + b"garbage" + shard3.read_bytes()[15:])
    expect_error(src, tmp_path / "out", [
        "model-00002-of-00004.safetensors: unreadable safetensors file", "file truncated",
        "model-00003-of-00004.safetensors: unreadable safetensors file (header is not valid JSON"])


# Shards of about one layer each, as released. In bf16 each stacked expert parameter is 4/3 of a shard
# (FP4 → bf16): streaming needs ~1.4 shards; holding the converted model ~17 shards.
RSS_CFG = CFG.replace(vocab_size=1024, hidden_size=512, moe_intermediate_size=512, n_routed_experts=32,
                      num_hidden_layers=4, layer_types=(m1.SLIDING, m1.CSA, m1.HCA, m1.SLIDING),
                      mlp_layer_types=(m1.HASH_MOE, m1.MOE, m1.MOE, m1.MOE), num_nextn_predict_layers=0)


def converter_growth(source, output, stats_file) -> dict:
    """Runs the CLI in a fresh process; its stats with `growth`: peak RSS during conversion − RSS before."""
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "convert_checkpoint.py"), source, output,
                             "--weights", "bf16", "--no-progress", "--stats-json", stats_file],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    stats = json.loads(open(stats_file).read())
    assert stats["peak_is_conversion_only"]
    return {**stats, "growth": stats["peak_rss"] - stats["rss_start"]}


def test_peak_rss_within_two_largest_files_plus_a_constant(sources, tmp_path):
    """The constant (Python/JAX/Orbax/TensorStore working state) is measured, not assumed: the growth
    while converting the tiny checkpoint, whose own tensors are ~0.1 MiB."""
    root, _ = sources
    constant = converter_growth(root / "original", tmp_path / "tiny", tmp_path / "tiny.json")["growth"]
    syn.write_checkpoint(tmp_path / "src", RSS_CFG, syn.random_stored_tensors(RSS_CFG, mtp=False), shards=5,
                         quantization_config=syn.QUANTIZATION_CONFIG)
    largest = max(os.path.getsize(tmp_path / "src" / f) for f in os.listdir(tmp_path / "src"))
    stats = converter_growth(tmp_path / "src", tmp_path / "out", tmp_path / "stats.json")
    print(f"\nconverter: largest file {largest / MIB:.1f} MiB, output {stats['output_bytes'] / MIB:.0f} MiB, "
          f"RSS growth {stats['growth'] / MIB:.1f} MiB (runtime constant {constant / MIB:.1f} MiB), "
          f"{stats['gb_per_s']:.3f} GB/s read ({stats['seconds']:.2f} s)")
    assert stats["output_bytes"] > 6 * largest  # holding the converted model would break the bound 3x over
    assert stats["growth"] <= 2 * largest + constant
