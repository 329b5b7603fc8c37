"""The package's layers: imports flow one way, there is no cycle, and `import model1_jax` stays light.

Every import statement of every module counts — module level, inside functions, and under
`if TYPE_CHECKING:` — because each of them is a dependency a reader has to hold in mind.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("model1_jax", "pallas_kernels")

# What each layer of model1_jax may import (besides itself). The order, bottom up:
#   common → config, text → parallel → model → io, inference → train → cli
BELOW = {
    "common": set(),
    "config": {"common"},
    "text": {"common"},
    "parallel": {"common", "config"},
    "model": {"common", "config", "parallel"},
    "io": {"common", "config", "parallel", "model"},
    "inference": {"common", "config", "parallel", "model", "text"},
    "train": {"common", "config", "parallel", "model", "io", "text"},
    "cli": {"common", "config", "parallel", "model", "io", "inference", "train", "text"},
}
# The layers that may call the kernels (pallas_kernels itself never imports model1_jax).
KERNEL_USERS = {"model", "inference", "train", "cli"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: pathlib.Path, name: str, modules: dict) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement anywhere in the file."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub if sub in modules else base, node.lineno))
    return [(m, line) for m, line in found if m.split(".")[0] in PACKAGES]


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "model1_jax" and len(parts) > 1 else None


def _graph() -> dict[str, list[tuple[str, int]]]:
    modules = _modules()
    return {name: _imports(path, name, modules) for name, path in modules.items()}


def test_imports_flow_one_way():
    problems = []
    for module, imports in _graph().items():
        layer = _layer(module)
        for target, line in imports:
            where = f"{module}:{line} imports {target}"
            if module.startswith("pallas_kernels"):
                if target.startswith("model1_jax"):
                    problems.append(f"{where} (pallas_kernels never imports model1_jax)")
                continue
            if layer is None:  # the package's own __init__: lazy re-exports of every layer
                continue
            if layer not in BELOW:
                problems.append(f"{module} is in no known layer; add it to BELOW")
                continue
            if target.startswith("pallas_kernels"):
                if layer not in KERNEL_USERS:
                    problems.append(f"{where} (only {sorted(KERNEL_USERS)} may call kernels)")
                continue
            target_layer = _layer(target)
            if target_layer is None:
                problems.append(f"{where} (layers import each other's modules, never the top-level package)")
            elif target_layer != layer and target_layer not in BELOW[layer]:
                problems.append(f"{where} (layer {layer!r} may import only {sorted(BELOW[layer])})")
    assert not problems, "imports against the layering:\n  " + "\n  ".join(problems)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _ in imps}) for m, imps in _graph().items()}
    # A package's __init__ and its submodules form no cycle worth reporting: Python imports the package
    # first and the re-exports are resolved after. So the __init__ of a package is left out of the graph.
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    graph = {m: [t for t in ts if t not in packages] for m, ts in graph.items() if m not in packages}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == "open":
                cycles.append(" → ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_layering_test_catches_a_violation(tmp_path, monkeypatch):
    """The check itself works: a model module importing the inference layer is reported."""
    fake = tmp_path / "model1_jax" / "model"
    fake.mkdir(parents=True)
    (tmp_path / "model1_jax" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "bad.py").write_text("def f():\n    from model1_jax.inference import steps  # function-local\n")
    (tmp_path / "pallas_kernels").mkdir()
    (tmp_path / "pallas_kernels" / "__init__.py").write_text("from model1_jax.model import bad\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError) as err:
        test_imports_flow_one_way()
    assert "model1_jax.model.bad:2 imports model1_jax.inference" in str(err.value)
    assert "pallas_kernels:1 imports model1_jax.model.bad" in str(err.value)


@pytest.mark.parametrize("package", PACKAGES)
def test_import_is_light(package):
    """Importing a package loads neither optax, Orbax, the Pallas backend, PyTorch nor the test oracle."""
    heavy = ("optax", "orbax", "jax.experimental.pallas", "jax._src.pallas", "torch", "transformers", "tokenizers")
    code = (f"import sys, {package}; heavy = {heavy!r}; "
            "print(sorted(m for m in sys.modules if m.startswith(heavy)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"import {package} loads {out.stdout.strip()}"


def test_modules_read_in_one_sitting():
    """Every module of both packages stays under ~450 lines, every line within 120 characters."""
    problems = []
    for name, path in _modules().items():
        lines = path.read_text().splitlines()
        if len(lines) > 450:
            problems.append(f"{name}: {len(lines)} lines (split it by concern)")
        problems += [f"{name}:{n}: {len(line)} characters" for n, line in enumerate(lines, 1) if len(line) > 120]
    assert not problems, "\n".join(problems)
