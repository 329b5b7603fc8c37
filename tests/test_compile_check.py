"""Static GPU compile check on the CPU (docs/compile_check.md): representative Pallas-Triton kernel variants (sparse
decode; sparse attention's forward and dKV) compile with Triton for sm_90a (and sm_100a) within the shared-memory
limit and the spill budget, with their matmuls on the tensor cores. `python scripts/compile_check.py` runs every
variant and writes the figures."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import compile_check as cc
from pallas_kernels import compile_check_sparse as ccs


def test_representative_variants_compile_within_limits():
    configs = [c for c in cc.configurations() if c.name in cc.REPRESENTATIVE]
    assert [c.name for c in configs] == sorted(cc.REPRESENTATIVE, key=[c.name for c in configs].index)
    records = cc.check_matrix(configs, list(cc.ARCHS), jobs=2)
    assert len(records) == len(configs) * len(cc.ARCHS)
    problems = [p for r in records for p in r["problems"]]
    assert not problems, "\n".join(problems)
    for r in records:  # the figures were read, not defaulted
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] > 0 and r["ptx_lines"] > 100, r


def test_representative_attention_kernels_compile_within_limits():
    """V4-Flash shape (n 64, h 512, bf16, 640 indices) on sm_90a: the forward and the dKV kernel."""
    configs = [c for c in ccs.all_configurations() if c.name in ccs.REPRESENTATIVE]
    assert sorted(c.name for c in configs) == sorted(ccs.REPRESENTATIVE)
    records = cc.check_matrix(configs, ["sm_90a"], jobs=2)
    problems = [p for r in records for p in r["problems"]]
    assert not problems, "\n".join(problems)
    for r in records:
        assert r["family"] == "sparse_attention" and r["n"] == 64 and r["k"] == 640 and r["d_chunk"] is None, r
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] > 0 and r["ptx_lines"] > 100 and r["mma"] == "wgmma", r


def test_configurations_cover_every_launchable_variant():
    names = [c.name for c in ccs.all_configurations()]
    assert len(names) == len(set(names))
    decode = cc.configurations()
    got = {(c.kv_format, c.block_h, c.split, c.extra) for c in decode}
    want = {(f, b, s, x) for f in ("model1", "v32") for b in (16, 32, 64) for s in (False, True) for x in (False, True)}
    assert want <= got
    assert {c.h_q for c in decode} == {16, 32, 64, 128}
    assert any(c.large_cache for c in decode)
    attention = {(c.kind, c.n, c.k) for c in ccs.all_configurations() if c.family == "sparse_attention"}
    assert attention == {(kind, n, k) for kind in ("fwd", "dq", "dkv") for n, k in ((64, 640), (128, 1152))}
    assert len(names) == len(decode) + len(attention)


def test_the_limits_can_fail():
    cfg = cc.KernelConfig("model1", 64, False, False)
    ok = cc.CompileStats(arch="sm_90a", registers=255, spill_store_bytes=0, spill_load_bytes=0, stack_bytes=0,
                         shared_bytes=cc.SMEM_LIMIT_BYTES, mma="wgmma", trap=False, ptx_lines=1000, seconds=1.0)
    assert cc.problems(cfg, ok) == []
    for change, what in [(dict(shared_bytes=cc.SMEM_LIMIT_BYTES + 1), "shared memory"),
                         (dict(spill_store_bytes=cc.SPILL_BUDGET_BYTES + 4), "spill"),
                         (dict(trap=True), "trap"), (dict(mma="mma.sync"), "expected wgmma")]:
        [problem] = cc.problems(cfg, dataclasses.replace(ok, **change))
        assert what in problem
    small = cc.KernelConfig("v32", 32, True, True)
    assert cc.problems(small, dataclasses.replace(ok, arch="sm_100a", mma="mma.sync")) == []
    dkv = ccs.AttentionConfig("dkv", 128, 1152)  # the same limits, its family's spill budget
    ok_100 = dataclasses.replace(ok, arch="sm_100a", mma="tcgen05")
    assert cc.problems(dkv, ok_100) == []
    for change, what in [(dict(shared_bytes=cc.SMEM_LIMIT_BYTES + 1), "shared memory"),
                         (dict(spill_store_bytes=ccs.SPILL_BUDGET_BYTES + 4), "spill"), (dict(mma="none"), "tcgen05")]:
        [problem] = cc.problems(dkv, dataclasses.replace(ok_100, **change))
        assert what in problem and dkv.name in problem


def test_chunk_choice_per_architecture():
    """Two 256-column halves except where Triton uses tcgen05 (sm_100a, head block 64): those compile to a trap."""
    assert cc.arch_d_chunk("sm_90a", 64) == 256 and cc.arch_d_chunk("sm_100a", 64) == 512
    assert cc.arch_d_chunk("sm_100a", 32) == 256 and cc.arch_d_chunk("sm_90a", 16) == 256


def test_a_module_without_a_triton_kernel_is_reported():
    lowered = cc.lower_for_cuda(lambda x: x * 2, jax.ShapeDtypeStruct((4,), jnp.float32))
    with pytest.raises(cc.CompileCheckError, match="no __gpu\\$xla.gpu.triton custom call"):
        cc.triton_kernels(lowered)
