"""FlashMLA cache byte formats: kv_format facts, exact bytes at the documented offsets, agreement with the
independent numpy quantizer, dequantization error bounds, and in-place writes of new tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import (
    DENSE,
    MODEL1,
    V32,
    cache_bytes,
    cache_shape,
    dequantize_kv,
    get_format,
    quantize_kv,
    read_tokens,
    write_kv,
)
from tests import flashmla_oracle as oracle

BF16 = ml_dtypes.bfloat16


def _keys(rng, num_blocks, page, d, scale=0.1):
    return (rng.standard_normal((num_blocks, page, d)) * scale).clip(-1, 1).astype(BF16)


# docs/kernels.md §4.2, "Worked block sizes": page size -> MODEL1 block stride S.
MODEL1_STRIDES = {2: 1728, 53: 31104, 61: 35712, 64: 37440, 69: 40320, 256: 149760, 576: 336384}


def test_layout_facts():
    assert (MODEL1.d_qk, MODEL1.d_v, MODEL1.bytes_per_token, MODEL1.tile, MODEL1.num_tiles) == (512, 512, 584, 64, 7)
    assert (V32.d_qk, V32.d_v, V32.bytes_per_token, V32.tile, V32.num_tiles) == (576, 512, 656, 128, 4)
    for page, stride in MODEL1_STRIDES.items():
        assert MODEL1.block_stride(page) == stride and stride % 576 == 0
    assert V32.block_stride(64) == 656 * 64
    assert cache_shape(10, 64, "model1") == (10, 37440) and cache_bytes(10, 64, MODEL1) == 374400
    assert cache_shape(10, 64, V32) == (10, 656 * 64)
    assert cache_shape(3, 4, "dense") == (3, 4, 512)
    assert cache_bytes(3, 4, DENSE, jnp.float32) == 3 * 4 * 512 * 4
    assert get_format("MODEL1") is MODEL1 and get_format(V32) is V32
    with pytest.raises(ValueError, match="kv_format"):
        get_format("fp8")


def test_model1_bytes_at_documented_offsets():
    """Hand-built keys whose quantized bytes are known: tile j has amax 448·2^(j-9), so its scale is 2^(j-9)."""
    page, g = 3, 2
    k = np.zeros((1, page, 512), np.float32)
    for j in range(7):
        k[0, g, 64 * j] = 448.0 * 2.0 ** (j - 9)  # fp8 448 = 0x7E after scaling
        k[0, g, 64 * j + 1] = -2.0 ** (j - 9)  # fp8 -1 = 0xB8
    k[0, g, 448:] = 1.5  # bf16 0x3FC0
    cache = np.asarray(quantize_kv(jnp.asarray(k, jnp.bfloat16), MODEL1))
    assert cache.shape == (1, 2304)  # ceil(584·3 / 576)·576
    rec = cache[0, 576 * g: 576 * g + 576]
    for j in range(7):
        assert rec[64 * j] == 0x7E and rec[64 * j + 1] == 0xB8 and not rec[64 * j + 2: 64 * j + 64].any()
    assert rec[448:576].tolist() == [0xC0, 0x3F] * 64  # little-endian bf16 RoPE
    scales = cache[0, 576 * page + 8 * g: 576 * page + 8 * g + 8]
    assert scales.tolist() == [127 + j - 9 for j in range(7)] + [0]  # ue8m0 bytes, then the pad byte
    # An all-zero token: amax 0 -> s_inv = 1e-4 -> scale 2^ceil(log2 1e-4) = 2^-13 -> byte 114.
    assert cache[0, 576 * page: 576 * page + 7].tolist() == [114] * 7
    assert not cache[0, 584 * page:].any()  # block padding


def test_v32_bytes_at_documented_offsets():
    page, g = 2, 1
    k = np.zeros((1, page, 576), np.float32)
    for j in range(4):
        k[0, g, 128 * j + 5] = -448.0 * 2.0 ** (j + 1)
    k[0, g, 512:] = -2.0  # bf16 0xC000
    cache = np.asarray(quantize_kv(jnp.asarray(k, jnp.bfloat16), V32))
    assert cache.shape == (1, 2 * 656)
    rec = cache[0, 656 * g: 656 * (g + 1)]
    for j in range(4):
        assert rec[128 * j + 5] == 0xFE  # fp8 -448
        assert rec[512 + 4 * j: 516 + 4 * j].view("<f4")[0] == 2.0 ** (j + 1)  # fp32 scale
    assert rec[528:656].tolist() == [0x00, 0xC0] * 64
    assert cache[0, 512:528].view("<f4").tolist() == [2.0 ** -13] * 4  # zero token of slot 0


@pytest.mark.parametrize("kv_format,page", [("model1", 2), ("model1", 61), ("v32", 3), ("v32", 64)])
def test_quantize_matches_independent_quantizer(kv_format, page):
    rng = np.random.default_rng(page)
    fmt = get_format(kv_format)
    k = _keys(rng, 5, page, fmt.d_qk, scale=1.0)
    k[0, 0] = 0.0  # amax 0
    k[1, 0, :fmt.tile] = 448.0 * 2.0 ** -3  # s_inv exactly a power of two
    k[2, -1] = (rng.standard_normal(fmt.d_qk) * 300).astype(BF16)  # big values
    k[3, 0, 7] = np.nan  # a NaN tile: NaN data, NaN scale
    k[4, 0] = (rng.standard_normal(fmt.d_qk) * 1e-6).astype(BF16)  # below the 1e-4 floor
    ours = np.asarray(quantize_kv(jnp.asarray(k), fmt))
    np.testing.assert_array_equal(ours, oracle.quantize(k, kv_format))


@pytest.mark.parametrize("kv_format", ["model1", "v32"])
def test_dequantize_error_bounds(kv_format):
    rng = np.random.default_rng(1)
    fmt = get_format(kv_format)
    page = 7
    k = _keys(rng, 4, page, fmt.d_qk, scale=2.0)
    cache = quantize_kv(jnp.asarray(k), fmt)
    deq = np.asarray(dequantize_kv(cache, fmt, page), np.float64)
    x = k.astype(np.float64)
    tiles = x[..., :fmt.d_nope].reshape(4, page, fmt.num_tiles, fmt.tile)
    scale = 2.0 ** np.ceil(np.log2(np.maximum(np.abs(tiles).max(-1) / 448.0, 1e-4)))
    err = np.abs(deq[..., :fmt.d_nope].reshape(tiles.shape) - tiles)
    # e4m3: 3 mantissa bits -> half-ulp 2^-4 relative for normals; subnormal step 2^-9 -> 2^-10 absolute.
    bound = np.maximum(np.abs(tiles) * 2.0 ** -4, 2.0 ** -10 * scale[..., None])
    assert np.all(err <= bound)
    np.testing.assert_array_equal(deq[..., fmt.d_nope:], x[..., fmt.d_nope:])  # RoPE is verbatim
    # Reading the bytes independently gives the same values.
    slots = np.arange(4 * page)
    np.testing.assert_array_equal(deq.reshape(-1, fmt.d_qk),
                                  oracle.dequantize_tokens(np.asarray(cache), kv_format, page, slots))


def test_read_tokens_matches_oracle_on_nan_poisoned_cache():
    rng = np.random.default_rng(2)
    page = 5
    k = _keys(rng, 6, page, 512)
    k[2] = np.nan
    cache = oracle.quantize(k, "model1", fill=0xFF)
    slots = np.array([[0, 29], [13, 7]])
    ours = np.asarray(read_tokens(jnp.asarray(cache), jnp.asarray(slots), MODEL1, page))
    np.testing.assert_array_equal(ours.reshape(-1, 512), oracle.dequantize_tokens(cache, "model1", page, slots.ravel()))
    assert np.isnan(np.asarray(read_tokens(jnp.asarray(cache), jnp.asarray([10]), MODEL1, page))).all()


_write = jax.jit(write_kv, static_argnames=("kv_format", "page_size"), donate_argnums=0)


@pytest.mark.parametrize("kv_format,page", [("model1", 61), ("v32", 2), ("dense", 4)])
def test_write_kv_in_place(kv_format, page):
    """Donated writes reuse the buffer, skip negative / out-of-range slots, leave other bytes alone, and write
    exactly what quantize_kv writes for the same rows."""
    rng = np.random.default_rng(4)
    fmt = get_format(kv_format)
    num_blocks = 3
    k0 = _keys(rng, num_blocks, page, fmt.d_qk)
    k_new = _keys(rng, 1, 5, fmt.d_qk, scale=3.0)[0]
    capacity = num_blocks * page
    slots = np.array([capacity - 1, -1, 1, capacity, page + 1], np.int32)
    if fmt.quantized:
        cache = quantize_kv(jnp.asarray(k0), fmt)
    else:
        cache = jnp.asarray(k0.astype(np.float32))
    pointer = cache.unsafe_buffer_pointer()
    new = _write(cache, jnp.asarray(slots), jnp.asarray(k_new), kv_format=kv_format, page_size=page)
    assert cache.is_deleted() and new.unsafe_buffer_pointer() == pointer

    expect = k0.reshape(-1, fmt.d_qk).copy()
    for slot, row in zip(slots, k_new):
        if 0 <= slot < capacity:
            expect[slot] = row
    expect = expect.reshape(k0.shape)
    if fmt.quantized:
        np.testing.assert_array_equal(np.asarray(new), oracle.quantize(expect, kv_format))
    else:
        np.testing.assert_array_equal(np.asarray(new), expect.astype(np.float32))


def test_write_kv_bad_input():
    cache = jnp.zeros(cache_shape(2, 4, MODEL1), jnp.uint8)
    with pytest.raises(ValueError, match="k_new"):
        write_kv(cache, jnp.zeros((3,), jnp.int32), jnp.zeros((2, 512)), kv_format="model1", page_size=4)
    with pytest.raises(ValueError, match="slots"):
        write_kv(cache, jnp.zeros((3, 1), jnp.int32), jnp.zeros((3, 512)), kv_format="model1", page_size=4)
    with pytest.raises(ValueError, match="kv_cache"):
        write_kv(cache, jnp.zeros((2,), jnp.int32), jnp.zeros((2, 512)), kv_format="model1", page_size=5)
    with pytest.raises(ValueError, match="k must have shape"):
        quantize_kv(jnp.zeros((2, 4, 576)), "model1")
    with pytest.raises(ValueError, match="kv_format"):
        quantize_kv(jnp.zeros((2, 4, 512)), "dense")
