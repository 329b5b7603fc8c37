"""Fine-tune MODEL1 with optax: full or LoRA, AdamW or Muon, MTP loss, aux-loss-free MoE balancing.

    python scripts/finetune.py          # a small MODEL1-shaped model on the Python standard library's
                                        # sources (bytes), a few minutes on a CPU; training checkpoints
                                        # in runs/finetune/train, the final model in runs/finetune/model
    python scripts/finetune.py --model DIR --data train.jsonl --tokenizer DIR/tokenizer.json \\
        --lora-rank 16 --optimizer muon --steps 2000 --checkpoint-dir run1
    python scripts/finetune.py ... --checkpoint-dir run1 --resume      # continue a killed run exactly
    python scripts/finetune.py --mesh data=2,tensor=4 --layout fsdp     # sharded over 8 devices
    python scripts/finetune.py --seq-len 4096 --document-masking --remat          # long sequences
    python scripts/finetune.py --model DIR --indexer-stage warmup --lr 1e-3 ...     # train the indexers only

Data: text files (one document each) or JSONL lines {"text": ...} / {"messages": [{"role", "content"}]}
(only assistant turns are targets). Without --tokenizer, text is tokenized as UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

# XLA's CPU scheduler favours concurrency by default and then runs every layer's recomputed forward early,
# which undoes --remat (docs/training.md §5.1); the memory-minimising scheduler is used unless XLA_FLAGS chooses.
# Set before JAX starts (it reads XLA_FLAGS once); the flag only concerns the CPU backend.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import model1_jax as m1
from model1_jax import cli, parallel
from model1_jax.common import human_bytes, human_count
from model1_jax.io.pretrained import read_config
from model1_jax.model import abstract_module
from model1_jax.model.attention import FULL_ATTENTION, INDEXER_STAGES, use_full_attention
from model1_jax.parallel import distributed
from model1_jax.text.tokenizers import load_tokenizer
from model1_jax.train import data as mdata
from model1_jax.train.balance import BalanceConfig
from model1_jax.train.loop import TrainCheckpointer, fit, measured_peak, tokens_per_second
from model1_jax.train.lora import PRESETS, LoRAConfig, apply_lora, find_targets, merge_lora, save_adapters
from model1_jax.train.optim import OPTIMIZERS, OptimizerConfig
from model1_jax.train.trainer import TrainConfig, Trainer


def default_config() -> m1.Config:
    """`Config.tiny()`: every attention and MLP type at toy width, byte vocabulary."""
    return m1.Config.tiny()


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", help="checkpoint directory, HF-format or Orbax (default: a small random-init model)")
    g.add_argument("--config", help="train from a random init of this HF config.json instead (default: "
                                    "Config.tiny())")
    g.add_argument("--data", nargs="+", help="text or .jsonl files (default: the Python standard library sources)")
    g.add_argument("--tokenizer", help="tokenizer.json (default: UTF-8 bytes)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per sequence, up to the config's "
                   "max_position_embeddings (attention memory is linear in it)")
    g.add_argument("--document-masking", action="store_true",
                   help="pack documents at multiples of the largest compression rate, positions restarting at 0, "
                        "so no attention, compressed entry or indexer pick crosses a document boundary")
    g.add_argument("--eval-fraction", type=float, default=0.02)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="compute dtype (default: bfloat16 on GPU, float32 on CPU); trained weights stay float32")
    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", default="adamw", help=f"one of {OPTIMIZERS}")
    g.add_argument("--steps", type=int, default=300)
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--accum-steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup-steps", type=int, default=30)
    g.add_argument("--min-lr-ratio", type=float, default=0.1)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip-norm", type=float, default=1.0)
    g.add_argument("--mtp-weight", type=float, default=0.3)
    g.add_argument("--bias-rate", type=float, default=1e-3, help="aux-loss-free router bias step γ")
    g.add_argument("--seq-balance-weight", type=float, default=0.0, help="sequence-wise balance loss α")
    g.add_argument("--remat", action="store_true", help="recompute decoder layers in the backward pass (less memory)")
    g.add_argument("--attention", choices=FULL_ATTENTION, default="auto",
                   help="full-sequence attention: sparse (auto: Pallas kernels on GPU, else jnp; xla; pallas; "
                        "interpret) or the quadratic dense reference")
    g.add_argument("--indexer-stage", choices=INDEXER_STAGES, default=None,
                   help="train the lightning indexers: warmup (they alone, KL over every visible entry) or sparse "
                        "(everything; their KL over their picks, inputs detached)")
    g.add_argument("--indexer-kl-weight", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tuning")
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-targets", nargs="+", default=["attention"],
                   help=f"presets {sorted(PRESETS)} or regular expressions over module paths")
    g = p.add_argument_group("run")
    g.add_argument("--checkpoint-dir", default="runs/finetune",
                   help="training checkpoints go to DIR/train, the final model to DIR/model (LoRA: DIR/adapters)")
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --checkpoint-dir")
    g.add_argument("--stop-after", type=int, help="checkpoint and exit after this step (a time-limited job); "
                   "--resume continues the same schedule")
    g.add_argument("--log-every", type=int, default=20)
    g.add_argument("--eval-every", type=int, default=100)
    g.add_argument("--eval-batches", type=int, default=16, help="held-out batches per evaluation (at most)")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-export", action="store_true",
                   help="skip saving the final model (m1.save format, LoRA merged) to CHECKPOINT_DIR/model")
    cli.add_sharding_arguments(p)  # --mesh/--layout: e.g. --mesh data=8 --layout data_parallel, or --layout fsdp
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    distributed.initialize()  # multi-host: every host runs this script (see the README)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:  # configuration and data errors: the message says it all
        sys.exit(f"finetune.py: error: {e}")


def run(args: argparse.Namespace) -> tuple[Trainer, list[dict[str, float]]]:
    """The whole run; returns the trainer (final state) and the logged loss curve."""
    layout = cli.layout_from_args(args)
    if jax.process_count() > 1 and not args.no_export:  # refused now, not after the whole run
        raise ValueError(f"the final export (m1.save, LoRA adapters) writes from one process and this run has "
                         f"{jax.process_count()}: pass --no-export (the training checkpoints in --checkpoint-dir are "
                         "written by every process and resume exactly)")
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype or ("bfloat16" if on_gpu else "float32"))
    # Every argument is checked before any model is built.
    optimizer = OptimizerConfig(name=args.optimizer, learning_rate=args.lr, warmup_steps=args.warmup_steps,
                                total_steps=args.steps, min_lr_ratio=args.min_lr_ratio,
                                weight_decay=args.weight_decay, clip_norm=args.clip_norm or None)
    train_config = TrainConfig(mtp_weight=args.mtp_weight, remat=args.remat,
                               balance=BalanceConfig(args.bias_rate, args.seq_balance_weight),
                               indexer_stage=args.indexer_stage, indexer_kl_weight=args.indexer_kl_weight)
    lora = LoRAConfig(args.lora_rank, args.lora_alpha, tuple(args.lora_targets)) if args.lora_rank else None
    if args.model and args.config:
        raise ValueError("--model and --config exclude each other (a checkpoint brings its own config)")
    config = read_config(args.model) if args.model else (m1.Config.from_hf(args.config) if args.config
                                                         else default_config())
    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")

    train_dir = os.path.join(args.checkpoint_dir, "train")
    existing = os.path.isdir(train_dir) and any(name.isdigit() for name in os.listdir(train_dir))
    if args.resume and not existing:
        raise FileNotFoundError(f"--resume: no checkpoint in {os.path.abspath(train_dir)}")
    if existing and not args.resume:
        raise ValueError(f"{os.path.abspath(train_dir)} already holds checkpoints; pass --resume or another "
                         "--checkpoint-dir")
    if lora:  # targets are checked on the abstract model, before any data is read or weight built
        find_targets(abstract_module(config), lora.targets)
    tokenizer = load_tokenizer(args.tokenizer)
    files = args.data or mdata.default_corpus()
    eos = config.eos_token_ids[0] if config.eos_token_ids else None
    t0 = time.perf_counter()
    align = max([config.compress_rate(t) for t in set(config.layer_types) if t != m1.SLIDING], default=1)
    dataset = mdata.build_dataset(files, tokenizer, seq_len=args.seq_len, eos_id=eos, vocab_size=config.vocab_size,
                                  eval_fraction=args.eval_fraction, align=align if args.document_masking else None)
    print(f"data    {len(files)} file(s), tokenizer {tokenizer.name}: {dataset.train_ids.shape[0]} training and "
          f"{dataset.eval_ids.shape[0]} held-out sequences of {args.seq_len} tokens ({time.perf_counter() - t0:.1f} s)")

    model, where = build_model(args, config, dtype, layout, quantized=lora is not None)
    use_full_attention(model, args.attention)
    if lora:
        paths = apply_lora(model, lora, rngs=nnx.Rngs(args.seed + 1))
        if layout is not None:
            parallel.shard(model, layout)  # the new adapters follow their kernels' shardings
        print(f"lora    rank {lora.rank}, alpha {lora.alpha} on {len(paths)} projections ({', '.join(lora.targets)})")
    trainer = Trainer(model, optimizer, train_config, lora=lora is not None)
    del model  # the trainer holds its own copy of what trains
    n_train = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    print(f"model   {where}: {config.num_hidden_layers} layers {list(config.layer_types)}, hidden "
          f"{config.hidden_size}, {config.n_routed_experts} experts; {human_count(n_train)} trainable parameters, "
          f"compute {dtype.name}, {args.optimizer}"
          + ("" if layout is None else f"; mesh {parallel.describe(layout.mesh)}, layout {args.layout}"))

    batches = mdata.Batches(dataset, args.batch_size, args.accum_steps, seed=args.seed)
    checkpointer = TrainCheckpointer(train_dir, every=args.checkpoint_every)
    record = {"data_fingerprint": dataset.fingerprint(), "data_seed": args.seed, "batch_size": args.batch_size,
              "accum_steps": args.accum_steps, "seq_len": args.seq_len, "optimizer": dataclasses.asdict(optimizer),
              "lora": dataclasses.asdict(lora) if lora else None}
    if args.resume:
        json_record = json.loads(json.dumps(record))  # tuples → lists, as stored
        checkpointer.restore(trainer, expect=json_record)
        print(f"resume  from step {int(trainer.state.step)} in {checkpointer.directory}")

    estimate = trainer.memory_estimate(probe_batch(dataset, args.batch_size, args.accum_steps))
    print(f"memory  per-device estimate (XLA's plan of one step): peak {human_bytes(estimate['peak'])} = state and "
          f"batch {human_bytes(estimate['arguments'])} + temporaries {human_bytes(estimate['temporaries'])} + "
          f"outputs {human_bytes(estimate['outputs'])} - reused {human_bytes(estimate['reused'])}")
    history = fit(trainer, batches, args.steps, checkpointer=checkpointer, meta=record, eval_data=dataset,
                  eval_every=args.eval_every, eval_batches_max=args.eval_batches, log_every=args.log_every,
                  progress=not args.no_progress, stop_after=args.stop_after)
    checkpointer.close()
    if history and "step_memory_bytes" in history[-1]:
        _, what = measured_peak()
        cpu = what == "process peak RSS"  # resident state is not part of the measured rise on a CPU
        planned = estimate["peak"] - (estimate["arguments"] if cpu else 0)
        print(f"memory  measured {'rise of the process during the steps' if cpu else 'device peak'} "
              f"{human_bytes(history[-1]['step_memory_bytes'])} (XLA's plan: {human_bytes(planned)})")
    print(f"done    {int(trainer.state.step)} steps, {tokens_per_second(history):,.0f} tokens/s "
          f"({jax.devices()[0].platform}); training checkpoint in {checkpointer.directory}")
    if args.stop_after is None or int(trainer.state.step) >= args.steps:
        export(trainer, lora, tokenizer, args.checkpoint_dir, args.no_export)
    return trainer, history


def probe_batch(dataset: mdata.PackedData, batch_size: int, accum_steps: int) -> dict:
    """A batch of the training shape (token 0, every target on; the first sequence's positions), for the memory
    estimate without taking a batch from the data order."""
    shape = (accum_steps, batch_size, dataset.seq_len)
    batch = {"ids": np.zeros(shape, np.int32), "mask": np.ones(shape, bool)}
    if dataset.train_positions is not None:
        batch["positions"] = np.broadcast_to(dataset.train_positions[0], shape)
    return batch


def build_model(args: argparse.Namespace, config: m1.Config, dtype, layout, *, quantized: bool):
    """(model, description): from --model or a seeded init, placed by the layout when --mesh is given.

    A LoRA base may stay FP8/FP4 (dequantized on the fly); full fine-tuning needs dense weights."""
    if args.model:
        return cli.load_model(args.model, dtype=dtype, layout=layout, quantized=quantized), args.model
    # fp32 storage whatever the compute dtype: the trainer keeps fp32 master weights anyway
    model = cli.random_model(config, seed=args.seed, dtype=dtype, param_dtype=jnp.float32, layout=layout)
    return model, f"random init (seed {args.seed})"


def export(trainer: Trainer, lora: LoRAConfig | None, tokenizer, directory: str, skip_model: bool) -> None:
    """The trained model as an `m1.save` checkpoint with its tokenizer.json (`scripts/generate.py --model
    DIR/model`), LoRA merged into it; LoRA adapters also alone."""
    model = trainer.model()
    if lora:
        out = save_adapters(model, os.path.join(directory, "adapters"), lora)
        print(f"saved   LoRA adapters alone in {out}")
        if skip_model:
            return
        merge_lora(model)
    if not skip_model:
        target = os.path.join(directory, "model")
        out = m1.save(model, target, overwrite=True)
        tokenizer.save(os.path.join(target, "tokenizer.json"))
        print(f"saved   model in {out}, tokenizer.json beside it")


if __name__ == "__main__":
    main()
