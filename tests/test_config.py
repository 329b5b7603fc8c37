"""Config: presets, Hugging Face round trips (HF's own config.json), legacy keys, validation."""

import dataclasses
import math

import jax
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.config import CSA, HCA, SLIDING
from model1_jax.model.decoder import DecoderLayer

# The released V4-Flash config.json, as docs/model.md §1.3–1.4 gives its fields: legacy keys throughout.
RELEASED_FLASH = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "moe_intermediate_size": 2048, "num_hidden_layers": 43, "num_attention_heads": 64,
    "num_key_value_heads": 1, "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024,
    "o_groups": 8, "o_lora_rank": 1024, "n_routed_experts": 256, "n_shared_experts": 1,
    "num_experts_per_tok": 6, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus",
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512, "sliding_window": 128, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "num_hash_layers": 3, "swiglu_limit": 10.0,
    "rope_theta": 10000, "compress_rope_theta": 160000, "max_position_embeddings": 1048576,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0], "num_nextn_predict_layers": 1,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "expert_dtype": "fp4",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128], "scale_fmt": "ue8m0"},
}


def test_presets_schedules():
    flash, pro = m1.Config.v4_flash(), m1.Config.v4_pro()
    assert flash.layer_types == (SLIDING, SLIDING) + (CSA, HCA) * 20 + (CSA,)
    assert pro.layer_types == (HCA, HCA) + (CSA, HCA) * 29 + (CSA,)
    for cfg in (flash, pro):
        assert cfg.mlp_layer_types[:3] == ("hash_moe",) * 3 and set(cfg.mlp_layer_types[3:]) == {"moe"}
        assert cfg.rope_scaling == m1.RopeScaling(factor=16.0, original_max_position_embeddings=65536)
        assert cfg.qk_rope_head_dim == 64 and cfg.mtp_layer_type == SLIDING
    tiny = m1.Config.tiny()
    assert set(tiny.layer_types) == {SLIDING, CSA, HCA} and set(tiny.mlp_layer_types) == {"hash_moe", "moe"}


def _param_count(cfg) -> int:
    """Parameters (not buffers, as HF counts) of the real modules: one abstract layer per distinct
    (attention type, MLP type), multiplied by the schedule, plus the global modules."""
    def count(make):
        return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(make), nnx.Param)))

    one_layer = cfg.replace(num_hidden_layers=1, layer_types=cfg.layer_types[:1],
                            mlp_layer_types=cfg.mlp_layer_types[:1])
    kinds = {k: count(lambda k=k: DecoderLayer(cfg, *k, rngs=nnx.Rngs(0)))
             for k in set(zip(cfg.layer_types, cfg.mlp_layer_types))}
    model_with_one_layer = count(lambda: m1.Model1(one_layer, rngs=nnx.Rngs(0)))
    globals_ = model_with_one_layer - kinds[(cfg.layer_types[0], cfg.mlp_layer_types[0])]
    return globals_ + sum(kinds[k] for k in zip(cfg.layer_types, cfg.mlp_layer_types))


@pytest.mark.parametrize("preset, billions", [("v4_flash", 284.33), ("v4_pro", 1572.997)])
def test_preset_parameter_counts(preset, billions):
    """docs/model.md §1.3 (HF modules on the meta device, no MTP): 284.33 B and 1572.997 B."""
    cfg = getattr(m1.Config, preset)().replace(num_nextn_predict_layers=0)
    assert round(_param_count(cfg) / 1e9, 3 if preset == "v4_pro" else 2) == billions


@pytest.mark.oracle
@pytest.mark.parametrize("preset", ["tiny", "v4_flash", "v4_pro"])
def test_round_trip_through_hf_config_json(preset, tmp_path):
    from transformers import DeepseekV4Config

    cfg = getattr(m1.Config, preset)()
    DeepseekV4Config(**cfg.to_hf()).save_pretrained(tmp_path)  # HF writes its own config.json
    assert m1.Config.from_hf(tmp_path) == cfg
    assert m1.Config.from_hf(tmp_path / "config.json") == cfg


def test_released_legacy_config_reads_as_flash_preset():
    assert m1.Config.from_hf(RELEASED_FLASH) == m1.Config.v4_flash()


