"""Continuous batching over a paged decode state (docs/serving.md §3).

    sched = m1.Scheduler(model, max_batch=8, max_len=4096, pool_tokens=8 * 1024, tokenizer=tok)
    sched.submit(prompt_ids, max_new_tokens=256, temperature=0.7, stop_strings=["\\n\\n"], id="q1")
    for done in sched.stream():        # completions as they finish
        print(done.id, done.text)
    results = sched.run()              # or: every completion, in submission order

Any number of requests; `max_batch` of them run at once, in slots. Each step is one or two compiled calls
(`batch_step`): slots whose prompt is not fed yet take a chunk of it, the others decode one token (or verify
one MTP draft, or DSpark's G drafts), idle slots feed nothing. A finished request's slot and pages are handed
to the next waiting request before the next step. Requests wait, in arrival order, until a slot and their pages
are free; one that could never fit is refused when submitted. Calls have a fixed set of shapes — `chunk` rows
when some slot is prefilling, 1 (2 with MTP) otherwise — so nothing compiles as requests come and go.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model1_jax.common import positive_int
from model1_jax.inference import sharded as sharded_decode
from model1_jax.inference import state as decode_state
from model1_jax.inference.batch_step import (
    StepInput,
    compiled_batch_step,
    compiled_dspark_batch_step,
    compiled_slots_step,
)
from model1_jax.inference.clock import CompileClock
from model1_jax.inference.memory import MemoryReport, memory_report
from model1_jax.inference.paging import PageTables
from model1_jax.inference.requests import Completion, Output, Request
from model1_jax.model.transformer import Model1
from model1_jax.parallel.distributed import to_host


@dataclasses.dataclass
class SchedulerStats:
    steps: int = 0
    prefill_steps: int = 0  # steps with some slot feeding a prompt chunk (`chunk` rows)
    prompt_tokens: int = 0  # fed so far
    generated_tokens: int = 0  # emitted so far
    decode_tokens: int = 0  # emitted by steps without prompt chunks
    finished: int = 0
    drafts: int = 0  # MTP / DSpark drafts verified
    accepted: int = 0
    sequence_steps: int = 0  # decode steps summed over the slots decoding in each
    step_tokens: int = 0  # tokens those emitted (before truncation at max_new_tokens / a stop)
    prefill_s: float = 0.0  # wall time of prefill steps, compilation excluded
    decode_s: float = 0.0  # wall time of the other steps, compilation excluded
    compile_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s


@dataclasses.dataclass
class _Slot:
    index: int
    output: Output
    seed: int
    stream: int
    fed: int = 0  # prompt tokens fed
    length: int = 0  # positions in the caches
    pending: int = 0  # emitted, not fed yet
    draft: int = 0  # the MTP block's guess of the token after `pending`

    @property
    def request(self) -> Request:
        return self.output.request

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.request.prompt)


def pool_pages_for(spec: decode_state.CacheSpec, rates: Sequence[int], *, pool_tokens: int | None = None,
                   pool_pages: Mapping[int, int] | None = None, parts: int = 1) -> dict[int, int]:
    """Pages of each rate's pool. Default: every slot at max_len (no request ever waits for pages).
    `pool_tokens`: enough pages for any max_batch requests holding that many tokens in total — ⌈tokens / (rate ·
    page_size)⌉ plus max_batch − 1 for the per-request rounding, capped at the default. Rounded up to `parts`."""
    if pool_pages is not None and sorted(pool_pages) != list(rates):
        raise ValueError(f"scheduler: pool_pages needs one entry per compression rate {list(rates)}, got "
                         f"{sorted(pool_pages)}")
    pages = {}
    for rate in rates:
        full = spec.max_batch * spec.table_width(rate)
        if pool_pages is not None:
            n = positive_int(pool_pages[rate], f"scheduler: pool_pages[{rate}]")
        elif pool_tokens is not None:
            n = min(full, -(-pool_tokens // (rate * spec.page_size)) + spec.max_batch - 1)
        else:
            n = full
        pages[rate] = -(-max(n, 1) // parts) * parts
    return pages


class Scheduler:
    """Continuous batching of generation requests over one paged decode state (see the module docstring).

    max_batch: slots (requests running at once). max_len: the most positions one request may use (prompt +
    max_new_tokens). pool_tokens / pool_pages: the size of the shared page pools (`pool_pages_for`).
    tokenizer: anything with `decode(ids) -> str`; needed for stop strings and fills `Completion.text`.
    stop_tokens: the default stop ids of requests that give none (default: the config's eos ids). seed: the
    random stream of requests without their own seed. prefill_batch: slots given a prompt chunk per step
    (default 1: a refill rarely finds a second slot prefilling, and a padded row costs a real one; max_batch puts
    prompt chunks and decode tokens of every slot in one call). speculative: None, "mtp" (`mtp=True` is the same:
    the MTP block's one draft, verified in the decode call) or "dspark" (the DSpark drafter: G drafts verified in
    a G + 1-token call; prompt chunks then always run in calls of their own). The other arguments are
    `make_spec`'s.
    """

    def __init__(self, model: Model1, *, max_batch: int, max_len: int, pool_tokens: int | None = None,
                 pool_pages: Mapping[int, int] | None = None, cache_dtype: str = "auto", index_cache: str = "auto",
                 chunk: int = 64, page_size: int = 64, mtp: bool = False, attention_backend: str = "auto",
                 tokenizer: Any = None, stop_tokens: Sequence[int] | None = None, seed: int = 0,
                 prefill_batch: int | None = None, speculative: str | None = None):
        cfg = self.config = model.config
        if speculative not in (None, "mtp", "dspark"):
            raise ValueError(f"scheduler: speculative must be None, 'mtp' or 'dspark', got {speculative!r}")
        if mtp and speculative == "dspark":
            raise ValueError("scheduler: mtp=True and speculative='dspark' name two different drafters")
        mtp = mtp or speculative == "mtp"
        if mtp and model.mtp is None:
            raise ValueError("scheduler: speculative='mtp' needs a model with an MTP block "
                             "(num_nextn_predict_layers=1)")
        if speculative == "dspark" and model.dspark is None:
            raise ValueError("scheduler: speculative='dspark' needs a model with a DSpark drafter (the 0731 / 0813 "
                             "checkpoints; config.dspark)")
        if pool_tokens is not None:
            positive_int(pool_tokens, "scheduler: pool_tokens")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ValueError(f"scheduler: seed must be an integer in [0, 2**32), got {seed!r}")
        kw = dict(max_batch=max_batch, max_len=max_len, cache_dtype=cache_dtype, chunk=chunk, page_size=page_size,
                  dtype=model.dtype, mtp=mtp, attention_backend=attention_backend, index_cache=index_cache,
                  speculative="dspark" if speculative == "dspark" else None)
        static = decode_state.make_spec(cfg, **kw)  # checks every argument before anything is allocated
        rates = decode_state.compress_rates(cfg, mtp)
        parts = sharded_decode.batch_shards(model.layout, max_batch)
        pages = pool_pages_for(static, rates, pool_tokens=pool_tokens, pool_pages=pool_pages, parts=parts)
        self.spec = decode_state.make_spec(cfg, **kw, pool_pages=pages)
        self.tokenizer = tokenizer
        self.stop_tokens = cfg.eos_token_ids if stop_tokens is None else tuple(int(s) for s in stop_tokens)
        self.seed = int(seed)
        # Under a sharding layout every call takes the whole batch: a slot's pages belong to its own part.
        self.prefill_batch = max_batch if model.layout is not None else min(
            max_batch, positive_int(prefill_batch, "scheduler: prefill_batch") if prefill_batch else 1)
        self.pages = PageTables(pages, {r: self.spec.table_width(r) for r in rates}, slots=max_batch,
                                page_size=page_size, parts=parts)
        self.state = sharded_decode.allocate(model.layout, cfg, self.spec)
        self.draft_probs = jnp.zeros((max_batch, cfg.vocab_size), jnp.float32)
        self.graphdef, self.params = nnx.split(model)
        self.stats = SchedulerStats()
        self._waiting: collections.deque[tuple[int, Request]] = collections.deque()
        self._slots: list[_Slot | None] = [None] * max_batch
        self._done: dict[int, Completion] = {}
        self._submitted = 0

    # -- requests ----------------------------------------------------------------------------------------

    def submit(self, prompt: Sequence[int] | Request, max_new_tokens: int | None = None, **settings) -> int:
        """Queues a request; returns its index (the order of `run()`'s results).

        `prompt` is token ids (with `max_new_tokens` and optional `temperature`, `top_k`, `top_p`, `sampling`,
        `stop_tokens`, `stop_strings`, `seed`, `id`: see `Request`) or a `Request`. A request that can never
        run is a ValueError (`check`), and nothing is queued."""
        request = self.check(prompt, max_new_tokens, **settings)
        self._waiting.append((self._submitted, request))
        self._submitted += 1
        return self._submitted - 1

    def check(self, prompt: Sequence[int] | Request, max_new_tokens: int | None = None, *, what: str | None = None,
              **settings) -> Request:
        """The checked `Request` `submit` would queue, or a ValueError naming the problem: bad ids or settings,
        longer than max_len, more pages than a pool holds, stop strings without a tokenizer."""
        if what is None:
            label = settings.get("id", prompt.id if isinstance(prompt, Request) else None)
            what = f"request {self._submitted}" + ("" if label is None else f" (id {label!r})")
        if isinstance(prompt, Request):
            if max_new_tokens is not None or settings:
                raise ValueError(f"{what}: pass the settings inside the Request")
            r = prompt
            request = Request.make(r.prompt, r.max_new_tokens, vocab_size=self.config.vocab_size, sampling=r.sampling,
                                   stop_tokens=r.stop_tokens, stop_strings=r.stop_strings, seed=r.seed, id=r.id,
                                   what=what)
        else:
            if max_new_tokens is None:
                raise ValueError(f"{what}: max_new_tokens is required")
            request = Request.make(prompt, max_new_tokens, vocab_size=self.config.vocab_size, what=what, **settings)
        if request.reserve > self.spec.max_len:
            raise ValueError(f"{what} can never run: prompt ({len(request.prompt)} tokens) + max_new_tokens "
                             f"({request.max_new_tokens}) = {request.reserve} positions, over the scheduler's "
                             f"max_len {self.spec.max_len}")
        why = self.pages.never_fits(request.reserve)
        if why:
            raise ValueError(f"{what} can never run: {why}; give the scheduler a larger pool")
        if request.stop_strings and self.tokenizer is None:
            raise ValueError(f"{what}: stop_strings need a tokenizer (Scheduler(..., tokenizer=...))")
        if request.seed is not None and request.seed >= 2**32:
            raise ValueError(f"{what}: seed must be below 2**32, got {request.seed}")
        return request

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots)

    def pool_use(self) -> dict[int, tuple[int, int]]:
        """compress rate -> (pages in use, pages)."""
        return {rate: (pool.in_use, pool.pages) for rate, pool in self.pages.pools.items()}

    def memory_report(self) -> MemoryReport:
        """The state's bytes (`memory_report`) with each pool's pages in use now."""
        return memory_report(self.config, self.spec, self.pages.in_use())

    # -- running ---------------------------------------------------------------------------------------

    def _admit(self) -> None:
        """Fills free slots with waiting requests, in arrival order, while their pages fit."""
        while self._waiting:
            index, request = self._waiting[0]
            free = [s for s, slot in enumerate(self._slots) if slot is None and self.pages.fits(s, request.reserve)]
            if not free:
                return  # the oldest request waits for a slot or pages; later ones wait behind it
            self._waiting.popleft()
            self.pages.admit(free[0], request.reserve)
            stop = self.stop_tokens if request.stop_tokens is None else request.stop_tokens
            explicit = request.seed is not None
            self._slots[free[0]] = _Slot(index, Output(request, stop, self.tokenizer),
                                         seed=request.seed if explicit else self.seed, stream=0 if explicit else index)

    def _inputs(self, rows: list[int], t: int, prefill: bool, decode: bool) -> tuple[StepInput, np.ndarray]:
        """Step inputs for slots `rows` (in that order): prompt chunks of prefilling slots if `prefill`, the pending
        token (and draft) of decoding slots if `decode`; any other row feeds nothing. DSpark decode rows carry
        the pending token alone and n_new = 1 + the drafts the slot's reserve has room for."""
        b = len(rows)
        ids = np.zeros((b, t), np.int32)
        n_new, fresh, emit, has_draft = (np.zeros(b, np.int32), np.zeros(b, bool), np.zeros(b, bool),
                                         np.zeros(b, bool))
        temperature, top_k, top_p = np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b, np.float32)
        seed, stream, counter = np.zeros(b, np.uint32), np.zeros(b, np.uint32), np.zeros(b, np.int32)
        for r, s in enumerate(rows):
            slot = self._slots[s]
            if slot is None or not (prefill if slot.prefilling else decode):
                continue
            request = slot.request
            if slot.prefilling:
                chunk = request.prompt[slot.fed:slot.fed + t]
                ids[r, :len(chunk)], n_new[r] = chunk, len(chunk)
                fresh[r] = slot.fed == 0
                emit[r] = slot.fed + len(chunk) == len(request.prompt)
            elif self.spec.dspark:  # drafts occupy the positions after the pending token, within the reserve
                ids[r, 0], emit[r] = slot.pending, True
                n_new[r] = min(self.spec.drafts + 1, request.reserve - slot.length)
            else:
                # A draft occupies the position after the pending token: only while that stays within the reserve.
                has_draft[r] = self.spec.mtp and slot.length + 2 <= request.reserve
                ids[r, 0] = slot.pending
                if has_draft[r]:
                    ids[r, 1] = slot.draft
                n_new[r], emit[r] = 1 + has_draft[r], True
            sampling = request.sampling
            temperature[r], top_k[r], top_p[r] = sampling.temperature, sampling.top_k, sampling.top_p
            seed[r], stream[r], counter[r] = slot.seed, slot.stream, len(slot.output.tokens)
        tables = {rate: table[rows] for rate, table in self.pages.tables.items()} if self.spec.paged else {}
        inp = StepInput(ids_bt=ids, n_new_b=n_new, fresh_b=fresh, emit_b=emit, has_draft_b=has_draft, tables=tables,
                        temperature_b=temperature, top_k_b=top_k, top_p_b=top_p, seed_b=seed, stream_b=stream,
                        counter_b=counter)
        return jax.tree.map(jnp.asarray, inp), n_new, has_draft

    def step(self) -> list[Completion]:
        """Admits waiting requests, runs the compiled step(s) of one iteration, and returns the requests it
        finished: with `prefill_batch` < max_batch, a chunk for up to that many prefilling slots (the others not
        computed) and then one token for every decoding slot; otherwise one call doing both for every slot."""
        self._admit()
        if self.running == 0:
            if self._waiting:  # cannot happen: submit() refuses what can never fit
                raise RuntimeError("scheduler: requests wait but none can be admitted into an empty batch")
            return []
        b, chunk, decode_t = self.spec.max_batch, self.spec.chunk, (2 if self.spec.mtp else 1)
        prefilling = [s for s, slot in enumerate(self._slots) if slot is not None and slot.prefilling]
        if self.spec.dspark:  # prompt chunks, then the draft-verify call of the decoding slots
            finished = []
            if prefilling:
                finished += self._prefill(prefilling, chunk)
            if any(slot is not None and not slot.prefilling for slot in self._slots):
                finished += self._run_dspark()
            return finished
        if self.prefill_batch == b:  # one call: prompt chunks and decode tokens for every slot
            return self._run(list(range(b)), chunk if prefilling else decode_t, prefill=True, decode=True, sub=False)
        finished = []
        if prefilling:
            finished += self._prefill(prefilling, chunk)
        if any(slot is not None and not slot.prefilling for slot in self._slots):
            finished += self._run(list(range(b)), decode_t, prefill=False, decode=True, sub=False)
        return finished

    def _prefill(self, prefilling: list[int], chunk: int) -> list[Completion]:
        """A prompt chunk for up to `prefill_batch` prefilling slots, oldest request first."""
        b = self.spec.max_batch
        if self.prefill_batch == b:
            return self._run(list(range(b)), chunk, prefill=True, decode=False, sub=False)
        chosen = sorted(prefilling, key=lambda s: self._slots[s].index)[:self.prefill_batch]
        pad = [s for s in range(b) if s not in chosen][:self.prefill_batch - len(chosen)]  # rows feeding nothing
        return self._run(chosen + pad, chunk, prefill=True, decode=False, sub=True)

    def _run_dspark(self) -> list[Completion]:
        """One DSpark call over every decoding slot (the others feed nothing)."""
        t0 = time.perf_counter()
        rows = list(range(self.spec.max_batch))
        with CompileClock() as clock:
            inp, n_new, _ = self._inputs(rows, 1, prefill=False, decode=True)
            out, self.state = compiled_dspark_batch_step(self.graphdef, self.params, self.state, inp)
            tokens, count, accepted, confidence = (to_host(x) for x in (out.tokens_bt, out.count_b, out.accepted_b,
                                                                        out.confidence_bg))
        st = self.stats
        st.steps += 1
        st.compile_s += clock.seconds
        st.decode_s += time.perf_counter() - t0 - clock.seconds
        finished = []
        for s in rows:
            slot = self._slots[s]
            if slot is None or not n_new[s]:
                continue
            st.drafts += int(n_new[s]) - 1
            st.accepted += int(accepted[s])
            st.sequence_steps += 1
            st.step_tokens += int(count[s])
            slot.length += int(count[s])
            slot.output.confidence.append(confidence[s])
            finished += self._emit(s, tokens[s, :count[s]].tolist(), decode=True)
        return finished

    def _emit(self, s: int, emitted: list[int], decode: bool) -> list[Completion]:
        """Hands a slot's emitted tokens to its output; the completion if that ends the request."""
        slot, st = self._slots[s], self.stats
        before = len(slot.output.tokens)
        done = any(slot.output.add(tok) for tok in emitted)  # stops at the token that ends the request
        added = len(slot.output.tokens) - before
        st.generated_tokens += added
        st.decode_tokens += added if decode else 0
        if done:
            return [self._finish(s)]
        if emitted:
            slot.pending = emitted[-1]
        return []

    def _run(self, rows: list[int], t: int, *, prefill: bool, decode: bool, sub: bool) -> list[Completion]:
        t0 = time.perf_counter()
        with CompileClock() as clock:
            inp, n_new, has_draft = self._inputs(rows, t, prefill, decode)
            args = (self.graphdef, self.params, self.state)
            if sub:
                out, self.draft_probs, self.state = compiled_slots_step(*args, jnp.asarray(rows, jnp.int32), inp,
                                                                        self.draft_probs)
            else:
                out, self.draft_probs, self.state = compiled_batch_step(*args, inp, self.draft_probs)
            tokens, count, accepted, draft = (to_host(x) for x in (out.tokens_b2, out.count_b, out.accepted_b,
                                                                   out.draft_b))
        wall = time.perf_counter() - t0 - clock.seconds
        st = self.stats
        fed_prompt = any(self._slots[s] is not None and self._slots[s].prefilling and n_new[r] > 0
                         for r, s in enumerate(rows))
        st.steps += 1
        st.compile_s += clock.seconds
        st.prefill_steps += fed_prompt
        if fed_prompt:
            st.prefill_s += wall
        else:
            st.decode_s += wall
        finished = []
        for r, s in enumerate(rows):
            slot = self._slots[s]
            if slot is None or not n_new[r]:
                continue
            if slot.prefilling:
                slot.fed += int(n_new[r])
                slot.length += int(n_new[r])
                st.prompt_tokens += int(n_new[r])
            else:
                slot.length += 1 + bool(accepted[r])  # a rejected draft's position is rolled back
                st.drafts += bool(has_draft[r])
                st.accepted += bool(accepted[r])
            emitted = tokens[r, :count[r]].tolist()
            if not fed_prompt:
                st.sequence_steps += 1
                st.step_tokens += len(emitted)
            if emitted:
                slot.draft = int(draft[r])
            finished += self._emit(s, emitted, decode=not fed_prompt)
        return finished

    def _finish(self, s: int) -> Completion:
        slot = self._slots[s]
        self._slots[s] = None
        self.pages.release(s)
        done = slot.output.completion(slot.index)
        self._done[slot.index] = done
        self.stats.finished += 1
        return done

    def stream(self) -> Iterator[Completion]:
        """Runs until every submitted request is done, yielding each completion as it finishes (requests
        submitted meanwhile are included)."""
        while self._waiting or self.running:
            yield from self.step()

    def run(self) -> list[Completion]:
        """Runs every submitted request to completion; returns all completions in submission order."""
        for _ in self.stream():
            pass
        return [self._done[i] for i in range(self._submitted)]

