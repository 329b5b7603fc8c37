"""DSpark speculative decoding (docs/dspark.md §8): 5 drafts, a 6-token verify, lossless acceptance, exact rollback.

* greedy `generate(..., speculative="dspark")` emits exactly plain greedy decoding's tokens, for prompts shorter
  and longer than the window, with the checkpoint's (random) drafter and with one made to agree with the target
  (its Markov head set to the target's own greedy bigrams), which accepts most drafts;
* sampled speculation draws from the target's distribution: on a 16-token vocabulary the first three tokens
  of 3,000 sequences match the exact marginals (computed by full forwards) within 5 standard errors;
* a step that rejects drafts leaves the decode state's live part bit-identical to feeding only the kept tokens,
  and both states continue identically;
* through the Pallas kernel (interpret mode, FP8 cache) drafting and the s_q = 6 verify keep greedy output too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.inference import sampling, speculative, steps
from model1_jax.inference.state import allocate, compressor_slots
from tests import synthetic_dspark as sd
from tests.util import random_model

PROMPTS = [[7], list(range(30, 36)), list(range(100, 113))]  # shorter and longer than the window (8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "flash-0731"
    sd.write_dspark_checkpoint(path, seed=5)
    return m1.from_pretrained(path, dtype=jnp.float32)


def run(model, prompts, n, **kw):
    return m1.generate(model, prompts, n, cache_dtype="float32", stop_tokens=(), chunk=8, **kw)


def test_greedy_speculation_emits_plain_greedy_tokens(model):
    plain = run(model, PROMPTS, 24)
    random = run(model, PROMPTS, 24, speculative="dspark")
    assert random.tokens == plain.tokens
    assert random.stats.mean_accepted_length >= 1.0 and len(random.confidence) == 3
    assert random.confidence[0].shape[1] == 5 and ((random.confidence[0] > 0) & (random.confidence[0] < 1)).all()
    sd.agree(model, [p + t for p, t in zip(PROMPTS, plain.tokens)])
    agreeing = run(model, PROMPTS, 24, speculative="dspark")
    assert agreeing.tokens == plain.tokens
    stats = agreeing.stats
    assert 0 < stats.accepted < stats.drafts  # both paths taken: repeated tokens with other successors reject
    assert stats.mean_accepted_length > 2.5 and stats.decode_steps < plain.stats.decode_steps / 2
    print(f"greedy DSpark, agreeing drafter: mean accepted length {stats.mean_accepted_length:.2f}, "
          f"{stats.accepted}/{stats.drafts} drafts, {stats.decode_steps} steps vs {plain.stats.decode_steps}; "
          f"random drafter: {random.stats.mean_accepted_length:.2f}")


def live(state, config) -> dict:
    """Everything a later call can read from a decode state (float32 caches): per sequence, the window rows of
    the last W positions, the complete compressed entries, the buffered positions a future window pools, the
    drafter rings' last W positions. Slots past the length hold leftovers that are rewritten before any read."""
    spec, out = state.spec, {"lengths": np.asarray(state.lengths)}
    h, w = spec.head_dim, spec.window
    for b, length in enumerate(out["lengths"]):
        recent = np.arange(max(0, length - w), length)
        for i, (ls, kind) in enumerate(zip(state.layers, config.layer_types)):
            out[b, i, "window"] = np.asarray(ls.window).reshape(-1, h)[b * spec.ring + recent % spec.ring]
            if kind == m1.SLIDING:
                continue
            rate = config.compress_rate(kind)
            cap, complete = spec.entries(rate), length // rate
            out[b, i, "entries"] = np.asarray(ls.entries).reshape(-1, h)[b * cap: b * cap + complete]
            overlap = kind == m1.CSA
            buffered = np.arange(max(0, complete * rate - overlap * rate), length)
            slots = buffered % compressor_slots(spec, rate, overlap)
            for name, cs in (("compressor", ls.compressor), ("index_compressor", ls.index_compressor)):
                if cs is not None:
                    out[b, i, name] = (np.asarray(cs.kv)[b, slots], np.asarray(cs.gate)[b, slots])
            if ls.index_keys is not None:
                out[b, i, "index_keys"] = np.asarray(ls.index_keys)[b, :complete]
        for s, ring in enumerate(state.dspark):
            out[b, "ring", s] = np.asarray(ring).reshape(-1, h)[b * spec.dspark_slots + recent % w]
    return out


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(*(v if isinstance(v, tuple) else (v,) for v in (a[key], b[key]))):
            np.testing.assert_array_equal(x, y, err_msg=str(key))


