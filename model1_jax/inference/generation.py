"""Text generation: `generate` runs a list of prompts through the continuous-batching `Scheduler`.

    gen = m1.generate(model, [[5, 7, 9], [3]], max_new_tokens=32)          # greedy
    gen.tokens        # generated ids per prompt (up to and including a stop token)
    gen.stats         # timings, throughput, cache bytes, MTP / DSpark acceptance

Any number of prompts: `max_batch` of them (default: all) run at once and finished ones are replaced by
waiting ones. MTP speculative decoding (`mtp=True` / `speculative="mtp"`): each step feeds the pending token
and the MTP block's draft of the next one (s_q = 2), accepts the draft by the speculative-sampling rule (in
greedy mode: iff it equals the argmax), and the MTP block drafts again from the last kept position. A rejected
draft is undone by the sequence's length alone (docs/decode.md §6).

DSpark speculative decoding (`speculative="dspark"`, the 0731 / 0813 checkpoints' drafter): each step drafts
G = 5 tokens and verifies G + 1 = 6 in one target call (`inference.speculative`); `stats.mean_accepted_length`
is the tokens emitted per sequence and step (1 to 6), `gen.confidence` the drafter's confidence per draft.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from model1_jax.common import check_token_ids, positive_int
from model1_jax.inference import state as decode_state
from model1_jax.inference.clock import CompileClock
from model1_jax.inference.sampling import Sampling
from model1_jax.inference.scheduler import Scheduler
from model1_jax.model.transformer import Model1

__all__ = ["CompileClock", "Generation", "GenerationStats", "generate"]


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float  # wall time of steps that fed prompt chunks, compilation excluded
    decode_s: float  # wall time of the decode-only steps, compilation excluded
    compile_s: float  # tracing + lowering + compiling during this call
    decode_steps: int  # decode-only steps
    cache_bytes: int
    cache_spec: decode_state.CacheSpec  # the state generation ran on (see `m1.memory_report`)
    drafts: int = 0  # MTP / DSpark drafts verified
    accepted: int = 0  # of which accepted
    sequence_steps: int = 0  # decode steps summed over the sequences active in each
    step_tokens: int = 0  # tokens those steps emitted (before truncation at max_new_tokens / a stop token)
    decode_tokens: int = 0  # tokens emitted by decode steps (the others come with the prompts' last chunks)
    steps: int = 0  # compiled steps run (prefill and decode)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens emitted by decode-only steps per second."""
        return self.decode_tokens / max(self.decode_s, 1e-9)

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafts if self.drafts else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per sequence and decode step (accepted drafts + 1; 1.0 without speculation)."""
        return self.step_tokens / self.sequence_steps if self.sequence_steps else None

    @property
    def seconds_per_step(self) -> float | None:
        return self.decode_s / self.decode_steps if self.decode_steps else None


@dataclasses.dataclass(frozen=True)
class Generation:
    tokens: list[list[int]]  # generated ids per prompt
    stats: GenerationStats
    # DSpark: per prompt, sigmoid(confidence) of the G drafts of each step it took part in [steps, G]
    confidence: list[np.ndarray] | None = None


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if getattr(prompts, "ndim", None) == 2:  # a NumPy / JAX [batch, tokens] array
        prompts = list(np.asarray(prompts))
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence | np.ndarray) or len(prompts) == 0:
        raise ValueError("generate: prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        check_token_ids(np.asarray(p), vocab_size, f"generate: prompt {i}", ndim=1)
    return [np.asarray(p).astype(np.int64).tolist() for p in prompts]


def generate(model: Model1, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] | None = None, cache_dtype: str = "auto",
             mtp: bool = False, max_len: int | None = None, max_batch: int | None = None, chunk: int = 64,
             page_size: int = 64, attention_backend: str = "auto", progress: bool = False,
             speculative: str | None = None, index_cache: str = "auto") -> Generation:
    """Generates up to `max_new_tokens` tokens after each prompt.

    prompts: token-id lists (different lengths, any number). temperature 0 = greedy; top_k / top_p filter the
    sampled distribution; prompt i draws from the stream (seed, i), whatever runs beside it. stop_tokens: a
    sequence ends after emitting one (default: the config's eos ids; () disables). cache_dtype: "fp8"
    (FlashMLA's v4 format), "bf16" or "float32" (unquantized), or "auto" (fp8 where the format fits the config,
    else the model's dtype). index_cache: indexer keys "fp8" (132-byte rows), "compute" or "auto" (fp8 with the
    fp8 cache). attention_backend: "auto", "xla", "pallas", "interpret" (`inference.state.ATTENTION_BACKENDS`);
    `stats.cache_spec` records what was picked. speculative: None, "mtp" (the preview's MTP block: 1 draft,
    verify 2; `mtp=True` is the same) or "dspark" (the DSpark drafter: 5 drafts, verify 6). max_len: positions
    per sequence (default: longest prompt + max_new_tokens); max_batch: sequences at once (default: the number
    of prompts); chunk: prefill tokens per sequence per step. All arguments are checked before anything is
    allocated or computed. For queues of requests with their own settings use `Scheduler`.
    """
    cfg = model.config
    positive_int(max_new_tokens, "generate: max_new_tokens")
    prompts = _check_prompts(prompts, cfg.vocab_size)
    sampling = Sampling(temperature, top_k, top_p)
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"generate: seed must be an integer in [0, 2**32), got {seed!r}")
    stop = cfg.eos_token_ids if stop_tokens is None else tuple(int(s) for s in stop_tokens)
    if any(not 0 <= s < cfg.vocab_size for s in stop):
        raise ValueError(f"generate: stop_tokens must be ids in [0, {cfg.vocab_size}), got {list(stop)}")
    if speculative not in (None, "mtp", "dspark"):
        raise ValueError(f"generate: speculative must be None, 'mtp' or 'dspark', got {speculative!r}")
    if mtp and speculative == "dspark":
        raise ValueError("generate: mtp=True and speculative='dspark' name two different drafters")
    mtp = mtp or speculative == "mtp"
    dspark = speculative == "dspark"
    if mtp and model.mtp is None:
        raise ValueError("generate: speculative='mtp' needs a model with an MTP block (num_nextn_predict_layers=1)")
    if dspark and model.dspark is None:
        raise ValueError("generate: speculative='dspark' needs a model with a DSpark drafter (the 0731 / 0813 "
                         "checkpoints; config.dspark)")
    longest = max(len(p) for p in prompts)
    max_len = longest + max_new_tokens if max_len is None else max_len
    max_batch = len(prompts) if max_batch is None else max_batch
    spec = decode_state.make_spec(cfg, max_batch=max_batch, max_len=max_len, cache_dtype=cache_dtype, chunk=chunk,
                                  page_size=page_size, dtype=model.dtype, mtp=mtp, attention_backend=attention_backend,
                                  speculative="dspark" if dspark else None, index_cache=index_cache)
    if longest > max_len:
        raise ValueError(f"generate: a prompt has {longest} tokens, over max_len {max_len}")
    if longest + max_new_tokens > max_len:
        raise ValueError(f"generate: prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_len "
                         f"{max_len}")

    with CompileClock() as clock:
        sched = Scheduler(model, max_batch=spec.max_batch, max_len=max_len, cache_dtype=cache_dtype,
                          index_cache=index_cache, chunk=chunk, page_size=page_size,
                          speculative="mtp" if mtp else speculative, attention_backend=attention_backend,
                          stop_tokens=stop, seed=int(seed),
                          # every prompt has a slot from the start: prefill them together, as a static batch would
                          prefill_batch=spec.max_batch if len(prompts) <= spec.max_batch else None)
        for prompt in prompts:
            sched.submit(prompt, max_new_tokens, sampling=sampling)
        bar = tqdm(total=len(prompts), unit="seq", disable=not progress, desc="generate")
        results = []
        while sched.waiting or sched.running:
            finished = sched.step()
            results += finished
            bar.set_postfix(tokens=sched.stats.generated_tokens, refresh=False)
            bar.update(len(finished))
        bar.close()
    results.sort(key=lambda c: c.index)
    st = sched.stats
    stats = GenerationStats(
        prompt_tokens=sum(map(len, prompts)), generated_tokens=st.generated_tokens, prefill_s=st.prefill_s,
        decode_s=st.decode_s, compile_s=clock.seconds, decode_steps=st.steps - st.prefill_steps,
        cache_bytes=sum(x.nbytes for x in jax.tree.leaves(sched.state)), cache_spec=sched.spec, drafts=st.drafts,
        accepted=st.accepted, sequence_steps=st.sequence_steps, step_tokens=st.step_tokens,
        decode_tokens=st.decode_tokens, steps=st.steps)
    confidence = [c.confidence if c.confidence is not None else np.zeros((0, cfg.dspark.block_size), np.float32)
                  for c in results] if dspark else None
    return Generation(tokens=[c.tokens for c in results], stats=stats, confidence=confidence)
