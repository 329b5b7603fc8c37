"""KV-cache formats of FlashMLA's sparse decode, as data, plus quantize / read / write (docs/kernels.md §4–5).

A quantized cache is `uint8[u, y]`: u page blocks of y = `kv_format.block_stride(page_size)` bytes.
The bytes are exactly FlashMLA's buffer, so a cache written here is read by FlashMLA and vice versa.

Shape letters follow the project's one table (docs/model.md §0): u page blocks, s token slots, h head dims (d_qk),
y bytes (of a block or a token's record).

Every token is handled through one "record" of `bytes_per_token` bytes in a fixed order
[fp8 NoPE | scale bytes | bf16 RoPE bytes]; `record_columns` says where each record byte lives in its block.
Writing (`write_kv`) and reading (`read_tokens`) both go through it, so `quantize_kv` is `write_kv` of every
slot and `dequantize_kv` is `read_tokens` of every slot.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_INV_MIN = 1e-4  # FlashMLA's floor on amax / 448


@dataclasses.dataclass(frozen=True)
class Fp8Format:
    """A FlashMLA FP8 sparse-decode kv_format.

    The first `d_nope` dims are stored as fp8 e4m3fn, one scale per `tile` dims; the last `d_rope` dims as bf16.
    V is the first `d_v` dims of the dequantized key (MODEL1: all of it; V3.2: the NoPE part).
    """

    name: str
    d_qk: int
    d_nope: int
    tile: int
    scale_format: str  # "ue8m0": one byte 2^(e-127) per tile; "float32": 4 little-endian bytes per tile
    scale_bytes: int  # scale bytes per token, padding included
    scales_inline: bool  # True: scales sit inside the token's record (V3.2); False: in a region after all records
    block_align: int  # the block stride is rounded up to a multiple of this (MODEL1: 576, for SM100's TMA)
    d_v: int = 512
    quantized = True

    @property
    def d_rope(self) -> int:
        return self.d_qk - self.d_nope

    @property
    def num_tiles(self) -> int:
        return self.d_nope // self.tile

    @property
    def token_pitch(self) -> int:
        """Bytes between consecutive tokens' records inside a block."""
        return self.d_nope + 2 * self.d_rope + (self.scale_bytes if self.scales_inline else 0)

    @property
    def bytes_per_token(self) -> int:
        """FlashMLA's bytes_per_token (stride(1) of its cache view): 584 for MODEL1, 656 for V3.2."""
        return self.token_pitch + (0 if self.scales_inline else self.scale_bytes)

    def block_stride(self, page_size: int) -> int:
        """Bytes per page block of `page_size` tokens."""
        used = self.bytes_per_token * page_size
        return -(-used // self.block_align) * self.block_align

    # Byte offsets inside a block of slot g (ints or integer arrays).
    def nope_offset(self, g):
        return self.token_pitch * g

    def scale_offset(self, g, page_size: int):
        if self.scales_inline:
            return self.token_pitch * g + self.d_nope
        return self.token_pitch * page_size + self.scale_bytes * g

    def rope_offset(self, g):
        return self.token_pitch * g + self.d_nope + (self.scale_bytes if self.scales_inline else 0)


@dataclasses.dataclass(frozen=True)
class DenseFormat:
    """Unquantized cache `[u, page_size, d_qk]` (float32 or bfloat16) with FlashMLA's index encoding; for
    exactness tests."""

    name: str = "dense"
    d_qk: int = 512
    d_v: int = 512
    quantized = False


# Upstream FlashMLA's names (`kv_format=`): "v4" (first released as MODEL1) and "v32"; "model1" stays an alias.
V4 = Fp8Format("v4", d_qk=512, d_nope=448, tile=64, scale_format="ue8m0", scale_bytes=8,
                   scales_inline=False, block_align=576)
V32 = Fp8Format("v32", d_qk=576, d_nope=512, tile=128, scale_format="float32", scale_bytes=16,
                scales_inline=True, block_align=1)
DENSE = DenseFormat()
MODEL1 = V4

KVFormat = Fp8Format | DenseFormat
KV_FORMATS = {"v4": V4, "model1": V4, "v32": V32, "dense": DENSE}


def get_format(kv_format: str | KVFormat) -> KVFormat:
    """Resolves "v4" (alias "model1") / "v32" / "dense" (or a format object) to the format object."""
    if isinstance(kv_format, (Fp8Format, DenseFormat)):
        return kv_format
    if isinstance(kv_format, str) and kv_format.lower() in KV_FORMATS:
        return KV_FORMATS[kv_format.lower()]
    raise ValueError(f"kv_format must be one of {sorted(KV_FORMATS)} or a format object, got {kv_format!r}")


def cache_shape(num_blocks: int, page_size: int, kv_format: str | KVFormat) -> tuple[int, ...]:
    """Shape of a cache of `num_blocks` pages: `(u, block_stride)` bytes, or `(u, page_size, d_qk)` (dense)."""
    fmt = get_format(kv_format)
    if fmt.quantized:
        return (num_blocks, fmt.block_stride(page_size))
    return (num_blocks, page_size, fmt.d_qk)


def cache_bytes(num_blocks: int, page_size: int, kv_format: str | KVFormat, dtype=jnp.bfloat16) -> int:
    """Bytes of such a cache; `dtype` only matters for the dense format."""
    fmt = get_format(kv_format)
    itemsize = 1 if fmt.quantized else jnp.dtype(dtype).itemsize
    return int(np.prod(cache_shape(num_blocks, page_size, fmt))) * itemsize


# ----------------------------------------------------------------------------------------------------------------
# Token records


def record_columns(kv_format: Fp8Format, offset_s, page_size: int):
    """Block byte column of every record byte: int32 `[s, bytes_per_token]` for slots `offset_s`."""
    r = jnp.arange(kv_format.bytes_per_token, dtype=jnp.int32)
    g = jnp.asarray(offset_s, jnp.int32)[:, None]
    n_nope, n_scale = kv_format.d_nope, kv_format.scale_bytes
    nope = kv_format.nope_offset(g) + r
    scale = kv_format.scale_offset(g, page_size) + (r - n_nope)
    rope = kv_format.rope_offset(g) + (r - n_nope - n_scale)
    return jnp.where(r < n_nope, nope, jnp.where(r < n_nope + n_scale, scale, rope))


def _ceil_log2(x_f32):
    """Exact ceil(log2(x)) of positive normal float32 values, from the bits (no rounding of a log)."""
    bits = lax.bitcast_convert_type(x_f32, jnp.int32)
    exponent = ((bits >> 23) & 0xFF) - 127
    return exponent + ((bits & 0x7FFFFF) != 0).astype(jnp.int32)


def quantize_records(k_sh, kv_format: Fp8Format):
    """FlashMLA's quantization of keys `[s, d_qk]` into records uint8 `[s, bytes_per_token]` (docs/kernels.md §5).

    Per tile: amax over |x| in fp32, s_inv = max(amax / 448, 1e-4), scale = 2^ceil(log2 s_inv),
    fp8 = round-to-nearest-even(x / scale). RoPE is stored verbatim as bf16. Keys are rounded to bf16 first
    (FlashMLA quantizes bf16 keys). A NaN tile gives NaN data and a NaN scale (0xFF for ue8m0).
    """
    n = k_sh.shape[0]
    x = k_sh.astype(jnp.bfloat16).astype(jnp.float32)
    nope = x[:, : kv_format.d_nope].reshape(n, kv_format.num_tiles, kv_format.tile)
    # A NaN anywhere makes the tile's scale NaN (torch's max propagates NaN; XLA:CPU's reduce-max may drop it).
    is_nan = jnp.isnan(nope).any(axis=-1)
    s_inv = jnp.maximum(jnp.max(jnp.abs(nope), axis=-1) / FP8_MAX, SCALE_INV_MIN)
    exp2 = _ceil_log2(s_inv)
    scale = jnp.where(is_nan, jnp.nan, lax.bitcast_convert_type((exp2 + 127) << 23, jnp.float32))
    fp8 = (nope / scale[..., None]).astype(jnp.float8_e4m3fn).reshape(n, kv_format.d_nope)
    fp8_u8 = lax.bitcast_convert_type(fp8, jnp.uint8)
    if kv_format.scale_format == "ue8m0":
        e = jnp.where(is_nan, 0xFF, exp2 + 127).astype(jnp.uint8)
        pad = jnp.zeros((n, kv_format.scale_bytes - kv_format.num_tiles), jnp.uint8)
        scale_u8 = jnp.concatenate([e, pad], axis=1)
    else:
        scale_u8 = lax.bitcast_convert_type(scale, jnp.uint8).reshape(n, kv_format.scale_bytes)
    rope = x[:, kv_format.d_nope:].astype(jnp.bfloat16)
    rope_u8 = lax.bitcast_convert_type(rope, jnp.uint8).reshape(n, 2 * kv_format.d_rope)
    return jnp.concatenate([fp8_u8, scale_u8, rope_u8], axis=1)


def decode_records(rec_sy, kv_format: Fp8Format):
    """Records uint8 `[..., bytes_per_token]` to the dequantized keys, float32 `[..., d_qk]` (exact bf16 values).

    FlashMLA's rule: bf16(fp8) * bf16(scale), rounded to bf16 (exact for the power-of-two scales we write).
    """
    lead = rec_sy.shape[:-1]
    n_nope, n_scale, nt = kv_format.d_nope, kv_format.scale_bytes, kv_format.num_tiles
    fp8 = lax.bitcast_convert_type(rec_sy[..., :n_nope], jnp.float8_e4m3fn).astype(jnp.float32)
    scale_u8 = rec_sy[..., n_nope:n_nope + n_scale]
    if kv_format.scale_format == "ue8m0":
        e = scale_u8[..., :nt].astype(jnp.int32)
        # 0xFF is NaN in ue8m0; e = 0 (2^-127, never written by the quantizer) reads as 0 here.
        scale = jnp.where(e == 0xFF, jnp.nan, lax.bitcast_convert_type(e << 23, jnp.float32))
    else:
        scale = lax.bitcast_convert_type(scale_u8.reshape(*lead, nt, 4), jnp.float32)
    scale = scale.astype(jnp.bfloat16).astype(jnp.float32)
    nope = (fp8.reshape(*lead, nt, kv_format.tile) * scale[..., None]).astype(jnp.bfloat16)
    rope_u8 = rec_sy[..., n_nope + n_scale:].reshape(*lead, kv_format.d_rope, 2)
    rope = lax.bitcast_convert_type(rope_u8, jnp.bfloat16)
    return jnp.concatenate([nope.reshape(*lead, n_nope), rope], axis=-1).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------------------------
# Cache-level operations


def is_valid_index(idx, pos, length, capacity: int):
    """docs/kernels.md §3.2: position `pos` holding `idx` is read iff pos < length and 0 <= idx < capacity
    (= pages · page_size).

    FlashMLA documents only -1 as invalid; any other out-of-range value is treated as invalid too, so no
    address is ever formed from it. Works on arrays inside and outside kernels.
    """
    return (pos < length) & (idx >= 0) & (idx < capacity)


@functools.partial(jax.jit, static_argnames=("kv_format", "page_size"))
def read_tokens(kv_cache, slots, kv_format: str | KVFormat, page_size: int):
    """Keys at flat slots `block * page_size + offset` (int array, any shape, all in range) as float32 `[..., d_qk]`."""
    fmt = get_format(kv_format)
    slots = jnp.asarray(slots, jnp.int32)
    p, g = slots // page_size, slots % page_size
    if not fmt.quantized:
        return kv_cache[p, g].astype(jnp.float32)
    cols = record_columns(fmt, g.reshape(-1), page_size).reshape(*slots.shape, fmt.bytes_per_token)
    return decode_records(kv_cache[p[..., None], cols], fmt)


@functools.partial(jax.jit, static_argnames=("kv_format", "page_size"))
def write_kv(kv_cache, slots, k_new, *, kv_format: str | KVFormat, page_size: int):
    """Writes keys `k_new [s, d_qk]` into flat `slots [s]` (`block * page_size + offset`); returns the new cache.

    A negative or out-of-range slot is skipped, so a decode step can pad its batch with -1. Quantized rows are
    byte-identical to `quantize_kv` of the same rows. Under `jax.jit(write_kv, donate_argnums=0, ...)` XLA
    updates the donated cache in place.
    """
    fmt = get_format(kv_format)
    _check_write_args(kv_cache, slots, k_new, fmt, page_size)
    num_blocks = kv_cache.shape[0]
    slots = slots.astype(jnp.int32)
    keep = (slots >= 0) & (slots < num_blocks * page_size)
    p = jnp.where(keep, slots // page_size, num_blocks)  # block num_blocks is out of range: dropped
    g = jnp.where(keep, slots % page_size, 0)
    if not fmt.quantized:
        return kv_cache.at[p, g].set(k_new.astype(kv_cache.dtype), mode="drop")
    cols = record_columns(fmt, g, page_size)
    return kv_cache.at[p[:, None], cols].set(quantize_records(k_new, fmt), mode="drop")


@functools.partial(jax.jit, static_argnames=("kv_format",))
def quantize_kv(k_ush, kv_format: str | KVFormat):
    """Quantizes keys `[u, page_size, d_qk]` (page blocks) into a FlashMLA cache uint8 `[u, block_stride]`.

    Bytes that belong to no token (MODEL1's per-token pad byte and block padding) are 0.
    """
    fmt = get_format(kv_format)
    if not fmt.quantized:
        raise ValueError(f"kv_format must be a quantized kv_format (model1 or v32), got {fmt.name!r}")
    if k_ush.ndim != 3 or k_ush.shape[-1] != fmt.d_qk:
        raise ValueError(f"k must have shape [num_blocks, page_size, {fmt.d_qk}] for kv_format {fmt.name!r}, "
                         f"got {k_ush.shape}")
    num_blocks, page_size, _ = k_ush.shape
    empty = jnp.zeros(cache_shape(num_blocks, page_size, fmt), jnp.uint8)
    slots = jnp.arange(num_blocks * page_size, dtype=jnp.int32)
    return write_kv(empty, slots, k_ush.reshape(-1, fmt.d_qk), kv_format=fmt, page_size=page_size)


@functools.partial(jax.jit, static_argnames=("kv_format", "page_size"))
def dequantize_kv(kv_cache, kv_format: str | KVFormat, page_size: int):
    """A FlashMLA cache uint8 `[u, block_stride]` back to bf16 keys `[u, page_size, d_qk]`."""
    fmt = get_format(kv_format)
    if not fmt.quantized:
        raise ValueError(f"kv_format must be a quantized kv_format (model1 or v32), got {fmt.name!r}")
    check_cache(kv_cache, fmt, page_size, "kv_cache")
    num_blocks = kv_cache.shape[0]
    slots = jnp.arange(num_blocks * page_size, dtype=jnp.int32).reshape(num_blocks, page_size)
    return read_tokens(kv_cache, slots, fmt, page_size).astype(jnp.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Validation shared with the decode entry point


def check_cache(kv_cache, kv_format: KVFormat, page_size, name: str) -> None:
    """Raises ValueError (naming `name`) unless `kv_cache` is a cache of `kv_format` with pages of `page_size`."""
    if not isinstance(page_size, (int, np.integer)) or isinstance(page_size, bool) or page_size <= 0:
        raise ValueError(f"page size for {name} must be a positive int, got {page_size!r}")
    shape, dtype = getattr(kv_cache, "shape", None), getattr(kv_cache, "dtype", None)
    if kv_format.quantized:
        want = kv_format.block_stride(page_size)
        if dtype != jnp.uint8 or len(shape) != 2:
            raise ValueError(f"{name} must be uint8 [num_blocks, {want}] for kv_format {kv_format.name!r}, "
                             f"got {dtype} {shape}")
        if shape[1] != want:
            raise ValueError(f"{name} has {shape[1]} bytes per block, but kv_format {kv_format.name!r} with page_size "
                             f"{page_size} needs {want}: mismatched kv_format or page size")
    else:
        if dtype not in (jnp.float32, jnp.bfloat16) or len(shape) != 3:
            raise ValueError(f"{name} must be float32/bfloat16 [num_blocks, page_size, d_qk] for the dense format, "
                             f"got {dtype} {shape}")
        if shape[1:] != (page_size, kv_format.d_qk):
            raise ValueError(f"{name} has shape {shape}, but the dense format with page_size {page_size} needs "
                             f"[num_blocks, {page_size}, {kv_format.d_qk}]: mismatched kv_format or page size")


def _check_write_args(kv_cache, slots, k_new, kv_format: KVFormat, page_size) -> None:
    check_cache(kv_cache, kv_format, page_size, "kv_cache")
    if getattr(slots, "ndim", None) != 1 or not jnp.issubdtype(slots.dtype, jnp.integer):
        raise ValueError(f"slots must be an int32 vector [n], got {getattr(slots, 'dtype', type(slots))} "
                         f"{getattr(slots, 'shape', '')}")
    if getattr(k_new, "ndim", None) != 2 or k_new.shape != (slots.shape[0], kv_format.d_qk):
        raise ValueError(f"k_new must have shape [n, {kv_format.d_qk}] with n = len(slots) = {slots.shape[0]}, "
                         f"got {getattr(k_new, 'shape', type(k_new))}")
    if not jnp.issubdtype(k_new.dtype, jnp.floating):
        raise ValueError(f"k_new must be a float array, got {k_new.dtype}")
