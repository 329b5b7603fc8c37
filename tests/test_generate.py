"""Generation: parity with transformers' greedy `generate()`, batch invariance, MTP speculative decoding,
sampling, and input checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.inference import sampling
from model1_jax.inference import steps as decode
from model1_jax.inference.generation import CompileClock
from tests.util import random_model

NEW = 32


# ------------------------------------------------------------------------------------------------------
# transformers parity


@pytest.mark.oracle
@pytest.mark.parametrize("name", ["csa_hca_hc4", "csa_m2_hc2"])
def test_greedy_matches_transformers(name, tmp_path):
    import torch

    from tests import hf_reference as ref

    # 16 indexer heads: a score is exactly 0 (a tie with any other 0) only when all heads' ReLUs are 0.
    hf = ref.make_model(name, seed=2, index_n_heads=16)
    hf.save_pretrained(tmp_path)
    model = m1.from_pretrained(tmp_path, dtype=jnp.float32)
    recorder = ref.IndexerScores(hf)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead (and contention on a shared CPU)
    try:
        for seed in range(20):  # prompts whose HF prefill and generation are free of top-k ties
            prompt = np.random.default_rng(seed).integers(0, hf.config.vocab_size, (2, 9))
            recorder.records.clear()
            with torch.no_grad():
                want = hf.generate(torch.as_tensor(prompt), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[:, prompt.shape[1]:].tolist()
            if recorder.boundary_ties() == 0:
                break
        else:
            pytest.fail("no tie-free prompt found")
    finally:
        recorder.close()
        torch.set_num_threads(threads)
    got = m1.generate(model, prompt, NEW, stop_tokens=(), cache_dtype="float32")
    assert got.tokens == want


# ------------------------------------------------------------------------------------------------------
# Batch invariance and MTP (bf16 cache: the unquantized mode's storage dtype)

# Window 8; a CSA layer (m=4, top 3 entries), an HCA layer (m'=8) and the MTP block (sliding window).
TINY = m1.Config.tiny().replace(num_hidden_layers=2, layer_types=(m1.CSA, m1.HCA),
                                mlp_layer_types=(m1.HASH_MOE, m1.MOE))
PROMPTS = [[int(x) for x in np.random.default_rng(i).integers(0, TINY.vocab_size, n)] for i, n in
           enumerate([6, 19, 1])]
RUN = dict(max_batch=3, max_len=19 + NEW, cache_dtype="bf16", stop_tokens=(), chunk=8, page_size=16)


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, seed=11)


@pytest.fixture(scope="module")
def greedy_batch(tiny):
    return m1.generate(tiny, PROMPTS, NEW, **RUN)


def test_batch_invariance(tiny, greedy_batch):
    assert all(len(t) == NEW for t in greedy_batch.tokens)
    for i, prompt in enumerate(PROMPTS):
        alone = m1.generate(tiny, [prompt], NEW, **RUN)
        assert alone.tokens[0] == greedy_batch.tokens[i], f"prompt {i}"


def test_mtp_greedy_equals_plain_greedy(tiny, greedy_batch):
    spec = m1.generate(tiny, PROMPTS, NEW, mtp=True, **RUN)
    assert spec.tokens == greedy_batch.tokens
    assert spec.stats.drafts > 0 and spec.stats.acceptance_rate is not None


def test_mtp_accept_and_reject_with_oracle_drafts(tiny, greedy_batch):
    """Drive the batcher's speculative step with drafts that are right on some steps and wrong on others:
    accepted drafts must add the bonus token, rejected ones must be rolled back exactly (every later token
    still equals plain greedy decoding)."""
    want = greedy_batch.tokens
    sched = m1.Scheduler(tiny, max_batch=3, max_len=RUN["max_len"], cache_dtype="bf16", chunk=8, page_size=16,
                         mtp=True, stop_tokens=())
    for prompt in PROMPTS:
        sched.submit(prompt, NEW)
    rng = np.random.default_rng(0)
    vocab = TINY.vocab_size
    accepted_total = rejected_total = 0
    while sched.running or sched.waiting:
        expected = 0
        for slot in sched._slots:  # replace the MTP block's drafts by oracle ones
            if slot is None or slot.prefilling:
                continue
            truth = want[slot.index][len(slot.output.tokens)]  # the token after the pending one
            right = rng.random() < 0.6
            slot.draft = int(truth if right else (truth + 1 + rng.integers(0, vocab - 1)) % vocab)
            if slot.length + 2 <= slot.request.reserve:  # the step verifies a draft
                expected += right
                rejected_total += not right
        before = sched.stats.accepted
        sched.step()
        assert sched.stats.accepted - before == expected
        accepted_total += expected
    assert accepted_total > 5 and rejected_total > 5
    assert [c.tokens for c in sched.run()] == want


def test_more_prompts_than_slots(tiny, greedy_batch):
    """Three prompts through two slots: the third waits for a slot and gets the tokens it gets in a batch."""
    got = m1.generate(tiny, PROMPTS, NEW, **{**RUN, "max_batch": 2})
    assert got.tokens == greedy_batch.tokens


def test_sampling_is_seeded(tiny):
    kw = dict(RUN, temperature=0.8, top_k=50, top_p=0.9, mtp=True)
    a = m1.generate(tiny, PROMPTS, 12, seed=1, **kw)
    b = m1.generate(tiny, PROMPTS, 12, seed=1, **kw)
    c = m1.generate(tiny, PROMPTS, 12, seed=2, **kw)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert all(0 <= t < TINY.vocab_size for row in a.tokens for t in row)


def test_stop_tokens(tiny, greedy_batch):
    stop = greedy_batch.tokens[1][5]
    got = m1.generate(tiny, PROMPTS, NEW, **{**RUN, "stop_tokens": (stop,)})
    for row, full in zip(got.tokens, greedy_batch.tokens):
        cut = full.index(stop) + 1 if stop in full else NEW
        assert row == full[:cut]


# ------------------------------------------------------------------------------------------------------
# Sampling rules


def test_probabilities_filters():
    logits = jnp.log(jnp.array([[0.5, 0.25, 0.15, 0.1]]))
    probs = jax.jit(sampling.probabilities)  # one compilation serves every setting

    def p(**kw):
        return probs(logits, sampling.Sampling(**kw).arrays())

    np.testing.assert_array_equal(p(), [[1, 0, 0, 0]])  # greedy
    np.testing.assert_allclose(p(temperature=1.0, top_k=2), [[2 / 3, 1 / 3, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(p(temperature=1.0, top_p=0.7), [[2 / 3, 1 / 3, 0, 0]], rtol=1e-6)  # 0.5+0.25 ≥ 0.7
    np.testing.assert_allclose(p(temperature=1.0, top_p=0.4), [[1, 0, 0, 0]], rtol=1e-6)  # the top token alone
    # top-k first (0.5, 0.25, 0.15 renormalised), then top-p of what is left: 5/9 + 5/18 ≥ 0.8. In the other
    # order 0.5 + 0.25 < 0.8 would keep three tokens.
    np.testing.assert_allclose(p(temperature=1.0, top_k=3, top_p=0.8), [[2 / 3, 1 / 3, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(p(temperature=2.0), jax.nn.softmax(logits / 2), rtol=1e-6)
    with pytest.raises(ValueError, match="top_p"):
        sampling.Sampling(top_p=1.5)


def test_speculative_acceptance_keeps_the_target_distribution():
    target = jnp.array([0.1, 0.4, 0.2, 0.3])
    draft_dist = jnp.array([0.5, 0.1, 0.3, 0.1])
    n = 40000
    keys = jax.random.split(jax.random.key(0), n)

    def one(key):
        d_key, a_key = jax.random.split(key)
        d = jax.random.categorical(d_key, jnp.log(draft_dist))[None].astype(jnp.int32)
        _, tok = sampling.accept_draft(a_key, target[None], draft_dist[None], d)
        return tok[0]

    counts = np.bincount(np.asarray(jax.jit(jax.vmap(one))(keys)), minlength=4) / n
    np.testing.assert_allclose(counts, target, atol=4 * np.sqrt(0.25 / n))


# ------------------------------------------------------------------------------------------------------
# Bad input: a clear error before anything is allocated or compiled


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[[1, 2], []]), "prompt 1: empty sequence"),
    (dict(prompts=[]), "non-empty list"),
    (dict(prompts=[[1, 2, TINY.vocab_size]]), r"prompt 0: token ids must be in \[0, 256\); found \[256\]"),
    (dict(prompts=[[-1]]), r"token ids must be in \[0, 256\); found \[-1\]"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_len=4), "prompt has 5 tokens, over max_len 4"),
    (dict(max_len=10), r"\+ max_new_tokens \(8\) exceeds max_len 10"),
    (dict(cache_dtype="fp8"), "head_dim 512"),
    (dict(cache_dtype="int4"), "cache_dtype"),
    (dict(attention_backend="pallas"), r"runs the Pallas kernel, which reads the FP8 cache"),
    (dict(attention_backend="triton"), "attention_backend must be one of"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-2), "top_k"),
    (dict(stop_tokens=(TINY.vocab_size,)), "stop_tokens"),
])
def test_bad_input(tiny, kwargs, match):
    args = dict(prompts=[[1, 2, 3, 4, 5]], max_new_tokens=8, cache_dtype="bf16")
    args.update(kwargs)
    with CompileClock() as clock, pytest.raises(ValueError, match=match):
        m1.generate(tiny, args.pop("prompts"), args.pop("max_new_tokens"), **args)
    assert clock.compiled == []


def test_bad_input_low_level(tiny):
    state = m1.init_state(TINY, max_batch=2, max_len=8, cache_dtype="bf16")
    with pytest.raises(ValueError, match="batch 1"):
        m1.prefill(tiny, state, np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="over the state's max_len 8"):
        m1.prefill(tiny, state, np.zeros((2, 9), np.int32))
    with pytest.raises(ValueError, match="token ids must be in"):
        m1.decode_step(tiny, state, np.array([0, 999]))
    with pytest.raises(ValueError, match="mtp=True but the config has no MTP"):
        m1.init_state(TINY.replace(num_nextn_predict_layers=0), max_batch=1, max_len=8, cache_dtype="bf16", mtp=True)
    assert decode.check_state(tiny, state) is None


# ------------------------------------------------------------------------------------------------------
# Attention backends and the default cache

# Head dim 512 with 64 RoPE dims (FlashMLA's v4 cache format) and 16 heads (a head count the kernel runs).
KERNEL_CFG = m1.Config.tiny().replace(head_dim=512, qk_rope_head_dim=64, index_head_dim=128, num_attention_heads=16,
                                      num_hidden_layers=3, layer_types=(m1.SLIDING, m1.CSA, m1.HCA),
                                      mlp_layer_types=(m1.HASH_MOE, m1.MOE, m1.MOE), num_nextn_predict_layers=0)


def _teacher_forced_logits(model, seqs, backend: str, dtype) -> np.ndarray:
    """float32 [b, t, v]: the logits at every position of `seqs` (token lists) fed through the FP8 cache."""
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int32)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = seq
    state = m1.init_state(KERNEL_CFG, max_batch=len(seqs), max_len=t, cache_dtype="fp8", chunk=16, page_size=16,
                          dtype=dtype, attention_backend=backend)
    logits, _ = m1.prefill(model, state, ids, [len(s) for s in seqs], all_logits=True)
    return np.asarray(logits)


def test_generation_agrees_on_both_attention_backends():
    """End to end through the Pallas kernel (interpret mode) and through the jnp reference. Prompts cross the
    window and both compression rates, so every cache scope is read.

    The two backends sum in different orders, and in bf16 that flips roundings, so their logits differ a little,
    and greedy tokens may part at a near-tie (jax 0.12 parts these runs at a top-2 margin of 0.002). So the
    contract is: (1) fed the same tokens, the backends' logits differ by less than bf16 itself moves them (the
    distance of the reference's logits from the same model computed in float32); (2) the generated tokens are
    equal up to the first step where they part, and there both tokens are within that noise of the top logit
    on both backends: a tie broken differently, never a wrong token."""
    model = m1.Model1(KERNEL_CFG, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    prompts = [list(range(1, 20)), list(range(40, 51))]
    runs = {backend: m1.generate(model, prompts, 8, stop_tokens=(), chunk=16, page_size=16, attention_backend=backend)
            for backend in ("xla", "interpret")}
    for backend, gen in runs.items():
        assert (gen.stats.cache_spec.attention_backend, gen.stats.cache_spec.cache_dtype) == (backend, "fp8")

    seqs = [p + g for p, g in zip(prompts, runs["xla"].tokens)]
    logits = {backend: _teacher_forced_logits(model, seqs, backend, jnp.bfloat16) for backend in ("xla", "interpret")}
    # The same bf16 weights computed in float32 (the cache still FP8): the bf16 rounding noise of the reference.
    model_f32 = nnx.eval_shape(lambda: m1.Model1(KERNEL_CFG, rngs=nnx.Rngs(0), dtype=jnp.float32,
                                                 param_dtype=jnp.bfloat16))
    nnx.update(model_f32, nnx.state(model))
    exact = _teacher_forced_logits(model_f32, seqs, "xla", jnp.float32)
    fed = np.arange(exact.shape[1])[None, :] < np.array([len(s) for s in seqs])[:, None]
    noise = np.abs(logits["xla"] - exact)[fed].max()
    gap = np.abs(logits["interpret"] - logits["xla"])[fed].max()
    assert gap <= noise, f"backends differ by {gap:.4f}, more than bf16's own rounding noise {noise:.4f}"

    for row, (prompt, want, got) in enumerate(zip(prompts, runs["xla"].tokens, runs["interpret"].tokens)):
        if got == want:
            continue
        step = next(j for j, (a, b) in enumerate(zip(want, got)) if a != b)
        pos = len(prompt) - 1 + step  # both runs fed the same tokens up to here
        for backend, lg in logits.items():
            top = lg[row, pos].max()
            for token in (want[step], got[step]):
                assert lg[row, pos, token] >= top - noise, (
                    f"sequence {row} parts at step {step}: token {token} is {top - lg[row, pos, token]:.4f} below "
                    f"the top logit on {backend}, more than the noise {noise:.4f}")


def test_default_cache_dtype_fits_every_config(tiny):
    """"auto" (the default) picks FP8 where FlashMLA's v4 format fits, else the model's own dtype."""
    assert m1.generate(tiny, [[1, 2, 3]], 2).stats.cache_spec.cache_dtype == "float32"
    assert m1.make_spec(TINY, max_batch=1, max_len=8, dtype=jnp.bfloat16).cache_dtype == "bf16"
    spec = m1.make_spec(KERNEL_CFG, max_batch=1, max_len=8, dtype=jnp.bfloat16)
    assert (spec.cache_dtype, spec.attention_backend) == ("fp8", "xla")  # the kernel runs by default on GPUs only
