"""sparse_mla_decode (jnp reference and Pallas kernel in interpret mode) against the float64 oracle.

The matrix mirrors FlashMLA's (docs/kernels.md §7.2) at CPU sizes: every axis value appears, corners are combined
explicitly, and the cross product is sampled. The reference takes the wider sample; interpret mode is slow,
so the kernel gets fewer, smaller cases (one at topk 2048), each with a fixed split count.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import DENSE, MODEL1, V32, DenseFormat, dequantize_kv, get_format, sparse_mla_decode
from pallas_kernels.triton_decode import D_CHUNKS, choose_num_splits, sparse_mla_decode_triton, tile_addresses
from tests import flashmla_oracle as oracle
from tests.decode_cases import Case, Scope, make_inputs, oracle_decode

SCOPES = [Scope(64, 2, 256), Scope(64, 64, 512), Scope(128, 256, 1024), Scope(576, 61, 1024),
          Scope(576, 2, 700), Scope(2048, 64, 2500), Scope(2048, 256, 2600), Scope(128, 61, 300)]


def _sampled_ref_cases():
    """Pairwise-style sample: each (kv_format, main scope) once, the other axes rotated."""
    cases = []
    for i, (kv_format, main) in enumerate(itertools.product(["model1", "v32"], SCOPES)):
        extra = SCOPES[(3 * i + 1) % len(SCOPES)] if i % 3 != 2 else None
        cases.append(Case(kv_format, b=(1, 3, 7)[i % 3], s_q=(1, 2, 3)[(i // 3) % 3], h_q=(64, 128)[(i // 2) % 2],
                          main=main, extra=extra, topk_length=i % 2 == 0,
                          extra_topk_length=extra is not None and i % 4 < 2, sink=i % 5 != 4, duplicates=i % 4 == 3,
                          seed=i))
    return cases


CORNER_REF_CASES = [
    # Every combination of {all invalid rows, zero-length requests, sink} with at least one active
    # (docs/kernels.md §7.2).
    *[Case("model1", b=3, s_q=3, h_q=64, main=Scope(64, 61, 200), extra=Scope(64, 61, 200), topk_length=True,
           extra_topk_length=True, sink=s, all_invalid=a, zero_len=z, seed=7)
      for a, z, s in itertools.product([False, True], repeat=3) if a or z or s],
    Case("v32", b=3, s_q=3, h_q=128, main=Scope(576, 53, 650), all_invalid=True, zero_len=True),
    Case("v32", b=7, s_q=2, h_q=64, main=Scope(128, 64, 300), extra=Scope(64, 2, 100), topk_length=True,
         extra_topk_length=True, all_invalid=True),
    Case("model1", b=1, s_q=1, h_q=16, main=Scope(128, 256, 1000), extra=Scope(64, 2, 64), topk_length=True),
    Case("model1", b=3, s_q=2, h_q=32, main=Scope(64, 64, 100), extra=Scope(576, 61, 700),
         extra_topk_length=True, duplicates=True),
]
REF_CASES = _sampled_ref_cases() + CORNER_REF_CASES

# (case, num_splits): interpret mode runs every program in sequence, so these stay small.
KERNEL_CASES = [
    (Case("model1", b=1, s_q=1, h_q=64, main=Scope(2048, 256, 2600), topk_length=True), 4),
    (Case("v32", b=1, s_q=1, h_q=128, main=Scope(576, 61, 700)), 1),
    (Case("v32", b=3, s_q=2, h_q=64, main=Scope(64, 2, 256), zero_len=True, all_invalid=True), 2),
    (Case("model1", b=3, s_q=2, h_q=64, main=Scope(128, 256, 300), extra=Scope(576, 2, 700),
          extra_topk_length=True, all_invalid=True), 3),
    (Case("model1", b=1, s_q=3, h_q=128, main=Scope(64, 64, 512), extra=Scope(128, 61, 300), topk_length=True,
          extra_topk_length=True, duplicates=True), 1),
    (Case("model1", b=7, s_q=1, h_q=16, main=Scope(64, 61, 100), extra=Scope(64, 2, 100), topk_length=True,
          zero_len=True), 2),
    (Case("v32", b=1, s_q=2, h_q=32, main=Scope(128, 64, 200), extra=Scope(64, 256, 300), topk_length=True,
          sink=False), 1),
    (Case("model1", b=3, s_q=1, h_q=64, main=Scope(64, 2, 64), topk_length=True, sink=False, zero_len=True), 1),
    (Case("v32", b=7, s_q=3, h_q=64, main=Scope(2048, 64, 2500), extra=Scope(64, 2, 100), topk_length=True,
          extra_topk_length=True, all_invalid=True), 5),
    (Case("model1", b=3, s_q=3, h_q=128, main=Scope(576, 61, 700), extra=Scope(2048, 256, 2600), topk_length=True,
          extra_topk_length=True, zero_len=True, duplicates=True), 7),
    (Case("v32", b=1, s_q=1, h_q=16, main=Scope(64, 256, 300), duplicates=True), 1),
]


@pytest.mark.parametrize("cases", [REF_CASES, [c for c, _ in KERNEL_CASES]], ids=["reference", "kernel"])
def test_matrix_covers_every_axis_value(cases):
    """Guards the sampled matrix: the issue's axis values all appear, for both formats."""
    for kv_format in ["model1", "v32"]:
        cs = [c for c in cases if c.kv_format == kv_format]
        scopes = [s for c in cs for s in (c.main, c.extra) if s]
        assert {c.b for c in cs} == {1, 3, 7} and {c.s_q for c in cs} == {1, 2, 3}
        assert {64, 128} <= {c.h_q for c in cs}
        assert {s.topk for s in scopes} == {64, 128, 576, 2048} and {2, 61, 64, 256} <= {s.page for s in scopes}
        for flag in ["topk_length", "extra_topk_length", "all_invalid", "zero_len", "duplicates"]:
            assert any(getattr(c, flag) for c in cs), flag
        assert any(c.extra for c in cs) and any(not c.extra for c in cs)
        assert any(c.sink for c in cs) and any(not c.sink for c in cs)


