"""The shape of the package: which package may import which, and how big each may grow (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "banpick_cli"
# Lower layers never import higher ones; packages within a layer do not import each other.
LAYERS = [
    {"errors", "paths", "progress", "checks", "outputs", "interrupts", "__init__", "__main__"},
    {"routing"},
    {"profile"},
    {"data"},
    {"models", "tasks"},
    # The runtime (what `apply` and the engine plugins import) beside the calibration passes: neither
    # imports the other, so serving never depends on calibration code.
    {"passes", "runtime"},
    {"evaluation", "report", "export"},
    {"stages"},
    {"cli", "demo"},
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _package_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Returns the banpick_cli packages a module imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "banpick_cli" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_package_has_a_layer():
    packages = {_package_of(p) for p in PACKAGE.rglob("*.py")}
    assert packages <= set(LEVEL), f"place these in LAYERS and docs/architecture.md: {sorted(packages - set(LEVEL))}"


def test_no_package_imports_one_above_it_or_beside_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = _package_of(path)
        for other in _imports(path) - {mine}:
            if LEVEL[other] >= LEVEL[mine] and LEVEL[mine] > 0:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {other}")
    assert not wrong, wrong


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph() -> dict[str, set[str]]:
    """Returns {module: the banpick_cli modules it imports, at its top, inside functions or for type checking}."""
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from pkg import sub` imports the module pkg.sub where there is one
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                          for a in node.names}
        graph[name] = {m for m in found if m in paths and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Returns the strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    assert not _cycles(_module_graph())


def test_only_tools_and_tests_import_the_demo_package():
    graph = _module_graph()
    users = sorted(m for m, imports in graph.items() if not m.startswith("banpick_cli.demo")
                   and any(i.startswith("banpick_cli.demo") for i in imports))
    assert not users, users


def test_the_cycle_check_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_package_holds_more_than_a_fifth_of_the_code():
    lines: dict[str, int] = {}
    for path in PACKAGE.rglob("*.py"):
        lines[_package_of(path)] = lines.get(_package_of(path), 0) + len(path.read_text(encoding="utf-8").splitlines())
    total = sum(lines.values())
    assert max(lines.values()) <= total / 5, {k: v for k, v in lines.items() if v > total / 5}


def test_a_profile_reads_without_transformers_and_engines_import_no_cli_stack():
    code = ("import sys\n"
            "sys.modules['transformers'] = None\n"
            "import banpick_cli.profile, banpick_cli.runtime.engine, banpick_cli.runtime.bundle\n"
            "import banpick_cli.runtime.vllm_plugin, banpick_cli.runtime.sglang_plugin\n"
            "heavy = [m for m in ('transformers', 'datasets', 'typer', 'rich', 'pandas') if sys.modules.get(m)]\n"
            "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
