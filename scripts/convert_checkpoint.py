"""Convert a DeepSeek-V4 checkpoint (HF or DeepSeek names; dense or the released FP8/FP4) to Orbax.

    python scripts/convert_checkpoint.py SRC OUT                  # dense bf16 (FP8/FP4 dequantized exactly)
    python scripts/convert_checkpoint.py SRC OUT --weights fp8    # keep FP8 linears / FP4 experts quantized
    python scripts/convert_checkpoint.py SRC --dry-run            # check everything, print the memory plan

The result loads with `model1_jax.load(OUT, dtype=...)` or `model1_jax.from_pretrained(OUT)`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys

import jax.numpy as jnp

from model1_jax.common import process_memory, reset_peak_memory
from model1_jax.io import convert
from model1_jax.io.hf import CheckpointError, plan_checkpoint

WEIGHTS = {"bf16": (jnp.bfloat16, False), "fp32": (jnp.float32, False), "fp8": (None, True)}


def _fixed_mmap_threshold(nbytes: int = 1 << 20) -> None:
    """glibc raises its mmap threshold after each large free (up to 32 MiB), after which the converter's
    ~MiB temporaries come from heaps it keeps; a fixed threshold returns them to the OS at once, so RSS
    tracks what is live. No-op without glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="checkpoint directory: config.json + *.safetensors (+ index json)")
    parser.add_argument("output", nargs="?", help="Orbax checkpoint directory to write")
    parser.add_argument("--weights", choices=sorted(WEIGHTS), default="bf16",
                        help="bf16/fp32: dense, FP8/FP4 dequantized exactly; fp8: keep FP8/FP4 tensors quantized")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="with --weights fp8: dtype of the tensors that are not quantized")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the memory plan; write nothing")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing checkpoint in OUTPUT (atomically)")
    parser.add_argument("--budget-gb", type=float,
                        help="parameters per Orbax item (default: half the largest source file); peak host memory "
                             "is about twice this plus the workers' scratch (--dry-run prints the bound)")
    parser.add_argument("--workers", type=int, help="reading threads (default: the CPUs this process may use)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--stats-json", help="write timing and memory figures here")
    args = parser.parse_args()
    if args.output is None and not args.dry_run:
        parser.error("OUTPUT is required unless --dry-run")
    dtype, quantized = WEIGHTS[args.weights]
    dtype = dtype or jnp.dtype(args.dtype)
    budget = None if args.budget_gb is None else int(args.budget_gb * 1e9)
    if budget is not None and budget < 1:
        parser.error("--budget-gb must be positive")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be positive")

    try:
        if args.dry_run:
            plan = plan_checkpoint(args.source, dtype=dtype, keep_quantized=quantized)
            mem = convert.memory_plan(plan, quantized=quantized, budget_bytes=budget, workers=args.workers)
            print(convert.describe(plan, mem, quantized=quantized))
            print("dry run: checkpoint is valid; nothing written")
            return 0
        _fixed_mmap_threshold()
        exact_peak = reset_peak_memory(trim=False)
        # read after the reset (VmHWM := VmRSS then): read before it, a page freed in between left the peak under it
        rss_start = process_memory("VmRSS")
        stats = convert.convert(args.source, args.output, dtype=dtype, quantized=quantized, overwrite=args.overwrite,
                                budget_bytes=budget, progress=not args.no_progress, workers=args.workers)
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    peak = process_memory("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"wrote {stats.path}: {stats.parameters} parameters from {stats.tensors} tensors in {stats.items} Orbax "
          f"item(s); read {stats.source_bytes / 1e9:.3f} GB in {stats.seconds:.2f} s ({stats.gb_per_s:.3f} GB/s); "
          f"peak RSS {peak / 1e9:.3f} GB (started at {(rss_start or 0) / 1e9:.3f} GB)")
    if args.stats_json:
        with open(args.stats_json, "w") as f:
            json.dump({"path": stats.path, "seconds": stats.seconds, "source_bytes": stats.source_bytes,
                       "output_bytes": stats.output_bytes, "gb_per_s": stats.gb_per_s, "items": stats.items,
                       "rss_start": rss_start, "peak_rss": peak, "peak_is_conversion_only": exact_peak}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
