"""Prefill and decode over the static-shape state against the model's full-sequence forward (fp32, CPU).

The full forward is the oracle (it matches transformers to ~1e-6, tests/test_model_parity.py). With an
unquantized float32 cache, prefill + token-by-token decode must reproduce its logits — and the MTP
block's — at every position, for sequences of different lengths in one batch, with prefill chunks that
cut windows in the middle.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
import pallas_kernels as pk
from model1_jax.inference import state as decode_state
from model1_jax.inference import steps as decode
from model1_jax.inference.generation import CompileClock
from model1_jax.model import attention
from pallas_kernels.formats import decode_records, quantize_records
from tests.util import forward_with_mtp, random_model

# A CSA layer (m=4, picking the top 3 entries), an HCA layer (m'=8) and the MTP block (a sliding-window
# layer): every attention type, both MoE types, as few layers as possible (compile time). MODEL1's
# 128-token window, so the prompt lengths 127..130 straddle the window and an HCA window boundary
# while CSA and HCA produce many entries.
TINY = m1.Config.tiny().replace(sliding_window=128, num_hidden_layers=2, layer_types=(m1.CSA, m1.HCA),
                                mlp_layer_types=(m1.HASH_MOE, m1.MOE))
TOTAL = 134  # every sequence is decoded up to this many tokens
CHUNK = 13  # prefill chunk: not a multiple of any rate, so chunks cut CSA, HCA and sliding windows
TOL = 5e-5  # of max |logit|; fp32 noise from different matmul shapes (HF parity uses 1e-4)
# Prompt lengths 1, m−1, m, m+1, 127..130 (m = 4); each batch mixes very different lengths.
BATCHES = [(1, 3, 129, 130), (4, 5, 127, 128)]


def rel_err(got, want, scale):
    diff = np.abs(np.asarray(got, np.float32) - want)
    return float(diff.max() / scale) if diff.size else 0.0


@pytest.fixture(scope="module")
def tiny():
    model = random_model(TINY, seed=3)
    ids = np.random.default_rng(7).integers(0, TINY.vocab_size, (4, TOTAL)).astype(np.int32)
    logits, mtp_logits = forward_with_mtp(model, ids)
    return model, ids, np.asarray(logits), np.asarray(mtp_logits)


def new_state(cfg=TINY, **kw):
    kw = {"max_batch": 4, "max_len": TOTAL, "cache_dtype": "float32", "chunk": CHUNK, "page_size": 16,
          "mtp": True, **kw}
    return m1.init_state(cfg, **kw)


@pytest.mark.parametrize("lengths", BATCHES, ids=["+".join(map(str, b)) for b in BATCHES])
def test_prefill_then_decode_equals_forward(tiny, lengths):
    model, ids, want, want_mtp = tiny
    scale = np.abs(want).max()
    lengths = np.array(lengths)
    state = new_state()
    logits, mtp_logits, state = m1.prefill(model, state, ids[:, :lengths.max()], lengths, all_logits=True,
                                           return_mtp=True)
    for b, n in enumerate(lengths):
        assert rel_err(logits[b, :n], want[b, :n], scale) < TOL, f"prefill row {b} ({n} tokens)"
        assert rel_err(mtp_logits[b, :n - 1], want_mtp[b, :n - 1], scale) < TOL, f"prefill MTP row {b}"
    np.testing.assert_array_equal(np.asarray(state.lengths), lengths)
    np.testing.assert_array_equal(np.asarray(state.mtp_lengths), lengths - 1)  # waits for the next token

    pos = lengths.copy()
    worst = 0.0
    while (pos < TOTAL).any():
        active = pos < TOTAL
        logits, mtp_logits, state = m1.decode_step(model, state, ids[np.arange(4), np.minimum(pos, TOTAL - 1)],
                                                   active, return_mtp=True)
        for b in np.flatnonzero(active):
            err = rel_err(logits[b], want[b, pos[b]], scale)
            mtp_err = rel_err(mtp_logits[b], want_mtp[b, pos[b] - 1], scale)
            worst = max(worst, err, mtp_err)
            assert err < TOL, f"decode row {b} position {pos[b]}: {err:.2e}"
            assert mtp_err < TOL, f"decode MTP row {b} position {pos[b] - 1}: {mtp_err:.2e}"
        pos += active
    print(f"\nlengths {lengths.tolist()}: worst decode error {worst:.1e}")


@pytest.mark.parametrize("split", [5, 10, 2])
def test_chunked_prefill_equals_one_shot(tiny, split):
    """13 tokens in one call vs split over two calls (the second starts mid-window)."""
    model, ids, want, _ = tiny
    one_shot, state_a = m1.prefill(model, new_state(), ids[:, :CHUNK], all_logits=True)
    state_b = new_state()
    first, state_b = m1.prefill(model, state_b, ids[:, :split], all_logits=True)
    second, state_b = m1.prefill(model, state_b, ids[:, split:CHUNK], all_logits=True)
    atol = 1e-6 * np.abs(want).max()
    np.testing.assert_allclose(np.concatenate([first, second], axis=1), one_shot, rtol=0, atol=atol)
    for got, ref in zip(jax.tree.leaves(state_b), jax.tree.leaves(state_a)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=1e-6, atol=1e-6)


def test_one_compiled_step_and_donated_caches(tiny):
    model, ids, _, _ = tiny
    state = new_state()
    _, state = m1.prefill(model, state, ids[:, :20], all_logits=True)
    _, state = m1.decode_step(model, state, ids[:, 20])  # compiles (or reuses) the decode step
    cache_size = decode._chunk_step._cache_size()
    with CompileClock() as clock:
        for p in range(21, 41):
            old = state
            pointer = old.layers[0].entries.unsafe_buffer_pointer()
            logits, state = m1.decode_step(model, state, ids[:, p])
            assert all(x.is_deleted() for x in jax.tree.leaves(old)), "the state must be donated"
            assert state.layers[0].entries.unsafe_buffer_pointer() == pointer, "caches must be updated in place"
    assert decode._chunk_step._cache_size() == cache_size
    assert [f for f in clock.compiled if "_chunk_step" in f] == [], "decode steps must not recompile"


def test_compile_clock_counts_programs_served_from_the_compilation_cache():
    """The suite runs with a compilation cache on disk (tests/conftest.py). A program served from it must still
    count as compiled, or the tests that check that nothing recompiles could not fail."""
    if not jax.config.jax_compilation_cache_dir:
        pytest.skip("the compilation cache is off (JAX_COMPILATION_CACHE_DIR set empty by the caller)")
    hits = []

    def listen(event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)

    step = jax.jit(lambda x: jnp.cumsum(x * 3.0 + 1.0))  # a program of this test only
    step(jnp.arange(7.0)).block_until_ready()
    jax.clear_caches()  # what the suite does between modules: only the cache on disk still holds the program
    jax.monitoring.register_event_listener(listen)
    try:
        with CompileClock() as clock:
            step(jnp.arange(7.0)).block_until_ready()
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert hits, "not served from the compilation cache: is JAX_COMPILATION_CACHE_DIR set (tests/conftest.py)?"
    assert any("lambda" in f for f in clock.compiled), clock.compiled


# ------------------------------------------------------------------------------------------------------
# Quantized caches

# MODEL1's FP8 layout needs head_dim 512 with 64 RoPE dims; everything else stays tiny (one layer of each type).
WIDE = m1.Config.tiny().replace(head_dim=512, qk_rope_head_dim=64, index_head_dim=128, num_hidden_layers=3,
                                layer_types=(m1.SLIDING, m1.CSA, m1.HCA), mlp_layer_types=(m1.HASH_MOE, m1.MOE, m1.MOE))


def rounded_forward(model, ids, stored):
    """The full forward with every attention key (sliding and compressed) replaced by `stored(keys)`, through
    the dense reference attention (`attend`, where the keys can be replaced in one place)."""
    original = attention.attend
    attention.attend = lambda q, keys, *args: original(q, stored(keys), *args)
    attention.use_full_attention(model, "dense")
    try:  # a fresh jit: the patched `attend` is read while tracing
        return np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    finally:
        attention.attend = original
        attention.use_full_attention(model, "auto")


def fp8_stored(k):
    """Keys as the FP8 cache stores them: e4m3 with a power-of-two scale per 64 NoPE dims, bf16 RoPE dims
    (docs/kernels.md §5)."""
    flat = k.reshape(-1, k.shape[-1])
    return decode_records(quantize_records(flat, pk.MODEL1), pk.MODEL1).reshape(k.shape).astype(k.dtype)


def decode_all(model, state, ids, prompt_lengths):
    """Prefill each row's prompt, then decode token by token to the end of `ids`: logits [b, t, v]."""
    total = ids.shape[1]
    logits, state = m1.prefill(model, state, ids[:, :prompt_lengths.max()], prompt_lengths, all_logits=True)
    got = [np.asarray(logits[b, :n]) for b, n in enumerate(prompt_lengths)]
    pos = prompt_lengths.copy()
    while (pos < total).any():
        active = pos < total
        logits, state = m1.decode_step(model, state, ids[np.arange(len(pos)), np.minimum(pos, total - 1)], active)
        for b in np.flatnonzero(active):
            got[b] = np.concatenate([got[b], np.asarray(logits[b:b + 1])])
        pos += active
    return np.stack(got), state