def _jnp(args):
    return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in args.items()}


@pytest.mark.parametrize("case", REF_CASES, ids=str)
def test_reference_matches_oracle(case):
    args = make_inputs(case)
    out, lse = sparse_mla_decode(**_jnp(args), kv_format=case.kv_format, backend="xla")
    assert out.dtype == jnp.bfloat16 and out.shape == (case.b, case.s_q, case.h_q, 512)
    assert lse.dtype == jnp.float32 and lse.shape == (case.b, case.h_q, case.s_q)
    oracle.check_decode(out, lse, *oracle_decode(case, args))


_kernel = jax.jit(sparse_mla_decode_triton, static_argnames=(
    "kv_format", "page_size", "extra_page_size", "softmax_scale", "num_splits", "d_chunk", "interpret"))


def _run_kernel(args, kv_format, num_splits, d_chunk=None):
    a = _jnp(args)
    return _kernel(a["q"], a["kv_cache"], a["indices"], kv_format=get_format(kv_format), page_size=a["page_size"],
                   topk_length_b=a["topk_length"], extra_kv_cache=a.get("extra_kv_cache"),
                   extra_idx_btk=a.get("extra_indices"), extra_page_size=a.get("extra_page_size"),
                   extra_topk_length_b=a.get("extra_topk_length"), attn_sink_n=a.get("attn_sink"),
                   softmax_scale=a["softmax_scale"], num_splits=num_splits, d_chunk=d_chunk, interpret=True)


# Cases alternate between whole 512-column rows and two 256-column halves (the sm_90a choice), so both are checked.
@pytest.mark.parametrize("case,num_splits,d_chunk", [(c, s, D_CHUNKS[i % 2]) for i, (c, s) in enumerate(KERNEL_CASES)],
                         ids=lambda x: str(x))
def test_kernel_matches_oracle(case, num_splits, d_chunk):
    args = make_inputs(case)
    out, lse = _run_kernel(args, case.kv_format, num_splits, d_chunk)
    assert out.dtype == jnp.bfloat16 and lse.shape == (case.b, case.h_q, case.s_q)
    oracle.check_decode(out, lse, *oracle_decode(case, args))


