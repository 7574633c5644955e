"""Dependencies point one way: search -> trainables, search -> analysis; analysis reads only
the run directory; a trial uses only tune.report / tune.get_checkpoint from Ray."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> dict[str, set[str]]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("package, forbidden", [
    ("analysis", ("trainables", "search")),
    ("trainables", ("search", "analysis", "optuna")),
])
def test_layers_never_import_against_the_arrows(package, forbidden):
    for path, names in _imports(package).items():
        bad = [n for n in names if n.split(".")[0] in forbidden]
        assert not bad, f"{path} imports {bad}"


def test_trainables_use_only_ray_tune_report_and_checkpoints():
    for path, names in _imports("trainables").items():
        ray = [n for n in names if n.split(".")[0] == "ray"]
        assert set(ray) <= {"ray"}, f"{path} imports {ray}"
        tree = ast.parse((ROOT / path).read_text())
        used = {node.attr for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tune"}
        assert used <= {"report", "get_checkpoint", "Checkpoint"}, f"{path} uses tune.{used}"
