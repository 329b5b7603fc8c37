"""config.json of the official 0731 / 0813 checkpoints (docs/dspark.md §2): the `dspark` sub-config, the
`compress_ratios` tail as the drafter's stages, the stale `num_nextn_predict_layers`, and the relatives refused."""

import copy

import pytest

import model1_jax as m1
from tests import synthetic_dspark as sd

FLASH = ([0, 0] + [4, 128] * 20 + [4], 43, [40, 41, 42], 256, 4096)
PRO = ([128, 128] + [4, 128] * 29 + [4], 61, [58, 59, 60], 512, 7168)


def released(trunk_ratios, layers, taps, rank, hidden, stages=3) -> dict:
    """The keys of the released V4-Flash-0731 / V4-Pro-0813 config.json that the drafter depends on."""
    return {"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"], "num_hidden_layers": layers,
            "hidden_size": hidden, "vocab_size": 129280, "num_nextn_predict_layers": 1, "num_hash_layers": 3,
            "compress_ratios": trunk_ratios + [0] * stages, "dspark_block_size": 5,
            "dspark_noise_token_id": 128799, "dspark_target_layer_ids": taps, "dspark_markov_rank": rank,
            "expert_dtype": "fp4", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}


@pytest.mark.parametrize("preset", [FLASH, PRO], ids=["flash-0731", "pro-0813"])
def test_released_configs(preset):
    raw = released(*preset)
    cfg = m1.Config.from_hf(raw)
    assert cfg.dspark == m1.DSparkConfig(block_size=5, noise_token_id=128799, target_layer_ids=tuple(preset[2]),
                                         markov_rank=preset[3], num_stages=3)
    assert cfg.num_nextn_predict_layers == 0  # the file's 1 is stale: 0731 ships no MTP block
    assert len(cfg.layer_types) == preset[1] and cfg.layer_types[-1] == m1.CSA
    assert "dspark_block_size" not in cfg.hf_extras and cfg.hf_extras["expert_dtype"] == "fp4"
    out = cfg.to_hf()
    assert out["compress_ratios"] == raw["compress_ratios"] and out["dspark_target_layer_ids"] == preset[2]
    assert m1.Config.from_hf(out) == cfg


def test_preview_config_is_unchanged():
    raw = released(*FLASH)
    for key in ("dspark_block_size", "dspark_noise_token_id", "dspark_target_layer_ids", "dspark_markov_rank"):
        del raw[key]
    raw["compress_ratios"] = raw["compress_ratios"][:44]
    cfg = m1.Config.from_hf(raw)
    assert cfg.dspark is None and cfg.num_nextn_predict_layers == 1 and cfg.mtp_layer_type == m1.SLIDING
    assert cfg.to_hf()["compress_ratios"] == raw["compress_ratios"]


def test_tiny_released_config_round_trips():
    cfg = m1.Config.from_hf(sd.released_config())
    assert cfg.dspark.target_layer_ids == (0, 1, 2) and cfg.dspark.num_stages == 3
    assert m1.Config.from_hf(cfg.to_hf()) == cfg
    two = m1.Config.from_hf(sd.released_config(num_stages=2))
    assert two.dspark.num_stages == 2 and two.to_hf()["compress_ratios"][-3:] == [128, 0, 0]


@pytest.mark.parametrize("patch, messages", [
    (lambda r: r.update(compress_ratios=r["compress_ratios"][:-3] + [0, 4, 0]),
     ["stages' entries [0, 4, 0] must all be 0"]),
    (lambda r: r.pop("dspark_markov_rank"), ["missing ['dspark_markov_rank']"]),
    (lambda r: r.update(compress_ratios=r["compress_ratios"][:43]), ["one more entry per drafter stage"]),
    (lambda r: r.update(dspark_target_layer_ids=[40, 40, 43]), ["distinct layer indices in [0, 43)"]),
    (lambda r: r.update(dspark_noise_token_id=129280), ["token id in [0, 129280)"]),
    (lambda r: r.update(dspark_n_routed_experts=128, text_config={}, num_nextn_predict_layers=3),
     ["DeepSeek-V4.1", "dspark_n_routed_experts", "text_config", "num_nextn_predict_layers=3"]),
    (lambda r: r.update(vision_config={}, vision_start_token_id=1), ["Vision-Exp", "vision_config",
                                                                    "vision_start_token_id"]),
    (lambda r: [r.pop(k) for k in list(r) if k.startswith("dspark")], ["3 entries past num_hidden_layers"]),
], ids=["tail-not-sliding", "missing-key", "no-tail", "bad-taps", "bad-noise", "v4.1", "vision", "tail-without-keys"])
def test_bad_configs_name_every_problem(patch, messages):
    raw = copy.deepcopy(released(*FLASH))
    patch(raw)
    with pytest.raises(ValueError) as err:
        m1.Config.from_hf(raw)
    for message in messages:
        assert message in str(err.value)


def test_one_drafter_at_a_time():
    with pytest.raises(ValueError, match="0 with a DSpark drafter"):
        m1.Config.tiny().replace(dspark=m1.DSparkConfig(5, 3, (1, 2, 3), 8))
    cfg = m1.Config.tiny().replace(num_nextn_predict_layers=0, dspark={"block_size": 5, "noise_token_id": 3,
                                                                      "target_layer_ids": [1, 2, 3], "markov_rank": 8})
    assert cfg.dspark.target_layer_ids == (1, 2, 3) and hash(cfg)
