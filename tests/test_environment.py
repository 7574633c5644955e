"""The driver's environment variables: set in one module, put back when the command ends."""

from __future__ import annotations

import os

import pytest

from search import environment


@pytest.fixture(autouse=True)
def _clean():
    yield
    environment.restore()


def test_restore_puts_back_a_value_that_was_there_and_removes_one_that_was_not(monkeypatch):
    monkeypatch.setenv("LS_TEST_THERE", "user")
    monkeypatch.delenv("LS_TEST_ABSENT", raising=False)
    environment.setenv("LS_TEST_THERE", "ours")
    environment.setenv("LS_TEST_ABSENT", "ours")
    environment.setenv("LS_TEST_ABSENT", "ours again")  # the value before the first set is what comes back
    assert os.environ["LS_TEST_THERE"] == "ours" and os.environ["LS_TEST_ABSENT"] == "ours again"
    environment.restore()
    assert os.environ["LS_TEST_THERE"] == "user"
    assert "LS_TEST_ABSENT" not in os.environ


def test_keep_users_leaves_a_value_the_user_set(monkeypatch):
    monkeypatch.setenv("LS_TEST_USER", "7")
    assert environment.setenv("LS_TEST_USER", "1", keep_users=True) is False
    assert os.environ["LS_TEST_USER"] == "7"


def test_temporarily_holds_for_the_block_only(monkeypatch):
    monkeypatch.delenv("LS_TEST_BLOCK", raising=False)
    monkeypatch.setenv("LS_TEST_KEPT", "user")
    with environment.temporarily({"LS_TEST_BLOCK": "1", "LS_TEST_KEPT": "ours"}):
        assert os.environ["LS_TEST_BLOCK"] == "1" and os.environ["LS_TEST_KEPT"] == "user"
    assert "LS_TEST_BLOCK" not in os.environ and os.environ["LS_TEST_KEPT"] == "user"


def test_the_command_leaves_the_environment_as_it_found_it(monkeypatch):
    from search.run import main

    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    before = dict(os.environ)
    assert main(["--print-config"]) == 0
    assert dict(os.environ) == before


def test_no_module_of_the_driver_writes_the_environment_but_this_one():
    import re
    from pathlib import Path

    writes = re.compile(r"os\.environ\[[^\]]+\]\s*=(?!=)|environ\.(setdefault|update|pop|clear)\(|os\.(putenv|unsetenv)\(")
    root = Path(__file__).resolve().parent.parent / "search"
    writers = [str(path.relative_to(root)) for path in root.rglob("*.py")
               if path.name != "environment.py" and writes.search(path.read_text())]
    assert writers == []
