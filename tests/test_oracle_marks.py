"""Every test that needs PyTorch or transformers carries `pytest.mark.oracle`, so `pytest --no-oracle` (the
newest-JAX CI leg, which has no PyTorch) leaves it out instead of failing on it."""

from tests import oracle_marks


def test_every_oracle_use_is_marked():
    problems = [p for path in sorted(oracle_marks.TESTS.glob("test_*.py"))
                for p in oracle_marks.unmarked_oracle_uses(path)]
    assert not problems, "\n".join(problems)


def test_the_check_finds_unmarked_uses(tmp_path):
    """The rule itself: module-level and in-test imports, a tests/ module that imports torch, framework="pt"."""
    cases = {
        "import torch\n": 1,
        "import pytest\nimport torch\npytestmark = pytest.mark.oracle\n": 0,
        "def test_a():\n    from transformers import AutoConfig\n": 1,
        "import pytest\n@pytest.mark.oracle\ndef test_a():\n    from transformers import AutoConfig\n": 0,
        "from tests import hf_reference as ref\n": 1,
        "def test_a():\n    from safetensors.torch import save_file\n": 1,
        "from safetensors import safe_open\ndef test_a(p):\n    safe_open(p, framework='pt')\n": 1,
        "from safetensors import safe_open\ndef test_a(p):\n    safe_open(p, framework='np')\n": 0,
        "import pytest\n@pytest.fixture\ndef hf():\n    import torch\n": 1,
    }
    for i, (source, want) in enumerate(cases.items()):
        path = tmp_path / f"test_case{i}.py"
        path.write_text(source)
        assert len(oracle_marks.unmarked_oracle_uses(path)) == want, source


def test_a_module_marked_as_a_whole_named_under_no_oracle_is_skipped():
    """Named on the command line, a module marked oracle as a whole is reported skipped under --no-oracle, never
    imported (its imports would fail without PyTorch; here they would reach the import blocker)."""
    import subprocess
    import sys

    marked = sorted(p.name for p in oracle_marks.TESTS.glob("test_*.py") if oracle_marks.module_marked(p))
    assert "test_loading.py" in marked
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "--no-oracle",
                          f"tests/{marked[0]}"], cwd=oracle_marks.TESTS.parent, capture_output=True, text=True,
                         timeout=300)
    # pytest's "no tests collected" (as when a -m selection leaves nothing), not a collection error (2)
    assert run.returncode == 5, run.stdout + run.stderr
    assert "1 skipped" in run.stdout and "left out under --no-oracle" in run.stdout + run.stderr, run.stdout
