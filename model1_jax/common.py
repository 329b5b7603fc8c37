"""Small helpers every layer shares, one copy each: argument checks with errors that name the argument,
human-readable sizes, and this process's host memory (Linux /proc)."""

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


def process_memory(field: str) -> int | None:
    """A size field of /proc/self/status in bytes — "VmRSS" (resident now), "VmHWM" (its peak); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_memory(trim: bool = True) -> bool:
    """Restarts the peak (VmHWM) from the current resident size (Linux `clear_refs`); False where unsupported.
    `trim` first hands the C allocator's freed blocks back to the OS (the compiler's, mostly), so that later work
    reusing them shows up as growth."""
    if trim:
        try:
            import ctypes
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
