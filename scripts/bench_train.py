"""Training memory and step time against sequence length: sparse full-sequence attention beside the dense one.

    python scripts/bench_train.py                       # T = 1K … 32K sparse, dense up to 4K; ~25 min on 2 cores
    python scripts/bench_train.py --lengths 1024 2048 --dense-max 2048 --steps 1

The model has V4's attention shape — head_dim 512 (64 RoPE dims), sliding window 128, CSA m = 4 with top-64
picks, HCA m = 128 — with 8 heads, hidden 64 and four layers (sliding, CSA, HCA, CSA). Each (T, attention)
point runs in a fresh process: one Trainer step (value and gradient of the next-token loss, AdamW update,
per-layer remat) on one sequence of T tokens. Recorded: XLA's per-device plan of the step (`Trainer.
memory_estimate`, printed before training by finetune.py), the measured peak (device peak on a GPU, the
process's peak RSS above what was resident before the timed steps, the allocator trimmed, on a CPU), and the
mean wall time (and the process's CPU time, all threads: what a shared machine's load changes least) of the
steps after the compiling one. JSON goes to benchmarks/results/bench_train.json. Targets (issue):
each doubling of T at most 2.3x in memory and time for the sparse path, and T = 32K within 20 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time

# XLA's CPU scheduler favours concurrency by default and then runs every layer's recomputed forward early,
# which undoes --remat (docs/training.md §5.1); the memory-minimising scheduler is used unless XLA_FLAGS chooses.
# Set before JAX starts (it reads XLA_FLAGS once); the flag only concerns the CPU backend.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "bench_train.json")


def bench_config():
    import model1_jax as m1
    return dataclasses.replace(
        m1.Config.tiny(), head_dim=512, qk_rope_head_dim=64, num_attention_heads=8, sliding_window=128,
        compress_rate_csa=4, compress_rate_hca=128, index_topk=64, index_head_dim=128, index_n_heads=2,
        max_position_embeddings=32768, num_nextn_predict_layers=0)


def one_point(length: int, attention: str, steps: int, max_bytes: float) -> dict:
    """Runs in its own process: builds the model and the trainer, estimates, steps, measures."""
    import jax
    import numpy as np
    from flax import nnx

    import model1_jax as m1
    from model1_jax.model.attention import use_full_attention
    from model1_jax.train.loop import measured_peak, reset_peak, resident_bytes
    from model1_jax.train.optim import OptimizerConfig
    from model1_jax.train.trainer import TrainConfig, Trainer

    baseline, _ = measured_peak()
    model = use_full_attention(m1.Model1(bench_config(), rngs=nnx.Rngs(0)), attention)
    trainer = Trainer(model, OptimizerConfig(), TrainConfig(mtp_weight=0.0, remat=True))
    del model
    ids = np.random.default_rng(0).integers(0, 256, (1, 1, length)).astype(np.int32)
    batch = {"ids": ids, "mask": np.ones_like(ids)}
    t0 = time.perf_counter()
    estimate = trainer.memory_estimate(batch)
    compile_s = time.perf_counter() - t0
    if estimate["peak"] > max_bytes:  # the machine is shared: do not try what would not fit
        return {"seq_len": length, "attention": attention, "estimate_bytes": estimate, "skipped": "over --max-gib"}
    times, cpu_times = [], []
    for i in range(steps + 1):  # the first step compiles (the jit cache is not the estimate's)
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(trainer.step(batch)["loss"])
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)  # all threads: depends far less on a shared machine's load
        if i == 0:  # what the steps themselves add: peak since here, above what is resident now
            reset_peak()
            before = resident_bytes()
    peak, what = measured_peak()
    return {"seq_len": length, "attention": attention, "estimate_bytes": estimate, "measured_bytes": peak,
            "measured": what, "resident_before_steps_bytes": before, "process_baseline_bytes": baseline,
            "step_bytes": peak - before if what == "process peak RSS" else peak,
            "step_s": float(np.mean(times[1:])), "step_min_s": float(np.min(times[1:])),
            "step_cpu_s": float(np.mean(cpu_times[1:])), "first_step_s": times[0], "estimate_compile_s": compile_s,
            "steps_timed": steps}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--dense-max", type=int, default=4096, help="longest T for the dense path (15.8 GB at 4K)")
    p.add_argument("--steps", type=int, default=2, help="timed steps after the compiling one")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per point")
    p.add_argument("--max-gib", type=float, default=16.0, help="skip a point whose estimate exceeds this")
    p.add_argument("--out", default=RESULTS, help="a JSON file, or a directory to write bench_train.json in")
    p.add_argument("--one", nargs=2, metavar=("T", "ATTENTION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one_point(int(args.one[0]), args.one[1], args.steps, args.max_gib * 2 ** 30)))
        return

    points = []
    for attention in ("auto", "dense"):
        for length in args.lengths:
            if attention == "dense" and length > args.dense_max:
                continue
            cmd = [sys.executable, os.path.abspath(__file__), "--one", str(length), attention, "--steps",
                   str(args.steps), "--max-gib", str(args.max_gib)]
            env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
            try:
                run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=env)
            except subprocess.TimeoutExpired:
                print(f"{attention:6s} T={length:6d}: timed out after {args.timeout} s")
                continue
            if run.returncode != 0:
                print(f"{attention:6s} T={length:6d}: failed\n{run.stderr[-2000:]}")
                continue
            point = json.loads(run.stdout.strip().splitlines()[-1])
            gib = 2 ** 30
            if "skipped" in point:
                print(f"{attention:6s} T={length:6d}: estimate {point['estimate_bytes']['peak'] / gib:6.2f} GiB, "
                      f"skipped (over --max-gib {args.max_gib})")
                continue
            points.append(point)
            est = point["estimate_bytes"]
            print(f"{attention:6s} T={length:6d}: estimate {est['peak'] / gib:6.2f} GiB (temporaries "
                  f"{est['temporaries'] / gib:6.2f}), measured step {point['step_bytes'] / gib:6.2f} GiB, "
                  f"{point['measured']} {point['measured_bytes'] / gib:6.2f} GiB, step {point['step_s']:7.2f} s "
                  f"(CPU {point['step_cpu_s']:7.1f} s)",
                  flush=True)

    import jax
    result = {"benchmark": "bench_train", "config": "V4 attention shape: head_dim 512, 8 heads, hidden 64, "
              "window 128, CSA m=4 top-64, HCA m=128; layers sliding, CSA, HCA, CSA; batch 1; remat per layer",
              "device": jax.devices()[0].device_kind, "platform": platform.platform(), "cpus": os.cpu_count(),
              "jax": jax.__version__, "points": points, "growth_per_doubling": _growth(points)}
    out = os.path.join(args.out, "bench_train.json") if os.path.isdir(args.out) else args.out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    for attention, rows in result["growth_per_doubling"].items():
        for row in rows:
            print(f"{attention:6s} {row['from']:6d} -> {row['to']:6d}: memory x{row['memory']:.2f}, "
                  f"time x{row['time']:.2f}" + (f", CPU time x{row['cpu_time']:.2f}" if "cpu_time" in row else ""))
    print(f"wrote {out}")


def _growth(points: list[dict]) -> dict:
    """Ratios of the measured step memory, XLA's estimate and the step time (wall, CPU) between doublings."""
    out: dict[str, list] = {}
    for attention in sorted({p["attention"] for p in points}):
        rows = sorted((p for p in points if p["attention"] == attention), key=lambda p: p["seq_len"])
        out[attention] = [
            {"from": a["seq_len"], "to": b["seq_len"],
             "memory": b["step_bytes"] / max(a["step_bytes"], 1),
             "estimate": b["estimate_bytes"]["peak"] / max(a["estimate_bytes"]["peak"], 1),
             "time": b["step_s"] / a["step_s"],
             **({"cpu_time": b["step_cpu_s"] / a["step_cpu_s"]} if "step_cpu_s" in a and "step_cpu_s" in b else {})}
            for a, b in zip(rows, rows[1:]) if b["seq_len"] == 2 * a["seq_len"]]
    return out


if __name__ == "__main__":
    main()