@pytest.mark.oracle
def test_legacy_keys_agree_with_hf():
    from transformers import DeepseekV4Config

    legacy = {k: v for k, v in RELEASED_FLASH.items() if k not in ("architectures", "model_type")}
    hf = DeepseekV4Config(**legacy)
    ours = m1.Config.from_hf(RELEASED_FLASH)
    assert list(ours.layer_types) == hf.layer_types
    assert list(ours.mlp_layer_types) == hf.mlp_layer_types
    assert ours.compress_rates == hf.compress_rates
    assert ours.qk_rope_head_dim == hf.qk_rope_head_dim
    for kind in ("main", "compress"):
        want = {k: v for k, v in hf.rope_parameters[kind].items() if k != "type"}
        assert ours.rope_parameters[kind] == pytest.approx(want), kind


def test_separate_compress_rate_keys_and_mtp_type():
    raw = dict(RELEASED_FLASH, compress_rate_csa=2, compress_rate_hca=16,
               compress_ratios=[0, 0] + [4, 128] * 20 + [4] + [4])
    cfg = m1.Config.from_hf(raw)
    assert cfg.compress_rates == {CSA: 2, HCA: 16} and cfg.mtp_layer_type == CSA


def test_flat_rope_parameters_without_yarn():
    raw = {k: v for k, v in RELEASED_FLASH.items() if k != "rope_scaling"}
    cfg = m1.Config.from_hf(raw)
    assert cfg.rope_scaling is None
    assert cfg.rope_parameters["compress"] == {"rope_type": "default", "rope_theta": 160000.0,
                                               "partial_rotary_factor": 0.125}


@pytest.mark.parametrize("change, field", [
    (dict(o_groups=3), "o_groups"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(layer_types=(SLIDING, "full_attention", HCA, CSA)), "layer_types"),
    (dict(layer_types=(SLIDING, CSA)), "layer_types"),
    (dict(mlp_layer_types=("moe",) * 3 + ("dense",)), "mlp_layer_types"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(router_jitter_noise=0.01), "router_jitter_noise"),
    (dict(attention_dropout=0.1), "attention_dropout"),
    (dict(hf_extra={"hidden_size": 8}), "hf_extra"),
    (dict(rope_scaling=m1.RopeScaling(factor=0.5, original_max_position_embeddings=64)), "rope_scaling.factor"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ValueError, match=rf"Config\.{field}\b"):
        dataclasses.replace(m1.Config.tiny(), **change)


@pytest.mark.parametrize("raw, field", [
    (dict(RELEASED_FLASH, compress_ratios=[0, 5] + [4] * 41), "compress_ratios"),
    (dict(RELEASED_FLASH, model_type="deepseek_v3"), "model_type"),
    ({k: v for k, v in RELEASED_FLASH.items() if k != "compress_ratios"}, "layer_types"),
    (dict(RELEASED_FLASH, rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
])
def test_from_hf_errors(raw, field):
    with pytest.raises(ValueError, match=field):
        m1.Config.from_hf(raw)


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        m1.Config.from_hf(tmp_path)


def test_mtp_layer_type_survives_to_hf():
    cfg = m1.Config.tiny().replace(mtp_layer_type=CSA)
    assert m1.Config.from_hf(cfg.to_hf()) == cfg


def test_rope_scaling_dict_needs_a_type():
    assert m1.Config.tiny().replace(rope_scaling={"rope_type": "yarn", "factor": 4,
                                                  "original_max_position_embeddings": 64}).rope_scaling.factor == 4
    with pytest.raises(ValueError, match="Config.rope_scaling: a dict needs rope_type"):
        m1.Config.tiny().replace(rope_scaling={"factor": 4, "original_max_position_embeddings": 64})


def test_hf_only_keys_pass_through_without_becoming_knobs():
    """Keys that do not change the model are carried for to_hf(), and are not Config fields."""
    raw = dict(RELEASED_FLASH, use_cache=False, output_router_logits=True, router_aux_loss_coef=0.01,
               quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}, torch_dtype="bfloat16")
    cfg = m1.Config.from_hf(raw)
    fields = {f.name for f in dataclasses.fields(cfg)}
    assert not fields & {"use_cache", "output_router_logits", "router_aux_loss_coef", "quantization_config"}
    assert cfg.hf_extras["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg.to_hf()["use_cache"] is False and cfg.to_hf()["router_aux_loss_coef"] == 0.01
    again = m1.Config.from_hf(cfg.to_hf())
    assert again == cfg and again.hf_extras == cfg.hf_extras
    hash(cfg)  # still a static jit argument


def test_demo_preset_fits_the_fp8_cache_format():
    cfg = m1.Config.demo()
    assert (cfg.head_dim, cfg.qk_rope_head_dim, cfg.sliding_window) == (512, 64, 128)
    assert set(cfg.layer_types) == {SLIDING, CSA, HCA} and cfg.num_nextn_predict_layers == 1
