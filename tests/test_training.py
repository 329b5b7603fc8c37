"""Training step: overfitting with AdamW and Muon, MTP target alignment, accumulation, optimizer groups, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from optax.contrib import MuonDimensionNumbers

import model1_jax as m1
from model1_jax.train.optim import OptimizerConfig, einsum_dims, matrix_dims, param_groups
from model1_jax.train.trainer import TrainConfig, Trainer
from tests.util import forward_with_mtp, random_model

TEXT = b"MODEL1 learns this line by heart."


def text_batch(n: int = 32) -> dict[str, np.ndarray]:
    ids = np.frombuffer(TEXT[:n], np.uint8).astype(np.int32)
    ids = np.stack([ids, np.roll(ids, 5)])[None]  # [accum 1, batch 2, n]
    return {"ids": ids, "mask": np.ones_like(ids, bool)}


def flat(state) -> dict[tuple, np.ndarray]:
    return {tuple(p): np.asarray(v) for p, v in nnx.to_flat_state(state)}


def overfit(model, optimizer: OptimizerConfig, steps: int):
    before = flat(nnx.state(model))
    trainer = Trainer(model, optimizer, TrainConfig(mtp_weight=0.3, remat=False))
    batch = text_batch()
    history = [trainer.step(batch) for _ in range(steps)]
    return trainer, before, jax.device_get(history)


def check_trained(trainer: Trainer, before: dict, history: list):
    last = history[-1]
    assert all(bool(m["grads_finite"]) for m in history)
    assert history[0]["main_loss"] > 3 and last["main_loss"] < 0.05 and last["mtp_loss"] < 0.1, last
    trained = flat(trainer.state.params)
    for path, value in flat(nnx.state(trainer.model())).items():
        name = "/".join(map(str, path))
        if path in trained:
            assert not np.array_equal(value, before[path]), f"{name} did not change"
        elif "indexer" in path or path[-1] == "tid2eid":
            np.testing.assert_array_equal(value, before[path], err_msg=f"{name} is frozen and must not change")
        elif path[-1] == "e_score_correction_bias":
            assert not np.array_equal(value, before[path]), f"{name}: the balance update did not move it"
        else:
            raise AssertionError(f"{name} is neither trained nor deliberately frozen")
    # Every router reports its load: k = 2 picks for each of the 2·32 tokens (2·31 in the MTP block).
    layers = trainer.model().config.num_hidden_layers
    want = {("layers", i, "mlp", "gate"): 2 * 2 * 32 for i in range(layers)}
    assert {p: v.sum() for p, v in last["loads"].items()} == {**want, ("mtp", "layer", "mlp", "gate"): 2 * 2 * 31}


@pytest.fixture(scope="module")
def config():
    return m1.Config.tiny()


def test_muon_overfits_and_trains_every_module():
    """AdamW's overfit of Config.tiny() runs through scripts/finetune.py (test_finetune.py); this is Muon's,
    on two layers that still hold every module kind: CSA + hash routing, HCA + biased routing, and the MTP
    block's sliding attention."""
    cfg = m1.Config.tiny().replace(num_hidden_layers=2, layer_types=(m1.CSA, m1.HCA),
                                   mlp_layer_types=(m1.HASH_MOE, m1.MOE))
    model = random_model(cfg, seed=2, std=0.05)
    trainer, before, history = overfit(model, OptimizerConfig("muon", learning_rate=1e-2, weight_decay=0.0), 80)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim)
    check_trained(trainer, before, history)
    # The indexers exist, and are deliberately outside the trained set (no LM-loss gradient reaches them).
    indexer = [p for p in before if "indexer" in p]
    assert len(indexer) == 6 and not set(indexer) & set(flat(trainer.state.params))


def hand_cross_entropy(logits_btv: np.ndarray, ids: np.ndarray, mask: np.ndarray, shift: int) -> float:
    """Σ over rows t with mask[t + shift] of −log softmax(logits[t])[ids[t + shift]], in float64."""
    total = 0.0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - shift):
            if mask[b, t + shift]:
                row = logits_btv[b, t].astype(np.float64)
                total += np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[ids[b, t + shift]]
    return total


# One step of a 1-layer model with MTP (hand-checkable losses), in several ways that must agree. AdamW with
# eps = 1 and lr = 1 makes the first update −g/(|g| + 1), smooth in g, so parameter changes compare the
# gradients themselves (with eps ≈ 0 it would be ≈ sign(g) for tiny g).
STEP_CFG = m1.Config.tiny().replace(num_hidden_layers=1, layer_types=(m1.SLIDING,), mlp_layer_types=(m1.MOE,))
STEP_OPT = OptimizerConfig("adamw", learning_rate=1.0, eps=1.0, weight_decay=0.0, clip_norm=None)


def step_batch():
    ids = np.frombuffer(TEXT[:32], np.uint8).astype(np.int32)
    ids = np.stack([np.roll(ids, 3 * i) for i in range(4)])[None]  # [accum 1, batch 4, 32]
    mask = np.ones_like(ids, bool)
    mask[0, 2, :10] = False  # unequal target counts per micro-batch: normalisation is global
    mask[0, 0, 7] = False
    return {"ids": ids, "mask": mask}


