"""The test helpers for the 0731 / 0813 layout, checked against published facts before anything relies on them.

* The synthetic writer's inventory, instantiated at V4-Flash size (shapes only), is the released one: 4,705
  `mtp.*` tensors (1,568 / 1,565 / 1,572 per stage), the dtype census I8 2,304 · F8_E8M0 2,329 · F8_E4M3 25 ·
  BF16 20 · F32 27, 10.863 GB, and the shapes read from the released headers (docs/dspark.md §3).
* Its files are valid safetensors (read back by the `safetensors` package through torch, not by our reader).
* The NumPy drafter reference has the described index set: the last W committed positions and the whole block,
  bidirectionally (docs/dspark.md §6).
"""

import json

import numpy as np
import pytest
from safetensors import safe_open

import model1_jax as m1
from tests import dspark_reference as ref
from tests import synthetic_dspark as sd

FLASH_DSPARK = {"dspark_block_size": 5, "dspark_noise_token_id": 128799, "dspark_target_layer_ids": [40, 41, 42],
                "dspark_markov_rank": 256}


def test_flash_inventory_is_the_released_one():
    layout = sd.storage_layout(sd.stage_layout(m1.Config.v4_flash(), FLASH_DSPARK))
    assert len(layout) == 4705
    assert [sum(k.startswith(f"mtp.{s}.") for k in layout) for s in range(3)] == [1568, 1565, 1572]
    assert sd.count_by_dtype(layout) == {"I8": 2304, "F8_E8M0": 2329, "F8_E4M3": 25, "BF16": 20, "F32": 27}
    assert round(sd.nbytes(layout) / 1e9, 3) == 10.863
    shapes = {"mtp.0.main_proj.weight": (4096, 12288), "mtp.0.main_proj.scale": (32, 96),
              "mtp.1.attn.wo_a.scale": (64, 32), "mtp.2.ffn.experts.7.w1.weight": (2048, 2048),
              "mtp.2.ffn.experts.7.w1.scale": (2048, 128), "mtp.0.ffn.experts.0.w2.scale": (4096, 64),
              "mtp.2.markov_head.markov_w1.weight": (129280, 256), "mtp.2.markov_head.markov_w2.weight": (129280, 256),
              "mtp.2.confidence_head.proj.weight": (1, 4352), "mtp.2.hc_head_fn": (4, 16384)}
    assert {k: layout[k][0] for k in shapes} == shapes
    assert not any(k.endswith(("e_proj.weight", "enorm.weight", "tid2eid")) or ".indexer." in k for k in layout)


@pytest.mark.oracle  # reads the files back through PyTorch (safetensors' NumPy backend has no float8)
def test_written_checkpoint_is_released_style(tmp_path):
    import torch

    path = tmp_path / "ckpt"
    _, stored = sd.write_dspark_checkpoint(path)
    with open(path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert weight_map.keys() == stored.keys()
    files = sorted(set(weight_map.values()))
    for s, file in enumerate(files[-3:]):  # one shard per stage, holding nothing else
        assert {n for n, f in weight_map.items() if f == file} == {n for n in stored if n.startswith(f"mtp.{s}.")}
    for file in files:
        with safe_open(path / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118
                got = f.get_tensor(name)
                want = stored[name]
                assert tuple(got.shape) == want.shape and got.element_size() == want.itemsize, name
                assert got.view(torch.uint8).numpy().tobytes() == want.tobytes(), name
    config = json.loads((path / "config.json").read_text())
    assert config["compress_ratios"] == [0, 4, 128, 0, 0, 0] and config["num_nextn_predict_layers"] == 1
    assert "layer_types" not in config and config["expert_dtype"] == "fp4"
    assert json.loads((path / "inference" / "config.json").read_text()) == {"n_mtp_layers": 3}
    assert stored["mtp.0.main_proj.weight"].dtype.name == "float8_e4m3fn"


@pytest.fixture(scope="module")
def drafter():
    return sd.dequantize_tensors(sd.quantize_tensors(sd.original_tensors(seed=3))), sd.released_config()


def test_reference_keys_are_the_last_window_of_committed_positions(drafter):
    weights, cfg = drafter
    w = cfg["sliding_window"]
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((1, w + 5, 3 * cfg["hidden_size"]))
    base = ref.draft(weights, cfg, hidden, [9])
    for pos, moves in ((4, False), (5, True), (w + 4, True)):  # ring = positions 5 .. W+4
        changed = hidden.copy()
        changed[0, pos] += 1.0
        delta = np.abs(ref.draft(weights, cfg, changed, [9])["hidden"] - base["hidden"]).max()
        assert (delta > 1e-6) == moves, (pos, delta)


def test_reference_block_is_bidirectional(drafter):
    """Slot 0 (the anchor) sees the noise slots after it: causal attention inside the block would not."""
    weights, cfg = drafter
    hidden = np.random.default_rng(1).standard_normal((1, 3, 3 * cfg["hidden_size"]))
    base = ref.draft(weights, cfg, hidden, [9])
    other = ref.draft(weights, cfg | {"dspark_noise_token_id": 17}, hidden, [9])
    assert np.abs(other["hidden"][0, 0] - base["hidden"][0, 0]).max() > 1e-6
    assert base["tokens"].shape == (1, 6) and base["tokens"][0, 0] == 9
    # Greedy drafts are the argmax of the biased logits, each biased by the token before it.
    assert (base["tokens"][0, 1:] == base["logits"][0].argmax(-1)).all()
    # Only the Markov bias depends on the token drawn before: drafts (1, 2, ...) vs (7, 2, ...) move ℓ_1 alone.
    a = ref.draft(weights, cfg, hidden, [9], temperature=1.0, tokens=[[1, 2, 3, 4, 5]])
    b = ref.draft(weights, cfg, hidden, [9], temperature=1.0, tokens=[[7, 2, 3, 4, 5]])
    w1 = weights["mtp.2.markov_head.markov_w1.weight"].astype(np.float64)
    w2 = weights["mtp.2.markov_head.markov_w2.weight"].astype(np.float64)
    np.testing.assert_array_equal(np.delete(a["logits"], 1, axis=1), np.delete(b["logits"], 1, axis=1))
    np.testing.assert_allclose(a["logits"][0, 1] - b["logits"][0, 1], w2 @ (w1[1] - w1[7]), atol=1e-12)
    assert a["confidence"][0, 1] != b["confidence"][0, 1] and a["confidence"][0, 0] == b["confidence"][0, 0]
