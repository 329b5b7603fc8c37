"""FP8 / FP4 block formats: exact dequantization, packing order, model-layout blocks, host = device."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model1_jax as m1
from model1_jax.io import regions
from model1_jax.io.hf import Assignment
from model1_jax.io.names import Slot, quant_arrangement, to_model_arrangement
from model1_jax.io.reader import read_pieces
from model1_jax.io.safetensors_file import read_header, write
from model1_jax.model import quant
from tests import synthetic

RNG = np.random.default_rng(0)


def one_scale(byte: int, shape=(1, 1)) -> np.ndarray:
    return np.full(shape, byte, np.uint8).view(quant.E8M0)


def test_e8m0_scales_are_powers_of_two():
    scales = np.arange(256, dtype=np.uint8).view(quant.E8M0)
    want = np.array([2.0 ** (b - 127) for b in range(255)] + [np.nan], np.float32)
    np.testing.assert_array_equal(quant.e8m0_to_float32(scales), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(quant.e8m0_to_float32)(jnp.asarray(scales)))[1:],
                                  want[1:])  # 2^-127 is subnormal: a backend may flush it
    np.testing.assert_array_equal(quant.e8m0_to_float32(scales), scales.astype(np.float32))  # = the dtype's own cast
    for byte in (1, 100, 127, 128, 200, 254):
        q = quant.BlockQuantized(np.ones((1, 1), quant.E4M3), one_scale(byte), quant.FP8, (1, 1))
        assert q.dequantize(np.float32)[0, 0] == np.float32(2.0 ** (byte - 127))


def test_fp8_dequantizes_every_e4m3_code_exactly():
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16).view(quant.E4M3)
    finite = np.isfinite(codes.astype(np.float32))
    q = quant.BlockQuantized(codes, one_scale(130), quant.FP8, (16, 16))  # scale 8
    got = q.dequantize(np.float32)
    np.testing.assert_array_equal(got[finite], codes.astype(np.float64)[finite] * 8.0)


def test_fp4_codes_and_low_nibble_first():
    table = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]  # docs/checkpoints.md §5.2
    codes = np.arange(16, dtype=np.uint8)
    packed = (codes[0::2] | (codes[1::2] << 4))[None, :]  # element 2j in the low nibble
    q = quant.BlockQuantized(packed, one_scale(127, (1, 1)), quant.FP4, (1, 32), pack_axis=1)
    got = q.dequantize(np.float32)[0]
    np.testing.assert_array_equal(got, np.array(table, np.float32))
    assert list(np.signbit(got)) == [c >= 8 for c in range(16)]
    byte = quant.BlockQuantized(np.array([[0x21]], np.uint8), one_scale(126), quant.FP4, (1, 32), 1)
    np.testing.assert_array_equal(byte.dequantize(np.float32), [[0.25, 0.5]])  # low 1 → 0.5, high 2 → 1.0, × 1/2


@pytest.mark.parametrize("fmt", [quant.FP8, quant.FP4])
def test_quantize_uses_smallest_power_of_two_scale(fmt):
    w = RNG.standard_normal((200, 130)).astype(np.float32) * np.exp(RNG.standard_normal((200, 1)))
    block = (128, 128) if fmt == quant.FP8 else quant.FP4_BLOCK
    q = quant.quantize(w, fmt, block, pack_axis=1 if fmt == quant.FP4 else None)
    assert q.scales.shape == quant.scale_shape(w.shape, block)  # ceil-blocks at the edges
    limit = 448.0 if fmt == quant.FP8 else 6.0
    scaled = np.abs(w) / np.repeat(np.repeat(q.scales.astype(np.float32), block[0], 0), block[1], 1)[:200, :130]
    amax = np.pad(scaled, [(0, -200 % block[0]), (0, -130 % block[1])]).reshape(
        q.scales.shape[0], block[0], q.scales.shape[1], block[1]).max(axis=(1, 3))
    assert np.all(amax <= limit) and np.all(amax > limit / 2)
    error = np.abs(q.dequantize(np.float32) - w) / np.repeat(np.repeat(q.scales.astype(np.float32), block[0], 0),
                                                            block[1], 1)[:200, :130]
    assert error.max() <= (16.0 if fmt == quant.FP8 else 1.0)  # half the widest code spacing (e4m3: 32, e2m1: 2)


@pytest.mark.parametrize("fmt, shape, block, pack_axis", [
    (quant.FP8, (200, 130), (128, 128), None),
    (quant.FP8, (3, 5, 64), (1, 2, 64), None),
    (quant.FP4, (4, 70, 6), (1, 32, 1), 1),
    (quant.FP4, (5, 96), (1, 32), 1),
])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_host_and_jitted_dequantize_are_bit_identical(fmt, shape, block, pack_axis, dtype):
    q = quant.quantize(RNG.standard_normal(shape), fmt, block, pack_axis)
    device = jax.tree.map(jnp.asarray, q)
    got = np.asarray(jax.jit(lambda t: t.dequantize(dtype))(device))
    want = q.dequantize(np.dtype(dtype))
    assert got.dtype == want.dtype and got.shape == shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


# Slots as hf_names produces them, with target (model) shapes where one checkpoint block spans several
# model axes (heads, groups) — the layouts of q_b, indexer q_b, o_a, o_b, experts.
LAYOUT_CASES = [
    ("q_b: blocks inside a head", Slot(("q",), "linear", 1), (256, 2, 128), (128, 128)),
    ("indexer q_b: a block spans 2 heads", Slot(("q",), "linear", 1), (128, 2, 64), (128, 128)),
    ("o_b: [g, o, d]", Slot(("o",), "linear", 2), (2, 128, 256), (128, 128)),
    ("o_a: [g, m, h, o]", Slot(("o",), "grouped", 3), (2, 1, 128, 128), (128, 128)),
    ("edge blocks", Slot(("w",), "linear", 1), (200, 130), (128, 128)),
    ("expert row", Slot(("e",), "copy", 1, expert=2), (4, 64, 128), (128, 128)),
    ("expert row, edge blocks", Slot(("e",), "copy", 1, expert=1), (3, 200, 130), (128, 128)),
    ("down_proj stack", Slot(("d",), "copy"), (3, 256, 64), (1, 128, 128)),
    ("gate of gate_up_proj", Slot(("g",), "gate"), (3, 256, 128), (1, 128, 128)),
    ("up of gate_up_proj", Slot(("u",), "up"), (3, 256, 128), (1, 128, 128)),
]


def _checkpoint_shape(slot, target):
    from model1_jax.io.names import source_shape
    return source_shape(slot, target)


@pytest.mark.parametrize("fmt", [quant.FP8, quant.FP4])
@pytest.mark.parametrize("name, slot, target, fp8_block", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_model_layout_blocks_equal_checkpoint_blocks(name, slot, target, fp8_block, fmt, tmp_path):
    """Rearranging values and scales into the model layout (as the reader does, from a file), then dequantizing,
    equals dequantizing in the checkpoint layout, then rearranging — the property the whole FP8/FP4 path rests on."""
    src = _checkpoint_shape(slot, target)
    hf_block = fp8_block if fmt == quant.FP8 else (1,) * (len(src) - 2) + quant.FP4_BLOCK
    pack = len(src) - 1 if fmt == quant.FP4 else None
    q = quant.quantize(RNG.standard_normal(src), fmt, hf_block, pack)
    want = to_model_arrangement(slot, q.dequantize(np.float32), target)

    write(str(tmp_path / "w.safetensors"), {"w": q.values, "s": q.scales})
    info, scale = sorted(read_header(str(tmp_path / "w.safetensors")), key=lambda i: i.name != "w")
    a = Assignment(info, slot, scale, fmt, hf_block)
    buffer = regions.parameter_buffer(slot.path, a, jax.ShapeDtypeStruct(target, jnp.float32), keep_quantized=True)
    read_pieces(regions.parameter_pieces(a, buffer), workers=1)
    got = buffer.value()
    assert got.shape == target
    assert got.pack_axis == (quant_arrangement(slot, target, hf_block)[1] if fmt == quant.FP4 else None)
    if slot.expert is not None:  # only that expert's row is read: the others hold whatever the memory held
        row = quant.BlockQuantized(got.values[slot.expert], got.scales[slot.expert], got.fmt, got.block[1:],
                                   None if got.pack_axis is None else got.pack_axis - 1)
        np.testing.assert_array_equal(row.dequantize(np.float32), want)
    else:
        np.testing.assert_array_equal(got.dequantize(np.float32), want)


@pytest.mark.parametrize("slot, target, hf_block, match", [
    (Slot(("q",), "linear", 1), (128, 3, 96), (128, 128), "does not tile"),
    (Slot(("o",), "grouped", 3), (2, 1, 128, 96), (128, 128), "does not tile"),
    (Slot(("g",), "gate"), (3, 96, 128), (1, 128, 128), "cannot be split in halves"),
    (Slot(("n",), "copy"), (128,), (128, 128), "never stored block-quantized"),
])
def test_impossible_layouts_are_named(slot, target, hf_block, match):
    with pytest.raises(ValueError, match=match):
        quant_arrangement(slot, target, hf_block)


def test_check_names_format_problems():
    good = quant.quantize(RNG.standard_normal((4, 64)), quant.FP4, (1, 32), 1)
    for bad, match in [
        (quant.BlockQuantized(good.values, good.scales[:, :1], quant.FP4, (1, 32), 1), "scales shape"),
        (quant.BlockQuantized(good.values.view(np.int8), good.scales, quant.FP4, (1, 32), 1), "values must be uint8"),
        (quant.BlockQuantized(good.values, good.scales.view(np.uint8), quant.FP4, (1, 32), 1), "UE8M0"),
        (quant.BlockQuantized(good.values, good.scales, quant.FP4, (1, 32), None), "pack_axis"),
        (quant.BlockQuantized(good.values, good.scales, "int4", (1, 32), 1), "unknown format"),
    ]:
        with pytest.raises(ValueError, match=match):
            bad.check()


def test_bfloat16_dequantization_is_exact():
    """value · 2^k has at most 4 significant bits: bf16 (8) holds it exactly, so bf16 == f32 rounded."""
    for fmt, block, pack in [(quant.FP8, (128, 128), None), (quant.FP4, (1, 32), 1)]:
        q = quant.quantize(RNG.standard_normal((256, 256)) * 3, fmt, block, pack)
        f32 = q.dequantize(np.float32)
        np.testing.assert_array_equal(q.dequantize(jnp.bfloat16).astype(np.float32), f32)


def test_all_e4m3_bytes_round_trip_through_quantize():
    values = np.array([v for v in np.arange(256, dtype=np.uint8).view(quant.E4M3).astype(np.float32)
                       if np.isfinite(v)], np.float32)
    w = np.array(list(itertools.islice(itertools.cycle(values), 128 * 4)), np.float32).reshape(4, 128)
    w[:, 0] = 448.0  # every block's absmax at the top of the range: scale 1
    q = quant.quantize(w, quant.FP8, (1, 128))
    assert np.all(q.scales.view(np.uint8) == 127)
    np.testing.assert_array_equal(q.dequantize(np.float32), w)


def test_fp8_blocks_straddling_heads_load_dense(tmp_path):
    """A valid FP8 checkpoint whose 128-row blocks straddle heads (head_dim 24: q_b's block holds 5⅓ heads) loads
    dequantized exactly; keeping it block-quantized is refused with a message that says what does work."""
    cfg = m1.Config.tiny().replace(head_dim=24, qk_rope_head_dim=8)
    stored = synthetic.quantize_tensors(synthetic.original_tensors(cfg))
    path = synthetic.write_checkpoint(tmp_path / "ckpt", cfg, stored)
    model = m1.from_pretrained(path, dtype=jnp.float32)
    want = synthetic.dequantize_tensors(stored)["layers.1.attn.wq_b.weight"]  # HF [n·h, q]
    got = np.asarray(model.layers[1].self_attn.q_b_proj.kernel[...])  # [q, n, h]
    np.testing.assert_array_equal(got, want.T.reshape(got.shape))
    with pytest.raises(m1.CheckpointError, match="loaded dequantized, not kept block-quantized"):
        m1.from_pretrained(path, dtype=jnp.float32, quantized=True)
