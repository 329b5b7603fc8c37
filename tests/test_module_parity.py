"""Per-module parity with transformers' DeepSeek-V4 modules, so a failure names its module.

One HF forward (config with sliding, CSA and HCA layers, hash_moe and moe, hc_mult 4) records
every submodule's inputs and outputs through hooks; each test runs the corresponding model1_jax
module on exactly those inputs.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_mod

import model1_jax as m1
from model1_jax.model import rope
from model1_jax.model.attention import picks_visible
from model1_jax.model.indexer import visible_entries
from tests import hf_reference as ref

pytestmark = pytest.mark.oracle  # every test here compares with transformers (tests/oracle_marks.py)

T = 27  # > sliding window (8), 6 CSA windows (> index_topk 3), 3 HCA windows


def close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(np.abs(want).max(), 1e-6)
    err = np.abs(got - want).max() / scale
    assert err < tol, f"max relative error {err:.2e}"


def np_(x):
    return x.detach().float().numpy() if isinstance(x, torch.Tensor) else x


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    hf = ref.make_model("csa_hca_hc4", seed=2)
    path = tmp_path_factory.mktemp("modules")
    hf.save_pretrained(path)
    model = m1.from_pretrained(path, dtype=jnp.float32)
    ids = ref.tie_free_ids(hf, batch=2, length=T, seed=7)
    rec: dict = {}

    def hook(name):
        def fn(module, args, kwargs, out):
            rec[name] = ([np_(a) for a in args], {k: np_(v) for k, v in kwargs.items()
                                                  if isinstance(v, torch.Tensor)}, out)
        return fn

    handles = [hf.model.hc_head.register_forward_hook(hook("hc_head"), with_kwargs=True)]
    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.register_forward_hook(hook(f"{i}.layer"), with_kwargs=True))
        for name in ("attn_hc", "ffn_hc", "self_attn", "mlp"):
            handles.append(getattr(layer, name).register_forward_hook(hook(f"{i}.{name}"), with_kwargs=True))
        handles.append(layer.mlp.gate.register_forward_hook(hook(f"{i}.gate"), with_kwargs=True))
        comp = layer.self_attn.compressor
        if comp is not None:
            handles.append(comp.register_forward_hook(hook(f"{i}.compressor"), with_kwargs=True))
            if hasattr(comp, "indexer"):
                handles.append(comp.indexer.register_forward_hook(hook(f"{i}.indexer"), with_kwargs=True))
    with torch.no_grad():
        hf(torch.as_tensor(ids))
    for h in handles:
        h.remove()
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), ids.shape)
    return hf, model, jnp.asarray(ids, jnp.int32), positions, rec


def layers_of(hf, *types):
    return [i for i, t in enumerate(hf.config.layer_types) if t in types]


def test_rope_tables_match_hf(run):
    hf, model, *_ = run
    for kind in (rope.MAIN, rope.COMPRESS):
        want = getattr(hf.model.rotary_emb, f"{kind}_inv_freq").numpy()
        close(rope.inverse_frequencies(model.config, kind), want, tol=1e-6)


def test_yarn_table_of_released_settings():
    """docs/model.md §3.2: with factor 16 / 65536 / beta 32,1 pairs 0..15 keep 160000^(-2i/64), 25..31 are divided
    by 16."""
    freq = rope.inverse_frequencies(m1.Config.v4_flash(), rope.COMPRESS)
    base = 160000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(freq[:16], base[:16], rtol=1e-6)
    np.testing.assert_allclose(freq[25:], base[25:] / 16, rtol=1e-6)
    assert np.all((freq[16:25] < base[16:25]) & (freq[16:25] > base[16:25] / 16))
    np.testing.assert_allclose(rope.inverse_frequencies(m1.Config.v4_flash(), rope.MAIN),
                               10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-6)


def test_apply_rope_matches_hf_interleaved_trailing_channels(run):
    hf, model, *_ = run
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 5, 32)).astype(np.float32)  # [b, heads, t, d]
    pos = torch.arange(5)[None].expand(2, -1)
    cos, sin = hf.model.rotary_emb(torch.zeros(1), position_ids=pos, layer_type="compress")
    want = hf_mod.apply_rotary_pos_emb(torch.as_tensor(x), cos, sin).numpy()
    c, s = rope.cos_sin(model.config, rope.COMPRESS, jnp.asarray(pos.numpy()))
    got = rope.apply_rope(jnp.asarray(x), c[:, None], s[:, None])
    close(got, want, tol=1e-6)
    close(rope.apply_rope(got, c[:, None], s[:, None], inverse=True), x, tol=1e-6)
    np.testing.assert_array_equal(np.asarray(got)[..., :24], x[..., :24])  # nope channels untouched


@pytest.mark.parametrize("site", ["attn_hc", "ffn_hc"])
def test_hyper_connection(run, site):
    hf, model, _, _, rec = run
    for i, layer in enumerate(model.layers):
        (streams,), _, (post, comb, collapsed) = rec[f"{i}.{site}"]
        got_post, got_comb, got_collapsed = getattr(layer, site)(jnp.asarray(streams))
        close(got_post, np_(post))
        close(got_comb, np_(comb))
        close(got_collapsed, np_(collapsed))
        # Sinkhorn output is doubly stochastic up to eps.
        np.testing.assert_allclose(np.asarray(got_comb).sum(-1), 1.0, atol=1e-4)
        np.testing.assert_allclose(np.asarray(got_comb).sum(-2), 1.0, atol=1e-4)


def test_hyper_head(run):
    hf, model, _, _, rec = run
    (streams,), _, out = rec["hc_head"]
    close(model.hc_head(jnp.asarray(streams)), np_(out))


def test_attention_each_layer_type(run):
    hf, model, _, positions, rec = run
    for i, layer in enumerate(model.layers):
        (x,), _, (out, _) = rec[f"{i}.self_attn"]
        close(layer.self_attn(jnp.asarray(x), positions), np_(out))


def test_compressors_and_visibility(run):
    hf, model, _, positions, rec = run
    for i in layers_of(hf, ref.C, ref.H):
        (x, q_res, *_), _, (entries, block_bias) = rec[f"{i}.compressor"]
        attn = model.layers[i].self_attn
        got = attn.compressor(jnp.asarray(x))
        close(got, np_(entries)[:, 0])
        want_visible = np_(block_bias)[:, 0] == 0
        if attn.indexer is None:
            got_visible = visible_entries(positions, got.shape[1], attn.compressor.rate)
        else:
            got_visible = picks_visible(attn.indexer(jnp.asarray(x), jnp.asarray(q_res), positions), got.shape[1])
        np.testing.assert_array_equal(np.asarray(got_visible), want_visible, err_msg=f"layer {i}")


def test_indexer_selection(run):
    hf, model, _, positions, rec = run
    for i in layers_of(hf, ref.C):
        (x, q_res, *_), _, picks = rec[f"{i}.indexer"]
        got = np.asarray(model.layers[i].self_attn.indexer(jnp.asarray(x), jnp.asarray(q_res), positions))
        want = picks.numpy()
        assert got.shape == want.shape
        # Picks are a set per query (order is irrelevant to attention); -1 marks "fewer visible than k".
        np.testing.assert_array_equal(np.sort(got, -1), np.sort(want, -1), err_msg=f"layer {i}")
        assert (got == -1).any() and (got >= 0).any()


def test_moe_routing(run):
    hf, model, ids, _, rec = run
    for i, layer in enumerate(model.layers):
        args, kwargs, (_, weights, experts) = rec[f"{i}.gate"]
        x = args[0].reshape(-1, args[0].shape[-1])
        route_ids = ids.reshape(-1) if layer.mlp.gate.is_hash else None
        got_w, got_e, _ = layer.mlp.gate(jnp.asarray(x), route_ids)
        order_got, order_want = np.argsort(np.asarray(got_e), -1), np.argsort(experts.numpy(), -1)
        np.testing.assert_array_equal(np.take_along_axis(np.asarray(got_e), order_got, -1),
                                      np.take_along_axis(experts.numpy(), order_want, -1), err_msg=f"layer {i}")
        close(np.take_along_axis(np.asarray(got_w), order_got, -1),
              np.take_along_axis(np_(weights), order_want, -1))


def test_moe_block(run):
    hf, model, ids, _, rec = run
    assert {layer.mlp_type for layer in model.layers} == {m1.HASH_MOE, m1.MOE}
    for i, layer in enumerate(model.layers):
        (x,), _, out = rec[f"{i}.mlp"]
        close(layer.mlp(jnp.asarray(x), ids), np_(out))


def test_decoder_layer(run):
    """A whole layer, including X' = post ⊗ y + combᵀ·X (comb contracted over its first index)."""
    hf, model, ids, positions, rec = run
    for i, layer in enumerate(model.layers):
        (streams,), _, out = rec[f"{i}.layer"]
        close(layer(jnp.asarray(streams), ids, positions), np_(out))
