"""Dense loading through on-device dequantization (io/device_dequant.py): the device gives the host lookup table's
bits for every value byte and every scale byte it accepts, the others go to the host and give them too, and a
dense `from_pretrained` equals the host read path bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.io import device_dequant, hf, placement, regions, relayout
from model1_jax.model import quant
from tests import synthetic as syn


def every_byte(fmt: str, scale_bytes: np.ndarray) -> quant.BlockQuantized:
    """Row i: every value byte (FP4: every pair of codes) under scale byte scale_bytes[i]."""
    values = np.tile(np.arange(256, dtype=np.uint8), (len(scale_bytes), 1))
    scales = scale_bytes.astype(np.uint8)[:, None].view(quant.E8M0)
    if fmt == quant.FP4:
        return quant.BlockQuantized(values, scales, fmt, (1, 512), 1)
    return quant.BlockQuantized(values.view(quant.E4M3), scales, fmt, (1, 256))


def table(weight: quant.BlockQuantized, dtype) -> np.ndarray:
    """The host path's lookup (`relayout.dequantize_rows`), whose bits equal NumPy's `dequantize` for every
    byte and scale (tests/test_parallel_load.py)."""
    values = np.asarray(weight.values).view(np.uint8)
    got = np.empty(weight.shape, dtype)
    rows = np.arange(values.shape[0])
    relayout.dequantize_rows(weight.fmt, values, weight.scales, rows, weight.block[1], got,
                             np.empty(values.size, np.uint16))
    return got


@pytest.fixture
def device_calls(monkeypatch):
    calls = []
    original = device_dequant._dequantize
    monkeypatch.setattr(device_dequant, "_dequantize",
                        lambda w, dtype: (calls.append(w.fmt), original(w, dtype=dtype))[1])
    return calls


@pytest.mark.parametrize("fmt", [quant.FP8, quant.FP4])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_device_gives_the_table_bits_for_every_byte_and_accepted_scale(fmt, dtype, device_calls):
    weight = every_byte(fmt, np.arange(device_dequant.MIN_SCALE[fmt], device_dequant.MAX_SCALE + 1))
    assert device_dequant.scales_exact(fmt, weight.scales)
    got = device_dequant.to_dense(weight, dtype)
    assert device_calls == [fmt] and isinstance(got, jax.Array)
    with np.errstate(over="ignore"):
        want = table(weight, dtype)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("fmt", [quant.FP8, quant.FP4])
@pytest.mark.parametrize("outside", [0, 1, 255])
def test_other_scales_are_dequantized_on_the_host_with_the_same_bits(fmt, outside, device_calls):
    """Scale bytes where XLA:CPU would flush a subnormal product (or NaN) send the weight to the host; a float16
    target does too. The bits are the table's either way."""
    weight = every_byte(fmt, np.array([outside, 127, 200, device_dequant.MIN_SCALE[fmt]]))
    on_device = outside >= device_dequant.MIN_SCALE[fmt] and outside <= device_dequant.MAX_SCALE
    assert device_dequant.scales_exact(fmt, weight.scales) == on_device
    for dtype in (jnp.bfloat16, jnp.float16):
        got = device_dequant.to_dense(weight, dtype)
        with np.errstate(over="ignore"):
            want = table(weight, dtype)
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))
    assert device_calls == ([fmt] if on_device else [])