def test_fp8_cache():
    """The FP8 cache against the forward whose keys went through the same rounding.

    Dequantization is exact (fp8 · 2^k, docs/kernels.md §5), so the only differences left are fp32 noise
    and its consequence: an element within ~1e-7 of a rounding boundary can round to the neighbouring
    value in one path and not the other (one fp8 step is 2^-3 of the element, one bf16 step 2^-8). A few
    such elements among the ~10^5 rounded ones move logits by ~1e-3 of max |logit| (measured: 3.5e-3);
    we allow 1e-2. The rounding itself moves this random model's logits by 0.1–0.4 of max |logit| (MoE
    routing flips included), so a cache that did not round, or rounded differently, fails.
    """
    model = random_model(WIDE, seed=5)
    ids = np.random.default_rng(1).integers(0, WIDE.vocab_size, (2, 40)).astype(np.int32)
    want = rounded_forward(model, ids, fp8_stored)
    # Indexer keys at compute precision: this test is about the KV format (the FP8 indexer keys, the default with
    # the FP8 cache, are tested against a forward that rounds them too in tests/test_index_cache.py).
    state = m1.init_state(WIDE, max_batch=2, max_len=40, cache_dtype="fp8", chunk=16, page_size=16,
                          index_cache="compute")
    got, state = decode_all(model, state, ids, np.array([23, 17]))
    err = rel_err(got, want, np.abs(want).max())
    print(f"\nfp8 cache: max error vs the rounded-key forward {err:.1e} of max |logit|")
    assert err < 1e-2
    assert state.layers[0].window.dtype == jnp.uint8 and state.layers[0].window.shape[1] == pk.MODEL1.block_stride(16)


