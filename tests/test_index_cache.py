"""FP8 indexer keys (docs/serving.md §4): the bytes equal an independent NumPy encoder of the serving engines'
132-byte page-major format, reads and page gathers return the exact dequantized keys, and decode with FP8
indexer keys (and the FP8 KV cache) agrees with the full forward whose keys are rounded the same way."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.model import attention
from model1_jax.model.indexer import Indexer
from pallas_kernels import index_format
from tests import test_decode
from tests.test_decode import WIDE, decode_all, fp8_stored, rel_err
from tests.util import random_model

J, PAGE, PAGES = 128, 16, 5


def encode_np(keys_sj: np.ndarray, slots: np.ndarray, pages: int, page_size: int) -> np.ndarray:
    """The format written from its description: per page, every entry's 128 FP8 e4m3 bytes first (entry t at
    byte 128·t), then every entry's float32 scale (entry t at byte 128·B + 4·t, little-endian); scale =
    2^ceil(log2(max(amax, 1e-4) / 448)) of the bf16-rounded row, fp8 = round-to-nearest-even(row / scale)."""
    j = keys_sj.shape[1]
    cache = np.zeros((pages, page_size * (j + 4)), np.uint8)
    for row, slot in zip(keys_sj, slots):
        if not 0 <= slot < pages * page_size:
            continue
        page, t = divmod(int(slot), page_size)
        x = row.astype(ml_dtypes.bfloat16).astype(np.float64)
        scale = 2.0 ** np.ceil(np.log2(max(np.abs(x).max(), 1e-4) / 448.0))
        cache[page, j * t:j * (t + 1)] = (x / scale).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
        cache[page, j * page_size + 4 * t:j * page_size + 4 * t + 4] = np.frombuffer(
            np.float32(scale).astype("<f4").tobytes(), np.uint8)
    return cache


def decode_np(cache: np.ndarray, slot: int, page_size: int, j: int) -> np.ndarray:
    page, t = divmod(slot, page_size)
    fp8 = cache[page, j * t:j * (t + 1)].view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    scale = cache[page, j * page_size + 4 * t:j * page_size + 4 * t + 4].view("<f4")[0]
    return fp8 * scale


@pytest.fixture(scope="module")
def keys():
    rng = np.random.default_rng(0)
    n = 40
    k = (rng.standard_normal((n, J)) * rng.choice([1e-6, 1e-3, 1.0, 300.0, 5e4], (n, 1))).astype(np.float32)
    k[0] = 0.0  # amax 0: the 1e-4 floor sets the scale
    k[1, 0] = 448.0 * 2.0 ** 5  # amax exactly 448 · 2^5: scale 2^5 with no rounding up
    slots = rng.permutation(PAGES * PAGE + 12)[:n] - 6  # some negative, some past the end: skipped
    return k, slots.astype(np.int32)


def test_bytes_equal_an_independent_encoder(keys):
    k, slots = keys
    empty = jnp.zeros(index_format.cache_shape(PAGES, PAGE, J), jnp.uint8)
    got = np.asarray(index_format.write(empty, jnp.asarray(slots), jnp.asarray(k), page_size=PAGE))
    want = encode_np(k, slots, PAGES, PAGE)
    assert got.shape == (PAGES, 132 * PAGE)
    np.testing.assert_array_equal(got, want)
    assert ((slots >= 0) & (slots < PAGES * PAGE)).sum() < len(slots)  # the skipping was exercised


def test_reads_return_the_exact_dequantized_keys(keys):
    k, slots = keys
    cache = index_format.write(jnp.zeros(index_format.cache_shape(PAGES, PAGE, J), jnp.uint8), jnp.asarray(slots),
                               jnp.asarray(k), page_size=PAGE)
    ok = (slots >= 0) & (slots < PAGES * PAGE)
    want = np.stack([decode_np(np.asarray(cache), int(s), PAGE, J) for s in slots[ok]])
    np.testing.assert_array_equal(np.asarray(index_format.read(cache, slots[ok], page_size=PAGE)), want)
    table = np.array([[3, 0, -1], [4, 2, 1]], np.int32)  # two sequences' block tables; −1: no page
    pages = np.asarray(index_format.gather_pages(cache, jnp.asarray(table), page_size=PAGE))
    assert pages.shape == (2, 3 * PAGE, J)
    for b in range(2):
        for u, page in enumerate(table[b]):
            if page >= 0:
                rows = [decode_np(np.asarray(cache), int(page) * PAGE + t, PAGE, J) for t in range(PAGE)]
                np.testing.assert_array_equal(pages[b, u * PAGE:(u + 1) * PAGE], np.stack(rows))
    # Rounding: within half an fp8 step (2^-4 relative for e4m3's 3 mantissa bits) of the bf16 key.
    x = k[ok].astype(ml_dtypes.bfloat16).astype(np.float32)
    big = np.abs(x) > 1e-2 * np.abs(x).max(axis=1, keepdims=True)
    assert (np.abs(want - x) <= 2.0 ** -4 * np.abs(x) + 1e-30)[big].all()


def test_compute_precision_option_is_exact(keys):
    k, slots = keys
    cache = index_format.write(jnp.zeros(index_format.cache_shape(PAGES, PAGE, J, fp8=False), jnp.float32),
                               jnp.asarray(slots), jnp.asarray(k), page_size=PAGE)
    ok = (slots >= 0) & (slots < PAGES * PAGE)
    np.testing.assert_array_equal(np.asarray(index_format.read(cache, slots[ok], page_size=PAGE)), k[ok])


def fp8_index_keys(k):
    return index_format.dequantize_rows(*index_format.quantize_rows(k.reshape(-1, k.shape[-1]))).reshape(
        k.shape).astype(k.dtype)


def rounded_forward(model, ids):
    """The full forward (the dense reference attention) with attention keys stored as the FP8 KV cache stores
    them and the indexer's keys as the FP8 indexer cache stores them."""
    attend, select = attention.attend, Indexer.select
    attention.attend = lambda q, k, *args: attend(q, fp8_stored(k), *args)
    Indexer.select = lambda self, x, q, k, pos: select(self, x, q, fp8_index_keys(k), pos)
    attention.use_full_attention(model, "dense")
    try:  # a fresh jit: the patched functions are read while tracing
        return np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    finally:
        attention.attend, Indexer.select = attend, select
        attention.use_full_attention(model, "auto")


