"""Continuous batching over the paged state: every request gets exactly the tokens it gets alone (greedy,
float32 cache), whatever runs beside it — requests admitted while others decode, requests that wait for pool
pages, stop tokens, stop strings and per-request settings — with a fixed set of compiled steps, pages returned
on completion, and clear refusals of requests that can never run."""

import jax
import numpy as np
import pytest

import model1_jax as m1
from model1_jax.inference.clock import CompileClock
from model1_jax.text import ByteTokenizer
from tests import synthetic_dspark as sd
from tests.util import random_model

# Window 8; a CSA layer (m=4, top 3 entries), an HCA layer (m'=8) and the MTP block: every paged cache.
TINY = m1.Config.tiny().replace(num_hidden_layers=2, layer_types=(m1.CSA, m1.HCA),
                                mlp_layer_types=(m1.HASH_MOE, m1.MOE))
TOK = ByteTokenizer()  # the tiny vocabulary is 256 byte ids
# 3 slots; pages of 4 entries: a CSA page covers 16 positions, an HCA page 32. The pools hold 4 CSA pages and 3
# HCA pages, where every slot at max_len would need 3 × 3 and 3 × 2: requests wait for pages.
SCHED = dict(max_batch=3, max_len=44, cache_dtype="float32", chunk=8, page_size=4, tokenizer=TOK, stop_tokens=(),
             pool_pages={4: 4, 8: 3})