def test_public_api_runs_kernel_in_interpret_mode():
    """backend="pallas" with interpret=True (automatic split count) and backend="auto" on CPU (reference)."""
    case = Case("model1", b=3, s_q=2, h_q=64, main=Scope(128, 64, 300), extra=Scope(64, 2, 100), topk_length=True)
    args = _jnp(make_inputs(case))
    want = oracle_decode(case, make_inputs(case))
    out, lse = sparse_mla_decode(**args, kv_format="model1", backend="pallas", interpret=True)
    oracle.check_decode(out, lse, *want)
    auto = sparse_mla_decode(**args, kv_format=MODEL1)  # CPU: the reference
    xla = sparse_mla_decode(**args, kv_format=MODEL1, backend="xla")
    np.testing.assert_array_equal(np.asarray(auto[0], np.float32), np.asarray(xla[0], np.float32))


# ----------------------------------------------------------------------------------------------------------------
# Semantics spelled out (each also covered by the oracle matrix)


def _small_case_args(kv_format="model1", **kw):
    case = Case(kv_format, b=2, s_q=2, h_q=64, main=Scope(128, 61, 300), sink=False, **kw)
    return case, _jnp(make_inputs(case))


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_sink_infinities(backend):
    _, args = _small_case_args()
    run = functools.partial(sparse_mla_decode, kv_format="model1", backend=backend, interpret=backend == "pallas")
    out0, lse0 = run(**args)
    h = args["q"].shape[2]
    out_pos, lse_pos = run(**args, attn_sink=jnp.full((h,), jnp.inf, jnp.float32))
    out_neg, lse_neg = run(**args, attn_sink=jnp.full((h,), -jnp.inf, jnp.float32))
    assert np.all(np.asarray(out_pos, np.float32) == 0.0)  # +inf sink: output exactly 0
    np.testing.assert_array_equal(lse_pos, lse0)  # the sink never changes lse
    np.testing.assert_array_equal(np.asarray(out_neg, np.float32), np.asarray(out0, np.float32))
    np.testing.assert_array_equal(lse_neg, lse0)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_entries_past_topk_length_are_ignored(backend):
    """Anything past topk_length (valid indices of NaN tokens, huge values) changes nothing."""
    case, args = _small_case_args(topk_length=True)
    length = np.asarray(args["topk_length"])
    idx = np.asarray(args["indices"]).copy()
    junk = np.random.default_rng(1).choice([0, 1, 2**31 - 1, -(2**31), 5, -7], idx.shape).astype(np.int32)
    past = np.arange(idx.shape[-1])[None, None, :] >= length[:, None, None]
    idx_junk = np.where(past, junk, idx)
    run = functools.partial(sparse_mla_decode, kv_format="model1", backend=backend, interpret=backend == "pallas")
    out_a, lse_a = run(**args)
    out_b, lse_b = run(**{**args, "indices": jnp.asarray(idx_junk)})
    np.testing.assert_array_equal(np.asarray(out_a, np.float32), np.asarray(out_b, np.float32))
    np.testing.assert_array_equal(lse_a, lse_b)
    assert not np.isnan(np.asarray(out_a, np.float32)).any()


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_negative_lengths_mean_no_tokens(backend):
    case = Case("model1", b=2, s_q=2, h_q=64, main=Scope(128, 61, 300), extra=Scope(64, 2, 100), topk_length=True)
    args = _jnp(make_inputs(case))  # no extra_topk_length: the extra scope must still be attended
    run = functools.partial(sparse_mla_decode, kv_format="model1", backend=backend, interpret=backend == "pallas")
    out_a, lse_a = run(**{**args, "topk_length": jnp.array([-200, -1], jnp.int32)})
    out_b, lse_b = run(**{**args, "topk_length": jnp.array([0, 0], jnp.int32)})
    assert np.isfinite(np.asarray(lse_b)).any()
    np.testing.assert_array_equal(np.asarray(out_a, np.float32), np.asarray(out_b, np.float32))
    np.testing.assert_array_equal(lse_a, lse_b)


