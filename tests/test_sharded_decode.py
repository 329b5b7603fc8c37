"""Sharded decoding on 8 simulated CPU devices equals one device.

* The sparse decode kernel and cache writes per shard (shard_map) equal the unsharded calls: sequences
  split over the batch axes with their pages, query heads and sinks over `tensor`, global token slots
  shifted to each shard's pages; FP8 MODEL1 cache (main + extra scope) and the dense cache.
* Whole model, meshes 8×1×1, 1×8×1, 1×2×4, 2×2×2: prefill + decode logits equal the single-device
  forward at every position, greedy generations equal single-device `m1.generate`, and the compiled
  decode step gathers neither routed-expert weights nor caches. Prefill uses chunk 1, so prefill and
  decode share one compiled step per mesh (chunked prefill is exercised by the sharded `generate`).
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
import pallas_kernels as pk
from model1_jax import parallel as sh
from model1_jax.inference import sharded as sharded_decode
from model1_jax.inference import steps as decode
from model1_jax.parallel.mesh import spec_entry
from tests.test_sharding import CFG, expert_weight_gathers, layout_of
from tests.util import forward, random_model

pytestmark = pytest.mark.usefixtures("eight_devices")  # tests/conftest.py
B, H, PAGE = 4, 8, 64
MAIN_PAGES, EXTRA_PAGES = 2, 1  # per sequence
LAYOUTS = {
    "2x2x2-tensor_parallel": ("data=2,expert=2,tensor=2", "tensor_parallel"),  # 4 sequence shards × 2 head shards
    "1x2x4-tensor_parallel": ("expert=2,tensor=4", "tensor_parallel"),
    "8x1x1-data_parallel": ("data=8", "data_parallel"),  # 4 sequences do not split 8 ways: replicated
}


def make_case(kv_format, s_q: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lay = pk.get_format(kv_format)

    def cache(pages):
        k = rng.normal(size=(B * pages, PAGE, lay.d_qk)).astype(np.float32)
        return pk.quantize_kv(jnp.asarray(k), lay) if lay.quantized else jnp.asarray(k)

    def indices(pages, topk):
        own = rng.integers(0, pages * PAGE, (B, s_q, topk)) + (np.arange(B) * pages * PAGE)[:, None, None]
        return jnp.asarray(np.where(rng.random(own.shape) < 0.2, -1, own), jnp.int32)

    return dict(q=jnp.asarray(rng.normal(size=(B, s_q, H, lay.d_qk)), jnp.float32),
                kv_cache=cache(MAIN_PAGES), indices=indices(MAIN_PAGES, 24),
                topk_length=jnp.asarray(rng.integers(1, 25, B), jnp.int32),
                extra_kv_cache=cache(EXTRA_PAGES), extra_indices=indices(EXTRA_PAGES, 8),
                extra_topk_length=jnp.asarray(rng.integers(0, 9, B), jnp.int32),
                attn_sink=jnp.asarray(rng.normal(size=H), jnp.float32))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("kv_format, s_q", [(pk.MODEL1, 1), (pk.DenseFormat(d_qk=64, d_v=64), 2)])
def test_sharded_kernel_equals_unsharded(name, kv_format, s_q):
    layout = sh.Layout.build(*LAYOUTS[name])
    case = make_case(kv_format, s_q)
    kw = dict(kv_format=kv_format, page_size=PAGE, extra_page_size=PAGE, backend="xla")
    want_out, want_lse = sharded_decode.sparse_mla_decode(None, **case, **kw)
    placed = {k: jax.device_put(v, NamedSharding(layout.mesh, spec))
              for (k, v), spec in zip(case.items(), specs_for(layout))}
    out, lse = jax.jit(lambda c: sharded_decode.sparse_mla_decode(layout, **c, **kw))(placed)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-6)
    heads = sharded_decode.head_axes(layout, H)
    assert (*out.sharding.spec, None, None, None)[2] == spec_entry(heads)


def specs_for(layout):
    """The placement the decode step gives its inputs: sequences over batch axes, heads over tensor."""
    bx = spec_entry(sharded_decode.batch_axes(layout, B))
    hx = spec_entry(sharded_decode.head_axes(layout, H))
    return [P(bx, None, hx), P(bx), P(bx), P(bx), P(bx), P(bx), P(bx), P(hx)]


@pytest.mark.parametrize("kv_format", [pk.MODEL1, pk.DenseFormat(d_qk=64, d_v=64)])
def test_sharded_write_equals_unsharded(kv_format):
    layout = sh.Layout.build(*LAYOUTS["2x2x2-tensor_parallel"])
    case = make_case(kv_format, 1)
    rng = np.random.default_rng(1)
    lay = pk.get_format(kv_format)
    # Two new tokens per sequence at slots inside its own pages, one of them padding (−1).
    slots = (np.arange(B) * MAIN_PAGES * PAGE)[:, None] + rng.integers(0, MAIN_PAGES * PAGE, (B, 2))
    slots[1, 1] = -1
    slots = jnp.asarray(slots.reshape(-1), jnp.int32)
    rows = jnp.asarray(rng.normal(size=(2 * B, lay.d_qk)), jnp.float32)
    kw = dict(kv_format=kv_format, page_size=PAGE, batch=B)
    want = sharded_decode.write_kv(None, case["kv_cache"], slots, rows, **kw)
    cache = jax.device_put(case["kv_cache"], sharded_decode.state_shardings(layout, case["kv_cache"], B))
    got = jax.jit(lambda c, s, r: sharded_decode.write_kv(layout, c, s, r, **kw))(cache, slots, rows)
    assert got.sharding.spec[0] == ("data", "expert")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(want), np.asarray(case["kv_cache"]))


# -- the whole model -------------------------------------------------------------------------------

DECODE_LAYOUTS = ["8x1x1-data_parallel", "1x8x1-expert_parallel", "1x2x4-tensor_parallel", "2x2x2-tensor_parallel"]
PROMPTS = [1, 3, 4, 5, 9, 12, 15, 16]  # around the compression rates (4, 8) and the window (8)
TOTAL, NEW = 20, 6  # teacher-forced positions; greedy tokens per prompt
TOL = 5e-5  # of max |logit|, as the single-device decode tests
IDS = np.random.default_rng(5).integers(0, CFG.vocab_size, (len(PROMPTS), TOTAL), dtype=np.int32)
SPEC = dict(max_batch=len(PROMPTS), max_len=max(PROMPTS) + NEW, cache_dtype="float32", page_size=4)


@pytest.fixture(scope="module")
def reference():
    """Single device: full-forward logits (the decode tests' oracle) and greedy `m1.generate` tokens."""
    model = random_model(CFG)
    logits = np.asarray(forward(model, IDS))
    prompts = [IDS[i, :n].tolist() for i, n in enumerate(PROMPTS)]
    gen = m1.generate(model, prompts, NEW, cache_dtype="float32", stop_tokens=(), page_size=4, chunk=8)
    return logits, gen.tokens


def new_state(model, layout):
    spec = m1.make_spec(CFG, chunk=1, **SPEC)
    return sharded_decode.allocate(layout, CFG, spec)


@pytest.fixture(scope="module", params=DECODE_LAYOUTS)
def sharded(request):
    layout = layout_of(request.param)
    return request.param, layout, sh.shard(random_model(CFG), layout)


def test_prefill_and_decode_logits_match_single_device(sharded, reference):
    name, layout, model = sharded
    want, _ = reference
    scale, lengths = np.abs(want).max(), np.array(PROMPTS)
    state = new_state(model, layout)
    assert state.layers[0].window.sharding.spec[0] == spec_entry(sharded_decode.batch_axes(layout, 8))
    logits, state = m1.prefill(model, state, IDS[:, :lengths.max()], lengths)
    errors = [np.abs(np.asarray(logits)[b] - want[b, n - 1]).max() / scale for b, n in enumerate(lengths)]
    pos = lengths.copy()
    while (pos < TOTAL).any():
        active = pos < TOTAL
        logits, state = m1.decode_step(model, state, IDS[np.arange(len(pos)), np.minimum(pos, TOTAL - 1)], active)
        errors += [np.abs(np.asarray(logits)[b] - want[b, pos[b]]).max() / scale for b in np.flatnonzero(active)]
        pos += active
    assert max(errors) < TOL, f"{name}: max relative logit error {max(errors):.2e}"
    assert len(errors) == len(PROMPTS) + (TOTAL * len(PROMPTS) - lengths.sum())  # every position checked

    # The step just run, compiled for this mesh (cached: no second compilation).
    graphdef, params = nnx.split(model)
    hlo = decode._chunk_step.lower(graphdef, params, state, IDS[:, :1], np.ones(len(PROMPTS), np.int32)
                                   ).compile().as_text()
    assert not expert_weight_gathers(hlo), f"{name}: the decode step all-gathers routed-expert weights"
    cache_gathers = [line for line in hlo.splitlines() if "all-gather" in line
                     and re.search(r"f32\[\d+,4,32\]", line)]  # [pages, page_size, head_dim] caches
    assert not cache_gathers, f"{name}: the decode step all-gathers a KV cache:\n{cache_gathers[0]}"


def test_greedy_generation_matches_single_device(sharded, reference):
    """Greedy decoding through the sharded prefill/decode steps gives the single-device `generate` tokens."""
    name, layout, model = sharded
    _, want = reference
    state = new_state(model, layout)
    lengths = np.array(PROMPTS)
    logits, state = m1.prefill(model, state, IDS[:, :lengths.max()], lengths)
    tokens = [np.asarray(logits).argmax(-1)]
    for _ in range(NEW - 1):
        logits, state = m1.decode_step(model, state, tokens[-1])
        tokens.append(np.asarray(logits).argmax(-1))
    assert np.stack(tokens, 1).tolist() == want, name


def test_generate_on_a_mesh_matches_single_device(reference):
    """`m1.generate` itself (chunked prefill, sampling step) on the 2×2×2 tensor-parallel layout."""
    _, want = reference
    layout = layout_of("2x2x2-tensor_parallel")
    model = sh.shard(random_model(CFG), layout)
    prompts = [IDS[i, :n].tolist() for i, n in enumerate(PROMPTS)]
    gen = m1.generate(model, prompts, NEW, cache_dtype="float32", stop_tokens=(), page_size=4, chunk=8)
    assert gen.tokens == want
