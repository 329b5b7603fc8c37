"""Sharded execution on 8 simulated CPU devices equals the single-device model.

Meshes 8×1×1 (data), 1×8×1 (expert), 1×2×4 and 2×2×2 (data × expert × tensor) with the inference
presets, plus FSDP on 2×2×2. The test config divides every one of them: 8 query heads in 4 output
groups, 4 indexer heads, 8 routed experts of width 48, vocabulary 256; it has CSA and HCA
layers, hash and learned routing, and the MTP block (sliding window). Compiled functions are shared per layout.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import model1_jax as m1
from model1_jax import parallel as sh
from model1_jax.model import moe, quant
from model1_jax.parallel import distributed
from tests.util import random_model

pytestmark = pytest.mark.usefixtures("eight_devices")  # tests/conftest.py
TOL = 1e-5  # max |Δlogit| / max |logit|; sharding only reorders fp32 sums
# CSA + hash routing, HCA + learned routing, and the MTP block (a sliding-window layer).
CFG = m1.Config.tiny().replace(
    num_hidden_layers=2, layer_types=(m1.CSA, m1.HCA), mlp_layer_types=(m1.HASH_MOE, m1.MOE),
    num_attention_heads=8, o_groups=4, index_n_heads=4, moe_intermediate_size=48, hc_mult=2)
IDS = np.random.default_rng(0).integers(0, CFG.vocab_size, (8, 24), dtype=np.int32)

LAYOUTS = {
    "8x1x1-data_parallel": ("data=8", "data_parallel"),
    "1x8x1-expert_parallel": ("expert=8", "expert_parallel"),
    "1x2x4-tensor_parallel": ("expert=2,tensor=4", "tensor_parallel"),
    "2x2x2-tensor_parallel": ("data=2,expert=2,tensor=2", "tensor_parallel"),
    "2x2x2-fsdp": ("data=2,expert=2,tensor=2", "fsdp"),
}


def layout_of(name: str, **kw) -> sh.Layout:
    mesh_spec, preset = LAYOUTS[name]
    return sh.Layout(sh.make_mesh(mesh_spec), sh.Rules.preset(preset), **kw)


def compile_forward(model: m1.Model1, ids):
    graphdef, state = nnx.split(model)
    fn = jax.jit(lambda state, ids: nnx.merge(graphdef, state).forward_with_mtp(ids))
    return fn.lower(state, ids).compile(), state


@pytest.fixture(scope="module")
def reference():
    compiled, state = compile_forward(random_model(CFG), IDS)
    return [np.asarray(x) for x in compiled(state, IDS)]


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def run(request):
    """(name, layout, sharded model, compiled forward_with_mtp, its outputs)."""
    layout = layout_of(request.param)
    model = sh.shard(random_model(CFG), layout)
    compiled, state = compile_forward(model, IDS)
    return request.param, layout, model, compiled, [np.asarray(x) for x in compiled(state, IDS)]


def max_rel_err(got, want) -> float:
    """max |got − want| / max |want|: the project's logit-error measure (summation order moves small values)."""
    return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def canonical(spec: P) -> tuple:
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


# -- equality with one device ----------------------------------------------------------------------

def test_forward_matches_single_device(run, reference):
    name, _, _, _, outputs = run
    for got, want, what in zip(outputs, reference, ("logits", "mtp logits")):
        err = max_rel_err(got, want)
        assert err < TOL, f"{name} {what}: max relative error {err:.2e}"


# -- placement -------------------------------------------------------------------------------------

