"""Dependencies point down only (cli → benchmarks → front → runtime → patches → blockstore).

The front is the package root `blockstore/__init__.py` and `blockstore/api.py`: the one place in
blockstore/ allowed to reach up into patches and runtime (lazily), so `import blockstore` gives a
user every operation. Every other module of blockstore/ stays below patches, and none of them may
use the front, which would be the same upward reach by another name.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Layers from the highest to the lowest; each but "front" is a folder installed as a package.
LAYERS = ["cli", "benchmarks", "front", "runtime", "patches", "blockstore"]
FOLDERS = [layer for layer in LAYERS if layer != "front"]
PACKAGE = {folder: "blockstore" if folder == "blockstore" else f"blockstore.{folder}" for folder in FOLDERS}
FRONT_FILES = {ROOT / "blockstore" / "__init__.py", ROOT / "blockstore" / "api.py"}
FRONT_NAMES = {"open", "init", "pack", "export", "verify", "diff", "apply", "rollback"}
"""What `blockstore` itself provides from the front (its other names are lower modules' own)."""


def layer_of(module: str) -> str | None:
    for folder in FOLDERS[:-1]:
        if module == PACKAGE[folder] or module.startswith(PACKAGE[folder] + "."):
            return folder
    if module == "blockstore.api" or module.startswith("blockstore.api."):
        return "front"
    if module.removeprefix("blockstore.") in FRONT_NAMES:  # `from blockstore import pack`
        return "front"
    return "blockstore" if module == "blockstore" or module.startswith("blockstore.") else None


def layer_of_file(path: Path) -> str:
    if path in FRONT_FILES:
        return "front"
    return path.relative_to(ROOT).parts[0]


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
            modules.update(f"{node.module}.{alias.name}" for alias in node.names)
    return modules


def violations_in(path: Path, layer: str | None = None) -> list[str]:
    """Imports in `path` (of `layer`, by default the layer its place in the repository gives it)
    that name a higher layer."""
    rank = LAYERS.index(layer or layer_of_file(path))
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    found = []
    for module in imported_modules(path):
        target = layer_of(module)
        # `from blockstore import runtime` names a higher layer through the root package.
        if target is not None and LAYERS.index(target) < rank:
            found.append(f"{shown} imports {module} ({target} is above it)")
    return found


@pytest.mark.parametrize("folder", FOLDERS)
def test_imports_point_down_only(folder: str) -> None:
    violations = [line for path in sorted((ROOT / folder).rglob("*.py")) for line in violations_in(path)]
    assert not violations, "\n".join(violations)


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from blockstore.cli.app import app\nimport blockstore.runtime\n")
    assert {layer_of(m) for m in imported_modules(bad)} >= {"cli", "runtime"}


def test_only_the_front_may_reach_up_from_the_root_package(tmp_path: Path) -> None:
    """The front's own upward imports pass; the same lines in any other blockstore/ module fail,
    and so does a lower module that uses the front."""
    front_imports = set().union(*(imported_modules(path) for path in FRONT_FILES))
    assert {"runtime", "patches"} <= {layer_of(module) for module in front_imports}
    assert not [line for path in FRONT_FILES for line in violations_in(path)]
    ordinary = tmp_path / "probe.py"  # as if it were blockstore/ops/probe.py
    ordinary.write_text("from blockstore.patches.diff import diff\nfrom blockstore import pack\n")
    found = violations_in(ordinary, "blockstore")
    assert {line.rsplit("(", 1)[1] for line in found} == {"front is above it)", "patches is above it)"}


def test_importing_blockstore_imports_neither_torch_nor_the_layers_above() -> None:
    """The front imports on first use: a CLI or a script that never loads a model pays for none of it."""
    probe = (
        "import sys, blockstore\n"
        "loaded = [m for m in ('torch', 'blockstore.api', 'blockstore.runtime', 'blockstore.patches') "
        "if m in sys.modules]\n"
        "repo_class = blockstore.Repository\n"
        "print(loaded, 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["[]", "False"], result.stdout + result.stderr
