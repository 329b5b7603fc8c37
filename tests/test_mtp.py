"""The MTP block (docs/model.md §4.10; HF has none): a hand computation of its equations, and its alignment.

mtp_logits[:, t] = lm_head(norm(hc_head(Block(e_proj(enorm(embed(ids[t+1]))) + h_proj(hnorm(X_t))))))
predicts token t+2. The inner Block is a decoder layer (checked against HF in test_module_parity);
everything around it is recomputed here in float64 NumPy from the spec.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from tests.util import forward_with_mtp, random_model, streams

EPS = 1e-6
_layer = nnx.jit(lambda layer, x, ids, positions: layer(x, ids, positions))


def rms(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * w


def hyper_head(x_btcd, fn_cdk, base_k, scale_1):
    b, t, c, d = x_btcd.shape
    flat = x_btcd.reshape(b, t, c * d)
    z = flat / np.sqrt(np.mean(flat * flat, axis=-1, keepdims=True) + EPS)
    pre = 1 / (1 + np.exp(-(z @ fn_cdk.reshape(c * d, c) * scale_1 + base_k))) + EPS  # hc_eps = 1e-6
    return np.einsum("btc,btcd->btd", pre, x_btcd)


def p(var):
    return np.asarray(var[...], np.float64)


@pytest.fixture(scope="module")
def model():
    return random_model(m1.Config.tiny().replace(hc_mult=2), seed=5)


def test_mtp_matches_hand_computation(model):
    ids = np.random.default_rng(1).integers(0, 256, (2, 9))
    logits, mtp_logits = forward_with_mtp(model, ids)
    assert logits.shape == (2, 9, 256) and mtp_logits.shape == (2, 8, 256)

    mtp = model.mtp
    main = np.asarray(streams(model, ids), np.float64)[:, :-1]  # main streams at positions 0..7
    nxt = ids[:, 1:]                                                # tokens 1..8
    e = rms(p(model.embed_tokens.embedding)[nxt], p(mtp.enorm.weight)) @ p(mtp.e_proj.kernel)
    h = rms(main, p(mtp.hnorm.weight)) @ p(mtp.h_proj.kernel)
    x0 = e[:, :, None, :] + h
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    x1 = np.asarray(_layer(mtp.layer, jnp.asarray(x0, jnp.float32), jnp.asarray(nxt), positions), np.float64)
    hc = mtp.hc_head
    out = rms(hyper_head(x1, p(hc.hc_fn), p(hc.hc_base), p(hc.hc_scale)), p(mtp.norm.weight))
    want = out @ p(model.lm_head.kernel)
    np.testing.assert_allclose(np.asarray(mtp_logits), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_mtp_alignment_is_causal(model):
    """mtp_logits[:, t] sees tokens 0..t+1 only: changing token j moves exactly the rows t >= j-1."""
    ids = np.random.default_rng(2).integers(0, 256, (1, 10))
    _, base = forward_with_mtp(model, ids)
    j = 6
    changed = ids.copy()
    changed[0, j] = (changed[0, j] + 1) % 256
    _, moved = forward_with_mtp(model, changed)
    delta = np.abs(np.asarray(moved) - np.asarray(base)).max(axis=-1)[0]
    assert np.all(delta[: j - 1] == 0) and np.all(delta[j - 1:] > 0), delta


def test_mtp_block_is_sliding_moe(model):
    layer = model.mtp.layer
    assert layer.layer_type == m1.SLIDING and layer.mlp_type == m1.MOE and layer.self_attn.compressor is None


def test_no_mtp_config():
    cfg = m1.Config.tiny().replace(num_nextn_predict_layers=0)
    model = nnx.eval_shape(lambda: m1.Model1(cfg, rngs=nnx.Rngs(0)))
    assert model.mtp is None
    with pytest.raises(ValueError, match="num_nextn_predict_layers=0"):
        model.forward_with_mtp(np.zeros((1, 3), np.int32))