def test_decode_with_fp8_index_keys_matches_the_rounded_forward():
    """Same argument and bound as tests/test_decode.py::test_fp8_cache (1e-2 of max |logit|: fp32 noise can flip
    the rounding of an element within ~1e-7 of a boundary). Leaving the indexer keys unrounded in the oracle
    must fail it: the rounding changes which entries the indexer picks."""
    model = random_model(WIDE, seed=5)
    ids = np.random.default_rng(1).integers(0, WIDE.vocab_size, (2, 40)).astype(np.int32)
    want = rounded_forward(model, ids)
    state = m1.init_state(WIDE, max_batch=2, max_len=40, cache_dtype="fp8", chunk=16, page_size=16)
    assert state.spec.index_cache == "fp8" and state.layers[1].index_keys.dtype == jnp.uint8
    assert state.layers[1].index_keys.shape == (2, 16 * 132)  # one page of 16 entries per sequence
    got, _ = decode_all(model, state, ids, np.array([23, 17]))
    scale = np.abs(want).max()
    err = rel_err(got, want, scale)
    kv_only = test_decode.rounded_forward(model, ids, fp8_stored)  # indexer keys left at full precision
    err_kv_only = rel_err(got, kv_only, np.abs(kv_only).max())
    print(f"\nfp8 indexer keys: max error vs the rounded forward {err:.1e} of max |logit|; vs the forward with "
          f"full-precision indexer keys {err_kv_only:.1e}")
    assert err < 1e-2 < err_kv_only  # measured: 3.3e-3 and 2.1e-1
