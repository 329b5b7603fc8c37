"""Whole-model parity with transformers' DeepseekV4ForCausalLM (fp32, CPU).

Weights go HF model → `save_pretrained` → `model1_jax.from_pretrained`; logits must agree within
1e-4 relative to max |logit| at every position, for sequence lengths around the compression
windows and past the sliding window.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from tests import hf_reference as ref

pytestmark = pytest.mark.oracle  # every test here compares with transformers (tests/oracle_marks.py)

TOL = 1e-4
_forward = nnx.jit(lambda model, ids: model(ids))


def lengths(cfg) -> list[int]:
    rates = [cfg.compress_rates[t] for t in set(cfg.layer_types) if t != ref.S] or [cfg.sliding_window]
    m = min(rates)
    long = max(cfg.sliding_window + 5, 3 * max(rates) + 2, cfg.index_topk * min(rates) * 2 + 3)
    return sorted({1, m - 1, m, m + 1, 2 * m + 1, long} - {0})


@pytest.fixture(scope="module", params=sorted(ref.CONFIGS))
def pair(request, tmp_path_factory):
    hf = ref.make_model(request.param, seed=1)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, m1.from_pretrained(path, dtype=jnp.float32)


def test_logits_match_transformers(pair):
    name, hf, model = pair
    worst = 0.0
    for i, length in enumerate(lengths(hf.config)):
        ids = ref.tie_free_ids(hf, batch=2, length=length, seed=100 + i)
        want = ref.logits(hf, ids)
        got = np.asarray(_forward(model, jnp.asarray(ids, jnp.int32)))
        assert got.shape == want.shape and got.dtype == np.float32
        err = np.abs(got - want).max(axis=-1) / np.abs(want).max()  # per position
        worst = max(worst, float(err.max()))
        where = np.unravel_index(err.argmax(), err.shape)
        assert err.max() < TOL, f"{name} length {length}: max rel err {err.max():.2e} at [batch, position] {where}"
    print(f"\n{name}: max relative logit error {worst:.2e} over lengths {lengths(hf.config)}")


def test_selection_actually_happens():
    """The long sequences must exercise index_topk < number of visible compressed entries."""
    for name in ("csa_hca_hc4", "csa_m2_hc2"):
        cfg = ref.hf_config(name)
        m = cfg.compress_rates[ref.C]
        assert (max(lengths(cfg)) // m) > cfg.index_topk, name