EXPECTED = {  # path suffix → PartitionSpec, per preset, for the meshes above (size-1 axes split nothing)
    "data_parallel": {"experts/gate_proj": P(), "self_attn/q_b_proj/kernel": P(), "embed_tokens/embedding": P()},
    "expert_parallel": {
        "experts/gate_proj": P("expert"), "experts/down_proj": P("expert"), "mlp/gate/kernel": P(),
        "mlp/gate/e_score_correction_bias": P(), "self_attn/q_b_proj/kernel": P(),
        "self_attn/sinks": P(), "shared_experts/gate_proj/kernel": P(), "embed_tokens/embedding": P()},
    "tensor_parallel": {
        "experts/gate_proj": P("expert", "tensor", None), "experts/up_proj": P("expert", "tensor", None),
        "experts/down_proj": P("expert", None, "tensor"), "mlp/gate/kernel": P(),
        "self_attn/q_b_proj/kernel": P(None, "tensor", None), "self_attn/sinks": P("tensor"),
        "self_attn/o_a_proj/kernel": P("tensor"), "self_attn/o_b_proj/kernel": P("tensor"),
        "self_attn/kv_proj/kernel": P(), "indexer/q_b_proj/kernel": P(None, "tensor"),
        "indexer/weights_proj/kernel": P(None, "tensor"), "shared_experts/gate_proj/kernel": P(None, "tensor"),
        "shared_experts/down_proj/kernel": P("tensor"), "mlp/gate/tid2eid": P("tensor"),
        "embed_tokens/embedding": P("tensor"), "lm_head/kernel": P(None, "tensor"), "attn_hc/fn": P()},
    "fsdp": {
        "experts/gate_proj": P("expert", "tensor", "data"), "experts/down_proj": P("expert", "data", "tensor"),
        "self_attn/q_a_proj/kernel": P("data"), "self_attn/q_b_proj/kernel": P(None, "tensor"),
        "self_attn/o_b_proj/kernel": P("tensor", None, "data"), "embed_tokens/embedding": P("tensor", "data"),
        "attn_hc/fn": P(None, "data"), "mtp/e_proj/kernel": P("data")},
}


def test_parameters_land_with_intended_specs(run):
    name, layout, model, _, _ = run
    expected = EXPECTED[LAYOUTS[name][1]]
    seen = set()
    for path, var in nnx.to_flat_state(nnx.state(model)):
        key = "/".join(map(str, path))
        actual = var.get_value().sharding
        assert actual.mesh == layout.mesh, key
        assert canonical(actual.spec) == canonical(layout.spec(var.get_metadata()["logical_axes"])), key
        for suffix, spec in expected.items():
            if key.endswith(suffix):
                assert canonical(actual.spec) == canonical(spec), f"{name} {key}: {actual.spec} != {spec}"
                seen.add(suffix)
    assert seen == set(expected), f"no parameter matched {set(expected) - seen}"


def expert_weight_gathers(hlo: str) -> list[str]:
    """All-gather ops (sync or async) whose operands/results have a routed-expert weight's trailing dims."""
    d, f = CFG.hidden_size, CFG.moe_intermediate_size
    widths = {f // n for n in (1, 2, 4, 8)}
    hits = []
    for line in hlo.splitlines():
        if "all-gather" not in line:
            continue
        for dims in re.findall(r"[a-z]+\d*\[(\d+),(\d+),(\d+)\]", line):
            _, a, b = map(int, dims)
            if (a == d and b in widths) or (a in widths and b == d):
                hits.append(line.strip())
                break
    return hits


def test_no_all_gather_of_routed_expert_weights(run):
    name, _, _, compiled, _ = run
    hits = expert_weight_gathers(compiled.as_text())
    if LAYOUTS[name][1] == "fsdp":
        # Control: FSDP splits the experts' hidden dim over `data`, so they must be gathered where used.
        assert hits, "the HLO check found no expert-weight all-gather even under FSDP"
    else:
        assert not hits, f"{name}: routed-expert weights are all-gathered:\n" + "\n".join(hits[:3])


def test_create_initialises_directly_sharded():
    """`create` runs the module init as one jitted computation with sharded outputs, without collectives
    (each device draws its own shards); values equal an unsharded init with the same seed. (The routed
    experts alone: XLA:CPU takes about a second to compile each random draw.)"""
    layout = layout_of("1x2x4-tensor_parallel")
    make = lambda: moe.Experts(CFG, rngs=nnx.Rngs(3))  # noqa: E731
    experts = sh.create(make, layout)
    assert experts.layout is layout
    want = jax.jit(lambda: nnx.state(make()))()
    for name in ("gate_proj", "up_proj", "down_proj"):
        value = getattr(experts, name).get_value()
        assert value.sharding.spec == EXPECTED["tensor_parallel"][f"experts/{name}"], name
        assert {s.data.shape for s in value.addressable_shards} == {
            (4, 12, 64) if name != "down_proj" else (4, 64, 12)}
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name].get_value()), err_msg=name)
    hlo = sh.initializer(make, layout)[1].lower().compile().as_text()
    assert not re.search(r"all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute", hlo)


# -- rules -----------------------------------------------------------------------------------------

def logical_names(cfg: m1.Config) -> set[str]:
    state = nnx.state(nnx.eval_shape(lambda: m1.Model1(cfg, rngs=nnx.Rngs(0))))
    return {a for _, v in nnx.to_flat_state(state) for a in v.get_metadata()["logical_axes"] if a is not None}


