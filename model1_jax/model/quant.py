"""Block-quantized weights (docs/checkpoints.md §5): the FP8 and FP4 formats of the released checkpoints.

* FP8 (`FP8`): float8_e4m3fn values, one UE8M0 scale per block (128×128 of HF's [out, in] in the
  released files; ceil-blocks at the edges).
* FP4 (`FP4`): e2m1 codes packed two per byte along the input axis (low nibble = even element),
  one UE8M0 scale per row and 32 input columns.

UE8M0 scales (float8_e8m0fnu) are powers of two, 2^(byte − 127), so `W = value · scale` is exact in
float32 and in bfloat16 (a ≤ 4-significant-bit value times a power of two), barring underflow below
2^−126, which a real scale never comes near.

`BlockQuantized` holds such a weight in the model's own layout (input axes first, shaped): values
and scales are rearranged exactly like the dense weight, and `block` says how many elements of each
model axis share one scale. `layers.weight` calls its `dequantize(dtype)` at the point of use, so a
model runs directly on FP8/FP4 parameters (dequantized on the fly). The same code dequantizes NumPy
arrays on the host (the converter) and JAX arrays inside `jit`, so both give identical bits.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

FP8 = "fp8_e4m3"
FP4 = "fp4_e2m1"
FORMATS = (FP8, FP4)

E4M3 = np.dtype(jnp.float8_e4m3fn)
E8M0 = np.dtype(jnp.float8_e8m0fnu)
# Largest finite magnitude of each value format: a block's scale maps its absmax at or below it.
_MAX = {FP8: 448.0, FP4: 6.0}
# e2m1 code → value: bit 3 is the sign, bits 0–2 index the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
# Scale block of the released FP4 experts on HF's [out, in]: one scale per row and 32 columns.
FP4_BLOCK = (1, 32)


def scale_shape(shape: Sequence[int], block: Sequence[int]) -> tuple[int, ...]:
    """Number of scales along each axis: ⌈size / block⌉ (partial blocks at the edges)."""
    return tuple(-(-n // b) for n, b in zip(shape, block))


def packed_shape(shape: Sequence[int], pack_axis: int) -> tuple[int, ...]:
    """Shape of the uint8 array holding FP4 codes of `shape`, two per byte along `pack_axis`."""
    shape = tuple(shape)
    return shape[:pack_axis] + (shape[pack_axis] // 2,) + shape[pack_axis + 1:]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """A block-quantized weight: `values`, `scales` (float8_e8m0fnu) and static format data.

    values: FP8 → float8_e4m3fn of the weight's shape; FP4 → uint8, two e2m1 codes per byte along
            `pack_axis` (the weight's innermost input axis), low nibble first.
    scales: ⌈shape / block⌉; element i of the weight uses scale ⌊i / block⌋ (per axis).
    Works with NumPy arrays (host) and JAX arrays (device, traced) alike.
    """

    values: jax.Array
    scales: jax.Array
    fmt: str = dataclasses.field(metadata=dict(static=True))
    block: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    pack_axis: int | None = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense weight."""
        shape = tuple(self.values.shape)
        if self.pack_axis is None:
            return shape
        return shape[:self.pack_axis] + (2 * shape[self.pack_axis],) + shape[self.pack_axis + 1:]

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def nbytes(self) -> int:
        return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in (self.values, self.scales))

    def check(self) -> BlockQuantized:
        """Raises ValueError if the arrays do not match the format; returns self."""
        problems = _format_problems(self)
        if problems:
            raise ValueError("BlockQuantized: " + "; ".join(problems))
        return self

    def dequantize(self, dtype=jnp.float32):
        """The dense weight in `dtype`: exactly value · scale (computed in float32, then cast)."""
        xp = np if isinstance(self.values, np.ndarray) else jnp
        if self.fmt == FP4:
            values = xp.asarray(E2M1_VALUES)[unpack_fp4(self.values, self.pack_axis)]
        else:
            values = self.values.astype(np.float32)
        scales = e8m0_to_float32(self.scales)
        shape = values.shape
        if all(n % b == 0 for n, b in zip(shape, self.block)):  # whole blocks: broadcast, no expanded copy
            blocked = values.reshape([x for n, b in zip(shape, self.block) for x in (n // b, b)])
            return (blocked * scales.reshape([x for s in scales.shape for x in (s, 1)])).reshape(shape).astype(
                dtype, copy=False)
        for axis, b in enumerate(self.block):
            if b > 1:
                scales = xp.repeat(scales, b, axis=axis)
        scales = scales[tuple(slice(0, n) for n in shape)]  # crop the partial blocks at the edges
        return (values * scales).astype(dtype, copy=False)


def _format_problems(q: BlockQuantized) -> list[str]:
    problems = []
    if q.fmt not in FORMATS:
        return [f"unknown format {q.fmt!r} (expected one of {FORMATS})"]
    want_values = E4M3 if q.fmt == FP8 else np.dtype(np.uint8)
    if np.dtype(q.values.dtype) != want_values:
        problems.append(f"{q.fmt} values must be {want_values}, got {q.values.dtype}")
    if np.dtype(q.scales.dtype) != E8M0:
        problems.append(f"scales must be float8_e8m0fnu (UE8M0), got {q.scales.dtype}")
    if (q.pack_axis is None) != (q.fmt == FP8) or (q.pack_axis is not None and not 0 <= q.pack_axis < q.ndim):
        problems.append(f"pack_axis {q.pack_axis} is invalid for {q.fmt} values of rank {q.ndim}")
        return problems
    if len(q.block) != q.ndim or any(b < 1 for b in q.block):
        problems.append(f"block {q.block} must give a positive size for each of the {q.ndim} axes")
    elif tuple(q.scales.shape) != scale_shape(q.shape, q.block):
        problems.append(f"scales shape {tuple(q.scales.shape)} != {scale_shape(q.shape, q.block)} "
                        f"(weight {q.shape}, block {q.block})")
    return problems


def e8m0_to_float32(scales):
    """UE8M0 scales → float32 2^(byte − 127), decoded from the bits (no float8 conversion support needed
    from the backend): byte b in 1..254 is the float32 with exponent field b; 0 is 2^−127; 255 is NaN."""
    if isinstance(scales, np.ndarray):
        bits = scales.view(np.uint8)
        xp, as_f32 = np, lambda u32: u32.view(np.float32)
    else:
        bits = jax.lax.bitcast_convert_type(scales, jnp.uint8)
        xp, as_f32 = jnp, lambda u32: jax.lax.bitcast_convert_type(u32, jnp.float32)
    value = as_f32(bits.astype(np.uint32) << 23)
    value = xp.where(bits == 0, np.float32(2.0 ** -127), value)
    return xp.where(bits == 255, np.float32(np.nan), value)


def unpack_fp4(packed, pack_axis: int):
    """uint8 bytes → e2m1 codes (uint8, 0..15), twice as long along `pack_axis`; low nibble first."""
    xp = np if isinstance(packed, np.ndarray) else jnp
    low, high = packed & 0x0F, packed >> 4
    shape = list(packed.shape)
    shape[pack_axis] *= 2
    return xp.stack([low, high], axis=pack_axis + 1).reshape(shape)


def pack_fp4(codes: np.ndarray, pack_axis: int) -> np.ndarray:
    """e2m1 codes (0..15) → uint8 bytes, two per byte along `pack_axis` (element 2j low, 2j+1 high)."""
    if codes.shape[pack_axis] % 2:
        raise ValueError(f"pack_fp4: axis {pack_axis} of {codes.shape} has odd length")
    codes = np.asarray(codes, np.uint8)
    low = np.take(codes, np.arange(0, codes.shape[pack_axis], 2), axis=pack_axis)
    high = np.take(codes, np.arange(1, codes.shape[pack_axis], 2), axis=pack_axis)
    return low | (high << 4)


def e2m1_codes(x: np.ndarray) -> np.ndarray:
    """Nearest e2m1 code of each element of x (|x| ≤ 6 expected; larger saturates to ±6)."""
    magnitudes = E2M1_VALUES[:8]
    index = np.abs(np.abs(x)[..., None] - magnitudes).argmin(axis=-1).astype(np.uint8)
    return index | (np.signbit(x).astype(np.uint8) << 3)


def quantize(w: np.ndarray, fmt: str, block: Sequence[int], pack_axis: int | None = None) -> BlockQuantized:
    """Quantizes a dense NumPy array the way the released checkpoints are (for tests and tools).

    Each block gets the smallest power-of-two scale that maps its absmax into the value range
    (448 for e4m3, 6 for e2m1); values are rounded to nearest. Returns NumPy arrays.
    """
    w = np.asarray(w, np.float32)
    block = tuple(int(b) for b in block)
    if len(block) != w.ndim:
        raise ValueError(f"quantize: block {block} has {len(block)} axes, the array {w.ndim}")
    if fmt == FP4 and (pack_axis is None or w.shape[pack_axis] % 2):
        raise ValueError(f"quantize: FP4 needs a pack_axis of even length, got {pack_axis} for {w.shape}")
    counts = scale_shape(w.shape, block)
    padded = np.pad(np.abs(w), [(0, c * b - n) for n, c, b in zip(w.shape, counts, block)])
    amax = padded.reshape([x for c, b in zip(counts, block) for x in (c, b)]).max(axis=tuple(range(1, 2 * w.ndim, 2)))
    with np.errstate(divide="ignore"):
        exponent = np.where(amax > 0, np.ceil(np.log2(amax / _MAX[fmt])), 0.0)
    scales = (np.clip(exponent, -127, 127) + 127).astype(np.uint8).view(E8M0)
    expanded = scales.astype(np.float32)
    for axis, b in enumerate(block):
        expanded = np.repeat(expanded, b, axis=axis)
    x = np.clip(w / expanded[tuple(slice(0, n) for n in w.shape)], -_MAX[fmt], _MAX[fmt])
    if fmt == FP8:
        return BlockQuantized(x.astype(E4M3), scales, FP8, block).check()
    if fmt == FP4:
        return BlockQuantized(pack_fp4(e2m1_codes(x), pack_axis), scales, FP4, block, pack_axis).check()
    raise ValueError(f"quantize: unknown format {fmt!r} (expected one of {FORMATS})")


def is_quantized(value) -> bool:
    return isinstance(value, BlockQuantized)
