"""Multi-host through JAX's own runtime: two processes of 4 CPU devices form one 8-device mesh.

Each process runs `tests/multihost_worker.py` with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set, as a user's hosts would (`distributed.initialize()` → `jax.distributed.initialize`,
gloo collectives on CPU); the forward logits and greedy `m1.generate` tokens must equal one process, and a
checkpoint loaded straight into a layout that splits the experts across the two processes must equal the
single-process read, the processes agreeing on which weights to dequantize on their devices.

Opt-in (`MODEL1_TEST_MULTIHOST=1`): two processes compiling side by side take about a minute on two
cores, more than the suite's budget allows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import model1_jax as m1
from model1_jax.io import convert, hf, placement, regions
from tests import synthetic as syn
from tests.multihost_worker import LOAD_LAYOUT, PROMPTS, inputs
from tests.test_sharding import CFG
from tests.util import forward, random_model

pytestmark = pytest.mark.skipif(os.environ.get("MODEL1_TEST_MULTIHOST") != "1",
                                reason="opt-in: set MODEL1_TEST_MULTIHOST=1 (two processes, about a minute)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(args) -> None:
    """Runs tests/multihost_worker.py as processes 0 and 1 of one run, `args(pid)` its arguments."""
    port = free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "PYTHONPATH": ROOT}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", *args(pid)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]


def test_two_processes_equal_one(tmp_path):
    run_workers(lambda pid: [str(tmp_path / f"{pid}.json")])

    model = random_model(CFG)
    ids = inputs()
    want_logits = np.asarray(forward(model, ids))
    want_tokens = m1.generate(model, [ids[i, :n].tolist() for i, n in enumerate(PROMPTS)], 4, cache_dtype="float32",
                              stop_tokens=(), page_size=4, chunk=8).tokens
    for pid in range(2):  # every process holds the full results
        got = json.loads((tmp_path / f"{pid}.json").read_text())
        assert got["devices"] == [8, 4]
        assert got["hosts_of_data"] == [[0], [1]]  # `data` is the axis that crosses hosts
        err = np.abs(np.array(got["logits"]) - want_logits).max() / np.abs(want_logits).max()
        assert err < 1e-5, f"process {pid}: max relative logit error {err:.2e}"
        assert got["tokens"] == want_tokens, f"process {pid}"
    assert jax.process_count() == 1  # the test process itself stayed single-host


def test_two_processes_load_their_shards_and_agree_on_device_dequantization(tmp_path):
    """Direct placement across processes: each reads its own shards; dense and quantized loads, and `m1.load` of the
    checkpoint's fp8 conversion, equal the single-process read bit for bit. One scale byte out of the device's exact
    range, in an expert only process 1 holds, sends that weight to the host path in both processes (process 0 alone
    would have taken the device)."""
    stored = syn.quantize_tensors(syn.original_tensors(syn.CONFIG, seed=5))
    name = f"layers.0.ffn.experts.{syn.CONFIG.n_routed_experts - 1}.w1"
    scale = np.array(stored[f"{name}.scale"])
    scale.view(np.uint8)[0, 0] = 0  # 2^-127: below device_dequant.MIN_SCALE
    stored[f"{name}.scale"] = scale
    checkpoint = syn.write_checkpoint(tmp_path / "ckpt", syn.CONFIG, stored, shards=2,
                                      quantization_config=syn.QUANTIZATION_CONFIG)
    orbax_dir = tmp_path / "orbax"
    convert.convert(checkpoint, orbax_dir, dtype=jnp.bfloat16, quantized=True, progress=False)
    run_workers(lambda pid: ["load", str(checkpoint), str(orbax_dir), str(tmp_path / f"{pid}.npz")])

    plan = hf.plan_checkpoint(checkpoint, dtype=jnp.bfloat16)
    corrupted = next(a.slot.path for u in plan.units for a in u.assignments if a.info.name == f"{name}.weight")
    candidates = placement._candidates(plan, m1.Layout.build(*LOAD_LAYOUT))  # the same mesh shape, in one process
    assert corrupted in candidates and len(candidates) > 1
    want = {"dense": {p: [v] for p, v in regions.read_units(plan.units, plan.targets, keep_quantized=False,
                                                             workers=2).items()},
            "quantized": {p: jax.tree.leaves(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(
                m1.from_pretrained(checkpoint, dtype=jnp.bfloat16, quantized=True)))}}
    results = [np.load(tmp_path / f"{pid}.npz") for pid in range(2)]
    want["orbax"] = want["quantized"]  # the fp8 conversion keeps the stored values and scales
    for pid, got in enumerate(results):
        assert int(got["dense/device_calls"]) == len(candidates) - 1, pid  # the same weights in both processes
        assert int(got["quantized/device_calls"]) == 0, pid
        for kind, values in want.items():
            for path, leaves in values.items():
                for i, leaf in enumerate(leaves):
                    key = f"{kind}/{'/'.join(map(str, path))}/{i}"
                    np.testing.assert_array_equal(got[key], np.ascontiguousarray(leaf).reshape(-1).view(np.uint8),
                                                  err_msg=f"process {pid}: {key}")
    # only process 1 holds the expert with the bad scale byte: the agreement, not each process's own check, decided
    assert [int(got["rejected_scale_shards"]) for got in results] == [0, 1]
