"""The warning for a torch install without bytecode for the modules it imports on demand, which
every trial process would otherwise compile from source (search.inputs.prepare.bytecode_line)."""

from __future__ import annotations

import os
import py_compile
import sys
from pathlib import Path

from search.inputs.prepare import ON_DEMAND, bytecode_line


def install(site: Path, compiled: bool = False) -> Path:
    """A site-packages holding ON_DEMAND's sources, byte-compiled where this Python looks for them if `compiled`."""
    for relative in ON_DEMAND:
        source = site / relative
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("VALUE = 1\n")
        if compiled:
            py_compile.compile(str(source), doraise=True)
    return site


def test_an_install_python_can_write_bytecode_into_gets_no_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert bytecode_line(install(tmp_path)) is None  # the first import writes it


def test_an_install_without_bytecode_under_pythondontwritebytecode_is_named_with_the_fix(tmp_path, monkeypatch):
    site = install(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    line = bytecode_line(site)
    assert line is not None
    assert str(site / "torch") in line and ON_DEMAND[0] in line and "PYTHONDONTWRITEBYTECODE is set" in line
    assert f"python -m compileall -q {site / 'torch'}" in line and "PYTHONPYCACHEPREFIX" in line
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert bytecode_line(install(tmp_path / "compiled", compiled=True)) is None


def test_an_install_in_a_faked_read_only_directory_is_named_with_the_directory(tmp_path, monkeypatch):
    """Read-only faked through os.access: the tests may run as root, for whom every directory is writable."""
    site = install(tmp_path)
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(site)))
    line = bytecode_line(site)
    assert line is not None and f"{site / 'torch' / '_dynamo' / '__pycache__'} is not writable" in line


def test_the_dry_run_says_when_the_installed_torch_lacks_bytecode_python_will_not_write(tmp_path, tiny_model_dir,
                                                                                        capsys, monkeypatch):
    """The real torch, looked up under an empty bytecode prefix with writing turned off: what a
    container built with --no-compile and PYTHONDONTWRITEBYTECODE=1 gives every process."""
    from search.run import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "no-bytecode-here"))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert main(["--set", f"model.path={tiny_model_dir}", "--set", "search.ranks=[2]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "has no bytecode for the modules it imports on demand" in out and "PYTHONDONTWRITEBYTECODE is set" in out
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    monkeypatch.setattr(sys, "pycache_prefix", None)
    assert main(["--set", f"model.path={tiny_model_dir}", "--set", "search.ranks=[2]", "--dry-run"]) == 0
    assert "has no bytecode" not in capsys.readouterr().out  # this checkout's venv was installed by pip
