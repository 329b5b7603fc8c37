"""The DSpark drafter (docs/dspark.md §5–§7) against the independent NumPy reference (tests/dspark_reference.py),
on the synthetic 0731-layout checkpoint loaded like a released one (FP8/FP4 dequantized, float32 compute).

* `Model1.draft` (plain arrays) equals the reference: greedy drafts token for token, and with sampled drafts
  the distributions each draft was drawn from; rings shorter than the window and wrapped around it;
* `Model1.streams(capture=True)` returns the target layers' output streams averaged over the mHC streams;
* the decode path (rings in a float32 decode state written by prefill, block attention through the sparse
  decode function) drafts what `Model1.draft` drafts from the same history.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.inference import drafter, steps
from tests import dspark_reference as ref
from tests import synthetic_dspark as sd

_draft = nnx.jit(lambda model, hidden, anchor: model.draft(hidden, anchor))
_capture = nnx.jit(lambda model, ids: model.streams(ids, capture=True))


@pytest.fixture(scope="module")
def drafted(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "flash-0731"
    _, stored = sd.write_dspark_checkpoint(path, seed=7)
    return m1.from_pretrained(path, dtype=jnp.float32), sd.dequantize_tensors(stored), sd.released_config()


def close(got, want, what):
    got = np.asarray(got, np.float64)
    assert np.abs(got - want).max() <= 1e-5 * max(np.abs(want).max(), 1.0), what


@pytest.mark.parametrize("committed", [3, 13], ids=["ring-partly-filled", "ring-wrapped"])
def test_greedy_draft_equals_reference(drafted, committed):
    model, weights, config = drafted
    hidden = np.random.default_rng(committed).standard_normal((2, committed, 3 * config["hidden_size"]))
    anchor = np.array([5, 250])
    got = _draft(model, jnp.asarray(hidden, jnp.float32), jnp.asarray(anchor))
    want = ref.draft(weights, config, hidden, anchor)
    np.testing.assert_array_equal(np.asarray(got.tokens), want["tokens"][:, 1:])
    for name in ("logits", "confidence", "hidden"):
        close(getattr(got, name), want[name], name)


def test_sampled_draft_distributions_equal_reference(drafted):
    """Each draft's distribution depends on the token drawn before it: compare along a drawn path."""
    model, weights, config = drafted
    hidden = np.random.default_rng(1).standard_normal((2, 9, 3 * config["hidden_size"]))
    forced = np.random.default_rng(2).integers(0, config["vocab_size"], (2, 5))
    got = nnx.jit(lambda m, h, a: m.draft(h, a, lambda i, _: jnp.asarray(forced)[:, i]))(
        model, jnp.asarray(hidden, jnp.float32), jnp.asarray([9, 9]))
    want = ref.draft(weights, config, hidden, [9, 9], temperature=0.7, tokens=forced)
    close(jax.nn.softmax(got.logits / 0.7, axis=-1), want["probs"], "probs")
    close(got.confidence, want["confidence"], "confidence")


@nnx.jit
def _layer_by_layer(model, ids):
    """The layers called one by one, each output averaged over the streams here."""
    x = model.embed(ids)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    means = []
    for layer in model.layers:
        x = layer(x, ids, positions)
        means.append(jnp.mean(x, axis=2))
    return x, means


def test_capture_is_the_mean_of_the_target_layers_outputs(drafted):
    model = drafted[0]
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 13)))
    streams, hidden = _capture(model, ids)
    x, means = _layer_by_layer(model, ids)
    taps = model.config.dspark.target_layer_ids
    close(hidden, np.concatenate([np.asarray(means[i], np.float64) for i in taps], axis=-1), "captured rows")
    close(streams, np.asarray(x, np.float64), "streams")
    plain = nnx.eval_shape(lambda: m1.Model1(m1.Config.tiny(), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="capture=True needs"):
        plain.streams(ids, capture=True)


@nnx.jit
def _decode_draft(model, state, anchor):
    return drafter.draft(model, state, anchor)


def test_decode_path_drafts_like_the_dense_drafter(drafted):
    """Sequences of 3 and 13 committed tokens (a ring partly filled, a ring wrapped) in one decode state."""
    model = drafted[0]
    ids = np.random.default_rng(4).integers(0, 256, (2, 13))
    lengths = np.array([3, 13])
    state = m1.init_state(model.config, max_batch=2, max_len=32, cache_dtype="float32", chunk=8,
                          speculative="dspark")
    _, state = steps.prefill(model, state, ids, lengths)
    anchor = jnp.asarray([17, 99])
    got, state = _decode_draft(model, state, anchor)
    _, hidden = _capture(model, jnp.asarray(ids))
    for row, length in enumerate(lengths):
        want = _draft(model, hidden[:, :length], anchor)  # causal: the first `length` rows are that sequence's
        np.testing.assert_array_equal(np.asarray(got.tokens)[row], np.asarray(want.tokens)[row])
        for name in ("logits", "confidence"):
            close(getattr(got, name)[row], np.asarray(getattr(want, name), np.float64)[row], name)
    np.testing.assert_array_equal(np.asarray(state.lengths), lengths)
