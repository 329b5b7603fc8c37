"""Loading the official 0731 / 0813 layout (docs/dspark.md §3–§4) beside the preview's, on synthetic checkpoints:
DeepSeek names, FP8/FP4 storage, three DSpark stages in their own shards, released config keys.

* the trunk's logits equal transformers' `DeepseekV4ForCausalLM` holding the dequantized weights;
* every drafter parameter is the dequantized tensor, dense or kept block-quantized;
* the schema comes from the tensors: a 0731 fine-tune without `mtp.*` loads as a plain model, the preview's
  MTP block still loads as MTP (even beside `dspark_*` keys);
* Vision-Exp, V4.1 names and inconsistent drafters fail with one error listing every problem;
* the converter, `m1.save` / `m1.load` and the `--dry-run` schema line handle the drafter.
"""

import contextlib
import io
import json
import os
import runpy
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.io import convert
from model1_jax.model import quant
from tests import synthetic as syn
from tests import synthetic_dspark as sd

CFG = sd.TRUNK
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 11))  # ≤ index_topk CSA entries: no top-k ties
forward = nnx.jit(lambda model, ids: model(ids))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A 0731-layout directory, its stored tensors, and the dense model loaded from it."""
    path = tmp_path_factory.mktemp("ckpt") / "flash-0731"
    _, stored = sd.write_dspark_checkpoint(path)
    return path, stored, m1.from_pretrained(path, dtype=jnp.float32)


def write_variant(path, config: dict, stored: dict, **kw):
    return sd.write_released(path, config, stored, **kw)


def params(model) -> dict:
    """path → dense float32 value (block-quantized parameters dequantized) of every weight."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        value = var.get_value()
        out[path] = np.asarray(value.dequantize(jnp.float32) if isinstance(value, quant.BlockQuantized) else value)
    return out


def run_cli(*args) -> tuple[int, str]:
    """scripts/convert_checkpoint.py in this process: (exit code, stdout)."""
    out, argv = io.StringIO(), sys.argv
    sys.argv = ["convert_checkpoint.py", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as code:
            runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts",
                                        "convert_checkpoint.py"), run_name="__main__")
    finally:
        sys.argv = argv
    return code.value.code, out.getvalue()


@pytest.mark.oracle
def test_trunk_logits_equal_transformers(released):
    import torch
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    _, stored, model = released
    dense = sd.dequantize_tensors({k: v for k, v in stored.items() if not k.startswith("mtp.")})
    hf = DeepseekV4ForCausalLM(DeepseekV4Config(**CFG.to_hf())).eval()
    hf.load_state_dict({k: torch.from_numpy(v if np.issubdtype(v.dtype, np.integer) else np.asarray(v, np.float32))
                        for k, v in syn.hf_module_names(dense, CFG).items()})
    with torch.no_grad():
        want = hf(torch.as_tensor(IDS)).logits.numpy()
    got = np.asarray(forward(model, jnp.asarray(IDS)))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_drafter_parameters_are_the_dequantized_tensors(released):
    path, stored, model = released
    dense = sd.dequantize_tensors(stored)
    ds = model.dspark
    assert model.mtp is None and model.config.dspark.num_stages == 3 and len(ds.stages) == 3
    checks = {
        "mtp.0.main_proj.weight": ds.main_proj.kernel[...].T,
        "mtp.0.main_norm.weight": ds.main_norm.weight[...],
        "mtp.2.markov_head.markov_w1.weight": ds.markov_w1[...],
        "mtp.2.markov_head.markov_w2.weight": ds.markov_w2.kernel[...].T,
        "mtp.2.confidence_head.proj.weight": ds.confidence.kernel[...].T,
        "mtp.2.hc_head_fn": np.asarray(ds.hc_head.hc_fn[...]).transpose(2, 0, 1).reshape(2, -1),
        "mtp.1.attn.wq_a.weight": ds.stages[1].self_attn.q_a_proj.kernel[...].T,
        "mtp.1.attn.attn_sink": ds.stages[1].self_attn.sinks[...],
        "mtp.2.ffn.gate.bias": ds.stages[2].mlp.gate.e_score_correction_bias[...],
        "mtp.0.ffn.experts.3.w2.weight": ds.stages[0].mlp.experts.down_proj[...][3],
    }
    for name, got in checks.items():
        np.testing.assert_array_equal(np.asarray(got), dense[name], err_msg=name)
    kept = m1.from_pretrained(path, dtype=jnp.float32, quantized=True)
    assert isinstance(kept.dspark.main_proj.kernel.get_value(), quant.BlockQuantized)
    assert isinstance(kept.dspark.stages[2].mlp.experts.up_proj.get_value(), quant.BlockQuantized)
    got, want = params(kept), params(model)
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))


