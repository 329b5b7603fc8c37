"""The 0731 layout on 8 simulated devices (2×2×2 tensor parallel): the HF-format checkpoint and its Orbax
conversion load straight into their shards, drafter included, and greedy DSpark decoding on the mesh emits the
single-device tokens (the drafter's rings split by sequence like every other cache)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax import parallel as sh
from model1_jax.io import convert
from tests import synthetic_dspark as sd

pytestmark = pytest.mark.usefixtures("eight_devices")  # tests/conftest.py
PROMPTS = [[5, 6, 7], list(range(40, 52)), [9], list(range(100, 106))]


def canonical(spec) -> tuple:
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return tuple(parts)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "flash-0731"
    sd.write_dspark_checkpoint(path, seed=9)
    return path


def test_sharded_loads_and_greedy_dspark_match_single_device(checkpoint, tmp_path):
    layout = sh.Layout(sh.make_mesh("data=2,expert=2,tensor=2"), sh.Rules.preset("tensor_parallel"))
    single = m1.from_pretrained(checkpoint, dtype=jnp.float32)
    convert.convert(checkpoint, tmp_path / "orbax", dtype=jnp.float32, progress=False)
    for model in (m1.from_pretrained(checkpoint, dtype=jnp.float32, layout=layout),
                  m1.load(tmp_path / "orbax", dtype=jnp.float32, layout=layout)):
        assert model.layout is layout and model.dspark.stages[2].self_attn.layout is layout
        for (path, var), (_, want) in zip(nnx.to_flat_state(nnx.state(model)),
                                          nnx.to_flat_state(nnx.state(single)), strict=True):
            value = var.get_value()
            assert canonical(value.sharding.spec) == canonical(layout.spec(var.get_metadata()["logical_axes"])), path
            np.testing.assert_array_equal(np.asarray(value), np.asarray(want.get_value()), err_msg=str(path))
    assert canonical(model.dspark.markov_w2.kernel.get_value().sharding.spec) == (None, "tensor")  # vocab split

    want = m1.generate(single, PROMPTS, 12, cache_dtype="float32", stop_tokens=(), chunk=8).tokens
    gen = m1.generate(model, PROMPTS, 12, cache_dtype="float32", stop_tokens=(), chunk=8, speculative="dspark")
    assert gen.tokens == want
