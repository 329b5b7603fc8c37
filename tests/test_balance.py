"""MoE balancing: the bias update balances a skewed router; the sequence-wise loss by hand; routing capture."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import model1_jax as m1
from model1_jax.model.layers import Buffer
from model1_jax.model.moe import Router, RoutingDecision, record_routing
from model1_jax.train import balance
from tests.util import forward, random_model

route = nnx.jit(lambda router, x: router(x)[1])


def test_bias_update_moves_load_toward_balance():
    cfg = m1.Config.tiny()
    router = Router(cfg, m1.MOE, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # A skewed batch: tokens share one large component, so every token picks the same k experts.
    x = jnp.asarray(rng.normal(size=cfg.hidden_size) + 0.2 * rng.normal(size=(256, cfg.hidden_size)), jnp.float32)
    e, rate = cfg.n_routed_experts, 1e-3
    history = []
    for step in range(300):
        load = balance.expert_load(route(router, x), e)
        history.append(float(balance.imbalance(load)))
        buffers = nnx.state(router, Buffer)
        new = balance.update_bias(nnx.as_pure(buffers), {(): load}, rate)
        if step == 0:  # one step: +rate for every under-loaded expert, −rate for every over-loaded one
            delta = np.asarray(new["e_score_correction_bias"]) - np.asarray(router.e_score_correction_bias[...])
            np.testing.assert_allclose(delta, rate * np.sign(np.mean(load) - np.asarray(load)), rtol=1e-6)
        nnx.update(router, new)
    assert history[0] == e / cfg.num_experts_per_tok  # all tokens on k experts: max/mean = e/k
    assert max(history[-50:]) < 1.2, history[-50:]  # sign steps of a fixed size end in a small oscillation


def test_sequence_balance_loss_by_hand():
    rng = np.random.default_rng(1)
    b, t, e, k = 2, 6, 4, 2
    scores = rng.random((b * t, e)).astype(np.float32) + 0.1
    experts = np.stack([rng.permutation(e)[:k] for _ in range(b * t)]).astype(np.int32)
    want = 0.0
    for s in range(b):
        rows = slice(s * t, (s + 1) * t)
        f = np.array([(experts[rows] == i).sum() for i in range(e)]) * e / (k * t)
        p = (scores[rows] / scores[rows].sum(-1, keepdims=True)).mean(0)
        want += (f * p).sum() / b
    got = balance.sequence_balance_loss(jnp.asarray(experts), jnp.asarray(scores), b)
    np.testing.assert_allclose(float(got), want, rtol=1e-6)
    # Perfectly balanced picks and uniform scores give exactly 1; the loss has a gradient in the scores.
    even = np.array([[0, 1], [2, 3]] * 2, np.int32)
    np.testing.assert_allclose(float(balance.sequence_balance_loss(jnp.asarray(even), jnp.ones((4, 4)), 1)), 1.0)
    grad = jax.grad(lambda s: balance.sequence_balance_loss(jnp.asarray(experts), s, b))(jnp.asarray(scores))
    assert np.abs(np.asarray(grad)).max() > 0


def test_routing_capture_records_every_router_and_leaves_inference_alone():
    model = random_model(m1.Config.tiny().replace(hc_mult=2), seed=5)
    ids = np.random.default_rng(2).integers(0, 256, (2, 9)).astype(np.int32)
    keys_before = {p for p, _ in nnx.to_flat_state(nnx.state(model))}
    plain = np.asarray(forward(model, ids))
    assert {p for p, _ in nnx.to_flat_state(nnx.state(model))} == keys_before  # no state added by inference
    captured_fwd = nnx.jit(lambda m, x: nnx.capture(lambda mm: mm(x), RoutingDecision)(m))
    assert captured_fwd(model, ids)[1] == nnx.State({})  # routers not switched on: nothing is recorded
    logits, captured = captured_fwd(record_routing(nnx.clone(model)), ids)
    # Same routing, same values up to fp32 rounding: the captured program has extra outputs, so XLA may fuse it
    # differently (bit-identical on jax 0.10.2; ~2e-6 apart on jax 0.12 with max |logit| ~4). Any routing or
    # state change would move logits by orders of magnitude more.
    np.testing.assert_allclose(np.asarray(logits), plain, rtol=0, atol=1e-5 * np.abs(plain).max())
    decisions = balance.decisions(captured)
    assert sorted(decisions) == [("layers", i, "mlp", "gate") for i in range(4)]  # __call__ does not run MTP
    for path, [(experts, scores)] in decisions.items():
        assert experts.shape == (18, 2) and scores.shape == (18, 8)
        if path[1] < 2:  # hash layers: the table's experts for each token id
            table = np.asarray(model.layers[path[1]].mlp.gate.tid2eid[...])
            np.testing.assert_array_equal(np.asarray(experts), table[ids.reshape(-1)])
    loads = {p: balance.expert_load(d[0][0], 8) for p, d in decisions.items()}
    line = balance.describe(loads, {("layers", 2, "mlp", "gate"), ("layers", 3, "mlp", "gate")})
    assert line.startswith("L0h ") and " L2 " in line
