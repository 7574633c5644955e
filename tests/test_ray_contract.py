"""The contract with Ray's internals (search/cluster/ray_contract.py), pinned against the installed Ray:
each behaviour the driver relies upon where Ray has no public API, and that no other module
of the project reaches into Ray's or torch's private modules."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACT = ROOT / "search" / "cluster" / "ray_contract.py"
PACKAGES = ("rundir", "search", "trainables", "analysis")


def test_contract_refuses_another_ray_naming_the_version_it_was_written_for(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.61.0")
    spec = importlib.util.spec_from_file_location("ray_contract_under_another_ray", CONTRACT)
    with pytest.raises(ImportError, match=r"written for Ray 2\.60\.0, and Ray 2\.61\.0 is installed"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_contract_auto_address_takes_ray_address_first(monkeypatch):
    from search.cluster.ray_contract import auto_address

    monkeypatch.setenv("RAY_ADDRESS", "198.51.100.7:6399")
    assert auto_address() == "198.51.100.7:6399"


def _in_a_fresh_process(code: str, env: dict[str, str]) -> dict:
    """What `code` (which prints one JSON line last) prints, run by a new Python: Ray reads its
    auth settings once per process."""
    done = subprocess.run([sys.executable, "-c", code], check=False, env={**env, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def _env(*dropped: str, **changes: str) -> dict[str, str]:
    """This process's environment without RAY_AUTH_MODE (a local ray.init sets it here), RAY_ADDRESS
    and `dropped`, with `changes`."""
    return {**{key: value for key, value in os.environ.items()
               if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS", *dropped)}, **changes}


@pytest.mark.parametrize("setting, found", [
    ("none", False), ("token", True), ("path_to_a_file", True), ("path_to_nothing", False), ("home_file", True)])
def test_contract_has_auth_token_finds_rays_token_whatever_the_auth_mode(setting, found, tmp_path):
    env = _env("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", HOME=str(tmp_path), RAY_AUTH_MODE="disabled")
    token = "0123456789abcdef" * 4
    if setting == "token":
        env["RAY_AUTH_TOKEN"] = token
    elif setting == "path_to_a_file":
        (tmp_path / "token").write_text(token)
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "token")
    elif setting == "path_to_nothing":
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "missing")
    elif setting == "home_file":
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text(token)
    code = "import json; from search.cluster.ray_contract import has_auth_token; print(json.dumps(has_auth_token()))"
    assert _in_a_fresh_process(code, env) is found


_AUTH_STEPS = """
import json
from search.cluster.ray_contract import has_auth_token, head_refuses_this_client, send_auth_token
address = {address!r}
steps = {{"refused_before": head_refuses_this_client(address), "has_token": has_auth_token()}}
send_auth_token()
steps["refused_after"] = head_refuses_this_client(address)
print(json.dumps(steps))
"""


def test_contract_a_head_that_requires_a_token_refuses_a_client_until_it_sends_the_machines_token(local_ray):
    """What `connect` does for a head that requires a token: a process that sends none is
    refused, and the same process is accepted once `send_auth_token` turned token mode on. A
    local `ray.init` head requires the machine's token, as a `ray start --head` does."""
    address = local_ray.get_runtime_context().gcs_address
    steps = _in_a_fresh_process(_AUTH_STEPS.format(address=address), _env())
    assert steps == {"refused_before": True, "has_token": True, "refused_after": False}


def test_contract_a_head_refuses_a_token_that_is_not_its_own(local_ray):
    address = local_ray.get_runtime_context().gcs_address
    steps = _in_a_fresh_process(_AUTH_STEPS.format(address=address),
                                _env(RAY_AUTH_TOKEN="f" * 64))
    assert steps == {"refused_before": True, "has_token": True, "refused_after": True}


def test_contract_the_driver_that_started_a_local_ray_is_not_refused(local_ray):
    from search.cluster.ray_contract import head_refuses_this_client

    assert head_refuses_this_client(local_ray.get_runtime_context().gcs_address) is False


