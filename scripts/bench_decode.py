#!/usr/bin/env python
"""Benchmark end-to-end decoding of a MODEL1-shaped model on one GPU: prefill and decode throughput.

The model has V4-Flash's widths (hidden 4096, 64 heads x 512, q/o LoRA 1024, 8 output groups, indexer
64 x 128 picking 512, window 128, CSA m=4, HCA m'=128, 4 mHC streams, top-6 MoE of 2048-wide experts) with
fewer layers and experts so that it fits one GPU next to transformers' copy (defaults: 8 layers, 16 experts,
~6B parameters in bf16). Weights are random; the speed is what matters.

For batch sizes 1, 8 and 64 (`--batch-sizes`): `m1.generate` with the FP8 cache, greedy, run twice (the
first run compiles; the second is measured): prefill tokens/s, ms per decode step, decode tokens/s, and
the HBM roofline of a step — bytes it must read (weights, including the routed experts a batch of that
size touches on average, plus the KV-cache bytes the kernel and the indexer read) over the GPU's
bandwidth. With a CUDA build of PyTorch, transformers' eager `generate()` runs the same config and weights
(HF random init → save_pretrained → `m1.from_pretrained`) side by side.
JSON goes to benchmarks/results/decode_<gpu>_<date>.json.

  python scripts/bench_decode.py [--batch-sizes 1,8,64] [--prompt-len 1024] [--new-tokens 64] [--layers 8]

Without a GPU it exits with a message. `--smoke --out DIR` runs a tiny config on the CPU to test the script
itself; its numbers are not measurements.

`--mesh data=2,expert=4` (with `--layout`, `--rules`) shards the model and decode state over the visible
devices (on every host of a multi-host run) and adds each device's memory to the report; transformers'
single-device run is skipped then. On a CPU with simulated devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8 ... --smoke --mesh ...`) the figures only show that
the sharded path runs: the JSON marks them `"simulated": true`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import model1_jax as m1  # noqa: E402
import pallas_kernels as pk  # noqa: E402
from model1_jax import cli  # noqa: E402
from model1_jax import parallel as sh  # noqa: E402
from model1_jax.model.summary import parameter_counts  # noqa: E402
from model1_jax.parallel import distributed  # noqa: E402
from pallas_kernels.roofline import gpu_peak  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def bench_config(layers: int, experts: int) -> m1.Config:
    """V4-Flash widths; `layers` = 2 sliding + alternating CSA/HCA (as released), `experts` routed experts."""
    kinds = (m1.SLIDING, m1.SLIDING) + tuple((m1.CSA, m1.HCA)[i % 2] for i in range(layers - 2))
    return m1.Config.v4_flash().replace(num_hidden_layers=layers, layer_types=kinds[:layers], n_routed_experts=experts,
                                        mlp_layer_types=tuple(m1.HASH_MOE if i < 3 else m1.MOE for i in range(layers)))


def smoke_config() -> m1.Config:
    return m1.Config.tiny().replace(head_dim=512, qk_rope_head_dim=64, index_head_dim=128, num_attention_heads=16,
                                    sliding_window=16, compress_rate_hca=16)


def step_bytes(cfg: m1.Config, model: m1.Model1, batch: int, context: int) -> dict[str, float]:
    """Bytes one decode step must read from HBM at `context` tokens per sequence (FP8 cache, bf16 weights).

    Weights: every parameter once, except routed experts (only those some token of the batch picks:
    E·(1 − (1 − k/E)^batch) per layer on average, assuming uniform routing), the embedding (one row per
    token) and the MTP block (unused without speculative decoding). Cache, per sequence and layer: the
    window's W tokens; CSA also its top-k entries and the indexer's keys of every entry (it scores them
    all); HCA every entry. 576 bytes per cached token, as FlashMLA counts (docs/kernels.md §8.1); indexer keys
    j + 4 bytes each (FP8 rows with a float32 scale, docs/serving.md §4).
    """
    counts = parameter_counts(model)
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    touched = 1 - (1 - k / e) ** batch  # expected fraction of routed experts some token picks
    unread = counts.get("routed experts", 0) * (1 - touched) + counts.get("embedding", 0) + counts.get("MTP block", 0)
    weights = 2.0 * (sum(counts.values()) - unread + batch * cfg.hidden_size)
    window = min(context, cfg.sliding_window)
    cache = 0.0
    for layer_type in cfg.layer_types:
        cache += window * 576
        if layer_type == m1.CSA:
            entries = context // cfg.compress_rate_csa
            cache += min(entries, cfg.index_topk) * 576 + entries * (cfg.index_head_dim + 4)
        elif layer_type == m1.HCA:
            cache += context // cfg.compress_rate_hca * 576
    cache *= batch
    return {"weights": weights, "cache": cache, "total": weights + cache}


def run_jax(model, prompts, new_tokens: int, chunk: int, attention_backend: str = "auto") -> dict:
    kw = dict(stop_tokens=(), cache_dtype="fp8", chunk=chunk, attention_backend=attention_backend)
    m1.generate(model, prompts, new_tokens, **kw)  # compiles
    stats = m1.generate(model, prompts, new_tokens, **kw).stats
    return dict(prefill_tokens_per_s=stats.prefill_tokens_per_s,
                decode_ms_per_step=stats.decode_s / stats.decode_steps * 1e3,
                decode_tokens_per_s=stats.decode_tokens_per_s, cache_bytes=stats.cache_bytes,
                compile_s_second_run=stats.compile_s, attention_backend=stats.cache_spec.attention_backend)


def run_hf(hf, prompts, new_tokens: int) -> dict:
    import torch

    ids = torch.as_tensor(np.asarray(prompts), device="cuda")

    def timed(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(2)  # warm-up
    prefill_s = timed(1)
    total_s = timed(new_tokens)
    step_s = (total_s - prefill_s) / (new_tokens - 1)
    return dict(prefill_tokens_per_s=ids.numel() / prefill_s, decode_ms_per_step=step_s * 1e3,
                decode_tokens_per_s=ids.shape[0] / step_s)


def per_device_memory(model) -> dict[str, dict]:
    """Parameter bytes on each local device, and the runtime's in-use / peak / limit where it reports them."""
    out = {}
    for device, nbytes in distributed.device_bytes(nnx.state(model)).items():
        stats = device.memory_stats() or {}
        out[f"{device.platform}:{device.id}"] = dict(
            params_bytes=nbytes, **{k: stats[k] for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit")
                                    if k in stats})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,8,64")
    p.add_argument("--prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--chunk", type=int, default=256, help="prefill tokens per sequence per call")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' side-by-side run")
    p.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    p.add_argument("--smoke", action="store_true", help="CPU self-test at tiny sizes; not a measurement")
    p.add_argument("--attention-backend", choices=m1.ATTENTION_BACKENDS, default="auto",
                   help="attention over the caches (default: the Pallas kernel on a GPU)")
    cli.add_sharding_arguments(p)
    ns = p.parse_args(argv)
    distributed.initialize()  # multi-host: every host runs this script
    layout = cli.layout_from_args(ns)
    if ns.smoke and ns.out == RESULTS_DIR:
        p.error("--smoke results are not measurements: pass --out DIR outside benchmarks/results")
    if not ns.smoke and jax.default_backend() != "gpu":
        print("bench_decode: no GPU found (jax backend is %r); nothing measured. Use --smoke --out DIR to test the "
              "script on a CPU." % jax.default_backend())
        return 2
    batch_sizes = [int(b) for b in ns.batch_sizes.split(",")]
    if ns.smoke:
        cfg, batch_sizes, ns.prompt_len, ns.new_tokens, ns.chunk = smoke_config(), [1, 2], 40, 6, 16
    else:
        cfg = bench_config(ns.layers, ns.experts)
    device = jax.devices()[0]
    peak = None if ns.smoke else gpu_peak(device.device_kind)

    hf = None
    want_hf = not (ns.smoke or ns.no_hf or layout is not None)
    if want_hf:
        try:
            import torch
            from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
            want_hf = torch.cuda.is_available()
        except ImportError:
            want_hf = False
        if not want_hf:
            print("transformers side-by-side skipped: PyTorch with CUDA is not available")
    if want_hf:
        hf = DeepseekV4ForCausalLM(DeepseekV4Config(**cfg.to_hf())).to(torch.bfloat16).eval()
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp)
            model = m1.from_pretrained(tmp, dtype=jnp.bfloat16)
        hf = hf.cuda()
    else:
        def make():
            return m1.Model1(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), dtype=jnp.bfloat16,
                             param_dtype=jnp.bfloat16)

        try:
            model = make() if layout is None else sh.create(make, layout)
        except ValueError as e:
            p.error(str(e))
    params = sum(parameter_counts(model).values())
    if layout is not None:
        print(f"mesh {sh.describe(layout.mesh)}, layout {ns.layout}")
        print(distributed.memory_report({"params": nnx.state(model)}))
    print(f"{device.device_kind}: {cfg.num_hidden_layers} layers, {cfg.n_routed_experts} experts, {params / 1e9:.2f}B "
          f"parameters; prompt {ns.prompt_len}, {ns.new_tokens} new tokens, FP8 cache")

    results = []
    rng = np.random.default_rng(0)
    for b in batch_sizes:
        prompts = rng.integers(0, cfg.vocab_size, (b, ns.prompt_len)).tolist()
        row = dict(batch=b, jax=run_jax(model, prompts, ns.new_tokens, ns.chunk, ns.attention_backend))
        if layout is not None:
            row["per_device"] = per_device_memory(model)
        need = step_bytes(cfg, model, b, ns.prompt_len + ns.new_tokens // 2)
        row["step_bytes"] = need
        if peak is not None:
            roof_ms = need["total"] / peak.hbm_bytes_per_s * 1e3
            row["roofline_ms_per_step"] = roof_ms
            row["jax"]["percent_of_roofline"] = 100 * roof_ms / row["jax"]["decode_ms_per_step"]
        if hf is not None:
            row["transformers"] = run_hf(hf, prompts, ns.new_tokens)
        results.append(row)
        j = row["jax"]
        line = (f"b={b:<3} prefill {j['prefill_tokens_per_s']:10,.0f} tok/s | decode {j['decode_ms_per_step']:8.2f} "
                f"ms/step {j['decode_tokens_per_s']:9,.1f} tok/s")
        if "roofline_ms_per_step" in row:
            line += f" | roofline {row['roofline_ms_per_step']:.2f} ms ({j['percent_of_roofline']:.0f}%)"
        if "transformers" in row:
            t = row["transformers"]
            line += f" | transformers {t['decode_ms_per_step']:.1f} ms/step, {t['decode_tokens_per_s']:,.1f} tok/s"
        print(line)

    mesh = None if layout is None else dict(layout.mesh.shape)
    header = dict(device=device.device_kind, smoke=ns.smoke, jax_version=jax.__version__, devices=jax.device_count(),
                  mesh=mesh, layout=None if layout is None else ns.layout,
                  simulated=layout is not None and device.platform == "cpu",
                  date=datetime.datetime.now().isoformat(timespec="seconds"), parameters=params,
                  config=dict(layers=cfg.num_hidden_layers, experts=cfg.n_routed_experts, hidden=cfg.hidden_size,
                              heads=cfg.num_attention_heads, layer_types=list(cfg.layer_types)),
                  prompt_len=ns.prompt_len, new_tokens=ns.new_tokens, cache="fp8 (MODEL1 layout)",
                  hbm_bytes_per_s=None if peak is None else peak.hbm_bytes_per_s,
                  page_bytes=pk.cache_bytes(1, 64, "model1"))
    ns.out.mkdir(parents=True, exist_ok=True)
    slug = "cpu-smoke" if ns.smoke else re.sub(r"[^A-Za-z0-9]+", "-", device.device_kind).strip("-")
    path = ns.out / f"decode_{slug}_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(dict(**header, results=results), indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
