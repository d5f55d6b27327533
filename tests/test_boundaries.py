"""Module boundaries of solar_quant/: the import graph (top-level and function-level imports,
read with ast; `if TYPE_CHECKING:` blocks left out) is acyclic, `verify` does not reach into `pipeline`, the per-layer quantizer
imports neither pydantic nor the options, and RTN and the GPTQ v1 packer stand apart from GPTQ."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "solar_quant"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _runtime_nodes(tree: ast.AST):
    """Every node, skipping `if TYPE_CHECKING:` bodies (never executed)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def import_graph() -> dict[str, set[str]]:
    """module -> the solar_quant modules it imports anywhere in its body."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    kept = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(kept + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                resolved = resolve(target) if target.startswith("solar_quant") else None
                if resolved and resolved != module and resolved != "solar_quant":
                    graph[module].add(resolved)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    # pipeline/gptq imports formats.gptq_v1 inside _run only: the graph must still hold the edge
    assert "solar_quant.formats.gptq_v1" in graph["solar_quant.pipeline.gptq"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_verify_does_not_import_the_pipeline():
    graph = import_graph()
    direct = {m for m in graph["solar_quant.verify"] if m.startswith("solar_quant.pipeline")}
    assert not direct, direct
    assert "solar_quant.pipeline.bnb" not in _reachable(graph, "solar_quant.verify")


def test_rtn_and_the_packer_do_not_import_gptq():
    graph = import_graph()
    for module in ("solar_quant.methods.rtn", "solar_quant.formats.gptq_v1"):
        assert "solar_quant.methods.gptq" not in _reachable(graph, module), module


def test_layer_quantizer_imports_neither_pydantic_nor_options():
    graph = import_graph()
    reach = _reachable(graph, "solar_quant.pipeline.layer_quant")
    assert "solar_quant.options" not in reach, sorted(reach)
    code = ("import sys, solar_quant.pipeline.layer_quant; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'typer') or m == 'solar_quant.options'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