def test_empty_rows_give_zero_and_inf():
    _, args = _small_case_args()
    args["indices"] = jnp.full_like(args["indices"], -1)
    for backend in ["xla", "pallas"]:
        out, lse = sparse_mla_decode(**args, kv_format="model1", backend=backend, interpret=backend == "pallas",
                                     attn_sink=jnp.zeros((64,), jnp.float32))
        assert np.all(np.asarray(out, np.float32) == 0.0) and np.all(np.isposinf(lse))


@pytest.mark.parametrize("kv_format", [MODEL1, V32])
def test_tile_addresses_stay_inside_the_cache(kv_format):
    """The kernel forms addresses only from in-range slots (interpret mode would hide an out-of-bounds read)."""
    page, num_blocks = 61, 5
    capacity = page * num_blocks
    idx = jnp.array([-1, -(2**31), 2**31 - 1, capacity, capacity + 7, -5, 0, capacity - 1], jnp.int32)
    valid = (idx >= 0) & (idx < capacity)
    blk, words, scale_w, rope_w = tile_addresses(idx, valid, kv_format, page)
    words_per_block = kv_format.block_stride(page) // 2
    assert np.all((np.asarray(blk) >= 0) & (np.asarray(blk) < num_blocks))
    for w, n in [(words, 1), (scale_w, kv_format.scale_bytes // 2), (rope_w, kv_format.d_rope)]:
        assert np.all(np.asarray(w) >= 0) and np.all(np.asarray(w) + n <= words_per_block)
    assert int(blk[-1, 0]) == num_blocks - 1  # the last valid slot is really addressed


def test_choose_num_splits():
    assert choose_num_splits(rows=296, head_blocks=1, work_tiles=10, num_sms=132) == 1  # b=148, s_q=2
    assert choose_num_splits(rows=4, head_blocks=1, work_tiles=10, num_sms=132) > 1  # b=2: spread the work
    assert choose_num_splits(rows=1, head_blocks=1, work_tiles=1, num_sms=132) == 1


# ----------------------------------------------------------------------------------------------------------------
# Dense kv_format and float32 q (exactness tests of the inference path)


@pytest.mark.parametrize("cache_dtype", [jnp.float32, jnp.bfloat16])
def test_dense_layout_float32(cache_dtype):
    rng = np.random.default_rng(3)
    b, s_q, h, page, num_blocks, topk = 2, 2, 16, 5, 9, 24
    q = jnp.asarray(rng.standard_normal((b, s_q, h, 512)), jnp.float32)
    cache = rng.standard_normal((num_blocks, page, 512)).astype(np.float32)
    idx = rng.integers(-3, num_blocks * page + 3, (b, s_q, topk)).astype(np.int32)
    used = np.zeros(num_blocks * page, bool)
    used[idx[(idx >= 0) & (idx < num_blocks * page)]] = True
    cache.reshape(-1, 512)[~used] = np.nan  # unreferenced slots
    cache = jnp.asarray(cache, cache_dtype)
    sink = jnp.asarray(rng.standard_normal(h), jnp.float32)
    out, lse = sparse_mla_decode(q, cache, jnp.asarray(idx), kv_format="dense", page_size=page, attn_sink=sink)
    assert out.dtype == jnp.float32
    ref_out, ref_lse = oracle.sparse_decode(np.asarray(q), [(np.asarray(cache, np.float32), idx, page, None)],
                                            kv_format="dense", attn_sink=np.asarray(sink), softmax_scale=512 ** -0.5)
    np.testing.assert_allclose(np.asarray(out), ref_out, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(np.asarray(lse), ref_lse, rtol=2e-6)


@pytest.mark.parametrize("kv_format", ["model1", "v32"])
def test_dense_of_dequantized_cache_equals_fp8_cache(kv_format):
    case = Case(kv_format, b=2, s_q=2, h_q=64, main=Scope(128, 64, 300), topk_length=True)
    args = _jnp(make_inputs(case))
    fmt = get_format(kv_format)
    dense = dequantize_kv(args["kv_cache"], fmt, args["page_size"])
    dense_layout = DENSE if fmt.d_qk == 512 else DenseFormat(d_qk=576)
    out_fp8, lse_fp8 = sparse_mla_decode(**args, kv_format=fmt, backend="xla")
    out_dense, lse_dense = sparse_mla_decode(**{**args, "kv_cache": dense}, kv_format=dense_layout, backend="xla")
    np.testing.assert_array_equal(np.asarray(out_fp8, np.float32), np.asarray(out_dense, np.float32))
    np.testing.assert_array_equal(lse_fp8, lse_dense)


# ----------------------------------------------------------------------------------------------------------------
# Bad input


def _good():
    _, args = _small_case_args()
    args["attn_sink"] = jnp.zeros((64,), jnp.float32)
    return args


BAD_INPUTS = [
    ("q", lambda a: {**a, "q": a["q"].astype(jnp.float16)}),
    ("q", lambda a: {**a, "q": a["q"][..., :500]}),
    ("q", lambda a: {**a, "q": a["q"][0]}),
    ("kv_cache", lambda a: {**a, "kv_cache": a["kv_cache"].astype(jnp.int8)}),
    ("kv_cache", lambda a: {**a, "page_size": 64}),  # cache was built for pages of 61
    ("kv_cache", lambda a: {**a, "kv_cache": a["kv_cache"][:, :-576]}),
    ("page size", lambda a: {**a, "page_size": 0}),
    ("indices", lambda a: {**a, "indices": a["indices"].astype(jnp.int64 if jax.config.x64_enabled else jnp.int16)}),
    ("indices", lambda a: {**a, "indices": a["indices"][:1]}),
    ("topk_length", lambda a: {**a, "topk_length": jnp.zeros((3,), jnp.int32)}),
    ("topk_length", lambda a: {**a, "topk_length": jnp.zeros((2,), jnp.float32)}),
    ("attn_sink", lambda a: {**a, "attn_sink": jnp.zeros((32,), jnp.float32)}),
    ("attn_sink", lambda a: {**a, "attn_sink": jnp.zeros((64,), jnp.bfloat16)}),
    ("extra_indices", lambda a: {**a, "extra_indices": a["indices"]}),
    ("extra_kv_cache", lambda a: {**a, "extra_kv_cache": a["kv_cache"], "extra_page_size": 61,
                                  "extra_indices": None}),
    ("extra_kv_cache", lambda a: {**a, "extra_kv_cache": a["kv_cache"], "extra_page_size": 2,
                                  "extra_indices": a["indices"]}),
    ("softmax_scale", lambda a: {**a, "softmax_scale": -1.0}),
    ("backend", lambda a: {**a, "backend": "cuda"}),
    ("kv_format", lambda a: {**a, "kv_format": "model2"}),
    ("kv_format", lambda a: {**a, "kv_format": "v32"}),  # q is 512 wide: names q and the kv_format
]


@pytest.mark.parametrize("name,mutate", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_value_error_naming_it(name, mutate):
    args = mutate({**_good(), "kv_format": "model1"})
    with pytest.raises(ValueError, match=name):
        sparse_mla_decode(**args)


def test_pallas_backend_rejects_what_the_kernel_cannot_run():
    args = _good()
    with pytest.raises(ValueError, match="q must be bfloat16"):
        sparse_mla_decode(**{**args, "q": args["q"].astype(jnp.float32)}, kv_format="model1", backend="pallas")
    with pytest.raises(ValueError, match="h_q = 48"):
        sparse_mla_decode(**{**args, "q": args["q"][:, :, :48], "attn_sink": None}, kv_format="model1",
                          backend="pallas")
    with pytest.raises(ValueError, match="interpret"):
        sparse_mla_decode(**args, kv_format="model1", backend="xla", interpret=True)
    dense = jnp.zeros((3, 4, 512), jnp.float32)
    with pytest.raises(ValueError, match="kv_format 'dense'"):
        sparse_mla_decode(**{**args, "kv_cache": dense, "page_size": 4}, kv_format="dense", backend="pallas")
