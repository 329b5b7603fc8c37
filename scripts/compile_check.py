#!/usr/bin/env python
"""Compile every Pallas-Triton kernel variant for sm_90a and sm_100a on the CPU and record its resources.

For each variant `sparse_mla_decode` can launch and the forward / dQ / dKV kernels of `sparse_attention` at V4-Flash
and V4-Pro shapes (pallas_kernels.compile_check_sparse.all_configurations()), the Triton IR is captured by lowering
for CUDA, compiled with the `triton` package (a test extra) to PTX and cubin, and ptxas's registers, spill bytes and
stack per thread, Triton's shared memory and the matrix instruction are recorded. Writes
benchmarks/results/compile_check.json and a markdown table beside it; exits 1 when a variant fails to compile or
breaks a limit (shared memory, its family's spill budget, trap, matmuls off the tensor cores).

  python scripts/compile_check.py [--configs model1-h64-split,attention-dkv-n64] [--archs sm_90a] [--jobs 2]
                                  [--keep DIR]   # also keep each variant's .ttir / .ptx / .cubin

No GPU is used or needed. The full matrix takes about 3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels import compile_check as cc  # noqa: E402
from pallas_kernels import compile_check_sparse  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def versions() -> dict:
    import jax
    import jaxlib
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
           "triton": triton.__version__}
    for arch, cap in cc.ARCHS.items():
        text = subprocess.run([get_ptxas(cap).path, "--version"], capture_output=True, text=True).stdout
        out[f"ptxas_{arch}"] = text.strip().splitlines()[-1] if text.strip() else "?"
    return out


def run(configs: list, archs: list[str], jobs: int, keep: str | None, budget: int | None,
        d_chunk: int | None) -> dict:
    start = time.perf_counter()

    def show(r):
        what = r["error"].splitlines()[0] if "error" in r else (
            f"{r['registers']} regs, spill {r['spill_store_bytes']}/{r['spill_load_bytes']} B, "
            f"smem {r['shared_bytes']} B, {r['mma']}, {r['seconds']} s")
        print(f"{r['kernel']:28s} {r['arch']:8s} d_chunk {r['d_chunk'] or '-'}: {what}", flush=True)

    records = cc.check_matrix(configs, archs, jobs=jobs, d_chunk=d_chunk, keep_dir=pathlib.Path(keep) if keep else None,
                              spill_budget=budget, progress=show)
    budgets = {c.family: c.spill_budget if budget is None else budget for c in configs}
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "smem_limit_bytes": cc.SMEM_LIMIT_BYTES, "spill_budget_bytes": budgets,
            "wall_seconds": round(time.perf_counter() - start, 1), "results": records}


def markdown(report: dict) -> str:
    v = report["versions"]
    budgets = ", ".join(f"{family} {b} B" for family, b in report["spill_budget_bytes"].items())
    lines = [f"Static compile check ({report['date'][:10]}; jax {v['jax']}, Triton {v['triton']}, no GPU): "
             f"registers per thread, ptxas spill stores / loads per thread (budget: {budgets} of stores), shared "
             f"memory per block (limit {report['smem_limit_bytes'] // 1024} KiB), matrix instruction. Kernels named "
             "attention-* are sparse_attention's (forward, dQ, dKV; n heads, h 512, bf16); the others "
             "sparse_mla_decode's. Problems: what breaks a limit.", "",
             "| kernel | arch | V chunk | registers | spill st / ld (B) | stack (B) | smem (KiB) | MMA | problems |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        head = f"| {r['kernel']} | {r['arch']} | {r['d_chunk'] or '–'} |"
        if "error" in r:
            lines.append(f"{head} compile error | | | | | {r['error'].splitlines()[0][:200]} |")
            continue
        flagged = "; ".join(p.split(": ", 1)[1] for p in r["problems"]) or "–"
        lines.append(f"{head} {r['registers']} | {r['spill_store_bytes']} / {r['spill_load_bytes']} | "
                     f"{r['stack_bytes']} | {r['shared_bytes'] / 1024:.1f} | {r['mma']} | {flagged} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="all", help="comma-separated kernel names (see --list), or 'all'")
    p.add_argument("--archs", default=",".join(cc.ARCHS), help="comma-separated: sm_90a, sm_100a")
    p.add_argument("--jobs", type=int, default=2, help="compiles in parallel")
    p.add_argument("--keep", help="a folder to also write each variant's .ttir / .ptx / .cubin to")
    p.add_argument("--d-chunk", type=int, choices=(512, 256),
                   help="V columns per dot for every architecture (default: what each architecture's GPU picks)")
    p.add_argument("--spill-budget", type=int, help="spill-store bytes per thread for every kernel (default: each "
                   "family's budget, docs/compile_check.md §3)")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR / "compile_check.json")
    p.add_argument("--list", action="store_true", help="print the kernel names and exit")
    args = p.parse_args(argv)
    all_configs = {c.name: c for c in compile_check_sparse.all_configurations()}
    if args.list:
        print("\n".join(all_configs))
        return 0
    names = list(all_configs) if args.configs == "all" else args.configs.split(",")
    unknown = [n for n in names if n not in all_configs]
    archs = args.archs.split(",")
    bad_archs = [a for a in archs if a not in cc.ARCHS]
    if unknown or bad_archs or args.jobs < 1:
        p.error(f"unknown kernels {unknown} (see --list), unknown archs {bad_archs} (have {list(cc.ARCHS)}), "
                f"or --jobs < 1")
    report = run([all_configs[n] for n in names], archs, args.jobs, args.keep, args.spill_budget, args.d_chunk)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(markdown(report))
    problems = [p for r in report["results"] for p in r["problems"]]
    print(f"wrote {args.out} and {args.out.with_suffix('.md')} ({report['wall_seconds']} s)")
    for line in problems:
        print("PROBLEM:", line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
