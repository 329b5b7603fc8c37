"""Multi-host through JAX's own runtime: two processes of 4 CPU devices form one 8-device mesh.

Each process runs `tests/multihost_worker.py` with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID set, as a user's hosts would (`distributed.initialize()` → `jax.distributed.initialize`,
gloo collectives on CPU); the forward logits and greedy `m1.generate` tokens must equal one process.

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
import numpy as np
import pytest

import model1_jax as m1
from tests.multihost_worker import PROMPTS, inputs
from tests.test_sharding import CFG
from tests.util import forward, random_model

pytestmark = pytest.mark.skipif(os.environ.get("MODEL1_TEST_MULTIHOST") != "1",
                                reason="opt-in: set MODEL1_TEST_MULTIHOST=1 (two processes, about a minute)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    port = free_port()
    procs = []
    for pid in range(2):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
               "PYTHONPATH": ROOT}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(tmp_path / f"{pid}.json")],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out[-3000:]

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
