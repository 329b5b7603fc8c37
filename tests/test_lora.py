"""LoRA: adapters train on a frozen bf16 or FP8/FP4 base that stays bit-identical; merging and saving."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.model import quant
from model1_jax.model.layers import Linear, weight
from model1_jax.train.lora import LoRAConfig, apply_lora, find_targets, load_adapters, merge_lora, save_adapters
from model1_jax.train.optim import OptimizerConfig
from model1_jax.train.trainer import TrainConfig, Trainer
from tests.util import forward, random_model

# One CSA layer: attention with compressor and indexer (test_targets covers the MTP block's attention).
CFG = m1.Config.tiny().replace(num_hidden_layers=1, layer_types=(m1.CSA,), mlp_layer_types=(m1.MOE,),
                               num_nextn_predict_layers=0)
LORA = LoRAConfig(rank=4, alpha=8.0, targets=("attention", "shared_experts"))
TEXT = b"Adapters learn this line; the base never moves."


def flat(state):
    return {tuple(p): v.get_value() for p, v in nnx.to_flat_state(state)}


def quantize_base(model, names=("q_a_proj", "kv_proj", "o_b_proj", "shared_experts")):
    """Some projections to the checkpoint issue's formats: attention kernels FP8 (16-wide blocks),
    shared-expert kernels FP4 (two codes per byte along the input axis); the rest stays as it is."""
    for path, linear in nnx.iter_modules(model):
        if (not isinstance(linear, Linear) or "indexer" in path or "compressor" in path
                or not any(n in path for n in names)):
            continue
        w = np.asarray(linear.kernel.get_value(), np.float32)
        if "shared_experts" in path:
            q = quant.quantize(w, quant.FP4, (1,) * (w.ndim - 1) + (16,), pack_axis=0)
        else:
            q = quant.quantize(w, quant.FP8, tuple(min(16, n) for n in w.shape))
        linear.kernel.set_value(jax.tree.map(jnp.asarray, q))
    return model


def train_adapters(model, steps=40):
    before = flat(nnx.state(model))
    apply_lora(model, LORA, rngs=nnx.Rngs(1))
    trainer = Trainer(model, OptimizerConfig("adamw", learning_rate=3e-2, weight_decay=0.0),
                      TrainConfig(mtp_weight=0.0), lora=True)
    ids = np.frombuffer(TEXT[:40], np.uint8).astype(np.int32)[None, None]
    batch = {"ids": ids, "mask": np.ones_like(ids, bool)}
    history = jax.device_get([trainer.step(batch) for _ in range(steps)])
    return trainer, before, history


def test_adapters_train_and_the_base_stays_bit_identical():
    """A bf16 base whose q_a/kv/o_b and shared-expert kernels are FP8/FP4: adapters sit on both kinds."""
    model = quantize_base(random_model(CFG, seed=3, std=0.05, dtype=jnp.bfloat16))
    kinds = {type(m.kernel.get_value()).__name__ for _, m in find_targets(model, LORA.targets)}
    assert kinds == {"BlockQuantized", "ArrayImpl"}, kinds
    trainer, before, history = train_adapters(model)
    # The adapters learn (rank 4 on a frozen random base, so no memorisation to zero: a clear drop).
    assert history[-1]["main_loss"] < 0.7 * history[0]["main_loss"], [h["main_loss"] for h in history]
    trained = trainer.model()
    adapters = flat(nnx.state(trained, nnx.LoRAParam))
    assert adapters and all(p[-2] == "lora" for p in adapters)
    assert all(np.abs(v).max() > 0 for p, v in adapters.items() if p[-1] == "b")  # B left zero: it trained
    # Optimizer state exists for the adapters only (AdamW: two moments each).
    n_adapter = sum(v.size for v in adapters.values())
    n_state = sum(x.size for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim)
    assert n_state == 2 * n_adapter
    after = flat(nnx.state(trained, nnx.Not(nnx.LoRAParam)))
    assert after.keys() == before.keys()
    for path, value in before.items():  # weights, quantized arrays, router biases, hash tables: untouched
        for a, b in zip(jax.tree.leaves(after[path]), jax.tree.leaves(value)):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), path


def test_merged_model_equals_base_plus_adapters():
    """Merging into dense and FP8/FP4 kernels (dequantized, plus ΔW, stored as the requested dtype)."""
    model = quantize_base(random_model(CFG, seed=4))
    apply_lora(model, LORA, rngs=nnx.Rngs(2))
    rng = np.random.default_rng(0)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):  # as if trained: B no longer zero
        var.set_value(jnp.asarray(0.1 * rng.normal(size=var.shape), jnp.float32))
    base = {p: np.asarray(weight(lin.kernel, jnp.float32)) for p, lin in find_targets(model, LORA.targets)}
    ids = rng.integers(0, 256, (2, 24)).astype(np.int32)
    adapted = np.asarray(forward(model, ids))
    merge_lora(model, dtype=jnp.float32)
    assert not nnx.state(model, nnx.LoRAParam)
    for path, linear in find_targets(model, LORA.targets):
        kernel = linear.kernel.get_value()
        assert kernel.dtype == jnp.float32 and not np.allclose(np.asarray(kernel), base[path]), path
    merged = np.asarray(forward(model, ids))
    np.testing.assert_allclose(merged, adapted, rtol=0, atol=1e-5 * np.abs(adapted).max())


def test_adapters_alone_save_and_load(tmp_path):
    model = random_model(CFG, seed=5)
    apply_lora(model, LORA, rngs=nnx.Rngs(3))
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        var.set_value(var.get_value() + 0.05)
    save_adapters(model, tmp_path / "ad", LORA)
    from safetensors.numpy import load_file
    names = load_file(str(tmp_path / "ad" / "adapters.safetensors")).keys()
    assert names and all(n.endswith((".lora.a", ".lora.b")) for n in names)

    fresh = random_model(CFG, seed=5)
    assert load_adapters(fresh, tmp_path / "ad") == LORA
    for (p1, a), (p2, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(fresh))):
        assert p1 == p2 and np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), p1

    other = random_model(CFG.replace(q_lora_rank=16), seed=5)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapters(other, tmp_path / "ad")
    assert not nnx.state(other, nnx.LoRAParam)  # left as it was


def test_targets():
    model = nnx.eval_shape(lambda: m1.Model1(m1.Config.tiny(), rngs=nnx.Rngs(0)))
    paths = [p for p, _ in find_targets(model, ("attention",))]
    # q/kv/o of 4 layers and of the MTP block; never the compressors' or indexers' projections.
    assert len(paths) == 5 * 5 and any(p.startswith("mtp.") for p in paths)
    assert not any("compressor" in p or "indexer" in p for p in paths)
    assert len(find_targets(model, (r"layers\.0\.self_attn\.q_a_proj",))) == 1
    with pytest.raises(ValueError, match=r"\['nothing_here'\] match no projection"):
        find_targets(model, ("attention", "nothing_here"))
    with pytest.raises(ValueError, match="neither a preset"):
        LoRAConfig(targets=("(",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)


def test_trainer_refusals():
    model = quantize_base(random_model(CFG, seed=6))
    with pytest.raises(ValueError, match="FP8/FP4-quantized"):
        Trainer(model, OptimizerConfig())
    with pytest.raises(ValueError, match="no LoRA adapters"):
        Trainer(model, OptimizerConfig(), lora=True)


def test_adapter_factors_are_muon_matrices():
    """Muon sees A as fan-in → rank and B as rank → fan-out, with the kernel's batch axes (groups g) kept."""
    from optax.contrib import MuonDimensionNumbers

    from model1_jax.train.optim import matrix_dims, param_groups

    def adapted_model():
        model = m1.Model1(CFG, rngs=nnx.Rngs(0))
        apply_lora(model, LORA, rngs=nnx.Rngs(1))
        return model

    model = nnx.eval_shape(adapted_model)  # shapes only
    groups = param_groups(model, nnx.LoRAParam)
    assert groups and set(groups.values()) == {"muon"}
    dims = matrix_dims(model)
    attn = ("layers", 0, "self_attn")
    q_b, o_a = model.layers[0].self_attn.q_b_proj.lora, model.layers[0].self_attn.o_a_proj.lora
    assert q_b.a.shape == (32, 4) and q_b.b.shape == (4, 4, 32)               # [q, l], [l, n, h]
    assert dims[(*attn, "q_b_proj", "lora", "b")] == MuonDimensionNumbers(0, (1, 2))
    assert o_a.a.shape == (2, 2, 32, 4) and o_a.b.shape == (2, 4, 16)         # [g, m, h, l], [g, l, o]
    assert dims[(*attn, "o_a_proj", "lora", "a")] == MuonDimensionNumbers((1, 2), 3)
    assert dims[(*attn, "o_a_proj", "lora", "b")] == MuonDimensionNumbers(1, (2,))
