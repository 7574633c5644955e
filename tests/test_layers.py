"""Dependencies point one way: search -> trainables, search -> analysis, all of them -> rundir;
analysis reads only the run directory; a trial uses only tune.report / tune.get_checkpoint from
Ray; and no module imports, at the top or inside a function, a module that imports it back.
The README's architecture table states these arrows, and is checked against the imports here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rundir", "search", "trainables", "analysis")
ARCHITECTURE = "## Architecture"


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


def module_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its source (deferred imports
    included: a cycle hidden inside a function is still a cycle). `from pkg import name`
    counts as importing `pkg.name` when that is a module, else `pkg`."""
    modules = {".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): path
               for package in packages for path in (root / package).rglob("*.py")}
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    submodule = f"{node.module}.{alias.name}"
                    edges.add(submodule if submodule in modules else node.module)
        graph[module] = {edge for edge in edges if edge in modules and edge != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (a depth-first search for a back edge)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = 2
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


@pytest.mark.parametrize("package, forbidden", [
    ("rundir", ("search", "trainables", "analysis", "torch", "ray", "transformers", "peft", "pandas")),
    ("analysis", ("trainables", "search")),
    ("trainables", ("search", "analysis", "optuna")),
])
def test_layers_never_import_against_the_arrows(package, forbidden):
    for path, names in _imports(package).items():
        bad = [n for n in names if n.split(".")[0] in forbidden]
        assert not bad, f"{path} imports {bad}"


def test_no_module_imports_a_module_that_imports_it_back():
    cycle = find_cycle(module_graph(ROOT, PACKAGES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle_planted_inside_one_package(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.b import helper\n")
    (package / "b.py").write_text("def helper():\n    from pkg import c\n")  # deferred, as cycles hide
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from pkg import b\n")

    assert find_cycle(module_graph(tmp_path, ("pkg",))) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


def test_trainables_use_only_ray_tune_report_and_checkpoints():
    for path, names in _imports("trainables").items():
        ray = [n for n in names if n.split(".")[0] == "ray"]
        assert set(ray) <= {"ray"}, f"{path} imports {ray}"
        tree = ast.parse((ROOT / path).read_text())
        used = {node.attr for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "tune"}
        # a shared trial's client names its slot by its trial id (the driver frees the slot by that id)
        allowed = {"report", "get_checkpoint", "Checkpoint"} | ({"get_context"} if path == "trainables/client.py" else set())
        assert used <= allowed, f"{path} uses tune.{used}"


def architecture_table(readme: str) -> dict[str, set[str] | None]:
    """The README's architecture table: each package -> the packages it may import, named in
    backticks in the last column (None where that column says `everything`)."""
    table = {}
    for cells in _first_table(readme.split(f"\n{ARCHITECTURE}\n", 1)[1].split("\n## ", 1)[0]):
        table[cells[0].strip("`")] = None if cells[-1] == "everything" else set(re.findall(r"`(\w+)`", cells[-1]))
    return table


def _first_table(text: str) -> list[list[str]]:
    """The rows of the first Markdown table in `text` (header and rule left out), as cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_architecture_table_is_read_with_its_arrows():
    readme = f"intro\n{ARCHITECTURE}\n\n| package | owns | may import |\n|---|---|---|\n" \
             "| `low` | files | nothing of ours |\n| `mid` | steps | `low`; of Ray only `tune.report` |\n" \
             "| `tests` | tests | everything |\n\n## Next\n| `other` | x | `low` |\n"
    assert architecture_table(readme) == {"low": set(), "mid": {"low"}, "tests": None}


def test_the_readmes_architecture_table_lists_every_package_and_the_arrows_the_imports_take():
    table = architecture_table((ROOT / "README.md").read_text())
    python_packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert python_packages <= set(table), f"the README's architecture table lacks {python_packages - set(table)}"
    assert all((ROOT / package).is_dir() for package in table), "the table names a directory that does not exist"
    graph = module_graph(ROOT, tuple(sorted(python_packages)))
    for package in sorted(python_packages):
        imported = {target.split(".")[0] for module, targets in graph.items() if module.split(".")[0] == package
                    for target in targets} - {package}
        assert table[package] is None or imported == table[package], (
            f"README: {package} may import {sorted(table[package])}; its modules import {sorted(imported)}")


def test_the_readme_names_every_part_of_search_and_each_part_it_names_exists():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("| part of `search` |", 1)[1]
    named = {name for cells in _first_table("| part of `search` |" + section) for name in re.findall(r"`([\w./]+)`", cells[0])}
    parts = {path.name + ("/" if path.is_dir() else "") for path in (ROOT / "search").iterdir()
             if (path.is_dir() and (path / "__init__.py").exists()) or (path.suffix == ".py" and path.name != "__init__.py")}
    assert named == parts, f"README lists {sorted(named - parts)} that search/ lacks, and lacks {sorted(parts - named)}"


def test_every_import_of_our_own_names_resolves_deferred_ones_included():
    import importlib

    unresolved = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                        and node.module.split(".")[0] in PACKAGES):
                    continue
                module = importlib.import_module(node.module)
                unresolved += [f"{path.relative_to(ROOT)}:{node.lineno} {node.module}.{alias.name}"
                               for alias in node.names if not _has(module, alias.name)]
    assert unresolved == []


def _has(module, name: str) -> bool:
    """Whether `from module import name` finds an attribute or a submodule."""
    import importlib.util

    if hasattr(module, name):
        return True
    try:
        return importlib.util.find_spec(f"{module.__name__}.{name}") is not None
    except ModuleNotFoundError:  # `module` is no package
        return False
