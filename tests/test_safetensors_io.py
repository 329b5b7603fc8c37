"""The NumPy safetensors reader/writer agrees with the reference library (torch backend) on every dtype,
including FP8 e4m3 and UE8M0; corrupt and truncated files are described, not crashed on."""

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from model1_jax.io import safetensors_file as st

RNG = np.random.default_rng(0)
ARRAYS = {
    "e4m3": RNG.integers(0, 256, (3, 5), dtype=np.uint8).view(jnp.float8_e4m3fn),
    "e8m0": RNG.integers(0, 255, (2, 4), dtype=np.uint8).view(jnp.float8_e8m0fnu),
    "bf16": RNG.standard_normal((4, 3)).astype(jnp.bfloat16),
    "f32": RNG.standard_normal(7).astype(np.float32),
    "i8": RNG.integers(-128, 128, (2, 2), dtype=np.int8),
    "i64": RNG.integers(0, 9, (3, 2)),
    "empty": np.zeros((0, 4), np.float32),
}


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


@pytest.mark.oracle
def test_written_files_read_back_by_the_reference_library(tmp_path):
    import torch

    st.write(str(tmp_path / "a.safetensors"), ARRAYS)
    with safe_open(tmp_path / "a.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(ARRAYS)
        for name, want in ARRAYS.items():
            got = f.get_tensor(name)
            assert tuple(got.shape) == want.shape
            assert got.contiguous().view(torch.uint8).numpy().tobytes() == bits(want), name


@pytest.mark.oracle
def test_reference_files_read_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    torch_dtypes = {"e4m3": torch.float8_e4m3fn, "e8m0": torch.float8_e8m0fnu, "bf16": torch.bfloat16}
    tensors = {}
    for name, a in ARRAYS.items():
        if name in torch_dtypes:  # torch cannot take float8 NumPy arrays: go through the bytes
            tensors[name] = torch.from_numpy(np.ascontiguousarray(a).view(np.uint8).copy()).view(torch_dtypes[name])
        else:
            tensors[name] = torch.from_numpy(a.copy())
    save_file(tensors, str(tmp_path / "ref.safetensors"))
    infos = {i.name: i for i in st.read_header(str(tmp_path / "ref.safetensors"))}
    assert {n: i.dtype for n, i in infos.items()} == {"e4m3": "F8_E4M3", "e8m0": "F8_E8M0", "bf16": "BF16",
                                                      "f32": "F32", "i8": "I8", "i64": "I64", "empty": "F32"}
    for name, want in ARRAYS.items():
        got = st.read_tensor(infos[name])
        assert got.dtype == want.dtype and got.shape == want.shape and bits(got) == bits(want), name


@pytest.mark.parametrize("damage, match", [
    (lambda b: b[: len(b) - 10], "past the end of the data .* truncated"),
    (lambda b: b[:4], "too short"),
    (lambda b: b[:8] + b"{not json" + b[17:], "not valid JSON"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length .* exceeds the file"),
    (lambda b: b.replace(b'"F32"', b'"X99"'), "unsupported dtype X99"),
])
def test_damaged_files_are_described(tmp_path, damage, match):
    st.write(str(tmp_path / "a.safetensors"), {"x": np.zeros((4, 4), np.float32), "y": np.ones(3, np.float32)})
    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "b.safetensors").write_bytes(damage(data))
    with pytest.raises(st.SafetensorsError, match=match):
        st.read_header(str(tmp_path / "b.safetensors"))
