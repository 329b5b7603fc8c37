#!/usr/bin/env python
"""Everything that needs a GPU, from one prepared command: one JSON and a markdown summary.

    python scripts/gpu_check.py                      # on one H100 / H200: about 8 minutes
    python scripts/gpu_check.py --smoke --out DIR    # CPU self-test: tiny shapes, kernel in interpret mode

Stages, in order; each runs in its own process under a time limit, so a stage that hangs or crashes costs only
its own share (the run as a whole stays inside --deadline):
  env             GPU name, driver, CUDA, jax / jaxlib / flax versions, date
  kernel_matrix   the sparse decode correctness matrix (tests/test_sparse_decode.py's cases) compiled for the GPU,
                  each case against the independent float64 oracle with FlashMLA's tolerances
  sparse_decode   scripts/bench_sparse_decode.py: MODEL1 CONFIG1-4 and V3.2, kernel beside the XLA reference,
                  percent of the roofline
  decode          scripts/bench_decode.py at batch 1 / 8 / 64, beside transformers' eager generate when its
                  DeepSeek-V4 model and CUDA PyTorch are there
  train, serve, load   scripts/bench_{train,serve,load}.py, each where it exists
Results: benchmarks/results/gpu_check_<gpu>_<date>.json and .md (--out elsewhere for --smoke).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    seconds: int  # its time limit on a GPU
    script: str | None = None  # a bench script run with --out DIR; None: a function of this file
    args: tuple[str, ...] = ()  # the script's arguments on a GPU
    smoke_args: tuple[str, ...] | None = ("--smoke",)  # on the CPU (None: the stage does not run there)


DEADLINE_S = 480.0  # the whole run on one H100 / H200; the stages' limits add up to at most this

STAGES = (
    Stage("env", 20),
    Stage("kernel_matrix", 120),
    Stage("sparse_decode", 100, "bench_sparse_decode.py",
          ("--configs", "CONFIG1,CONFIG2,CONFIG3,CONFIG4,V3.2", "--batch-sizes", "64,148", "--iters", "20",
           "--warmup", "3"),
          ("--smoke", "--configs", "CONFIG3", "--batch-sizes", "1", "--iters", "1", "--warmup", "0")),
    Stage("decode", 100, "bench_decode.py", ("--batch-sizes", "1,8,64", "--prompt-len", "512", "--new-tokens", "32"),
          None),
    Stage("train", 45, "bench_train.py", ("--lengths", "8192", "32768", "--dense-max", "8192", "--timeout", "25"),
          None),
    Stage("serve", 45, "bench_serve.py", ("--requests", "64"), None),
    # The synthetic checkpoint is written first (about 1 GB); every stage runs in a fresh process, after a 1 s
    # pause instead of the default 5 s (the device's time is scarce; bench_load's docstring says what it is for).
    Stage("load", 50, "bench_load.py", ("--size-gb", "1.0", "--repeat", "1", "--settle", "1", "--stages",
                                        "read,copy,from_pretrained_q,convert_fp8,load_fp8"), None),
)


# ----------------------------------------------------------------------------------------------------
# In-process stages (run in a child process: `gpu_check.py --run-stage NAME --stage-out FILE`)


def stage_env(smoke: bool) -> dict:
    import flax
    import jax
    import jaxlib

    device = jax.devices()[0]
    out = dict(platform=device.platform, device=device.device_kind, device_count=jax.device_count(),
               jax=jax.__version__, jaxlib=jaxlib.__version__, flax=flax.__version__, python=sys.version.split()[0],
               date=datetime.datetime.now().isoformat(timespec="seconds"))
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        out["nvidia_smi"] = f"unavailable: {e}"
    return out


def stage_kernel_matrix(smoke: bool, report) -> dict:
    """Every case of the test matrix through `sparse_mla_decode(backend="pallas")` (compiled; interpret mode with
    --smoke) against the oracle. `report` is called after each case, so a time-out still leaves the cases done."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import sparse_mla_decode
    from pallas_kernels.compare import decode_report
    from tests.decode_cases import make_inputs, oracle_decode
    from tests.test_sparse_decode import KERNEL_CASES, REF_CASES

    kernel_cases = [c for c, _ in KERNEL_CASES]
    if smoke:  # the two cheapest cases of the kernel matrix, one per format
        cost = lambda c: c.b * c.s_q * c.h_q * (c.main.topk + (c.extra.topk if c.extra else 0))  # noqa: E731
        cases = [min((c for c in kernel_cases if c.kv_format == f), key=cost) for f in ("model1", "v32")]
    else:
        cases = REF_CASES + kernel_cases
    done = []
    for case in cases:
        args = make_inputs(case)
        start = time.perf_counter()
        try:
            out, lse = sparse_mla_decode(**{k: jnp.asarray(v) if isinstance(v, np.ndarray) else v
                                            for k, v in args.items()},
                                         kv_format=case.kv_format, backend="pallas", interpret=smoke)
            jax.block_until_ready((out, lse))
            problem = decode_report(out, lse, *oracle_decode(case, args))
        except Exception as e:  # noqa: BLE001  (a failing case is a result, not the end of the matrix)
            problem = f"{type(e).__name__}: {e}"[:500]
        done.append(dict(case=str(case), ok=problem is None, problem=problem,
                         seconds=round(time.perf_counter() - start, 2)))
        report(dict(cases=len(cases), passed=sum(r["ok"] for r in done), results=done))
    return dict(cases=len(cases), passed=sum(r["ok"] for r in done), results=done)


def run_stage_here(name: str, smoke: bool, out_file: pathlib.Path) -> None:
    def report(result):
        out_file.write_text(json.dumps(result))

    if name == "env":
        report(stage_env(smoke))
    elif name == "kernel_matrix":
        report(stage_kernel_matrix(smoke, report))
    else:
        raise SystemExit(f"unknown in-process stage {name!r}")


