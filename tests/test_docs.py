"""The documentation stays true to the code: every key of configs/default.yaml has its line in
docs/configuration.md and in `--help`, the README stays a front door of at most 150 lines, and
every relative link and every file of the repository that the README and docs/ name exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "bench" / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))]


def dotted_keys(mapping: dict, prefix: str = "") -> list[str]:
    """Every leaf key of a nested mapping, dotted (`tracking.mlflow.enabled`); an empty mapping
    is a leaf (`data.columns: {}`)."""
    out = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            out += dotted_keys(value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def test_dotted_keys_walks_every_level_and_keeps_an_empty_mapping_as_a_key():
    assert dotted_keys({"a": 1, "b": {"c": {"d": 2}, "e": {}}}) == ["a", "b.c.d", "b.e"]


@pytest.fixture(scope="module")
def default_keys() -> list[str]:
    return dotted_keys(yaml.safe_load((ROOT / "configs" / "default.yaml").read_text()))


def test_every_key_of_the_default_config_has_a_line_in_docs_configuration(default_keys):
    lines = (ROOT / "docs" / "configuration.md").read_text().splitlines()
    missing = [key for key in default_keys if not any(line.startswith(f"| `{key}` |") for line in lines)]
    assert not missing, f"docs/configuration.md has no table row for {missing}"


def test_every_key_of_the_default_config_has_a_line_in_help(default_keys):
    done = subprocess.run([sys.executable, "-m", "search.run", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    missing = [key for key in default_keys if f"\n  {key} = " not in done.stdout]
    assert not missing, f"python -m search.run --help does not list {missing}"


def test_the_readme_has_at_most_150_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: move the details to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_names_a_file_that_exists(page):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    broken = [t for t in targets if "://" not in t and not (page.parent / t).exists()]
    assert not broken, f"{page.relative_to(ROOT)} links to {broken}, which do not exist"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_of_the_repository_named_in_backticks_exists(page):
    top = {path.name for path in ROOT.iterdir() if path.is_dir() and not path.name.startswith(".")}
    named = re.findall(r"`([\w.-]+/[\w./-]*\.\w+)`", page.read_text())
    missing = [path for path in named if path.split("/")[0] in top and not (ROOT / path).exists()]
    assert not missing, f"{page.relative_to(ROOT)} names {missing}, which do not exist"
