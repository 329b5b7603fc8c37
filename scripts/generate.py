"""Generate tokens with MODEL1: prefill, then jit-compiled decode steps over an FP8 paged KV cache.

    python scripts/generate.py                                  # Config.demo(), RANDOM weights
    python scripts/generate.py --mtp --temperature 0.8 --top-p 0.9
    python scripts/generate.py --model DIR --prompt "Hello"     # HF or Orbax checkpoint (+ tokenizer.json)
    python scripts/generate.py --model V4-FLASH-0731-DIR          # its DSpark drafter: 5 drafts, 6-token verify
    python scripts/generate.py --model DIR --mesh data=2,expert=4  # over 8 devices (every host: see README)
    python scripts/generate.py --model DIR --input requests.jsonl --output results.jsonl --max-batch 32

Without --model the weights are seeded random numbers: the tokens are meaningless, the shapes, cache
bytes and speed are real.

--input/--output: one request per line ({"messages": [...]} chat through the model's tokenizer.json, or
{"prompt": "..."} / {"prompt_ids": [...]}, with optional "id", "max_new_tokens", "temperature", "top_k",
"top_p", "seed", "stop", "stop_token_ids"; docs/serving.md §5), run by continuous batching over a paged cache;
each result is appended as it finishes, and a rerun skips the ids already in the output. Bad lines are
reported with their numbers and skipped (--on-error skip) or stop the run before anything is generated
(--on-error refuse).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import model1_jax as m1
from model1_jax import cli
from model1_jax import parallel as sh
from model1_jax.common import human_count
from model1_jax.inference import jsonl
from model1_jax.inference import sharded as sharded_decode
from model1_jax.model.summary import parameter_counts
from model1_jax.parallel import distributed
from model1_jax.text import ChatEncoder, ChatFormatError, HFTokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (HF or Orbax); default: Config.demo(), random weights")
    p.add_argument("--prompt", action="append", help="prompt text (needs tokenizer.json in --model); repeatable")
    p.add_argument("--prompt-ids", action="append", help="comma-separated token ids; repeatable")
    p.add_argument("--batch", type=int, default=2, help="random prompts when none are given (default 2)")
    p.add_argument("--prompt-len", type=int, default=100, help="length of the longest random prompt (default 100)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--max-len", type=int, help="cache capacity per sequence (default: longest prompt + new)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                   help="comma-separated stop token ids (default: the config's eos; '' for none)")
    p.add_argument("--speculative", choices=["auto", "none", "mtp", "dspark"], default="auto",
                   help="speculative decoding: mtp (the preview's MTP block: 1 draft, verify 2), dspark (the 0731/0813 "
                        "drafter: 5 drafts, verify 6), none; auto (default): dspark when the model has the drafter")
    p.add_argument("--mtp", action="store_true", help="same as --speculative mtp")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    p.add_argument("--chunk", type=int, default=64, help="prefill tokens per sequence per call")
    p.add_argument("--budget-gb", type=float, help="also print the longest max_len whose cache fits this many GiB")
    p.add_argument("--no-progress", action="store_true")
    jsonl_group = p.add_argument_group("batch files")
    jsonl_group.add_argument("--input", help="requests, one JSON object per line")
    jsonl_group.add_argument("--output", help="results, appended one line per finished request (resumable)")
    jsonl_group.add_argument("--on-error", choices=("skip", "refuse"), default="skip",
                             help="bad input lines: report and skip them (default), or report and generate nothing")
    jsonl_group.add_argument("--tokenizer", help="tokenizer.json (default: the one in --model)")
    jsonl_group.add_argument("--revision", choices=("0731", "preview"), default="0731",
                             help="chat format revision of the checkpoint (reasoning-effort tiers; docs/chat.md §6)")
    jsonl_group.add_argument("--max-batch", type=int, default=8, help="requests decoded at once (default 8)")
    jsonl_group.add_argument("--pool-tokens", type=int,
                             help="context tokens the shared page pools hold (default: every slot at --max-len)")
    cli.add_decode_arguments(p)
    cli.add_sharding_arguments(p)
    args = p.parse_args()
    if args.batch < 1 or args.prompt_len < 1:
        p.error("--batch and --prompt-len must be positive")
    if (args.input is None) != (args.output is None):
        p.error("--input and --output go together")
    dtype = jnp.dtype(args.dtype)
    distributed.initialize()  # multi-host: every host runs this script (see the README)
    if not distributed.is_main_process():
        sys.stdout = open(os.devnull, "w")  # one host reports
    layout = cli.layout_from_args(args)

    t0 = time.perf_counter()
    tokenizer = None
    if args.model:
        try:
            model = cli.load_model(args.model, dtype=dtype, layout=layout)
        except ValueError as e:  # a bad checkpoint, or a layout that does not divide it
            sys.exit(f"error: {e}")
        tok_path = args.tokenizer or os.path.join(args.model, "tokenizer.json")
        if os.path.isfile(tok_path):
            tokenizer = HFTokenizer(tok_path)
        print(f"model   {args.model}" + (" (with tokenizer.json)" if tokenizer else ""))
    else:
        # The "rbg" generator: eager init compiles one small kernel per parameter shape, and threefry's
        # kernels take XLA:CPU tens of seconds in total; rbg's take a few.
        def make():
            rngs = nnx.Rngs(jax.random.key(args.seed, impl="rbg"))
            return m1.Model1(m1.Config.demo(), rngs=rngs, dtype=dtype, param_dtype=dtype)

        try:
            model = make() if layout is None else sh.create(make, layout)  # sharded: never whole on one device
        except ValueError as e:
            sys.exit(f"error: {e}")
        print(f"model   Config.demo() with RANDOM weights (seed {args.seed}): the generated tokens are "
              "meaningless; shapes, cache bytes and speed are real")
    if tokenizer is None and args.tokenizer:
        tokenizer = HFTokenizer(args.tokenizer)
    init_s = time.perf_counter() - t0
    cfg = model.config
    speculative = "mtp" if args.mtp else args.speculative
    if speculative == "auto":
        speculative = "dspark" if model.dspark is not None else "none"
    speculative = None if speculative == "none" else speculative
    kinds = {m1.SLIDING: "sliding", m1.CSA: f"CSA(m={cfg.compress_rate_csa})",
             m1.HCA: f"HCA(m={cfg.compress_rate_hca})"}
    print(f"        {cfg.num_hidden_layers} layers ({', '.join(kinds[t] for t in cfg.layer_types)}"
          f"{' + MTP' if model.mtp is not None else ''}"
          f"{f' + DSpark drafter ({cfg.dspark.num_stages} stages)' if model.dspark is not None else ''}), "
          f"hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads x "
          f"{cfg.head_dim}, {human_count(sum(parameter_counts(model).values()))} params; init {init_s:.1f} s on "
          f"{jax.devices()[0].platform}")

    if args.input:
        sys.exit(batch_file(args, model, tokenizer, speculative))

    prompts: list[list[int]] = []
    if args.prompt:
        if tokenizer is None:
            p.error("--prompt needs a --model directory with tokenizer.json; use --prompt-ids otherwise")
        prompts += [tokenizer.tokenizer.encode(text).ids for text in args.prompt]
    if args.prompt_ids:
        prompts += [[int(x) for x in s.split(",") if x.strip()] for s in args.prompt_ids]
    if not prompts:  # random prompts of different lengths
        rng = np.random.default_rng(args.seed)
        lengths = [max(1, args.prompt_len - 17 * i) for i in range(args.batch)]
        prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]

    try:
        if layout is not None:  # the decode state generate() will allocate, planned per device first
            spec = m1.make_spec(cfg, max_batch=len(prompts), max_len=args.max_len or max(map(len, prompts))
                                + args.max_new_tokens, cache_dtype=args.cache_dtype, chunk=args.chunk, dtype=dtype,
                                speculative=speculative, attention_backend=args.attention_backend)
            plan = sharded_decode.state_plan(layout, cfg, spec)
            print(f"mesh    {sh.describe(layout.mesh)}, layout {args.layout}")
            print(distributed.memory_report({"params": nnx.state(model), "decode state": plan}))
            distributed.check_fits({"decode state": plan})  # the parameters are already in place
        gen = m1.generate(model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, seed=args.seed, stop_tokens=args.stop, cache_dtype=args.cache_dtype,
                          speculative=speculative, max_len=args.max_len, chunk=args.chunk,
                          progress=not args.no_progress, attention_backend=args.attention_backend)
    except (ValueError, MemoryError) as e:
        sys.exit(f"error: {e}")
    s = gen.stats
    for i, (prompt, out) in enumerate(zip(prompts, gen.tokens)):
        print(f"[{i}] prompt {len(prompt)} tokens -> {len(out)} new: {out}")
        if tokenizer is not None:
            print(f"    {tokenizer.decode(prompt)!r} -> {tokenizer.decode(out)!r}")
    print(m1.memory_report(cfg, s.cache_spec))
    if args.budget_gb:
        longest = m1.max_len_for_budget(cfg, int(args.budget_gb * 2**30), max_batch=len(prompts),
                                        cache_dtype=args.cache_dtype, chunk=args.chunk, dtype=dtype,
                                        speculative=speculative)
        print(f"budget  {args.budget_gb:g} GiB of cache holds {len(prompts)} sequences of up to {longest:,} tokens")
    print(f"compile {s.compile_s:.1f} s (tracing + XLA, all steps)")
    print(f"prefill {s.prompt_tokens} tokens in {s.prefill_s * 1e3:.0f} ms: {s.prefill_tokens_per_s:,.0f} tokens/s")
    print(f"decode  {s.generated_tokens} tokens, {s.decode_steps} steps in {s.decode_s * 1e3:.0f} ms: "
          f"{s.decode_tokens_per_s:,.0f} tokens/s ({s.decode_s / max(s.decode_steps, 1) * 1e3:.1f} ms/step)")
    if speculative:
        rate = s.acceptance_rate
        print(f"{speculative.upper():<7} mean accepted length {s.mean_accepted_length:.2f} tokens per step; "
              f"{s.accepted}/{s.drafts} drafts accepted" + (f" ({rate:.0%})" if rate is not None else ""))


def batch_file(args: argparse.Namespace, model: m1.Model1, tokenizer: HFTokenizer | None,
               speculative: str | None) -> int:
    """--input/--output: requests file → results file through the continuous-batching scheduler."""
    encoder = None
    if tokenizer is not None:
        try:
            encoder = ChatEncoder(tokenizer.tokenizer, revision=args.revision)
        except ChatFormatError as e:
            print(f"note    {e}: 'messages' lines cannot be encoded")
    defaults = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p)
    entries, bad = jsonl.read_requests(args.input, model.config.vocab_size, defaults=defaults, tokenizer=tokenizer,
                                       encoder=encoder, seed=args.seed)
    longest = max((e.request.reserve for e in entries), default=1)
    try:
        max_len = args.max_len or min(longest, model.config.max_position_embeddings)  # longer lines are reported
        sched = m1.Scheduler(model, max_batch=args.max_batch, max_len=max_len,
                             pool_tokens=args.pool_tokens, cache_dtype=args.cache_dtype, chunk=args.chunk,
                             speculative=speculative, attention_backend=args.attention_backend,
                             tokenizer=encoder or tokenizer, stop_tokens=args.stop, seed=args.seed)
        entries, too_big = jsonl.admissible(entries, sched)
        done = jsonl.finished_ids(args.output)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    bad = sorted(bad + too_big, key=lambda b: b.line)
    for b in bad:
        print(f"{args.input}: {b}", file=sys.stderr)
    if bad and args.on_error == "refuse":
        print(f"error: {len(bad)} bad line(s) in {args.input}; nothing generated (--on-error skip runs the rest)",
              file=sys.stderr)
        return 1
    todo = [e for e in entries if jsonl.id_key(e.id) not in done]
    print(f"input   {args.input}: {len(entries) + len(bad)} requests, {len(bad)} skipped (bad), "
          f"{len(entries) - len(todo)} already in {args.output}, {len(todo)} to run")
    print(sched.memory_report())
    summary = jsonl.run(sched, todo, args.output, encoder=encoder, progress=not args.no_progress)
    st = sched.stats
    print(f"done    {summary['requests']} requests, {summary['generated_tokens']} tokens in {summary['seconds']:.1f} s "
          f"({summary['tokens_per_s']:,.1f} tokens/s; compile {st.compile_s:.1f} s)"
          + (f"; {speculative.upper()} {st.accepted}/{st.drafts} drafts accepted" if st.drafts else ""))
    return 0


if __name__ == "__main__":
    main()
