"""Text generation: prefill, then one compiled step per token (or per verified draft with MTP).

    gen = m1.generate(model, [[5, 7, 9], [3]], max_new_tokens=32)          # greedy
    gen.tokens        # generated ids per prompt (up to and including a stop token)
    gen.stats         # timings, throughput, cache bytes, MTP / DSpark acceptance

MTP speculative decoding (`mtp=True`): each step feeds the pending token and the MTP block's draft of the
next one (s_q = 2), accepts the draft by the speculative-sampling rule (in greedy mode: iff it equals the
argmax), then lets the MTP block draft again from the last kept position. A rejected draft is undone by
resetting the sequence's length: every cache slot it wrote (window ring, compressor buffers, entries) is
rewritten before any later query can read it (see `decode_state`), so rollback is exact.

DSpark speculative decoding (`speculative="dspark"`, the 0731 / 0813 checkpoints' drafter): each step drafts
G = 5 tokens and verifies G + 1 = 6 in one target call (`inference.speculative`); `stats.mean_accepted_length`
is the tokens emitted per sequence and step (1 to 6), `gen.confidence` the drafter's confidence per draft.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from model1_jax.common import check_token_ids, positive_int
from model1_jax.inference import sampling as sampling_lib
from model1_jax.inference import sharded as sharded_decode
from model1_jax.inference import speculative as speculative_lib
from model1_jax.inference import state as decode_state
from model1_jax.inference import steps as decode
from model1_jax.inference.sampling import Sampling
from model1_jax.model.transformer import Model1
from model1_jax.parallel.distributed import to_host

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_BACKEND_COMPILE = _COMPILE_EVENTS[-1]


class CompileClock:
    """Context manager adding up the seconds JAX spends tracing, lowering and compiling while it is open,
    and listing the functions compiled (from `jax.monitoring` events)."""

    def __init__(self):
        self.seconds = 0.0
        self.compiled: list[str] = []

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event in _COMPILE_EVENTS:
            self.seconds += duration
        if event == _BACKEND_COMPILE:
            self.compiled.append(str(kwargs.get("fun_name", "?")))

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listen)


@dataclasses.dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float  # wall time of the prefill, compilation excluded
    decode_s: float  # wall time of the decode loop, compilation excluded
    compile_s: float  # tracing + lowering + compiling during this call
    decode_steps: int
    cache_bytes: int
    cache_spec: decode_state.CacheSpec  # the state generation ran on (see `m1.memory_report`)
    drafts: int = 0  # MTP / DSpark drafts verified
    accepted: int = 0  # of which accepted
    sequence_steps: int = 0  # decode steps summed over the sequences active in each
    step_tokens: int = 0  # tokens those steps emitted (before truncation at max_new_tokens / a stop token)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / max(self.prefill_s, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens produced by the decode loop per second (the first token comes from the prefill)."""
        return max(self.generated_tokens - 1, 0) / max(self.decode_s, 1e-9)

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


# ----------------------------------------------------------------------------------------------------
# Compiled steps (the state is donated: caches are updated in place)


