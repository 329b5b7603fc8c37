#!/usr/bin/env python
"""Continuous batching over a paged pool vs static batches: the same requests, the same slots.

N requests (default 256) with prompt and output lengths drawn log-uniformly from --prompt-len and
--new-tokens (outputs run to their length: no stop token), through
  * the batcher: one `m1.Scheduler` with --max-batch slots; finished slots are refilled at once and prompts
    are prefilled in chunks between decode steps; the page pools hold --pool-tokens context tokens (default:
    --max-batch requests of the mean length), so admission sometimes waits for pages;
  * static batches: the requests in groups of --max-batch, each group prefilled together and decoded until its
    longest request ends (a slot that finishes early idles), then the next group; every slot owns room for
    the longest request (max_len), as a static server allocates it. Same compiled model code.
Both are compiled before the clock starts. Reported: requests/s, output tokens/s, mean request latency (its
completion time: every request arrives at the start), steps, and the decode state's bytes (allocated once; the
batcher's pools at their peak use too). JSON to benchmarks/results/serve_<device>_<date>.json.

    python scripts/bench_serve.py                                     # Config.demo(), random weights
    python scripts/bench_serve.py --requests 64 --prompt-len 8 128 --new-tokens 4 64   # a smaller CPU run
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import model1_jax as m1  # noqa: E402
from model1_jax import cli  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def workload(n: int, prompt_len: tuple[int, int], new_tokens: tuple[int, int], vocab: int, seed: int):
    rng = np.random.default_rng(seed)

    def log_uniform(lo, hi):
        return np.exp(rng.uniform(np.log(lo), np.log(hi + 1), n)).astype(int).clip(lo, hi)

    lengths, outputs = log_uniform(*prompt_len), log_uniform(*new_tokens)
    return [(rng.integers(0, vocab, p).tolist(), int(o)) for p, o in zip(lengths, outputs)]


def state_bytes(sched: m1.Scheduler) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(sched.state))


def drive(sched: m1.Scheduler, groups: list[list[tuple[list[int], int]]]) -> dict:
    """Runs each group of requests to completion before submitting the next (one group: continuous batching)."""
    peak = {rate: 0 for rate in sched.pool_use()}
    latencies = []  # every request arrives at the start (an offline batch): latency = its completion time
    t0 = time.perf_counter()
    for group in groups:
        for prompt, new in group:
            sched.submit(prompt, new)
        while sched.waiting or sched.running:
            for _ in sched.step():
                latencies.append(time.perf_counter() - t0)
            for rate, (used, _) in sched.pool_use().items():
                peak[rate] = max(peak[rate], used)
    wall = time.perf_counter() - t0
    st = sched.stats
    seconds = wall - st.compile_s  # compilation, if any slipped in, is not throughput
    report = sched.memory_report()
    page_bytes = {p.rate: p.page_bytes for p in report.pools}
    pools_bytes = sum(p.total for p in report.pools)
    peak_pool_bytes = sum(peak[r] * page_bytes[r] for r in peak)
    return dict(requests=len(latencies), seconds=seconds, compile_s=st.compile_s,
                requests_per_s=len(latencies) / seconds, output_tokens=st.generated_tokens,
                output_tokens_per_s=st.generated_tokens / seconds, mean_latency_s=float(np.mean(latencies)),
                steps=st.steps, prefill_steps=st.prefill_steps, decode_s=st.decode_s, prefill_s=st.prefill_s,
                state_bytes=state_bytes(sched), pool_pages={str(r): n for r, n in sched.spec.pool_pages},
                pool_bytes=pools_bytes, peak_pool_pages={str(r): n for r, n in peak.items()},
                peak_pool_bytes=peak_pool_bytes, peak_state_bytes_in_use=state_bytes(sched) - pools_bytes
                + peak_pool_bytes, drafts=st.drafts, accepted=st.accepted)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory; default: Config.demo() with random weights")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(16, 512), metavar=("MIN", "MAX"))
    p.add_argument("--new-tokens", type=int, nargs=2, default=(8, 256), metavar=("MIN", "MAX"))
    p.add_argument("--chunk", type=int, default=64, help="prompt tokens per slot per step")
    p.add_argument("--prefill-batch", type=int, default=1, help="slots given a prompt chunk per batcher step")
    p.add_argument("--pool-tokens", type=int, help="context tokens of the batcher's pools (default: max-batch x the "
                                                   "mean request length)")
    p.add_argument("--mtp", action="store_true", help="MTP speculative decoding in both")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    cli.add_decode_arguments(p)
    ns = p.parse_args(argv)
    dtype = jnp.dtype(ns.dtype)
    if ns.model:
        model = cli.load_model(ns.model, dtype=dtype)
    else:
        model = m1.Model1(m1.Config.demo(), rngs=nnx.Rngs(jax.random.key(ns.seed, impl="rbg")), dtype=dtype,
                          param_dtype=dtype)
    cfg = model.config
    reqs = workload(ns.requests, tuple(ns.prompt_len), tuple(ns.new_tokens), cfg.vocab_size, ns.seed)
    max_len = max(len(pr) + n for pr, n in reqs)
    mean_len = int(np.mean([len(pr) + n for pr, n in reqs]))
    pool_tokens = ns.pool_tokens or ns.max_batch * mean_len
    common = dict(max_batch=ns.max_batch, max_len=max_len, cache_dtype=ns.cache_dtype, chunk=ns.chunk, mtp=ns.mtp,
                  attention_backend=ns.attention_backend, stop_tokens=(), seed=ns.seed)
    setups = {"batcher": dict(pool_tokens=pool_tokens, prefill_batch=ns.prefill_batch),
              "static": dict(prefill_batch=ns.max_batch)}  # full pools: every slot can reach max_len
    print(f"{jax.devices()[0].device_kind}: {ns.requests} requests, prompts {ns.prompt_len[0]}-{ns.prompt_len[1]}, "
          f"outputs {ns.new_tokens[0]}-{ns.new_tokens[1]} tokens (max_len {max_len}, mean {mean_len}), "
          f"{ns.max_batch} slots, chunk {ns.chunk}")
    results = {}
    for name, extra in setups.items():
        warm = m1.Scheduler(model, **common, **extra)  # compile every step shape before timing
        groups = [reqs[:3]] if name == "batcher" else [reqs[:ns.max_batch]]
        drive(warm, [[(pr[:ns.chunk + 1], min(n, 3)) for pr, n in g] for g in groups])
        sched = m1.Scheduler(model, **common, **extra)
        batches = [reqs] if name == "batcher" else [reqs[i:i + ns.max_batch] for i in range(0, len(reqs), ns.max_batch)]
        results[name] = r = drive(sched, batches)
        print(f"{name:8} {r['requests_per_s']:8.3f} req/s {r['output_tokens_per_s']:9.1f} out tok/s  mean latency "
              f"{r['mean_latency_s']:7.1f} s  {r['steps']} steps  state {r['state_bytes'] / 2**20:8.1f} MiB "
              f"(pools {r['pool_bytes'] / 2**20:.1f} MiB, peak use {r['peak_pool_bytes'] / 2**20:.1f} MiB)"
              + (f"  compile {r['compile_s']:.1f} s slipped in" if r["compile_s"] else ""))
    b, s = results["batcher"], results["static"]
    ratios = dict(requests_per_s=b["requests_per_s"] / s["requests_per_s"],
                  output_tokens_per_s=b["output_tokens_per_s"] / s["output_tokens_per_s"],
                  state_bytes=b["state_bytes"] / s["state_bytes"],
                  state_bytes_saved=s["state_bytes"] - b["state_bytes"])
    print(f"batcher / static: {ratios['requests_per_s']:.2f}x requests/s, {ratios['output_tokens_per_s']:.2f}x output "
          f"tokens/s, {ratios['state_bytes']:.2f}x the decode-state bytes ({ratios['state_bytes_saved'] / 2**20:.1f} "
          "MiB saved)")
    device = jax.devices()[0]
    out = dict(device=device.device_kind, platform=device.platform,
               date=datetime.datetime.now().isoformat(timespec="seconds"), jax_version=jax.__version__,
               model=ns.model or "Config.demo() random weights", dtype=ns.dtype,
               requests=ns.requests, max_batch=ns.max_batch, prompt_len=ns.prompt_len, new_tokens=ns.new_tokens,
               chunk=ns.chunk, prefill_batch=ns.prefill_batch, pool_tokens=pool_tokens, mtp=ns.mtp,
               cache_dtype=sched.spec.cache_dtype, index_cache=sched.spec.index_cache, max_len=max_len,
               results=results, ratios=ratios)
    ns.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device.device_kind).strip("-")
    path = ns.out / f"serve_{slug}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
