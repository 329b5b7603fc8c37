"""scripts/bench_load.py's ceiling (the rate a loader would reach at the plain stages' rates, its docstring) and its
hold on the page cache. The benchmark itself is run by hand (it writes gigabytes); this keeps its arithmetic and its
conditions honest."""

from __future__ import annotations

import importlib.util
import os
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


PLAIN = {"read": {"stage": "read", "gb_per_s": 5.0, "bytes": 1.4 * GB},
         "read_new": {"stage": "read_new", "gb_per_s": 2.0, "bytes": 1.4 * GB},
         "copy_direct": {"stage": "copy_direct", "gb_per_s": 1.5, "bytes": 1.4 * GB}}


def test_the_slowest_thing_a_stage_must_do_bounds_it(bench):
    dense = {"stage": "from_pretrained", "bytes": 1.4 * GB, "kept_bytes": 4.0 * GB}  # new memory: 2 s
    assert bench.ceiling(dense, PLAIN) == pytest.approx(1.4 / 2.0)
    fp8 = {"stage": "convert_fp8", "bytes": 1.4 * GB, "output_bytes": 1.4 * GB}  # the disk: as fast as the copy
    assert bench.ceiling(fp8, PLAIN) == pytest.approx(1.5)
    bf16 = {"stage": "convert_bf16", "bytes": 1.4 * GB, "output_bytes": 4.0 * GB}
    assert bench.ceiling(bf16, PLAIN) == pytest.approx(1.4 * 1.5 / 4.0)
    quick = {"stage": "load_fp8", "bytes": 1.4 * GB, "kept_bytes": 0.1 * GB}  # then reading bounds it
    assert bench.ceiling(quick, PLAIN) == pytest.approx(5.0)


def test_kept_memory_is_created_at_the_rate_measured_for_the_nearer_amount(bench):
    plain = {**PLAIN, "fill_new": {"stage": "fill_new", "gb_per_s": 1.0, "bytes": 4.0 * GB}}
    dense = {"stage": "from_pretrained", "bytes": 1.4 * GB, "kept_bytes": 4.0 * GB}  # fill_new's 4 GB: 4 s
    assert bench.ceiling(dense, plain) == pytest.approx(1.4 / 4.0)
    quantized = {"stage": "from_pretrained_q", "bytes": 1.4 * GB, "kept_bytes": 1.3 * GB}
    assert bench.ceiling(quantized, plain) == pytest.approx(1.4 / 0.65)  # at read_new's rate: 0.65 s
    assert bench.ceiling(dense, PLAIN) == pytest.approx(1.4 / 2.0)  # runs without fill_new: read_new's rate


def test_no_ceiling_for_the_plain_stages_or_without_them(bench):
    assert bench.ceiling({**PLAIN["read_new"], "bytes": GB, "kept_bytes": GB}, PLAIN) is None
    row = {"stage": "from_pretrained_q", "bytes": GB, "kept_bytes": GB}
    assert bench.ceiling(row, {k: v for k, v in PLAIN.items() if k != "copy_direct"}) is None


def _drop(file: pathlib.Path) -> None:
    """Asks the kernel to drop the file's clean pages from the page cache (it keeps pages some process maps)."""
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_held_files_stay_in_the_page_cache(bench, tmp_path):
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "empty"]
    for i, file in enumerate(files[:2]):
        file.write_bytes(os.urandom((3 + i) << 20))
    files[2].touch()
    for file in files:
        _drop(file)
    dropped = bench.resident_fraction(files)
    with bench.held_in_page_cache(files):
        assert bench.resident_fraction(files) == 1.0
        for file in files:
            _drop(file)
        assert bench.resident_fraction(files) == 1.0  # mapped: the kernel keeps them
    for file in files:
        _drop(file)
    assert bench.resident_fraction(files) == dropped  # released once the hold ends
    assert bench.resident_fraction([files[2]]) == 1.0  # nothing to read: counts as cached