def one_step(model, *, remat=False, split=False):
    """(parameter changes, buffers, metrics, trainer) of one step; `split`: two micro-batches of 2."""
    before = flat(nnx.state(model, nnx.Param))
    trainer = Trainer(model, STEP_OPT, TrainConfig(mtp_weight=0.5, remat=remat))
    metrics = jax.device_get(trainer.step({k: v.reshape(2, 2, -1) if split else v for k, v in step_batch().items()}))
    after = flat(trainer.state.params)
    return {k: after[k] - before[k] for k in after}, flat(trainer.state.buffers), metrics, trainer


@pytest.fixture(scope="module")
def reference_step():
    return one_step(random_model(STEP_CFG, seed=4))


def test_mtp_targets(reference_step):
    """The step's losses equal a hand computation from `forward_with_mtp`: main row t scores ids[t+1], MTP
    row t scores ids[t+2], masked targets skipped, each normalised by the batch's target count."""
    ids, mask = step_batch()["ids"][0], step_batch()["mask"][0]
    logits, mtp_logits = (np.asarray(x) for x in forward_with_mtp(random_model(STEP_CFG, seed=4), ids))
    main = hand_cross_entropy(logits, ids, mask, 1) / mask[:, 1:].sum()
    mtp = hand_cross_entropy(mtp_logits, ids, mask, 2) / mask[:, 2:].sum()
    wrong = hand_cross_entropy(mtp_logits, ids, mask, 1) / mask[:, 1:].sum()
    # An off-by-one MTP target must land far outside the comparison's tolerance (here ~200x), or this
    # test could not tell the two shifts apart.
    assert abs(wrong - mtp) > 50 * 2e-5 * mtp
    metrics = reference_step[2]
    np.testing.assert_allclose(metrics["main_loss"], main, rtol=2e-5)
    np.testing.assert_allclose(metrics["mtp_loss"], mtp, rtol=2e-5)
    np.testing.assert_allclose(metrics["loss"], main + 0.5 * mtp, rtol=2e-5)


def test_accumulation_remat_and_sharding_match_one_device_step(reference_step):
    """Two micro-batches of 2, with remat, FSDP + tensor parallel over 4 devices (batch split over `data`,
    hidden over `data`, heads over `tensor`) == one batch of 4 on one device: same gradients, router loads
    and metrics, and the state stays in its shardings. (One compilation covers the three mechanisms.)"""
    layout = m1.Layout.build("data=2,tensor=2", "fsdp", devices=jax.devices()[:4])
    model = m1.parallel.create(lambda: random_model(STEP_CFG, seed=4), layout)
    (d1, b1, m1_, trainer), (d2, b2, m2_, _) = one_step(model, remat=True, split=True), reference_step
    scale = max(np.abs(d).max() for d in d2.values())
    for k in d1:
        np.testing.assert_allclose(d1[k], d2[k], rtol=1e-4, atol=1e-5 * scale, err_msg=str(k))
    for k in b1:
        np.testing.assert_array_equal(b1[k], b2[k])
    for k in ("loss", "main_loss", "mtp_loss", "grad_norm"):
        np.testing.assert_allclose(m1_[k], m2_[k], rtol=1e-5, err_msg=k)
    specs = {tuple(p): x.sharding.spec for p, x in nnx.to_flat_state(trainer.state.params)}
    assert specs[("layers", 0, "self_attn", "q_b_proj", "kernel")] == P(None, "tensor")       # [q, n, h]: heads
    assert specs[("embed_tokens", "embedding")] == P("tensor", "data")                       # [v, d]: FSDP
    assert all(len(x.sharding.device_set) == 4 for x in jax.tree.leaves(trainer.state))


def test_optimizer_groups_and_matrix_views(config):
    model = nnx.eval_shape(lambda: m1.Model1(config, rngs=nnx.Rngs(0)))
    groups = param_groups(model)
    vectors = ("weight", "base", "scale", "hc_base", "hc_scale", "sinks", "position_bias")
    for path, group in groups.items():
        want = "adamw" if path[0] in ("embed_tokens", "lm_head") or path[-1] in vectors else "muon"
        assert group == want, "/".join(map(str, path))
    dims = matrix_dims(model)
    attn = ("layers", 1, "self_attn")
    assert dims[(*attn, "q_b_proj", "kernel")] == MuonDimensionNumbers((0,), (1, 2))            # q → n·h
    assert dims[(*attn, "o_a_proj", "kernel")] == MuonDimensionNumbers((1, 2), (3,))            # per group g
    assert dims[(*attn, "compressor", "kv_proj", "kernel")] == MuonDimensionNumbers((0,), (1, 2))
    assert dims[("layers", 2, "mlp", "experts", "down_proj")] == MuonDimensionNumbers(2, 1)   # per expert
    assert einsum_dims("btcd,de->btce") == MuonDimensionNumbers((0,), (1,))


def test_bad_input_is_refused_before_compute(config):
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        OptimizerConfig("sgd")
    with pytest.raises(ValueError, match="total_steps"):
        OptimizerConfig(warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="mtp_weight"):
        TrainConfig(mtp_weight=-1)
    trainer = Trainer(random_model(config.replace(max_position_embeddings=16)), OptimizerConfig())
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings"):
        trainer.step(text_batch(32))
    bad = text_batch(8)
    bad["ids"][0, 1, 3] = 300
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\); found \[300\]"):
        trainer.step(bad)
    with pytest.raises(ValueError, match=r"\[micro-batches, batch, tokens\]"):
        trainer.step({"ids": np.zeros((2, 8), np.int32), "mask": np.ones((2, 8), bool)})
