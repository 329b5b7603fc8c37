#!/usr/bin/env python
"""Benchmark the Pallas sparse FP8 decode against the jnp reference on a GPU (docs/kernels.md §8).

Cases: MODEL1 CONFIG1-4 and V3.2 (docs/kernels.md §8.3: s_q 2, attention sink on, FlashMLA's sizes) at b 2, 64,
128, 148.
For each case and backend: µs per call, TFLOP/s, GB/s and percent of the roofline with the formulas of
`pallas_kernels.roofline`; the kernel's output is checked against the reference with FlashMLA's tolerances.
Results go to benchmarks/results/sparse_decode_<gpu>_<date>.json with the GPU name, jax version and date.

Timing: mean over --iters back-to-back calls after --warmup calls (L2 is not flushed between calls, unlike
FlashMLA's CUPTI timing, so cases whose data fits in L2, b = 2, read optimistic).

  python scripts/bench_sparse_decode.py [--configs CONFIG1,V3.2] [--batch-sizes 2,64] [--iters 50]

Without a GPU it exits with a message and measures nothing. `--smoke` runs tiny cases on the CPU with the
kernel in interpret mode, to test this script itself; its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pallas_kernels import cache_bytes, get_format, quantize_kv, sparse_mla_decode  # noqa: E402
from pallas_kernels.compare import decode_report  # noqa: E402
from pallas_kernels.roofline import decode_flop_and_bytes, gpu_peak, roofline_seconds  # noqa: E402
from pallas_kernels.triton_decode import BLOCK_T, choose_num_splits, num_sms  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


@dataclasses.dataclass(frozen=True)
class ScopeSpec:
    topk: int
    page: int
    s_k: int  # tokens per request


@dataclasses.dataclass(frozen=True)
class Config:
    h_q: int
    kv_format: str
    main: ScopeSpec
    extra: ScopeSpec | None = None
    varlen_extra: bool = False  # extra_topk_length ~ U{0..extra topk} per request


# docs/kernels.md §8.3, from FlashMLA's tests/test_flash_mla_sparse_decoding.py.
CONFIGS = {
    "CONFIG1": Config(64, "model1", ScopeSpec(128, 256, 16384), ScopeSpec(512, 64, 16384)),
    "CONFIG2": Config(128, "model1", ScopeSpec(128, 256, 16384), ScopeSpec(1024, 64, 16384)),
    "CONFIG3": Config(64, "model1", ScopeSpec(128, 256, 16384), ScopeSpec(1024, 2, 16384), varlen_extra=True),
    "CONFIG4": Config(128, "model1", ScopeSpec(128, 256, 16384), ScopeSpec(1024, 2, 16384), varlen_extra=True),
    "V3.2": Config(128, "v32", ScopeSpec(2048, 64, 32768)),
}
S_Q = 2


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _random_blocks(key, num_blocks, page, kv_format):
    d_qk = get_format(kv_format).d_qk
    k = (jax.random.normal(key, (num_blocks, page, d_qk), jnp.float32) / 10).clip(-1, 1).astype(jnp.bfloat16)
    return quantize_kv(k, kv_format)


def random_cache(key, num_blocks: int, page: int, kv_format: str, chunk_tokens: int = 1 << 18):
    """A quantized cache of N(0, 1)/10 keys, built in chunks to bound the bf16/fp32 temporaries."""
    per = max(1, chunk_tokens // page)
    parts = [_random_blocks(jax.random.fold_in(key, i), min(per, num_blocks - start), page, kv_format)
             for i, start in enumerate(range(0, num_blocks, per))]
    return jnp.concatenate(parts) if len(parts) > 1 else parts[0]


def make_scope(key, b: int, spec: ScopeSpec, kv_format: str):
    """FlashMLA-style scope: each request owns s_k tokens in randomly placed blocks; each query row picks topk
    distinct positions. Returns (cache, indices [b, s_q, topk])."""
    k_table, k_pos, k_cache = jax.random.split(key, 3)
    blocks_per_req = -(-spec.s_k // spec.page)
    table = jax.random.permutation(k_table, b * blocks_per_req).reshape(b, blocks_per_req)
    pos = jax.lax.top_k(jax.random.uniform(k_pos, (b, S_Q, spec.s_k)), spec.topk)[1]
    idx = table[jnp.arange(b)[:, None, None], pos // spec.page] * spec.page + pos % spec.page
    return random_cache(k_cache, b * blocks_per_req, spec.page, kv_format), idx.astype(jnp.int32)


def make_inputs(cfg: Config, b: int, seed: int) -> dict:
    key = jax.random.key(seed)
    k_q, k_main, k_extra, k_len, k_sink, k_flip = jax.random.split(key, 6)
    d_qk = get_format(cfg.kv_format).d_qk
    q = jax.random.normal(k_q, (b, S_Q, cfg.h_q, d_qk)).clip(-1, 1).astype(jnp.bfloat16)
    cache, idx = make_scope(k_main, b, cfg.main, cfg.kv_format)
    args = dict(q=q, kv_cache=cache, indices=idx, page_size=cfg.main.page)
    if cfg.extra:
        xcache, xidx = make_scope(k_extra, b, cfg.extra, cfg.kv_format)
        args.update(extra_kv_cache=xcache, extra_indices=xidx, extra_page_size=cfg.extra.page)
        if cfg.varlen_extra:
            args["extra_topk_length"] = jax.random.randint(k_len, (b,), 0, cfg.extra.topk + 1, jnp.int32)
    flip = jax.random.normal(k_flip, (cfg.h_q,))  # FlashMLA: ~31 % +inf, ~31 % -inf
    sink = jax.random.normal(k_sink, (cfg.h_q,))
    args["attn_sink"] = jnp.where(flip > 0.5, jnp.inf, jnp.where(flip < -0.5, -jnp.inf, sink)).astype(jnp.float32)
    return args


def time_us(fn, args: dict, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        jax.block_until_ready(fn(**args))
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(**args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters * 1e6


def run_case(name: str, cfg: Config, b: int, args_ns) -> dict:
    args = make_inputs(cfg, b, args_ns.seed)
    scopes = [(np.asarray(args["indices"]), None)]
    if cfg.extra:
        scopes.append((np.asarray(args["extra_indices"]), np.asarray(args.get("extra_topk_length"))
                       if cfg.varlen_extra else None))
    d_qk = get_format(cfg.kv_format).d_qk
    flop, nbytes = decode_flop_and_bytes(cfg.h_q, d_qk, scopes)
    peak = None if args_ns.smoke else gpu_peak(jax.devices()[0].device_kind)
    work_tiles = sum(-(-s.topk // BLOCK_T) for s in [cfg.main, cfg.extra] if s)
    record = dict(config=name, b=b, s_q=S_Q, h_q=cfg.h_q, d_qk=d_qk, kv_format=cfg.kv_format,
                  main=dataclasses.asdict(cfg.main), extra=cfg.extra and dataclasses.asdict(cfg.extra),
                  varlen_extra=cfg.varlen_extra, gflop=flop / 1e9, mbytes=nbytes / 1e6,
                  cache_mbytes=sum(cache_bytes(args[k].shape[0], args[p], cfg.kv_format)
                                   for k, p in [("kv_cache", "page_size"), ("extra_kv_cache", "extra_page_size")]
                                   if k in args) / 1e6,
                  num_splits=choose_num_splits(b * S_Q, max(cfg.h_q // 64, 1), work_tiles, num_sms()),
                  roofline_us=peak and roofline_seconds(flop, nbytes, peak) * 1e6)
    outputs = {}
    for backend in ["pallas", "xla"]:
        fn = jax.jit(functools.partial(sparse_mla_decode, kv_format=cfg.kv_format, backend=backend,
                                       interpret=args_ns.smoke and backend == "pallas"),
                     static_argnames=("page_size", "extra_page_size"))
        try:
            outputs[backend] = jax.block_until_ready(fn(**args))
            us = time_us(fn, args, args_ns.iters, args_ns.warmup)
        except Exception as e:  # noqa: BLE001 - one failing backend must not lose the other measurements
            record[backend] = dict(error=f"{type(e).__name__}: {e}"[:2000])
            continue
        record[backend] = dict(us=us, tflops=flop / us / 1e6, gbps=nbytes / us / 1e3,
                               pct_roofline=record["roofline_us"] and 100.0 * record["roofline_us"] / us)
    if len(outputs) == 2:
        problem = decode_report(*outputs["pallas"], *outputs["xla"])
        record["matches_reference"] = problem is None
        record["mismatch"] = problem
    return record


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--batch-sizes", default="2,64,128,148")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    parser.add_argument("--smoke", action="store_true", help="CPU self-test at tiny sizes; not a measurement")
    ns = parser.parse_args(argv)

    names = ns.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    if ns.smoke and ns.out == RESULTS_DIR:
        parser.error("--smoke results are not measurements: pass --out DIR outside benchmarks/results")
    if not ns.smoke and jax.default_backend() != "gpu":
        print(f"bench_sparse_decode: no GPU found (jax backend is {jax.default_backend()!r}); this benchmark times "
              "the Pallas kernel on a GPU, so nothing was measured.", file=sys.stderr)
        return 2
    configs = {n: CONFIGS[n] for n in names}
    if ns.smoke:  # keep topk and pages, shrink the sequences so the CPU interpreter finishes quickly
        shrink = lambda s: s and dataclasses.replace(s, s_k=2 * s.topk)  # noqa: E731
        configs = {n: dataclasses.replace(c, main=shrink(c.main), extra=shrink(c.extra)) for n, c in configs.items()}

    device = jax.devices()[0]
    peak = None if ns.smoke else gpu_peak(device.device_kind)
    header = dict(gpu=None if ns.smoke else device.device_kind, smoke=ns.smoke, num_sms=num_sms(),
                  jax=jax.__version__, jaxlib=jaxlib.__version__,
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  timing=f"mean of {ns.iters} back-to-back calls after {ns.warmup} warmup calls; L2 not flushed",
                  peak=peak and dataclasses.asdict(peak))
    results = []
    print(f"{'config':8} {'b':>4} {'splits':>6} {'pallas µs':>10} {'TFLOP/s':>8} {'GB/s':>7} {'%roof':>6} "
          f"{'xla µs':>9} {'ok':>4}")
    for name, cfg in configs.items():
        for b in [int(x) for x in ns.batch_sizes.split(",")]:
            r = run_case(name, cfg, b, ns)
            results.append(r)
            p, x = r["pallas"], r["xla"]
            print(f"{name:8} {b:>4} {r['num_splits']:>6} {_fmt(p.get('us'), '10.1f')} {_fmt(p.get('tflops'), '8.1f')} "
                  f"{_fmt(p.get('gbps'), '7.0f')} {_fmt(p.get('pct_roofline'), '6.1f')} {_fmt(x.get('us'), '9.1f')} "
                  f"{str(r.get('matches_reference', '-')):>4}", flush=True)
            for backend in ["pallas", "xla"]:
                if "error" in r[backend]:
                    print(f"  {backend} failed: {r[backend]['error'][:300]}")
            if r.get("mismatch"):
                print(f"  mismatch: {r['mismatch']}")

    ns.out.mkdir(parents=True, exist_ok=True)
    slug = "cpu-smoke" if ns.smoke else re.sub(r"[^A-Za-z0-9]+", "-", device.device_kind).strip("-")
    path = ns.out / f"sparse_decode_{slug}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(dict(**header, results=results), indent=1))
    print(f"wrote {path}")
    return 0 if all(r.get("matches_reference") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
