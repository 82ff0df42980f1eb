"""docs/design.md §2: dependencies point down only (cli → benchmarks → runtime → patches → blockstore)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folder → its installed package, from the highest layer to the lowest.
LAYERS = ["cli", "benchmarks", "runtime", "patches", "blockstore"]
PACKAGE = {folder: "blockstore" if folder == "blockstore" else f"blockstore.{folder}" for folder in LAYERS}


def layer_of(module: str) -> str | None:
    for folder in LAYERS[:-1]:
        if module == PACKAGE[folder] or module.startswith(PACKAGE[folder] + "."):
            return folder
    return "blockstore" if module == "blockstore" or module.startswith("blockstore.") else None


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


@pytest.mark.parametrize("folder", LAYERS)
def test_imports_point_down_only(folder: str) -> None:
    rank = LAYERS.index(folder)
    violations = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module in imported_modules(path):
            layer = layer_of(module)
            # `from blockstore import runtime` names a higher layer through the root package.
            if layer is not None and LAYERS.index(layer) < rank:
                violations.append(f"{path.relative_to(ROOT)} imports {module} ({layer} is above {folder})")
    assert not violations, "\n".join(violations)


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from blockstore.cli.app import app\nimport blockstore.runtime\n")
    assert {layer_of(m) for m in imported_modules(bad)} >= {"cli", "runtime"}
