"""One full-sequence forward pass of MODEL1, with a readable summary of what was run.

    python scripts/forward.py                       # Config.tiny(), random weights
    python scripts/forward.py --model DIR           # a Hugging Face-format checkpoint
    python scripts/forward.py --mesh data=2,expert=4 --layout expert_parallel   # sharded over 8 devices
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import model1_jax as m1
from model1_jax import cli
from model1_jax import parallel as sh
from model1_jax.common import human_bytes, human_count
from model1_jax.model.summary import parameter_bytes, parameter_counts
from model1_jax.parallel import distributed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF-format checkpoint directory (default: Config.tiny() with random weights)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    cli.add_sharding_arguments(parser)
    args = parser.parse_args()
    if args.batch < 1 or args.seq_len < 1:
        parser.error("--batch and --seq-len must be positive")
    dtype = jnp.dtype(args.dtype)
    distributed.initialize()
    layout = cli.layout_from_args(args)

    t0 = time.perf_counter()
    if args.model:
        model = m1.from_pretrained(args.model, dtype=dtype)
        if layout is not None:
            try:
                model = sh.shard(model, layout)
            except ValueError as e:
                raise SystemExit(str(e)) from None
        print(f"loaded {args.model}")
    else:
        def make():
            return m1.Model1(m1.Config.tiny(), rngs=nnx.Rngs(args.seed), dtype=dtype, param_dtype=dtype)

        try:
            model = make() if layout is None else sh.create(make, layout)
        except ValueError as e:  # the layout does not divide the model
            raise SystemExit(str(e)) from None
        print(f"Config.tiny() with RANDOM weights (seed {args.seed}): "
              "outputs are meaningless, shapes and speed are real")
    init_s = time.perf_counter() - t0
    cfg = model.config
    if layout is not None:
        print(f"mesh    {sh.describe(layout.mesh)}, layout {args.layout}")
        print(distributed.memory_report({"params": nnx.state(model)}))

    kinds = {m1.SLIDING: "sliding", m1.CSA: f"CSA(m={cfg.compress_rate_csa})",
             m1.HCA: f"HCA(m={cfg.compress_rate_hca})"}
    print(f"layers  {cfg.num_hidden_layers}: " + ", ".join(
        f"{kinds[a]}+{'hash' if b == m1.HASH_MOE else 'moe'}" for a, b in zip(cfg.layer_types, cfg.mlp_layer_types)))
    print(f"widths  hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads x {cfg.head_dim} (one shared K=V head), "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok} + 1 shared, {cfg.hc_mult} mHC streams, "
          f"window {cfg.sliding_window}, index top-{cfg.index_topk}")
    counts = parameter_counts(model)
    print(f"params  {human_count(sum(counts.values()))} ({human_bytes(parameter_bytes(model))} in memory)")
    for group, n in counts.items():
        print(f"        {group:<28} {human_count(n):>8}")

    ids = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.seq_len), dtype=np.int32)
    if layout is not None:
        ids = distributed.from_host(ids, layout.activation_sharding(("batch", "seq"), ids.shape))
    forward = nnx.jit(lambda m, x: m(x))
    t0 = time.perf_counter()
    logits = forward(model, ids).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = forward(model, ids).block_until_ready()
    run_s = time.perf_counter() - t0

    print(f"input   input_ids {ids.dtype}{list(ids.shape)}  ->  logits {logits.dtype}{list(logits.shape)}")
    print(f"time    init {init_s:.2f} s, compile {compile_s:.2f} s, forward {run_s * 1e3:.1f} ms "
          f"({args.batch * args.seq_len / run_s:,.0f} tokens/s on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s))")
    print(f"argmax  next token after each of the first 10 positions of sequence 0: "
          f"{distributed.to_host(jnp.argmax(logits, -1))[0, :10].tolist()}")


if __name__ == "__main__":
    main()
