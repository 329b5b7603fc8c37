"""The sparse decode kernel and cache writes per shard (shard_map) equal the unsharded calls.

Sequences are split over the batch axes (with their pages), query heads and sinks over `tensor`;
global token slots are shifted to each shard's pages. FP8 MODEL1 cache (main + extra scope) and the
dense cache, on 8 simulated CPU devices (the kernel's XLA reference runs there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from model1_jax import sharded_decode
from model1_jax import sharding as sh

B, H, PAGE = 4, 8, 64
MAIN_PAGES, EXTRA_PAGES = 2, 1  # per sequence
LAYOUTS = {
    "2x2x2-tensor_parallel": ("data=2,expert=2,tensor=2", "tensor_parallel"),  # 4 sequence shards × 2 head shards
    "1x2x4-tensor_parallel": ("expert=2,tensor=4", "tensor_parallel"),
    "8x1x1-data_parallel": ("data=8", "data_parallel"),  # 4 sequences do not split 8 ways: replicated
}


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
    if jax.device_count() < 8:
        pytest.fail(f"these tests need 8 devices, found {jax.device_count()}: run with "
                    "XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it unless XLA_FLAGS "
                    "is already set)")


def make_case(kv_layout, s_q: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lay = pk.get_layout(kv_layout)

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
@pytest.mark.parametrize("kv_layout, s_q", [(pk.MODEL1, 1), (pk.DenseLayout(d_qk=64, d_v=64), 2)])
def test_sharded_kernel_equals_unsharded(name, kv_layout, s_q):
    layout = sh.Layout.build(*LAYOUTS[name])
    case = make_case(kv_layout, s_q)
    kw = dict(kv_layout=kv_layout, page_size=PAGE, extra_page_size=PAGE, backend="xla")
    want_out, want_lse = sharded_decode.sparse_mla_decode(None, **case, **kw)
    placed = {k: jax.device_put(v, sh.NamedSharding(layout.mesh, spec))
              for (k, v), spec in zip(case.items(), specs_for(layout))}
    out, lse = jax.jit(lambda c: sharded_decode.sparse_mla_decode(layout, **c, **kw))(placed)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-6)
    heads = sharded_decode.head_axes(layout, H)
    assert (*out.sharding.spec, None, None, None)[2] == sharded_decode._part(heads)


def specs_for(layout):
    """The placement the decode step gives its inputs: sequences over batch axes, heads over tensor."""
    P = sh.P
    bx = sharded_decode._part(sharded_decode.batch_axes(layout, B))
    hx = sharded_decode._part(sharded_decode.head_axes(layout, H))
    return [P(bx, None, hx), P(bx), P(bx), P(bx), P(bx), P(bx), P(bx), P(hx)]


@pytest.mark.parametrize("kv_layout", [pk.MODEL1, pk.DenseLayout(d_qk=64, d_v=64)])
def test_sharded_write_equals_unsharded(kv_layout):
    layout = sh.Layout.build(*LAYOUTS["2x2x2-tensor_parallel"])
    case = make_case(kv_layout, 1)
    rng = np.random.default_rng(1)
    lay = pk.get_layout(kv_layout)
    # Two new tokens per sequence at slots inside its own pages, one of them padding (−1).
    slots = (np.arange(B) * MAIN_PAGES * PAGE)[:, None] + rng.integers(0, MAIN_PAGES * PAGE, (B, 2))
    slots[1, 1] = -1
    slots = jnp.asarray(slots.reshape(-1), jnp.int32)
    rows = jnp.asarray(rng.normal(size=(2 * B, lay.d_qk)), jnp.float32)
    kw = dict(kv_layout=kv_layout, page_size=PAGE, batch=B)
    want = sharded_decode.write_kv(None, case["kv_cache"], slots, rows, **kw)
    cache = jax.device_put(case["kv_cache"], sharded_decode.state_shardings(layout, case["kv_cache"], B))
    got = jax.jit(lambda c, s, r: sharded_decode.write_kv(layout, c, s, r, **kw))(cache, slots, rows)
    assert got.sharding.spec[0] == ("data", "expert")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(want), np.asarray(case["kv_cache"]))
