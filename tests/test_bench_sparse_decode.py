"""The benchmark script runs end to end (data generation, both backends, check, JSON) in its CPU smoke mode,
and refuses to run without a GPU otherwise. It cannot be timed here; this only keeps it from rotting."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_sparse_decode.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_sparse_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_checked_results(bench, tmp_path):
    rc = bench.main(["--smoke", "--configs", "CONFIG3,V3.2", "--batch-sizes", "1", "--iters", "1", "--warmup", "0",
                     "--out", str(tmp_path)])
    (path,) = tmp_path.glob("sparse_decode_cpu-smoke_*.json")
    data = json.loads(path.read_text())
    assert rc == 0 and data["smoke"] and data["gpu"] is None and data["jax"] == jax.__version__
    assert [r["config"] for r in data["results"]] == ["CONFIG3", "V3.2"]
    for r in data["results"]:
        assert r["matches_reference"] and r["pallas"]["us"] > 0 and r["xla"]["us"] > 0 and r["gflop"] > 0


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the no-GPU exit")
def test_refuses_to_run_without_gpu(bench, capsys):
    assert bench.main([]) == 2
    assert "no GPU" in capsys.readouterr().err