LENGTHS = [(6, 10), (19, 4), (1, 16), (13, 7), (3, 12), (25, 9), (9, 9), (30, 14)]  # (prompt, max_new_tokens)
PROMPTS = [np.random.default_rng(i).integers(0, TINY.vocab_size, n).tolist() for i, (n, _) in enumerate(LENGTHS)]
SAMPLED = dict(temperature=0.9, top_k=40, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def model():
    return random_model(TINY, seed=11)


def run(model, requests, **kw):
    sched = m1.Scheduler(model, **{**SCHED, **kw})
    for prompt, max_new, settings in requests:
        sched.submit(prompt, max_new, **settings)
    return sched, sched.run()


@pytest.fixture(scope="module")
def alone(model):
    """Each request with no stop rule, alone in the same scheduler configuration (same compiled steps)."""
    out = []
    for i, (prompt, (_, max_new)) in enumerate(zip(PROMPTS, LENGTHS)):
        settings = SAMPLED if i == 3 else {}
        out.append(run(model, [(prompt, max_new, settings)])[1][0].tokens)
    return out


def stop_rules(alone):
    """Per-request settings: request 1 stops at a token it emits, request 4 at a string it writes (two printable
    bytes), request 3 samples. Returns (settings per request, the tokens each must then produce alone)."""
    settings = [{} for _ in PROMPTS]
    want = [list(t) for t in alone]
    stop = alone[1][2]
    settings[1] = dict(stop_tokens=[stop])
    want[1] = alone[1][:alone[1].index(stop) + 1]
    settings[3] = SAMPLED
    tokens = alone[4]
    k = next(k for k in range(len(tokens) - 1) if all(32 <= t < 127 for t in tokens[k:k + 2]))
    text = TOK.decode(tokens[k:k + 2])
    settings[4] = dict(stop_strings=[text])
    n = next(n for n in range(1, len(tokens) + 1) if text in TOK.decode(tokens[:n]))  # the first completion
    want[4] = tokens[:n]
    return settings, want, text


@pytest.mark.parametrize("prefill_batch", [2, 3], ids=["chunks-apart", "one-call"])
def test_batch_equals_alone(model, alone, prefill_batch):
    """prefill_batch 2 (default): prompt chunks for two slots, then a decode step; 3 = max_batch: prompt chunks
    and decode tokens of every slot in one call."""
    settings, want, stop_text = stop_rules(alone)
    sched = m1.Scheduler(model, **SCHED, prefill_batch=prefill_batch)
    for i, (prompt, (_, max_new), s) in enumerate(zip(PROMPTS, LENGTHS, settings)):
        sched.submit(prompt, max_new, id=f"r{i}", **s)
    waited_for_pages = admitted_while_decoding = False
    order = []
    while sched.waiting or sched.running:
        sched._admit()  # what step() does first, observed here
        slots = [slot for slot in sched._slots if slot is not None]
        admitted_while_decoding |= any(s.fed == 0 for s in slots) and any(not s.prefilling for s in slots)
        waited_for_pages |= sched.waiting > 0 and len(slots) < SCHED["max_batch"]  # a slot is free, pages are not
        order += [c.index for c in sched.step()]
        sched.pages.check()
    results = sched.run()
    assert [c.tokens for c in results] == want
    assert [c.index for c in results] == list(range(len(PROMPTS))) and order != sorted(order)  # finish order differs
    assert [c.id for c in results] == [f"r{i}" for i in range(len(PROMPTS))]
    assert results[1].finish_reason == "stop" and results[1].stop == want[1][-1]
    assert results[4].stop == stop_text and results[4].text + stop_text == TOK.decode(want[4])[-len(
        results[4].text + stop_text):]
    assert stop_text not in results[4].text
    assert results[0].finish_reason == "length" and results[0].text == TOK.decode(want[0])
    assert waited_for_pages and admitted_while_decoding
    assert sched.pages.in_use() == {4: 0, 8: 0}  # every page returned


def test_no_recompilation_as_requests_come_and_go(model, alone):
    """Both step shapes ([2 slots, chunk] prompt chunks, [3 slots, 1] decode) were compiled by the fixtures; a new
    scheduler and new requests compile no step."""
    order = list(range(len(PROMPTS)))[::-1]
    with CompileClock() as clock:
        _, results = run(model, [(PROMPTS[i], LENGTHS[i][1], SAMPLED if i == 3 else {}) for i in order])
    assert [f for f in clock.compiled if "step" in f] == [], clock.compiled
    assert [c.tokens for c in results] == [alone[i] for i in order]


def test_mtp_in_the_batcher_equals_plain_greedy(model, alone):
    greedy = [i for i in range(len(PROMPTS)) if i != 3]
    sched, results = run(model, [(PROMPTS[i], LENGTHS[i][1], {}) for i in greedy], mtp=True)
    assert [c.tokens for c in results] == [alone[i] for i in greedy]
    assert sched.stats.drafts > 0


@pytest.mark.parametrize("prefill_batch", [1, 3], ids=["chunks-apart", "all-slots"])
def test_dspark_in_the_batcher_equals_plain_greedy(prefill_batch):
    """The DSpark drafter (G = 5, a 6-token verify) driving the batcher, with its Markov head set to the plain
    outputs' bigrams so that most drafts are accepted and some rejected: the plain greedy tokens of every request,
    pages returned, and a second scheduler compiles no step."""
    cfg = TINY.replace(num_nextn_predict_layers=0, dspark=m1.DSparkConfig(5, 255, (0, 1), 8))
    model = random_model(cfg, seed=11)
    greedy = [i for i in range(len(PROMPTS)) if i != 3]
    requests = [(PROMPTS[i], LENGTHS[i][1], {}) for i in greedy]
    want = [c.tokens for c in run(model, requests, prefill_batch=prefill_batch)[1]]
    sd.agree(model, [PROMPTS[i] + w for i, w in zip(greedy, want)])
    sched, results = run(model, requests, speculative="dspark", prefill_batch=prefill_batch)
    assert [c.tokens for c in results] == want
    st = sched.stats
    assert 0 < st.accepted < st.drafts and st.step_tokens / st.sequence_steps > 2, st
    assert all(c.confidence.shape[1] == 5 and len(c.confidence) > 0 for c in results)
    assert sched.pages.in_use() == {4: 0, 8: 0}
    with CompileClock() as clock:
        again = run(model, requests[::-1], speculative="dspark", prefill_batch=prefill_batch)[1]
    assert [f for f in clock.compiled if "step" in f] == [], clock.compiled
    assert [c.tokens for c in again] == want[::-1]


def test_never_fits_and_bad_requests(model):
    sched = m1.Scheduler(model, **{**SCHED, "tokenizer": None})
    with pytest.raises(ValueError, match=r"request 0 can never run: prompt \(40 tokens\) \+ max_new_tokens \(5\) "
                                         r"= 45 positions, over the scheduler's max_len 44"):
        sched.submit([1] * 40, 5)
    small = m1.Scheduler(model, **{**SCHED, "pool_pages": {4: 2, 8: 4}})
    with pytest.raises(ValueError, match=r"can never run: it needs 3 pages of the m=4 pool .* at most 2"):
        small.submit([1] * 30, 10)
    with pytest.raises(ValueError, match="stop_strings need a tokenizer"):
        sched.submit([1, 2], 3, stop_strings=["x"])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 256\)"):
        sched.submit([1, 256], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sched.submit([1, 2], 0)
    with pytest.raises(ValueError, match="top_p"):
        sched.submit([1, 2], 3, top_p=2.0)
    assert sched.waiting == 0 and small.waiting == 0  # nothing was queued
    with pytest.raises(ValueError, match="pool_pages needs one entry per compression rate"):
        m1.Scheduler(model, **{**SCHED, "pool_pages": {4: 2}})


def test_memory_report_shows_the_pools(model):
    sched = m1.Scheduler(model, **SCHED)
    report = sched.memory_report()
    assert [(p.rate, p.pages, p.in_use) for p in report.pools] == [(4, 4, 0), (8, 3, 0)]
    assert report.total == sum(x.nbytes for x in jax.tree.leaves(sched.state))
    assert "pool m=4: 4 pages of 16 tokens" in str(report)
