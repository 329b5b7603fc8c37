"""Dense loading of FP8/FP4 weights: read them kept block-quantized, dequantize them on the device.

A dense `from_pretrained` of the released checkpoints would otherwise dequantize on the host: a table lookup per
byte, then a transpose of the dense result (two to four bytes per stored byte) into the model's arrangement.
Reading the weights kept quantized transposes the stored bytes instead, and `BlockQuantized.dequantize` — the
model's own function, jitted — then runs where the weight will live: on a GPU after moving a half (FP8 into bf16)
or a quarter (FP4) of the bytes; on the CPU in XLA's vectorised loops on all cores (docs/checkpoints.md §7.3 gives
the rates measured there).

Exactness. Every product value · 2^(s − 127) is exact in float32 and its cast to bfloat16 exact or correctly
rounded — as long as it is a normal number. XLA's CPU backend flushes subnormal inputs and results to zero,
where NumPy does not, so the device path is taken only when every scale byte of the weight lies in
[`MIN_SCALE`, 254]: there the smallest nonzero product (e4m3 2^−9, e2m1 2^−1, times 2^(s − 127)) is still
at least 2^−126, and 255 (NaN) is excluded. A weight with any other scale byte (a block scaled below 2^−117,
or a NaN scale: a trained weight has neither) is dequantized on the host with NumPy instead, in bounded slices,
giving the bits `BlockQuantized.dequantize` gives there. Either way the result equals the host lookup table of
`io.relayout` bit for bit (tests/test_device_dequant.py checks every value byte under every scale byte). The
target dtype must be bfloat16 or float32, whose normal range is float32's; other dtypes stay on the host path.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from model1_jax.io import hostmem
from model1_jax.io.hf import CheckpointPlan
from model1_jax.io.names import quant_arrangement
from model1_jax.model import quant

# Smallest scale byte keeping every nonzero product normal in float32: 2^(s − 127) · 2^−9 ≥ 2^−126 for e4m3,
# 2^(s − 127) · 2^−1 ≥ 2^−126 for e2m1 (and s ≥ 1 keeps the scale itself normal).
MIN_SCALE = {quant.FP8: 10, quant.FP4: 2}
MAX_SCALE = 254  # 255 is NaN
DTYPES = (np.dtype(jnp.bfloat16), np.dtype(np.float32))
HOST_SLICE_BYTES = 64 << 20  # float32 bytes of one slice on the host path


def dequantized_on_device(plan: CheckpointPlan) -> frozenset[tuple]:
    """Paths of the block-quantized parameters a dense load reads kept quantized (to dequantize on the device):
    those whose target dtype is bfloat16 or float32 and whose blocks map onto the model's arrangement (every
    block of the released checkpoints does; `hf.plan` explains the others, which stay on the host path)."""
    paths, other = set(), set()
    for unit in plan.units:
        for a in unit.assignments:
            path, target = a.slot.path, plan.targets[a.slot.path]
            ok = a.fmt is not None and np.dtype(target.dtype) in DTYPES
            if ok:
                try:
                    quant_arrangement(a.slot, tuple(target.shape), a.hf_block)  # raises where blocks do not map
                except ValueError:
                    ok = False
            (paths if ok else other).add(path)
    return frozenset(paths - other)


@functools.partial(jax.jit, static_argnames="dtype")
def _dequantize(weight: quant.BlockQuantized, dtype) -> jax.Array:
    return weight.dequantize(dtype)


@functools.partial(jax.jit, static_argnames=("dtype", "sharding"))
def _dequantize_into(weight: quant.BlockQuantized, dtype, sharding) -> jax.Array:
    return jax.lax.with_sharding_constraint(weight.dequantize(dtype), sharding)


def scales_exact(fmt: str, scales: np.ndarray) -> bool:
    """Whether every scale byte (host array) lies where the device gives the exact product (module docstring)."""
    scales = np.asarray(scales).view(np.uint8)
    return scales.size == 0 or (int(scales.min()) >= MIN_SCALE[fmt] and int(scales.max()) <= MAX_SCALE)


def to_dense(weight: quant.BlockQuantized, dtype, device=None) -> jax.Array:
    """The dense weight (host arrays) in `dtype` on `device` (default: JAX's default device), exactly
    value · scale. Waits for the result, so that a reader calling it holds one quantized weight in flight."""
    dtype = np.dtype(dtype)
    if dtype in DTYPES and scales_exact(weight.fmt, weight.scales):
        out = _dequantize(jax.tree.map(lambda a: jax.device_put(a, device), weight), dtype=dtype)
        return out.block_until_ready()
    return jax.device_put(host_dequantize(weight, dtype), device)


def to_dense_sharded(weight: quant.BlockQuantized, dtype, sharding) -> jax.Array:
    """A global weight (values and scales split along the weight's own axes) as the dense weight with `sharding`,
    dequantized on its devices. The caller has checked every scale byte with `scales_exact`, in every process
    (`io.placement`), and `dtype` is one of `DTYPES`."""
    return _dequantize_into(weight, dtype=np.dtype(dtype), sharding=sharding)


def host_dequantize(weight: quant.BlockQuantized, dtype) -> np.ndarray:
    """`weight.dequantize` with NumPy in slices of whole blocks along the first axis, so the float32
    intermediates stay within HOST_SLICE_BYTES (an expert stack is gigabytes)."""
    shape, dtype = weight.shape, np.dtype(dtype)
    out = hostmem.empty(shape, dtype)
    if not out.size:
        return out
    packed = weight.pack_axis == 0  # two dense rows per stored row
    step = math.lcm(weight.block[0], 2 if packed else 1)
    rows = max(step, HOST_SLICE_BYTES // (4 * math.prod(shape[1:]) or 1) // step * step)
    with np.errstate(over="ignore"):  # the largest scales overflow to inf, as in `dequantize` itself
        for r in range(0, shape[0], rows):
            n = min(rows, shape[0] - r)
            values = weight.values[r // 2:(r + n) // 2] if packed else weight.values[r:r + n]
            scales = weight.scales[r // weight.block[0]:-(-(r + n) // weight.block[0])]
            part = quant.BlockQuantized(np.asarray(values), np.asarray(scales), weight.fmt, weight.block,
                                        weight.pack_axis)
            out[r:r + n] = part.dequantize(np.float32).astype(dtype)
    return out
