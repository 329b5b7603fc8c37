"""from_pretrained: naming schemes, sharded directories, bad checkpoints, bad token ids."""

import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import save_file

import model1_jax as m1
from tests import hf_reference as ref
from tests.util import forward_with_mtp

pytestmark = pytest.mark.oracle  # the checkpoints are written by transformers and torch (tests/oracle_marks.py)

_forward = nnx.jit(lambda model, ids: model(ids))
IDS = np.random.default_rng(0).integers(0, 128, (2, 19))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An HF model saved by transformers (single file) and our logits from it as the baseline."""
    hf = ref.make_model("csa_hca_hc4", seed=3)
    path = tmp_path_factory.mktemp("single")
    hf.save_pretrained(path)
    baseline = np.asarray(_forward(m1.from_pretrained(path, dtype=jnp.float32), jnp.asarray(IDS)))
    return hf, path, baseline


def tensors_of(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def write_checkpoint(path, config_src, tensors, config_patch=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(config_src, "config.json")) as f:
        config = json.load(f)
    config.update(config_patch or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    return path


def logits_of(path) -> np.ndarray:
    return np.asarray(_forward(m1.from_pretrained(path, dtype=jnp.float32), jnp.asarray(IDS)))


def test_matches_transformers(saved):
    hf, _, baseline = saved
    want = ref.logits(hf, IDS)
    assert np.abs(baseline - want).max() / np.abs(want).max() < 1e-4


def test_sharded_directory_with_index(saved, tmp_path):
    hf, _, baseline = saved
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) > 3
    np.testing.assert_array_equal(logits_of(tmp_path), baseline)


def test_hf_module_names_with_merged_experts(saved, tmp_path):
    """Names as the HF modules hold them (`self_attn.q_a_proj`, merged `experts.gate_up_proj`)."""
    hf, path, baseline = saved
    state = {k: v for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    write_checkpoint(tmp_path, path, state)
    np.testing.assert_array_equal(logits_of(tmp_path), baseline)


def to_original_names(tensors: dict) -> dict:
    """transformers' saved names → DeepSeek's originals (no `model.` prefix, `embed`, `hc_head_fn`, …)."""
    out = {}
    for name, t in tensors.items():
        name = re.sub(r"^model\.", "", name)
        name = {"embed_tokens.weight": "embed.weight"}.get(name, name)
        name = re.sub(r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1", name)
        name = re.sub(r"\.attn\.norm\.weight$", ".attn.kv_norm.weight", name)
        out[name] = t
    return out


def test_original_deepseek_names_with_mtp(saved, tmp_path):
    hf, path, baseline = saved
    original = to_original_names(tensors_of(path))
    assert "head.weight" in original and "layers.1.attn.indexer.compressor.wkv.weight" in original
    # An MTP block in DeepSeek's naming: a sliding attention (layer 0's) and a moe FFN (layer 2's).
    gen = torch.Generator().manual_seed(0)
    d = hf.config.hidden_size
    mtp = {k.replace("layers.0.", "mtp.0."): v for k, v in original.items()
           if k.startswith("layers.0.") and ".ffn." not in k}
    mtp.update({k.replace("layers.2.", "mtp.0."): v for k, v in original.items() if k.startswith("layers.2.ffn.")})
    mtp.update({"mtp.0.e_proj.weight": torch.randn(d, d, generator=gen),
                "mtp.0.h_proj.weight": torch.randn(d, d, generator=gen),
                "mtp.0.enorm.weight": torch.randn(d, generator=gen),
                "mtp.0.hnorm.weight": torch.randn(d, generator=gen),
                "mtp.0.norm.weight": torch.randn(d, generator=gen),
                "mtp.0.hc_head_fn": original["hc_head_fn"] + 1.0,
                "mtp.0.hc_head_base": original["hc_head_base"], "mtp.0.hc_head_scale": original["hc_head_scale"]})
    write_checkpoint(tmp_path, path, {**original, **mtp})
    model = m1.from_pretrained(tmp_path, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(_forward(model, jnp.asarray(IDS))), baseline)
    np.testing.assert_array_equal(np.asarray(model.mtp.e_proj.kernel[...]), mtp["mtp.0.e_proj.weight"].numpy().T)
    np.testing.assert_array_equal(np.asarray(model.mtp.norm.weight[...]), mtp["mtp.0.norm.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(model.mtp.layer.self_attn.kv_norm.weight[...]),
                                  np.asarray(model.layers[0].self_attn.kv_norm.weight[...]))
    np.testing.assert_array_equal(np.asarray(model.mtp.layer.mlp.experts.down_proj[...]),
                                  np.asarray(model.layers[2].mlp.experts.down_proj[...]))
    mtp_logits = forward_with_mtp(model, IDS)[1]
    assert mtp_logits.shape == (2, IDS.shape[1] - 1, 128) and np.isfinite(np.asarray(mtp_logits)).all()


def test_bad_checkpoint_lists_every_problem(saved, tmp_path):
    _, path, _ = saved
    tensors = tensors_of(path)
    del tensors["model.layers.1.attn.wq_a.weight"]                                   # missing
    del tensors["model.layers.3.ffn.experts.5.w2.weight"]                            # one expert missing
    tensors["model.layers.0.attn.wkv.weight"] = torch.zeros(7, 64)                   # mis-shaped
    tensors["model.layers.2.attn.indexer.wq_b.weight"] = torch.zeros(64, 32)         # HCA has no indexer
    tensors["model.layers.0.ffn.gate.tid2eid"] = tensors["model.layers.0.ffn.gate.tid2eid"].float()  # wrong type
    tensors["model.bogus.weight"] = torch.zeros(3)                                   # unexpected
    write_checkpoint(tmp_path, path, tensors)
    with pytest.raises(m1.CheckpointError) as info:
        m1.from_pretrained(tmp_path, dtype=jnp.float32)
    message = str(info.value)
    assert len(info.value.problems) == 6, message
    for needle in ("missing tensor for layers.1.self_attn.q_a_proj.kernel", "missing experts [5]",
                   "layers.0.attn.wkv.weight: shape [7, 64], expected [32, 64]",
                   "no parameter layers.2.self_attn.indexer", "dtype F32 cannot fill layers.0.mlp.gate.tid2eid",
                   "unexpected tensor 'model.bogus.weight'"):
        assert needle in message, message


def test_truncated_file(saved, tmp_path):
    _, path, _ = saved
    shutil.copy(path / "config.json", tmp_path / "config.json")
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(m1.CheckpointError, match="unreadable safetensors"):
        m1.from_pretrained(tmp_path, dtype=jnp.float32)


def test_missing_shard_listed_in_index(saved, tmp_path):
    hf, _, _ = saved
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    victim = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[1]
    os.remove(tmp_path / victim)
    with pytest.raises(m1.CheckpointError, match=f"shard listed in the index is missing: {victim}"):
        m1.from_pretrained(tmp_path, dtype=jnp.float32)


def test_block_scale_beside_a_dense_weight(saved, tmp_path):
    """FP8/FP4 checkpoints load (tests/test_convert.py); a scale next to a BF16/F32 weight is an error, and a
    dense checkpoint whose config.json still declares quantization_config loads as dense."""
    _, path, baseline = saved
    tensors = tensors_of(path)
    tensors["model.layers.0.attn.wq_a.scale"] = torch.ones(1, 1)
    write_checkpoint(tmp_path / "a", path, tensors)
    with pytest.raises(m1.CheckpointError, match="wq_a.weight: has a block scale but dtype F32"):
        m1.from_pretrained(tmp_path / "a", dtype=jnp.float32)
    write_checkpoint(tmp_path / "b", path, tensors_of(path), {"quantization_config": {"quant_method": "fp8"}})
    np.testing.assert_array_equal(logits_of(tmp_path / "b"), baseline)


def test_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        m1.from_pretrained(tmp_path / "nope")


@pytest.mark.parametrize("ids, match", [
    (np.array([[1, 2, 256]]), r"\[0, 256\).*256"),
    (np.array([[-1, 2]]), r"\[0, 256\)"),
    (np.array([1, 2, 3]), "shape"),
    (np.array([[1.0, 2.0]]), "integer"),
    (np.zeros((1, 0), np.int32), "empty"),
])
def test_token_ids_are_checked_before_compute(ids, match):
    model = nnx.eval_shape(lambda: m1.Model1(m1.Config.tiny(), rngs=nnx.Rngs(0)))  # abstract: any compute would fail
    with pytest.raises(ValueError, match=match):
        model(ids)