@jax.jit
def _first_token(logits_bv, key, sampling):
    return sampling_lib.draw(key, sampling_lib.probabilities(logits_bv, sampling))


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state",))
def _plain_step(graphdef, params, state, tokens_b, active_b, key, sampling):
    """Feeds one token per active sequence and draws the next: (tokens [b, 1], count [b], state)."""
    model = nnx.merge(graphdef, params)
    logits_bv, _, state = decode.chunk_step(model, state, tokens_b[:, None], active_b.astype(jnp.int32))
    next_b = sampling_lib.draw(key, sampling_lib.probabilities(logits_bv, sampling))
    return next_b[:, None], active_b.astype(jnp.int32), state


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("state", "draft_probs_bv"))
def _speculative_step(graphdef, params, state, tokens_b, draft_b, draft_probs_bv, has_draft_b, active_b, key,
                      sampling):
    """Verifies [pending, draft] (s_q = 2) for active sequences; `has_draft` false feeds the pending token alone.

    Returns (emitted [b, 2], emitted count [b], next pending [b], next draft [b], its distribution [b, v],
    accepted [b], state).
    """
    model = nnx.merge(graphdef, params)
    active_b = active_b.astype(jnp.int32)
    has_draft_b = has_draft_b & (active_b > 0)
    lengths_b, prev_streams = state.lengths, state.last_streams
    ids_bt = jnp.stack([tokens_b, draft_b], axis=1)
    streams_btcd, state = decode.model_step(model, state, ids_bt, active_b * (1 + has_draft_b))
    logits_btv = model.head(streams_btcd)
    target0_bv = sampling_lib.probabilities(logits_btv[:, 0], sampling)
    accept_key, plain_key, bonus_key, draft_key = jax.random.split(key, 4)
    accepted_b, corrected_b = sampling_lib.accept_draft(accept_key, target0_bv, draft_probs_bv, draft_b)
    accepted_b = accepted_b & has_draft_b
    first_b = jnp.where(has_draft_b, corrected_b, sampling_lib.draw(plain_key, target0_bv))
    bonus_b = sampling_lib.draw(bonus_key, sampling_lib.probabilities(logits_btv[:, 1], sampling))
    kept_b = active_b * (1 + accepted_b)  # positions kept: the pending token, and the draft if accepted
    last = decode.last_rows(streams_btcd, kept_b)[:, 0]
    state = state.replace(lengths=lengths_b + kept_b,
                          last_streams=jnp.where((kept_b > 0)[:, None, None], last, prev_streams).astype(
                              prev_streams.dtype))
    # The MTP block catches up to the last kept position; its next id is the token we are about to emit.
    ext_streams = jnp.concatenate([prev_streams[:, None].astype(streams_btcd.dtype), streams_btcd], axis=1)
    ext_ids = jnp.stack([tokens_b, first_b, bonus_b], axis=1)
    target_b = jnp.where(active_b > 0, lengths_b + kept_b, state.mtp_lengths)
    mtp_logits_bv, state = decode.mtp_step(model, state, ext_streams, ext_ids, lengths_b - 1, target_b)
    draft_probs_bv = sampling_lib.probabilities(mtp_logits_bv, sampling)
    next_draft_b = sampling_lib.draw(draft_key, draft_probs_bv)
    pending_b = jnp.where(accepted_b, bonus_b, first_b)
    return (jnp.stack([first_b, bonus_b], axis=1), kept_b, pending_b, next_draft_b, draft_probs_bv, accepted_b,
            state)


