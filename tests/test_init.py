"""From-scratch initialisation follows docs/model.md §6, with a non-degenerate hash table; every parameter is named."""

import jax
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.model.layers import Buffer


@pytest.fixture(scope="module")
def model():
    return m1.Model1(m1.Config.tiny(), rngs=nnx.Rngs(0))


def values(model, suffix):
    return [np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))
            if "/".join(map(str, p)).endswith(suffix)]


def test_constant_inits(model):
    for suffix, value in [("_layernorm/weight", 1), ("kv_norm/weight", 1), ("q_a_norm/weight", 1), ("norm/weight", 1),
                          ("hc/base", 0), ("hc/scale", 1), ("hc_head/hc_base", 0), ("hc_head/hc_scale", 1),
                          ("sinks", 0), ("position_bias", 0), ("e_score_correction_bias", 0)]:
        found = values(model, suffix)
        assert found, suffix
        for v in found:
            np.testing.assert_array_equal(v, value, err_msg=suffix)


def test_normal_inits_have_std_initializer_range(model):
    for suffix in ("kernel", "embedding", "experts/gate_proj", "experts/down_proj", "hc/fn", "hc_head/hc_fn"):
        w = np.concatenate([v.ravel() for v in values(model, suffix)])
        assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002, suffix


def test_hash_table_is_non_degenerate(model):
    cfg = model.config
    for table in values(model, "tid2eid"):
        assert table.shape == (cfg.vocab_size, cfg.num_experts_per_tok) and table.dtype == np.int32
        assert all(len(set(row)) == cfg.num_experts_per_tok for row in table)  # distinct experts per token
        assert set(table.ravel()) == set(range(cfg.n_routed_experts))         # every expert reachable
    a, b = values(model, "tid2eid")
    assert (a != b).any()


def test_every_variable_has_logical_axes(model):
    for path, var in nnx.to_flat_state(nnx.state(model)):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.ndim, path
    assert all(not isinstance(v, nnx.Param) for v in jax.tree.leaves(nnx.state(model, Buffer)))


@pytest.mark.parametrize("preset", ["tiny", "tiny_dspark"])
def test_abstract_model_is_the_models_eval_shape(preset):
    """`abstract_model` (which draws no random numbers) has the graph and the abstract variables — paths, types,
    shapes, dtypes, metadata — of `nnx.eval_shape` over the model built with real `nnx.Rngs`."""
    import jax.numpy as jnp

    from model1_jax.model.transformer import abstract_model

    config = m1.Config.tiny()
    if preset == "tiny_dspark":  # every layer type, hash routing, and the DSpark drafter
        config = config.replace(
            num_hidden_layers=3, layer_types=(m1.SLIDING, m1.CSA, m1.HCA),
            mlp_layer_types=(m1.HASH_MOE, m1.MOE, m1.MOE), num_nextn_predict_layers=0,
            dspark=m1.DSparkConfig(5, 200, (0, 1, 2), 8))
    expected = nnx.eval_shape(lambda: m1.Model1(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                                                param_dtype=jnp.bfloat16))
    graphdef, state = nnx.split(expected)
    got_graphdef, got = abstract_model(config, jnp.bfloat16)
    assert got_graphdef == graphdef
    expected = list(nnx.to_flat_state(state))
    assert [p for p, _ in got] == [p for p, _ in expected]
    for (path, a), (_, b) in zip(got, expected):
        assert type(a) is type(b), path
        assert a.get_value() == b.get_value(), path  # ShapeDtypeStructs: shape, dtype, sharding
        assert a.get_metadata() == b.get_metadata(), path