# ----------------------------------------------------------------------------------------------------
# Orchestration


def run_stage(stage: Stage, smoke: bool, limit: float) -> dict:
    """Runs one stage in a child process under `limit` seconds; returns its record."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        if stage.script is None:
            out_file = tmp / "result.json"
            cmd = [sys.executable, __file__, "--run-stage", stage.name, "--stage-out", str(out_file)]
            cmd += ["--smoke"] if smoke else []
        else:
            cmd = [sys.executable, str(ROOT / "scripts" / stage.script), *(stage.smoke_args if smoke else stage.args),
                   "--out", str(tmp)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            status = f"timed out after {limit:.0f} s"
            log = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
        record = dict(status=status, seconds=round(time.perf_counter() - start, 1), log_tail=log[-3000:])
        results = sorted(tmp.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if results:
            record["result"] = json.loads(results[-1].read_text())
        return record


def summary_markdown(report: dict) -> str:
    env = report["stages"].get("env", {}).get("result", {})
    lines = [f"# GPU check: {env.get('device', '?')}{' (CPU smoke run: not measurements)' if report['smoke'] else ''}",
             "", f"{env.get('nvidia_smi', '')}; jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, flax "
             f"{env.get('flax')}; {report['date']}", "", "| stage | status | seconds | result |", "|---|---|---|---|"]
    for name, rec in report["stages"].items():
        lines.append(f"| {name} | {rec['status']} | {rec.get('seconds', '')} | {_headline(name, rec.get('result'))} |")
    sparse = (report["stages"].get("sparse_decode", {}).get("result") or {}).get("results", [])
    if sparse:
        lines += ["", "| config | b | splits | Pallas µs | TFLOP/s | % roofline | XLA µs | matches |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sparse:
            p, x = r.get("pallas", {}), r.get("xla", {})
            lines.append(f"| {r['config']} | {r['b']} | {r.get('num_splits')} | {p.get('us', '-')} | "
                         f"{p.get('tflops', '-')} | {p.get('pct_roofline', '-')} | {x.get('us', '-')} | "
                         f"{r.get('matches_reference', '-')} |")
    decode = (report["stages"].get("decode", {}).get("result") or {}).get("results", [])
    if decode:
        lines += ["", "| batch | ms/step | tokens/s | % roofline | transformers ms/step |", "|---|---|---|---|---|"]
        for r in decode:
            j, t = r["jax"], r.get("transformers", {})
            lines.append(f"| {r['batch']} | {j['decode_ms_per_step']:.2f} | {j['decode_tokens_per_s']:.0f} | "
                         f"{j.get('percent_of_roofline', '-')} | {t.get('decode_ms_per_step', '-')} |")
    return "\n".join(lines) + "\n"


def _headline(name: str, result) -> str:
    if not result:
        return ""
    if name == "kernel_matrix":
        return f"{result['passed']}/{result['cases']} cases within FlashMLA's tolerances"
    if name == "env":
        return f"{result['device']} ×{result['device_count']}"
    if "results" in result:
        return f"{len(result['results'])} rows (below / in the JSON)"
    return "see the JSON"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU self-test (tiny shapes, interpret mode)")
    p.add_argument("--stages", default=",".join(s.name for s in STAGES), help="comma-separated subset")
    p.add_argument("--deadline", type=float, default=DEADLINE_S,
                   help=f"seconds for the whole run (default {DEADLINE_S:.0f})")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    p.add_argument("--run-stage", help=argparse.SUPPRESS)
    p.add_argument("--stage-out", type=pathlib.Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run_stage:
        sys.path.insert(0, str(ROOT))
        run_stage_here(args.run_stage, args.smoke, args.stage_out)
        return 0
    names = args.stages.split(",")
    unknown = sorted(set(names) - {s.name for s in STAGES})
    if unknown:
        p.error(f"unknown stages {unknown}; the stages are {[s.name for s in STAGES]}")
    if args.smoke and args.out == RESULTS_DIR:
        p.error("--smoke results are not measurements: pass --out DIR outside benchmarks/results")

    start = time.perf_counter()
    report = dict(smoke=args.smoke, date=datetime.datetime.now().isoformat(timespec="seconds"), stages={})
    for stage in (s for s in STAGES if s.name in names):
        left = args.deadline - (time.perf_counter() - start)
        if stage.script and not (ROOT / "scripts" / stage.script).exists():
            report["stages"][stage.name] = dict(status=f"skipped: scripts/{stage.script} does not exist")
        elif args.smoke and stage.script and stage.smoke_args is None:
            report["stages"][stage.name] = dict(status="skipped: no CPU smoke mode")
        elif left < 10:
            report["stages"][stage.name] = dict(status="skipped: the deadline was reached")
        else:
            print(f"[gpu_check] {stage.name} (up to {min(stage.seconds, left):.0f} s)", flush=True)
            report["stages"][stage.name] = run_stage(stage, args.smoke, min(stage.seconds, left))
            print(f"[gpu_check] {stage.name}: {report['stages'][stage.name]['status']}", flush=True)
    report["seconds"] = round(time.perf_counter() - start, 1)

    device = report["stages"].get("env", {}).get("result", {}).get("device", "unknown")
    slug = "cpu-smoke" if args.smoke else re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-")
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / f"gpu_check_{slug}_{datetime.datetime.now():%Y%m%d-%H%M%S}"
    base.with_suffix(".json").write_text(json.dumps(report, indent=1))
    base.with_suffix(".md").write_text(summary_markdown(report))
    print(f"[gpu_check] wrote {base}.json and .md ({report['seconds']} s)")
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in report["stages"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
