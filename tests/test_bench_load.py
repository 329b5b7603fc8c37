"""scripts/bench_load.py's ceiling: the rate a loader would reach at the plain stages' rates (its docstring). The
benchmark itself is run by hand (it writes gigabytes); this keeps its arithmetic honest."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "bench_load.py"
GB = 10**9


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_load", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


PLAIN = {"read": {"stage": "read", "gb_per_s": 5.0}, "read_new": {"stage": "read_new", "gb_per_s": 2.0},
         "copy_direct": {"stage": "copy_direct", "gb_per_s": 1.5}}


def test_the_slowest_thing_a_stage_must_do_bounds_it(bench):
    dense = {"stage": "from_pretrained", "bytes": 1.4 * GB, "kept_bytes": 4.0 * GB}  # new memory: 2 s
    assert bench.ceiling(dense, PLAIN) == pytest.approx(1.4 / 2.0)
    fp8 = {"stage": "convert_fp8", "bytes": 1.4 * GB, "output_bytes": 1.4 * GB}  # the disk: as fast as the copy
    assert bench.ceiling(fp8, PLAIN) == pytest.approx(1.5)
    bf16 = {"stage": "convert_bf16", "bytes": 1.4 * GB, "output_bytes": 4.0 * GB}
    assert bench.ceiling(bf16, PLAIN) == pytest.approx(1.4 * 1.5 / 4.0)
    quick = {"stage": "load_fp8", "bytes": 1.4 * GB, "kept_bytes": 0.1 * GB}  # then reading bounds it
    assert bench.ceiling(quick, PLAIN) == pytest.approx(5.0)


def test_no_ceiling_for_the_plain_stages_or_without_them(bench):
    assert bench.ceiling({**PLAIN["read_new"], "bytes": GB, "kept_bytes": GB}, PLAIN) is None
    row = {"stage": "from_pretrained_q", "bytes": GB, "kept_bytes": GB}
    assert bench.ceiling(row, {k: v for k, v in PLAIN.items() if k != "copy_direct"}) is None