# ----------------------------------------------------------------------------------------------------
# Public API


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
             speculative: str | None = None) -> Generation:
    """Generates up to `max_new_tokens` tokens after each prompt.

    prompts: token-id lists (different lengths are fine). temperature 0 = greedy; top_k / top_p filter the
    sampled distribution. stop_tokens: a sequence ends after emitting one (default: the config's eos ids;
    () disables). cache_dtype: "fp8" (FlashMLA's v4 format), "bf16" or "float32" (unquantized), or "auto" (fp8
    where the format fits the config, else the model's dtype). attention_backend: "auto", "xla", "pallas",
    "interpret" (`inference.state.ATTENTION_BACKENDS`); `stats.cache_spec` records what was picked.
    speculative: None, "mtp" (the preview's MTP block: 1 draft, verify 2; `mtp=True` is the same) or "dspark"
    (the DSpark drafter: 5 drafts, verify 6). max_len: the state's capacity (default: longest
    prompt + max_new_tokens); max_batch: the state's batch (default: the number of prompts); chunk: prefill
    tokens per call. All arguments are checked before anything is allocated or computed.
    """
    cfg = model.config
    positive_int(max_new_tokens, "generate: max_new_tokens")
    prompts = _check_prompts(prompts, cfg.vocab_size)
    sampling = Sampling(temperature, top_k, top_p)
    if not isinstance(seed, (int, np.integer)):
        raise ValueError(f"generate: seed must be an integer, got {seed!r}")
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
                                  speculative="dspark" if dspark else None)
    if len(prompts) > spec.max_batch:
        raise ValueError(f"generate: {len(prompts)} prompts exceed max_batch {spec.max_batch}")
    if longest > max_len:
        raise ValueError(f"generate: a prompt has {longest} tokens, over max_len {max_len}")
    if longest + max_new_tokens > max_len:
        raise ValueError(f"generate: prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_len "
                         f"{max_len}")

    b = spec.max_batch
    ids = np.zeros((b, longest), np.int32)
    lengths = np.zeros((b,), np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        lengths[i] = len(p)
    key = jax.random.key(seed)
    graphdef, params = nnx.split(model)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = np.arange(b) >= len(prompts)
    drafts = accepted = steps = sequence_steps = step_tokens = 0
    confidence: list[list[np.ndarray]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts) * max_new_tokens, unit="tok", disable=not progress, desc="generate")

    def emit(row: int, token: int) -> None:
        outputs[row].append(token)
        bar.update(1)
        if token in stop or len(outputs[row]) >= max_new_tokens:
            done[row] = True
            bar.update(max_new_tokens - len(outputs[row]))

    state = sharded_decode.allocate(model.layout, cfg, spec)  # split by sequence under a layout
    cache_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    with CompileClock() as clock:
        t0 = time.perf_counter()
        logits_bv, state = decode.prefill(model, state, ids, lengths)
        sampling_arrays = sampling.arrays()
        pending = _first_token(logits_bv, jax.random.fold_in(key, 0), sampling_arrays)
        first = to_host(pending)
        prefill_s, prefill_compile = time.perf_counter() - t0, clock.seconds
        for row in range(len(prompts)):
            emit(row, int(first[row]))

        t0 = time.perf_counter()
        lengths_now = lengths.copy()  # tokens in the main caches (the pending token is not fed yet)
        if mtp:  # no draft before the first step: the MTP block has not seen the first generated token yet
            draft, draft_probs = jnp.zeros((b,), jnp.int32), jnp.zeros((b, cfg.vocab_size), jnp.float32)
            has_draft = np.zeros((b,), bool)
        while not done.all():
            steps += 1
            active = ~done
            step_key = jax.random.fold_in(key, steps)
            if dspark:
                emitted, count, pending, acc, conf, state = speculative_lib.compiled_dspark_step(
                    graphdef, params, state, pending, jnp.asarray(active), step_key, sampling_arrays)
                g = model.dspark.block_size
                drafts += int(np.minimum(max_len - lengths_now - 1, g)[active].sum())
                accepted += int(to_host(acc)[active].sum())
                conf = to_host(conf)
                for row in np.flatnonzero(active[:len(prompts)]):
                    confidence[row].append(conf[row])
            elif mtp:
                has_draft &= active & (lengths_now + 2 <= max_len)
                emitted, count, pending, draft, draft_probs, acc, state = _speculative_step(
                    graphdef, params, state, pending, draft, draft_probs, jnp.asarray(has_draft), jnp.asarray(active),
                    step_key, sampling_arrays)
                drafts += int(has_draft.sum())
                accepted += int(to_host(acc).sum())
                has_draft = active.copy()
            else:
                emitted, count, state = _plain_step(graphdef, params, state, pending, jnp.asarray(active), step_key,
                                                    sampling_arrays)
                pending = emitted[:, 0]
            emitted, count = to_host(emitted), to_host(count)
            lengths_now += count
            sequence_steps += int(active.sum())
            step_tokens += int(count[active].sum())
            for row in np.flatnonzero(active):
                for j in range(count[row]):
                    if not done[row]:
                        emit(row, int(emitted[row, j]))
        decode_s = time.perf_counter() - t0
    bar.close()
    decode_compile = clock.seconds - prefill_compile
    stats = GenerationStats(
        prompt_tokens=int(lengths.sum()), generated_tokens=sum(len(o) for o in outputs),
        prefill_s=max(prefill_s - prefill_compile, 0.0), decode_s=max(decode_s - decode_compile, 0.0),
        compile_s=clock.seconds, decode_steps=steps, cache_bytes=cache_bytes, cache_spec=spec, drafts=drafts,
        accepted=accepted, sequence_steps=sequence_steps, step_tokens=step_tokens)
    conf_out = [np.stack(c) if c else np.zeros((0, model.dspark.block_size)) for c in confidence] if dspark else None
    return Generation(tokens=outputs, stats=stats, confidence=conf_out)