def _private_uses(path: Path) -> list[str]:
    """The dotted names of Ray's or torch's private parts (a part starting with one underscore)
    that `path` imports or reaches through an attribute."""
    def private(name: str) -> bool:
        parts = name.split(".")
        return parts[0] in ("ray", "torch") and any(p.startswith("_") and not p.startswith("__") for p in parts)

    def dotted(node: ast.AST) -> str | None:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if private(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [f"{node.module}.{alias.name}" for alias in node.names if private(f"{node.module}.{alias.name}")]
        elif isinstance(node, ast.Attribute) and (name := dotted(node)) and private(name):
            found.append(name)
    return found


def test_contract_module_is_the_only_one_that_reaches_into_ray_or_torch_internals():
    uses = {str(path.relative_to(ROOT)): _private_uses(path) for package in PACKAGES
            for path in sorted((ROOT / package).rglob("*.py")) if path != CONTRACT}
    assert {path: names for path, names in uses.items() if names} == {}
    assert _private_uses(CONTRACT)  # the check sees what the contract itself uses


def test_contract_checker_sees_a_private_module_imported_or_reached(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import ray\nfrom ray._raylet import GcsClient\nimport torch._dynamo\n"
                       "ray._private.worker.global_worker\ntorch.compiler.reset()\n")
    assert set(_private_uses(planted)) == {"ray._raylet.GcsClient", "torch._dynamo", "ray._private.worker.global_worker",
                                           "ray._private.worker", "ray._private"}


def test_contract_error_messages_off_the_console_stops_the_drivers_raylet_lines_and_puts_the_switch_back(capsys):
    import ray._private.worker as ray_worker

    from search.cluster.ray_contract import error_messages_off_the_console

    # what Ray's error listener thread calls with each error the cluster publishes for the job (Ray
    # prints a line it printed a moment ago once, so each call has its own)
    def message(text: str) -> dict:
        return {"lines": [text], "pid": "raylet", "is_err": False}

    with error_messages_off_the_console():
        ray_worker.print_to_stdstream(message("A worker died or was killed (1)"), ignore_prefix=False)
    assert capsys.readouterr().out == ""
    ray_worker.print_to_stdstream(message("The actor is very large (2)"), ignore_prefix=False)
    assert "The actor is very large (2)" in capsys.readouterr().out


def test_contract_tune_keeps_as_many_trials_pending_as_tune_max_pending_trials_pg_says(local_ray, tmp_path, monkeypatch):
    """StagedSearch limits concurrency itself, without Tune's ConcurrencyLimiter: Tune then keeps one
    trial pending at a time unless TUNE_MAX_PENDING_TRIALS_PG says more (environment.pending_trials)."""
    import time

    from ray import tune
    from ray.tune.experiment import Trial
    from ray.tune.search import Searcher

    class Endless(Searcher):
        def suggest(self, trial_id):
            return {"x": 1}

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

    class MostPending(tune.Callback):
        def __init__(self):
            self.most = 0

        def on_step_end(self, iteration, trials, **info):
            self.most = max(self.most, sum(trial.status == Trial.PENDING for trial in trials))

    def trainable(config):
        time.sleep(0.5)
        tune.report({"done": 1})

    def most_pending(setting: str | None) -> int:
        if setting is None:
            monkeypatch.delenv("TUNE_MAX_PENDING_TRIALS_PG", raising=False)
        else:
            monkeypatch.setenv("TUNE_MAX_PENDING_TRIALS_PG", setting)
        seen = MostPending()
        tune.Tuner(tune.with_resources(trainable, {"cpu": 0.25}),
                   tune_config=tune.TuneConfig(search_alg=Endless(), num_samples=5, metric="done", mode="max"),
                   run_config=tune.RunConfig(storage_path=str(tmp_path), name=f"pending-{setting}", callbacks=[seen],
                                             verbose=0)).fit()
        return seen.most

    assert most_pending(None) == 1
    assert most_pending("4") == 4


FIT_IMPORTS_SEEN = """
import json, sys
import ray
from ray import tune
from search.cluster.ray_contract import TUNE_FIT_IMPORTS

class Quiet(tune.Callback):
    pass

def trainable(config):
    tune.report({"done": 1})

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
before = [name for name in TUNE_FIT_IMPORTS if name in sys.modules]
tune.Tuner(trainable, run_config=tune.RunConfig(storage_path=STORAGE, name="imports", callbacks=[Quiet()],
                                                verbose=0)).fit()
print(json.dumps({"before": before, "after": [name for name in TUNE_FIT_IMPORTS if name in sys.modules]}))
"""


def test_contract_tune_fit_imports_the_modules_the_driver_imports_while_ray_starts(tmp_path):
    """`import_what_tune_fit_imports` moves work off the way to the first trial only while
    `Tuner.fit` (with a callback, as every run passes) imports each of them itself."""
    from search.cluster.ray_contract import TUNE_FIT_IMPORTS

    seen = _in_a_fresh_process(FIT_IMPORTS_SEEN.replace("STORAGE", repr(str(tmp_path))), _env())
    assert seen == {"before": [], "after": list(TUNE_FIT_IMPORTS)}


def test_contract_import_what_tune_fit_imports_imports_each_module_it_names():
    code = ("import json, sys\nfrom search.cluster.ray_contract import TUNE_FIT_IMPORTS, import_what_tune_fit_imports\n"
            "before = [n for n in TUNE_FIT_IMPORTS if n in sys.modules]\nimport_what_tune_fit_imports()\n"
            "print(json.dumps({'before': before, 'after': [n for n in TUNE_FIT_IMPORTS if n in sys.modules]}))")
    from search.cluster.ray_contract import TUNE_FIT_IMPORTS

    assert _in_a_fresh_process(code, _env()) == {"before": [], "after": list(TUNE_FIT_IMPORTS)}
