"""The repository explains itself: every `docs/<file>.md §N` a file cites exists, nothing cites a document
outside the repository, and the README's Python examples run as written."""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [p for d in ("model1_jax", "pallas_kernels", "scripts", "tests", "benchmarks", "docs")
           for p in sorted((ROOT / d).rglob("*")) if p.suffix in (".py", ".md")] + [ROOT / "README.md"]
CITATION = re.compile(r"docs/([\w-]+\.md) §(\d+(?:\.\d+)*)")


def _sections(doc: pathlib.Path) -> set[str]:
    """Section numbers of a doc's headings: "## 4. Title" → "4", "### 4.6 Title" → "4.6"."""
    return {m.group(1).rstrip(".") for m in re.finditer(r"^#{2,4} (\d+(?:\.\d+)*)\.? ", doc.read_text(), re.M)}


def test_every_docs_citation_resolves():
    problems, cache = [], {}
    for path in SOURCES:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for name, section in CITATION.findall(line):
                doc = ROOT / "docs" / name
                if name not in cache:
                    cache[name] = _sections(doc) if doc.exists() else None
                if cache[name] is None:
                    problems.append(f"{path.relative_to(ROOT)}:{n}: docs/{name} does not exist")
                elif section not in cache[name]:
                    problems.append(f"{path.relative_to(ROOT)}:{n}: docs/{name} has no section {section}")
    assert not problems, "\n".join(problems)


def test_nothing_cites_documents_outside_the_repository():
    outside = re.compile(r"\bspec §|\bSpec §|shared/spec|shared/guides|\bguide (rule|§)")
    hits = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}" for p in SOURCES if p.name != "test_docs.py"
            for n, line in enumerate(p.read_text().splitlines(), 1) if outside.search(line)]
    assert not hits, "\n".join(hits)


def _readme_examples() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)


def test_readme_has_examples():
    assert len(_readme_examples()) >= 4


def test_readme_examples_run(tmp_path, monkeypatch):
    """The README's ```python blocks, in order, in one namespace (as a reader pastes them into one session), in an
    empty working directory. The suite's 8 simulated devices serve the multi-device example."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, code in enumerate(_readme_examples()):
        try:
            exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        except Exception as e:  # noqa: BLE001  (re-raised with the block that failed)
            pytest.fail(f"README python block {i} raised {type(e).__name__}: {e}\n{code}")
    assert os.listdir(tmp_path), "the examples were expected to write a checkpoint into the working directory"