def test_rules_cover_every_parameter_axis():
    """Every logical axis a parameter uses has a rule in every preset, and the table has no stale names."""
    names = logical_names(m1.Config.tiny()) | logical_names(CFG.replace(tie_word_embeddings=True))
    assert names <= set(sh.PARAM_AXES), f"parameters use logical axes without a rule: {names - set(sh.PARAM_AXES)}"
    assert set(sh.PARAM_AXES) <= names, f"rules for axes no parameter uses: {set(sh.PARAM_AXES) - names}"
    for preset in sh.PRESETS:
        rules = sh.Rules.preset(preset)
        assert set(rules.as_dict()) == set(sh.LOGICAL_AXES)
        for name in names:
            rules[name]


def test_rules_reject_unknown_and_missing_names():
    with pytest.raises(KeyError, match="no rule for logical axis 'new_axis'"):
        sh.Rules.expert_parallel()["new_axis"]
    with pytest.raises(ValueError, match="unknown logical axes"):
        sh.Rules.expert_parallel().replace(new_axis="tensor")
    with pytest.raises(ValueError, match="no rule for logical axes"):
        sh.Rules.of({"vocab": None})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        sh.Rules.expert_parallel().replace(heads="model")
    rules = sh.Rules.expert_parallel().parse_overrides("heads=tensor,experts=expert+tensor,expert_mlp=")
    assert rules["heads"] == ("tensor",) and rules["experts"] == ("expert", "tensor") and rules["expert_mlp"] == ()


def test_user_rules_split_experts_over_two_axes():
    layout = sh.Layout(sh.make_mesh("expert=2,tensor=4"),
                       sh.Rules.expert_parallel().replace(experts=("expert", "tensor"), expert_mlp=None))
    shardings = layout.shardings(nnx.eval_shape(lambda: m1.Model1(CFG, rngs=nnx.Rngs(0))))
    assert shardings["layers"][0]["mlp"]["experts"]["gate_proj"].spec == P(("expert", "tensor"), None, None)


# -- bad layouts -----------------------------------------------------------------------------------

def abstract(cfg):
    return nnx.eval_shape(lambda: m1.Model1(cfg, rngs=nnx.Rngs(0)))


def test_mesh_that_does_not_divide_heads_is_a_clear_error():
    layout = sh.Layout(sh.make_mesh("expert=2,tensor=4"), sh.Rules.tensor_parallel())
    with pytest.raises(ValueError) as err:
        layout.shardings(abstract(CFG.replace(num_attention_heads=6, o_groups=3)))
    msg = str(err.value)
    assert "layers/{0,1}/self_attn/q_b_proj/kernel: dimension 1 ('heads', size 6) is not divisible by mesh " \
           "axes tensor (4 devices)" in msg
    assert "('o_groups', size 3)" in msg and "mtp/layer/self_attn/sinks" in msg  # every problem, at once


def test_mesh_that_does_not_divide_experts_is_a_clear_error():
    layout = layout_of("1x8x1-expert_parallel")
    with pytest.raises(ValueError, match=r"experts/gate_proj: dimension 0 \('experts', size 12\) is not divisible "
                                         r"by mesh axes expert \(8 devices\)"):
        sh.shard(random_model(CFG.replace(n_routed_experts=12)), layout)


def test_mesh_axis_used_twice_is_a_clear_error():
    layout = sh.Layout(sh.make_mesh("expert=2,tensor=4"), sh.Rules.tensor_parallel().replace(head_dim="tensor"))
    with pytest.raises(ValueError, match="mesh axis 'tensor' splits both dimension 1 and 2"):
        layout.shardings(abstract(CFG))


@pytest.mark.parametrize("spec, match", [
    ("data=3", "needs 3 devices, but 8 are available"),
    ("data=2,model=4", r"unknown axes \['model'\]"),
    ("data=two", "size of 'data' must be an integer"),
    ("data=-1,expert=-1", "one axis may be -1"),
    ("data=2,data=4", "distinct axes"),
    ("data=3,expert=-1", "do not split"),
])
def test_bad_mesh_spec(spec, match):
    with pytest.raises(ValueError, match=match):
        sh.make_mesh(spec)