@pytest.mark.parametrize("shape, block, pack_axis, fmt", [
    ((24, 16, 10), (1, 1, 32), 2, quant.FP4),   # an expert stack [e, out, in], packed along its input axis
    ((96, 40), (32, 1), 0, quant.FP4),           # a linear packed along its first (input) axis
    ((50, 30), (16, 16), None, quant.FP8),       # partial blocks at both edges
])
def test_host_dequantize_in_slices_equals_the_whole(shape, block, pack_axis, fmt, monkeypatch):
    rng = np.random.default_rng(0)
    dense = shape if pack_axis is None else tuple(n * 2 if i == pack_axis else n for i, n in enumerate(shape))
    stored = shape if pack_axis is None else tuple(n // 2 if i == pack_axis else n for i, n in enumerate(dense))
    values = rng.integers(0, 256, stored, dtype=np.uint8)
    if fmt == quant.FP8:
        values = values.view(quant.E4M3)
    scales = rng.integers(0, 256, quant.scale_shape(dense, block), dtype=np.uint8).view(quant.E8M0)
    weight = quant.BlockQuantized(values, scales, fmt, block, pack_axis).check()
    monkeypatch.setattr(device_dequant, "HOST_SLICE_BYTES", 1)  # one block row (FP4 along axis 0: two) per slice
    with np.errstate(over="ignore"):
        want = weight.dequantize(np.float32).astype(jnp.bfloat16)
    got = device_dequant.host_dequantize(weight, jnp.bfloat16)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    stored = syn.quantize_tensors(syn.original_tensors(syn.CONFIG, seed=3))
    return syn.write_checkpoint(tmp_path_factory.mktemp("device_dequant"), syn.CONFIG, stored, shards=2,
                                quantization_config=syn.QUANTIZATION_CONFIG)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_dense_load_equals_the_host_read_path(dtype, checkpoint, device_calls):
    plan = hf.plan_checkpoint(checkpoint, dtype=dtype)
    quantized = {a.slot.path for u in plan.units for a in u.assignments if a.fmt}
    assert device_dequant.dequantized_on_device(plan) == quantized  # every FP8/FP4 weight of the released storage
    host = regions.read_units(plan.units, plan.targets, keep_quantized=False, workers=2)
    model = m1.from_pretrained(checkpoint, dtype=dtype, workers=2)
    assert len(device_calls) == len(quantized)
    for path, var in nnx.to_flat_state(nnx.state(model)):
        got = np.asarray(var.get_value())
        assert got.dtype == host[path].dtype, path
        np.testing.assert_array_equal(got.view(np.uint8), host[path].view(np.uint8), err_msg=str(path))


@pytest.mark.usefixtures("eight_devices")
@pytest.mark.parametrize("min_scale", [None, 255])
def test_sharded_dense_load_dequantizes_on_the_devices(min_scale, checkpoint, monkeypatch):
    """Direct placement: each weight's quantized shards are dequantized on their devices into the dense sharding;
    a scale byte the device would not multiply exactly (every one, with MIN_SCALE raised) sends it to the host."""
    calls = []
    original = device_dequant._dequantize_into
    monkeypatch.setattr(device_dequant, "_dequantize_into", lambda w, dtype, sharding: (
        calls.append(sharding), original(w, dtype=dtype, sharding=sharding))[1])
    if min_scale is not None:
        monkeypatch.setattr(device_dequant, "MIN_SCALE", dict.fromkeys(device_dequant.MIN_SCALE, min_scale))
    layout = m1.Layout.build("data=2,expert=2,tensor=2", "tensor_parallel")
    model = m1.from_pretrained(checkpoint, dtype=jnp.bfloat16, layout=layout)
    plan = hf.plan_checkpoint(checkpoint, dtype=jnp.bfloat16)
    host = regions.read_units(plan.units, plan.targets, keep_quantized=False, workers=2)
    # the weights whose values and scales the layout splits evenly (at these toy widths not every scale grid is)
    on_device = placement._candidates(plan, layout)
    assert 0 < len(on_device) < len({a.slot.path for u in plan.units for a in u.assignments if a.fmt})
    assert len(calls) == (0 if min_scale else len(on_device))
    for path, var in nnx.to_flat_state(nnx.state(model)):
        got = var.get_value()
        assert got.sharding == layout.sharding(var.get_metadata()["logical_axes"], got.shape), path
        np.testing.assert_array_equal(np.asarray(got).view(np.uint8), host[path].view(np.uint8), err_msg=str(path))
