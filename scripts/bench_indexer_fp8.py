#!/usr/bin/env python
"""How often the lightning indexer picks the same entries from FP8 keys as from full-precision keys.

Runs a model's full forward over one long random sequence, takes every CSA layer's indexer inputs (the
layer's normed input and q latent) and its compressed keys, and scores every query against the keys twice:
as computed (float32) and as the FP8 indexer cache stores them (132-byte rows: e4m3 with one power-of-two
scale per key, docs/serving.md §4). For each query with more visible entries than k — where the choice
matters — it compares the two top-k sets: mean overlap |A ∩ B| / k and the fraction of queries whose sets are
identical. JSON to benchmarks/results/indexer_fp8_topk_<date>.json.

    python scripts/bench_indexer_fp8.py                       # Config.demo(), random init, 4096 tokens
    python scripts/bench_indexer_fp8.py --model DIR --tokens 16384 --top-k 64 512

With random weights (the default) the scores are those of an untrained model; a checkpoint gives the figure
that matters for serving.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import model1_jax as m1  # noqa: E402
from model1_jax import cli  # noqa: E402
from model1_jax.model.indexer import select_top_k  # noqa: E402
from pallas_kernels import index_format  # noqa: E402

RESULTS_DIR = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def indexer_inputs(model: m1.Model1, ids: np.ndarray) -> list[tuple]:
    """(indexer, x [1, t, d], q latent [1, t, q], keys [1, w, j], positions [1, t]) of every CSA layer."""
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    found = []

    def attention(i, attn, x_btd):
        if attn.indexer is not None:
            _, q_lat = attn.queries(x_btd, positions)
            found.append((attn.indexer, x_btd, q_lat, attn.indexer.compressor(x_btd), positions))
        return attn(x_btd, positions)

    model.streams(jnp.asarray(ids), positions, attention=attention)
    return found


def fp8_keys(keys_bsj):
    flat = keys_bsj.reshape(-1, keys_bsj.shape[-1])
    return index_format.dequantize_rows(*index_format.quantize_rows(flat)).reshape(keys_bsj.shape)


def agreement(indexer, x, q_lat, keys, positions, k: int) -> dict:
    full = indexer.scores(x, q_lat, keys, positions)
    rounded = indexer.scores(x, q_lat, fp8_keys(keys), positions)
    a = np.asarray(select_top_k(full, positions, indexer.rate, k))[0]
    b = np.asarray(select_top_k(rounded, positions, indexer.rate, k))[0]
    visible = (np.asarray(positions)[0] + 1) // indexer.rate
    rows = np.flatnonzero(visible > k)  # queries with a real choice
    overlap = np.array([len(np.intersect1d(a[t], b[t])) / k for t in rows])
    return dict(k=k, queries=int(rows.size), mean_overlap=float(overlap.mean()) if rows.size else None,
                identical_sets=float((overlap == 1).mean()) if rows.size else None,
                min_overlap=float(overlap.min()) if rows.size else None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (HF or Orbax); default: Config.demo(), random init")
    p.add_argument("--tokens", type=int, default=4096, help="sequence length (default 4096)")
    p.add_argument("--top-k", type=int, nargs="+", default=None,
                   help="k values to compare (default: the config's index_topk, 64 and 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
    ns = p.parse_args(argv)
    if ns.model:
        model = cli.load_model(ns.model, dtype=jnp.bfloat16)
        source = ns.model
    else:
        model = m1.Model1(m1.Config.demo(), rngs=nnx.Rngs(jax.random.key(ns.seed, impl="rbg")))
        source = "Config.demo(), random init"
    cfg = model.config
    ks = ns.top_k or sorted({cfg.index_topk, 64, 512})
    ids = np.random.default_rng(ns.seed).integers(0, cfg.vocab_size, (1, ns.tokens))
    layers = indexer_inputs(model, ids)
    if not layers:
        p.error("the model has no CSA layer (no lightning indexer)")
    results = []
    for i, inputs in enumerate(layers):
        for k in ks:
            row = dict(csa_layer=i, **agreement(*inputs, k))
            results.append(row)
            if row["queries"]:
                print(f"CSA layer {i}, top-{k:<4} over {row['queries']:5} queries: mean overlap "
                      f"{row['mean_overlap']:.4f}, identical sets {row['identical_sets']:.1%}, worst "
                      f"{row['min_overlap']:.3f}")
            else:
                print(f"CSA layer {i}, top-{k}: no query sees more than {k} entries at {ns.tokens} tokens")
    ns.out.mkdir(parents=True, exist_ok=True)
    path = ns.out / f"indexer_fp8_topk_{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(dict(model=source, tokens=ns.tokens, device=jax.devices()[0].device_kind,
                                    index_head_dim=cfg.index_head_dim, index_heads=cfg.index_n_heads,
                                    results=results), indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
