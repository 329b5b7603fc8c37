"""Which tests need the PyTorch oracle, read from the test sources (no import, so it works where torch is absent).

A test needs the oracle when it imports torch, transformers or safetensors' torch backend, directly or through
a tests/ module that does (`tests/hf_reference.py`), or opens a safetensors file with framework="pt". Such a
test must carry `pytest.mark.oracle`: on its function when the import is inside it, or as the module's
`pytestmark` when the import is at module level. `pytest --no-oracle` (tests/conftest.py) then leaves out
every marked test, which is how the newest-JAX leg (.ci/python313.sh) runs without PyTorch; without the
option nothing is skipped, and a missing torch fails those tests.
"""

from __future__ import annotations

import ast
import functools
import pathlib

TESTS = pathlib.Path(__file__).resolve().parent


def _is_oracle_mark(node: ast.AST) -> bool:
    """`pytest.mark.oracle`, called or not."""
    node = node.func if isinstance(node, ast.Call) else node
    return (isinstance(node, ast.Attribute) and node.attr == "oracle" and isinstance(node.value, ast.Attribute)
            and node.value.attr == "mark")


def _imported(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return []


def _is_oracle_import(name: str, oracle_modules: frozenset[str]) -> bool:
    return (name.split(".")[0] in ("torch", "transformers") or name == "safetensors.torch"
            or name.startswith("safetensors.torch.") or name in oracle_modules)


def _uses(node: ast.AST, oracle_modules: frozenset[str]) -> bool:
    """Whether the code under `node` imports an oracle package or opens safetensors with framework="pt"."""
    for sub in ast.walk(node):
        if any(_is_oracle_import(name, oracle_modules) for name in _imported(sub)):
            return True
        if isinstance(sub, ast.Call) and any(k.arg == "framework" and isinstance(k.value, ast.Constant)
                                             and k.value.value == "pt" for k in sub.keywords):
            return True
    return False


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """Module statements outside function and class bodies (imports under a top-level `if`/`try` included)."""
    out, todo = [], list(tree.body)
    while todo:
        stmt = todo.pop()
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        if isinstance(stmt, (ast.If, ast.Try, ast.With)):
            todo += [s for field in ("body", "orelse", "finalbody") for s in getattr(stmt, field, [])]
            todo += [s for h in getattr(stmt, "handlers", []) for s in h.body]
            continue
        out.append(stmt)
    return out


@functools.cache
def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


@functools.cache
def oracle_modules() -> frozenset[str]:
    """tests/ modules (as `tests.name`) whose import needs the oracle, transitively."""
    found: set[str] = set()
    while True:
        new = {f"tests.{p.stem}" for p in TESTS.glob("*.py")
               if f"tests.{p.stem}" not in found
               and any(_uses(s, frozenset(found)) for s in _module_level(_tree(p)))}
        if not new:
            return frozenset(found)
        found |= new


def module_marked(path: pathlib.Path) -> bool:
    """Whether the module assigns `pytestmark` a value holding `pytest.mark.oracle`."""
    for stmt in _tree(path).body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark"
                                                for t in stmt.targets):
            return any(_is_oracle_mark(n) for n in ast.walk(stmt.value))
    return False


def unmarked_oracle_uses(path: pathlib.Path) -> list[str]:
    """Places in a test module that use the oracle without the mark (empty when the module is in order)."""
    tree, mods = _tree(path), oracle_modules()
    if module_marked(path):
        return []
    problems = [f"{path.name}:{s.lineno}: module-level oracle import; add `pytestmark = pytest.mark.oracle`"
                for s in _module_level(tree) if _uses(s, mods)]
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            marked_class = any(_is_oracle_mark(d) for d in node.decorator_list)
            for fn in node.body:
                if isinstance(fn, ast.FunctionDef) and not marked_class:
                    problems += _function_problem(path, fn, mods)
    for fn in tree.body:
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            problems += _function_problem(path, fn, mods)
    return problems


def _function_problem(path, fn, mods) -> list[str]:
    if not _uses(fn, mods) or (fn.name.startswith("test") and any(_is_oracle_mark(d) for d in fn.decorator_list)):
        return []
    what = "test" if fn.name.startswith("test") else "helper or fixture (move the use into a marked test)"
    return [f"{path.name}:{fn.lineno}: {what} {fn.name} uses the oracle without @pytest.mark.oracle"]