def test_fine_tune_without_drafter_tensors_is_a_plain_model(released, tmp_path):
    path, stored, model = released
    with open(path / "config.json") as f:
        config = json.load(f)
    plain = m1.from_pretrained(write_variant(tmp_path / "ft", config, sd.without_drafter(stored)), dtype=jnp.float32)
    assert plain.dspark is None and plain.mtp is None and plain.config.dspark is None
    np.testing.assert_array_equal(np.asarray(forward(plain, jnp.asarray(IDS))),
                                  np.asarray(forward(model, jnp.asarray(IDS))))


def test_preview_layout_still_loads_its_mtp_block(tmp_path):
    preview = syn.quantize_tensors(syn.original_tensors(CFG, seed=4))
    path = sd.write_released(tmp_path / "preview", sd.released_config(dspark=None), preview)
    model = m1.from_pretrained(path, dtype=jnp.float32)
    assert model.mtp is not None and model.dspark is None
    # A DSpark-era config over preview tensors: the tensors decide.
    mixed = sd.write_released(tmp_path / "mixed", sd.released_config(num_stages=1), preview)
    assert m1.from_pretrained(mixed, dtype=jnp.float32).mtp is not None


def problems_of(path) -> str:
    with pytest.raises(m1.CheckpointError) as err:
        m1.from_pretrained(path, dtype=jnp.float32)
    return str(err.value)


def test_relatives_and_broken_drafters_fail_with_every_problem(released, tmp_path):
    path, stored, _ = released
    config = sd.released_config()
    message = problems_of(write_variant(tmp_path / "vision", *sd.vision_exp(config, stored)))
    assert "Vision-Exp configuration (vision_config)" in message and "Vision-Exp tensors" in message
    assert "vision.blocks.0.attn.qkv.weight, aligner.proj.weight, image_newline … (6 in all)" in message
    assert "unexpected tensor" not in message  # the family is named, not a list of strays
    message = problems_of(write_variant(tmp_path / "v41", config, sd.v41_markov_names(stored)))
    assert "DeepSeek-V4.1 Markov-head names" in message and "mtp.2.markov_head.embed.weight" in message

    two = {k: v for k, v in stored.items() if not k.startswith("mtp.2.")}
    message = problems_of(write_variant(tmp_path / "two", config, two))
    assert "compress_ratios describes 3 drafter stages, the tensors have 2" in message
    assert "inference/config.json n_mtp_layers describes" not in message  # written from the tensors: 2
    assert "missing tensor for dspark.markov_w1" in message
    no_keys = {k: v for k, v in config.items() if not k.startswith("dspark")}
    no_keys["compress_ratios"] = no_keys["compress_ratios"][:4]
    message = problems_of(write_variant(tmp_path / "nokeys", no_keys, stored))
    assert "but config.json has no dspark_* keys" in message
    moved = dict(stored)
    moved["mtp.1.main_norm.weight"] = moved.pop("mtp.0.main_norm.weight")
    message = problems_of(write_variant(tmp_path / "moved", config, moved))
    assert "mtp.1.main_norm.weight: the DSpark combiner belongs to stage 0" in message
    mixed = stored | {"mtp.0.e_proj.weight": np.zeros((CFG.hidden_size,) * 2, sd.BF16)}
    assert "mixes the preview MTP block" in problems_of(write_variant(tmp_path / "mix", config, mixed))


def test_converter_orbax_and_dry_run(released, tmp_path):
    path, _, model = released
    want = params(model)
    convert.convert(path, tmp_path / "fp8", dtype=jnp.float32, quantized=True, progress=False)
    loaded = m1.load(tmp_path / "fp8", dtype=jnp.float32)
    assert loaded.config == model.config and loaded.config.dspark.markov_rank == 16
    assert isinstance(loaded.dspark.main_proj.kernel.get_value(), quant.BlockQuantized)
    got = params(loaded)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=str(key))
    saved = m1.save(model, tmp_path / "saved")
    again = m1.load(saved, dtype=jnp.float32)
    assert again.config == model.config and again.dspark is not None
    np.testing.assert_array_equal(np.asarray(again.dspark.markov_w1[...]), np.asarray(model.dspark.markov_w1[...]))
    code, out = run_cli(path, "--dry-run")
    assert code == 0 and "schema      DSpark drafter, 3 stages (169 mtp.* tensors)" in out
    assert "DSpark drafter (3 stages)" in out
