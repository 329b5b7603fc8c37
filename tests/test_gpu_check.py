"""scripts/gpu_check.py in its CPU smoke mode (tiny shapes, kernel in interpret mode): the stages run in their own
processes, results land in one JSON and a markdown summary. This keeps the one-command GPU check from rotting; it
measures nothing."""

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def test_smoke_run_writes_one_json_and_a_summary(tmp_path):
    rc = gpu_check.main(["--smoke", "--stages", "env,kernel_matrix,sparse_decode,decode", "--out", str(tmp_path),
                         "--deadline", "600"])
    (path,) = tmp_path.glob("gpu_check_cpu-smoke_*.json")
    report = json.loads(path.read_text())
    stages = report["stages"]
    assert rc == 0, {k: (v["status"], v.get("log_tail", "")[-800:]) for k, v in stages.items()}
    assert report["smoke"] and stages["env"]["result"]["platform"] == "cpu"
    matrix = stages["kernel_matrix"]["result"]
    assert matrix["cases"] == 2 and matrix["passed"] == 2
    assert all(r["matches_reference"] for r in stages["sparse_decode"]["result"]["results"])
    assert stages["decode"]["status"] == "skipped: no CPU smoke mode"
    summary = path.with_suffix(".md").read_text()
    assert "| kernel_matrix | ok |" in summary and "2/2 cases" in summary


def test_a_stage_that_overruns_is_cut_off_and_the_run_goes_on(tmp_path):
    stage = gpu_check.Stage("kernel_matrix", 1)
    record = gpu_check.run_stage(stage, smoke=True, limit=0.5)
    assert record["status"].startswith("timed out after")


def test_stage_limits_fit_the_whole_run():
    """The stages' own limits add up to at most the default deadline (8 minutes), so none is cut short by it."""
    assert sum(stage.seconds for stage in gpu_check.STAGES) <= gpu_check.DEADLINE_S == 480.0
    assert {stage.name for stage in gpu_check.STAGES} >= {"env", "kernel_matrix", "sparse_decode", "decode", "train",
                                                           "serve", "load"}
