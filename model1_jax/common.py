"""Small helpers every layer shares, one copy each: argument checks with errors that name the argument,
and human-readable sizes."""

from __future__ import annotations

import numbers

import jax
import numpy as np


def positive_int(value, what: str) -> int:
    """`value` as an int, or a ValueError naming `what` unless it is an integer >= 1 (bools are not integers)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_token_ids(ids, vocab_size: int, what: str = "input_ids", ndim: int = 2) -> None:
    """Token ids of shape [batch, tokens] (`ndim=2`) or [tokens] (1): integers in [0, vocab_size), at least
    one token. Traced values are not checked (they cannot be read); everything else is checked before any
    compute, with the offending values and their positions in the message."""
    if isinstance(ids, jax.core.Tracer):
        return
    arr = np.asarray(ids)
    if arr.ndim != ndim:
        want = "[batch, tokens]" if ndim == 2 else "[tokens]"
        raise ValueError(f"{what}: expected shape {want}, got {arr.shape}")
    if arr.shape[-1] == 0:
        raise ValueError(f"{what}: empty sequence (0 tokens)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what}: expected integer token ids, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        where = np.argwhere(bad)[:5].tolist()
        raise ValueError(f"{what}: token ids must be in [0, {vocab_size}); found {arr[bad][:5].tolist()} "
                         f"at {'[batch, position]' if ndim == 2 else 'positions'} {where}")


def human_bytes(n: float) -> str:
    """1536 → "1.5 KiB" (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float, unit: str = "") -> str:
    """284_330_000_000 → "284B" (decimal thousands: K, M, B, T)."""
    for suffix in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or suffix == "T":
            return f"{n:.3g}{suffix}{unit}" if suffix else f"{n:g}{unit}"
        n /= 1000
    raise AssertionError("unreachable")