def test_rejected_drafts_leave_the_state_as_if_never_drafted(model):
    """One step where the drafter is right a few times then wrong (its Markov head holds the target's greedy
    bigrams, one of them broken), against a state that was only ever fed the kept tokens. Shapes as in the
    greedy test's generate() calls, so the compiled steps are reused."""
    lengths = np.array([len(p) for p in PROMPTS])
    plain = run(model, PROMPTS, 24)
    sequences = [p + t for p, t in zip(PROMPTS, plain.tokens)]
    sd.agree(model, sequences, wrong_after=lengths[2] + 2)  # third sequence: d3 wrong if d1, d2 are right
    prompts = np.array([p + [0] * (13 - len(p)) for p in PROMPTS])

    def fresh():
        spec = m1.make_spec(model.config, max_batch=3, max_len=37, cache_dtype="float32", chunk=8,
                            speculative="dspark")
        return steps.prefill(model, allocate(model.config, spec), prompts, lengths)[1]

    graphdef, params = nnx.split(model)
    pending = jnp.asarray([t[0] for t in plain.tokens])
    verify = jnp.full((3,), 6, jnp.int32)  # the pending token and 5 drafts each
    greedy = tuple(jnp.broadcast_to(jnp.asarray(x), (3,)) for x in sampling.Sampling().arrays())

    def step(state, pending, t):
        keys = jax.random.split(jax.random.key(t), 3)
        return speculative.compiled_dspark_step(graphdef, params, state, pending, verify, keys, greedy)

    emitted, count, nxt, _, _, drafted = step(fresh(), pending, 0)
    count = np.asarray(count)
    assert count.max() > 1 and count.min() < 6, count  # drafts kept, and drafts rejected
    kept = np.zeros((3, 13), np.int32)
    kept[:, 0] = np.asarray(pending)
    for b in range(3):
        kept[b, 1:count[b]] = np.asarray(emitted)[b, :count[b] - 1]
        assert list(kept[b, :count[b]]) + [int(nxt[b])] == sequences[b][lengths[b]:lengths[b] + count[b] + 1]
    _, fed = steps.prefill(model, fresh(), kept, count)  # the kept tokens alone, through prefill's own call
    assert_same(live(drafted, model.config), live(fed, model.config))
    for t in range(2):  # and both continue identically
        a, b = step(drafted, nxt, t), step(fed, nxt, t)
        for x, y in zip(a[:5], b[:5]):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        nxt, drafted, fed = a[2], a[5], b[5]
        assert_same(live(drafted, model.config), live(fed, model.config))


@pytest.mark.slow
def test_sampled_speculation_matches_the_target_distribution():
    cfg = m1.Config.tiny().replace(vocab_size=16, num_nextn_predict_layers=0,
                                   dspark=m1.DSparkConfig(block_size=5, noise_token_id=15,
                                                          target_layer_ids=(1, 2, 3), markov_rank=4))
    model = random_model(cfg, seed=11, std=0.3)
    prompt, n = [3, 1, 4, 1, 5], 3000
    settings = dict(temperature=0.8, top_k=12, top_p=1.0)
    gen = m1.generate(model, [prompt] * n, 3, seed=2, stop_tokens=(), cache_dtype="float32", chunk=8,
                      speculative="dspark", **settings)
    assert 0 < gen.stats.accepted < gen.stats.drafts
    tokens = np.array(gen.tokens)

    # Exact marginals of the first three tokens under the same temperature / top-k, from one full forward over
    # every prefix (padded at the end to one length: causal, so the padding changes nothing before it).
    v, width = cfg.vocab_size, len(prompt) + 2
    prefixes = [prompt] + [prompt + [a] for a in range(v)] + [prompt + [a, b] for a in range(v) for b in range(v)]
    ids = np.array([p + [0] * (width - len(p)) for p in prefixes])
    logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    last = jnp.asarray([len(p) - 1 for p in prefixes])
    q = np.asarray(sampling.probabilities(logits[jnp.arange(len(prefixes)), last], sampling.Sampling(**settings)),
                   np.float64)
    p1 = q[0]
    p12 = p1[:, None] * q[1:1 + v]
    p3 = np.einsum("ab,abc->c", p12, q[1 + v:].reshape(v, v, v))
    for position, exact in enumerate([p1, p12.sum(0), p3]):
        observed = np.bincount(tokens[:, position], minlength=v) / n
        bound = 5 * np.sqrt(exact * (1 - exact) / n) + 1 / n
        assert (np.abs(observed - exact) <= bound).all(), (position, observed, exact)


def test_speculation_through_the_kernel_emits_plain_greedy_tokens():
    """Drafting (the block over ring + scratch slots) and the 6-token verify through the Pallas kernel (interpret
    mode, FP8 v4 cache): the tokens of plain greedy decoding through the same kernel. (Across the two backends
    bf16 rounding may break a near tie differently; within one backend speculation must not change a token.)"""
    cfg = m1.Config.tiny().replace(
        head_dim=512, qk_rope_head_dim=64, index_head_dim=128, num_attention_heads=16, num_hidden_layers=3,
        layer_types=(m1.SLIDING, m1.CSA, m1.HCA), mlp_layer_types=(m1.HASH_MOE, m1.MOE, m1.MOE),
        num_nextn_predict_layers=0, dspark=m1.DSparkConfig(5, 200, (0, 1, 2), 8))
    model = random_model(cfg, seed=3, std=0.05, dtype=jnp.bfloat16)
    prompts = [list(range(1, 12)), list(range(40, 49))]  # past the window (8) and both compression rates
    runs = {spec: m1.generate(model, prompts, 4, stop_tokens=(), chunk=16, page_size=16,
                              attention_backend="interpret", speculative=spec)
            for spec in (None, "dspark")}
    for gen in runs.values():
        assert (gen.stats.cache_spec.attention_backend, gen.stats.cache_spec.cache_dtype) == ("interpret", "fp8")
    assert runs["dspark"].tokens == runs[None].tokens