def test_bf16_cache(tiny):
    """The bf16 cache (fp32 compute) against the forward whose attention keys are rounded to bf16.

    Same argument as for FP8: fp32 noise between the two paths can flip the rounding of a key element
    that sits within ~1e-7 of a bf16 boundary. One bf16 step is 2^-8 of the element against FP8's 2^-3,
    so the FP8 bound scaled by 2^-5, 3e-4, applies (measured: 6e-5). Rounding itself moves logits by
    ~7e-3, so a cache that kept fp32 keys, or also rounded buffers or indexer keys, fails.
    """
    model, ids, unrounded, _ = tiny
    ids = ids[:2, :40]
    want = rounded_forward(model, ids, lambda k: k.astype(jnp.bfloat16).astype(k.dtype))
    state = new_state(max_batch=2, max_len=40, cache_dtype="bf16", mtp=False)
    got, state = decode_all(model, state, ids, np.array([23, 5]))
    scale = np.abs(want).max()
    err = rel_err(got, want, scale)
    print(f"\nbf16 cache: max error vs the rounded-key forward {err:.1e} of max |logit| "
          f"(rounding itself moves logits by {rel_err(unrounded[:2, :40], want, scale):.1e})")
    assert err < 3e-4 and rel_err(unrounded[:2, :40], want, scale) > 10 * 3e-4
    assert state.layers[0].window.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------------------
