"""The shape of the package: which package may import which, and how big each may grow (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "banpick_cli"
# Lower layers never import higher ones; packages within a layer do not import each other.
LAYERS = [
    {"errors", "paths", "progress", "checks", "outputs", "__init__", "__main__"},
    {"routing"},
    {"profile"},
    {"data"},
    {"models", "tasks"},
    {"passes"},
    {"runtime"},
    {"evaluation", "report"},
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