def test_mesh_spec_forms():
    assert sh.parse_mesh("data=2,expert=4", 8) == {"data": 2, "expert": 4, "tensor": 1}
    assert sh.parse_mesh("data=2,expert=-1", 8) == {"data": 2, "expert": 4, "tensor": 1}
    assert sh.parse_mesh(None, 8) == {"data": 1, "expert": 8, "tensor": 1}
    mesh = sh.make_mesh("data=2,tensor=4")
    assert dict(mesh.shape) == {"data": 2, "expert": 1, "tensor": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_layout_refuses_explicit_axes():
    mesh = jax.make_mesh((1, 8, 1), sh.MESH_AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 3)
    with pytest.raises(ValueError, match="not Auto-typed"):
        sh.Layout(mesh, sh.Rules.expert_parallel())


def test_activation_constraint_keeps_axes_that_divide():
    layout = layout_of("2x2x2-tensor_parallel")
    assert layout.activation_spec(("batch", "seq", "act_embed"), (8, 5, 64)) == P(("data", "expert"), None, None)
    assert layout.activation_spec(("batch", "seq", "act_embed"), (2, 5, 64)) == P("data", None, None)
    assert layout.activation_spec(("batch", "seq", "act_embed"), (1, 5, 64)) == P(None, None, None)


# -- expert parallelism: capacity and padding ------------------------------------------------------

def capacity_reference(x, experts, weights, gate, up, down, limit, capacity):
    """Each expert takes its first `capacity` assignments in token order; float64 loops. Weights as the model
    stores them: gate, up [e, f, d], down [e, d, f]."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    taken = np.zeros(gate.shape[0], int)
    y = np.zeros((x.shape[0], down.shape[1]))
    for t in range(x.shape[0]):
        for e, w in zip(np.asarray(experts[t]), np.asarray(weights[t])):
            if taken[e] >= capacity:
                continue
            taken[e] += 1
            g, u = np.minimum(gate[e] @ x[t], limit), np.clip(up[e] @ x[t], -limit, limit)
            y[t] += w * (down[e] @ (g / (1 + np.exp(-g)) * u))
    return y


@pytest.fixture(scope="module")
def moe_layer():
    model = random_model(CFG)
    return model.layers[1].mlp, nnx.state(model.layers[1].mlp)


def moe_inputs(t):
    rng = np.random.default_rng(t)
    return rng.normal(size=(1, t, CFG.hidden_size)).astype(np.float32)


def test_routed_ffn_capacity_drops_in_token_order(moe_layer):
    layer, _ = moe_layer
    x = moe_inputs(13)[0]
    weights, experts, _ = layer.gate(jnp.asarray(x))
    params = [np.asarray(v.get_value()) for v in (layer.experts.gate_proj, layer.experts.up_proj,
                                                  layer.experts.down_proj)]
    ffn = jax.jit(moe.routed_ffn, static_argnames=("limit", "capacity"))
    for capacity in (1, 3):
        got = ffn(jnp.asarray(x), experts, weights, *params, limit=CFG.swiglu_limit, capacity=capacity)
        want = capacity_reference(x, experts, weights, *params, CFG.swiglu_limit, capacity)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    full = ffn(jnp.asarray(x), experts, weights, *params, limit=CFG.swiglu_limit)
    np.testing.assert_allclose(np.asarray(full), capacity_reference(x, experts, weights, *params, CFG.swiglu_limit,
                                                                    capacity=10**9), rtol=1e-5, atol=1e-5)


def test_expert_parallel_moe_pads_tokens_and_applies_capacity(moe_layer):
    """13 tokens on 8 expert shards (padded); no capacity = the single-device layer; capacity factor c =
    every expert keeps its first ceil(c·t·k/e) assignments (each shard sees every token here)."""
    layer, state = moe_layer
    graphdef = nnx.graphdef(layer)
    x = moe_inputs(13)
    call = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    want = np.asarray(call(state, x))
    for factor in (None, 0.5):
        layout = layout_of("1x8x1-expert_parallel", capacity_factor=factor)
        sharded = sh.shard(nnx.merge(graphdef, state), layout)
        got = np.asarray(jax.jit(lambda m, x: m(x))(sharded, x))
        if factor is None:
            assert max_rel_err(got, want) < TOL
            continue
        capacity = -(-int(factor * 16 * CFG.num_experts_per_tok) // CFG.n_routed_experts)  # 16 = 13 padded
        weights, experts, _ = layer.gate(jnp.asarray(x[0]))
        params = [np.asarray(v.get_value()) for v in (layer.experts.gate_proj, layer.experts.up_proj,
                                                      layer.experts.down_proj)]
        routed = capacity_reference(x[0], experts, weights, *params, CFG.swiglu_limit, capacity)
        shared = np.asarray(layer.shared_experts(jnp.asarray(x)))[0]
        assert not np.allclose(got[0], want[0], atol=1e-3), "the capacity dropped nothing; the test is vacuous"
        assert max_rel_err(got[0], routed + shared) < TOL  # float64 reference


# -- memory ----------------------------------------------------------------------------------------

def test_memory_plan_and_report():
    layout = layout_of("1x8x1-expert_parallel")
    plan = sh.abstract_state(lambda: m1.Model1(CFG, rngs=nnx.Rngs(0)), layout)
    per_device = distributed.device_bytes(plan)
    assert set(per_device) == set(layout.mesh.devices.flat)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(plan))
    experts = sum(x.size * x.dtype.itemsize for p, x in nnx.to_flat_state(plan)
                  if "experts" in p and p[-1] in ("gate_proj", "up_proj", "down_proj"))
    assert set(per_device.values()) == {total - experts + experts // 8}
    distributed.check_fits({"params": plan}, budget_bytes=total)
    with pytest.raises(MemoryError, match=r"cpu:0 needs \d+\.\d+ KiB \(params \d+\.\d+ KiB \+ cache 8 B\) but its "
                                          r"budget is 1000 B"):
        cache = jax.ShapeDtypeStruct((8, 2), jnp.float32, sharding=NamedSharding(layout.mesh, P("expert")))
        distributed.check_fits({"params": plan, "cache": cache}, budget_bytes=1000)
    report = distributed.memory_report({"params": plan})
    assert report.count("\n") == len(jax.local_devices()) and "free: not reported" in report


# -- checkpoints and quantized experts -------------------------------------------------------------

def test_load_reads_orbax_checkpoint_into_shards(tmp_path):
    model = random_model(CFG)
    m1.save(model, tmp_path / "ckpt")
    layout = layout_of("2x2x2-tensor_parallel")
    loaded = m1.load(tmp_path / "ckpt", dtype=jnp.float32, layout=layout)
    assert loaded.layout is layout and loaded.layers[1].self_attn.layout is layout
    for (path, var), (_, want) in zip(nnx.to_flat_state(nnx.state(loaded)), nnx.to_flat_state(nnx.state(model)),
                                      strict=True):
        value = var.get_value()
        assert canonical(value.sharding.spec) == canonical(layout.spec(var.get_metadata()["logical_axes"])), path
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want.get_value()), err_msg=str(path))


def fp4_experts(layer, down_block: int):
    """The layer's routed experts as FP4 (e2m1 codes, UE8M0 scales per 32 inputs, as released)."""
    for name, block in (("gate_proj", 32), ("up_proj", 32), ("down_proj", down_block)):
        var = getattr(layer.experts, name)
        q = quant.quantize(np.asarray(var.get_value()), quant.FP4, (1, 1, block), pack_axis=2)
        var.set_value(jax.tree.map(jnp.asarray, q))
    return layer


def test_expert_parallel_runs_on_quantized_experts():
    """FP4 values and scales are split like the weight and dequantized per shard inside shard_map."""
    layer = fp4_experts(random_model(CFG).layers[1].mlp, down_block=12)
    graphdef, state = nnx.split(layer)
    x = moe_inputs(16)
    want = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    layout = layout_of("1x2x4-tensor_parallel")
    sharded = sh.shard(nnx.merge(graphdef, state), layout)
    down = sharded.experts.down_proj.get_value()
    assert down.values.sharding.spec == down.scales.sharding.spec == P("expert", None, "tensor")
    assert {s.data.shape for s in down.values.addressable_shards} == {(4, 64, 6)}  # 12 of f, two per byte
    got = np.asarray(jax.jit(lambda m, x: m(x))(sharded, x))
    assert max_rel_err(got, want) < TOL


def test_quantized_scales_that_do_not_split_are_a_clear_error():
    layer = fp4_experts(random_model(CFG).layers[1].mlp, down_block=32)  # 2 scales along f=48
    with pytest.raises(ValueError, match=r"experts/down_proj \(scales\): dimension 2 \('expert_mlp', size 2\) is "
                                         r"not divisible by mesh axes tensor \(4 devices\)"):
        sh.shard(layer, layout_of("1x2x4-tensor_parallel"))