# State and memory


def test_fp8_needs_model1_geometry():
    with pytest.raises(ValueError, match="head_dim 512"):
        m1.init_state(TINY, max_batch=1, max_len=16, cache_dtype="fp8")


def test_state_shapes_and_report_agree():
    spec = m1.make_spec(TINY, max_batch=3, max_len=50, cache_dtype="float32", chunk=8, page_size=16, mtp=True)
    state = decode_state.allocate(TINY, spec)
    assert sum(x.nbytes for x in jax.tree.leaves(state)) == m1.memory_report(TINY, spec).total
    assert state.layers[0].window.shape == (3 * 144 // 16, 16, TINY.head_dim)  # ring: 128 + 8 → 144 slots
    assert state.layers[0].entries.shape == (3 * 16 // 16, 16, TINY.head_dim)  # ⌈50/4⌉ = 13 → one page of 16
    assert state.layers[0].compressor.kv.shape == (3, 8, 2, TINY.head_dim)  # CSA: 2m slots, Ca/Cb series
    assert state.layers[1].compressor.kv.shape == (3, 8, TINY.head_dim)  # HCA: m' slots
    assert state.layers[0].index_keys.shape == (3, 16, TINY.index_head_dim)
    assert state.mtp.entries is None and state.mtp.window.shape == state.layers[0].window.shape


def test_memory_report_v4_flash_1m():
    cfg = m1.Config.v4_flash()
    spec = m1.make_spec(cfg, max_batch=1, max_len=1 << 20, cache_dtype="fp8", dtype=jnp.bfloat16)
    report = m1.memory_report(cfg, spec)
    rows = {r.kind.split()[0]: r for r in report.rows}
    assert rows["sliding"].layers == 2 and rows["CSA"].layers == 21 and rows["HCA"].layers == 20
    assert rows["sliding"].per_token == 0
    page_bytes = pk.cache_bytes(1, 64, "model1")  # 64 tokens of 584 bytes, padded to a multiple of 576
    token_bytes = page_bytes / 64
    assert rows["CSA"].per_token == pytest.approx((token_bytes + 132) / 4)  # FP8 entry + FP8 indexer key (132 B)
    compute_keys = m1.make_spec(cfg, max_batch=1, max_len=1 << 20, cache_dtype="fp8", dtype=jnp.bfloat16,
                                index_cache="compute")
    csa = next(r for r in m1.memory_report(cfg, compute_keys).rows if r.kind.startswith("CSA"))
    assert csa.per_token == pytest.approx((token_bytes + 2 * 128) / 4)  # bf16 indexer keys
    assert rows["HCA"].per_token == pytest.approx(token_bytes / 128)
    assert rows["sliding"].fixed_per_sequence == 3 * page_bytes  # 128 + 64 → 192 slots = 3 pages
    assert report.total == sum(int(np.prod(x.shape)) * x.dtype.itemsize
                               for x in jax.tree.leaves(decode_state.state_shapes(cfg, spec)))
    print(f"\n{report}")


def test_max_len_for_budget():
    kw = dict(max_batch=4, cache_dtype="fp8", dtype=jnp.bfloat16)
    cfg = m1.Config.v4_flash()
    budget = 10 << 30
    n = m1.max_len_for_budget(cfg, budget, **kw)
    total = lambda length: m1.memory_report(cfg, m1.make_spec(cfg, max_len=length, **kw)).total  # noqa: E731
    assert total(n) <= budget < total(n + 1)
    assert m1.max_len_for_budget(cfg, 1 << 50, **kw) == cfg.max_position_embeddings  # capped by the config
    with pytest.raises(ValueError, match="do not hold"):
        m1.max_len_for_budget(cfg, 1000, **kw)
