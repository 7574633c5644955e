"""Never lose work: a SIGKILLed run resumes to the same answer; SIGTERM stops gracefully;
a resume with another config is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_STEPS = 12


def _args(tiny_model_dir, output: Path, name: str) -> list[str]:
    # One trial at a time and no dropout, so an interrupted run can be compared exactly.
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,mlp,all_linear]", "search.ranks=[2,4,8]",
            "search.learning_rate=[1e-3,2e-2]", "search.dropout=[0.0,0.0]", "budget.num_samples=6",
            f"budget.max_steps={MAX_STEPS}", "budget.eval_every=3", "budget.grace_period=3", "budget.reduction_factor=3",
            "budget.batch_size=4", "data.eval_examples=8", "resources.max_concurrent_trials=1"]
    return ["--output", str(output), "--name", name, *[x for s in sets for x in ("--set", s)]]


def _cli(args: list[str], **kwargs):
    return subprocess.Popen([sys.executable, "-m", "search.run", *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _ended_trials(run_dir: Path) -> int:
    """Trials whose last report is in; a trial directory appears when the next one starts."""
    return max(0, len(list((run_dir / "tune").glob("trial_*"))) - 1)


def _steps_reported(run_dir: Path) -> dict[str, list[int]]:
    out = {}
    for result in (run_dir / "tune").glob("trial_*/result.json"):
        out[result.parent.name] = [json.loads(line)["step"] for line in result.read_text().splitlines()]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("plain")
    process = _cli(_args(tiny_model_dir, output, "plain"))
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-3000:]
    return output / "plain"


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tiny_model_dir, tmp_path, uninterrupted):
    run_dir = tmp_path / "killed"
    process = _cli(_args(tiny_model_dir, tmp_path, "killed"))
    deadline = time.monotonic() + 300
    while _ended_trials(run_dir) < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1.5)  # past the one-second experiment-state snapshot
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "trials.csv").exists(), "the run finished before it could be killed"

    resumed = _cli(["--resume", *_args(tiny_model_dir, tmp_path, "killed")])
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]

    trials = pd.read_csv(run_dir / "trials.csv")
    plain = pd.read_csv(uninterrupted / "trials.csv")
    assert trials.origin.isin(["search", "prior"]).sum() == 6 and len(trials) == len(plain)
    assert (trials.status != "failed").all(), trials[["trial_id", "status", "error"]].to_string()
    key = ["origin", "module_set", "r", "alpha_ratio", "learning_rate", "seed", "step"]
    assert sorted(map(tuple, trials[key].round(12).values)) == sorted(map(tuple, plain[key].round(12).values))
    for name, steps in _steps_reported(run_dir).items():  # the search experiment
        assert steps == sorted(set(steps)), f"{name} reported a step twice: {steps}"
    pick = json.loads((run_dir / "pick.json").read_text())
    plain_pick = json.loads((uninterrupted / "pick.json").read_text())
    assert pick["lora_config"] == plain_pick["lora_config"]
    assert pick["value"] == pytest.approx(plain_pick["value"], rel=1e-6)


# The driver, SIGKILLed the moment a trial's superseded checkpoint is deleted (Tune deletes none:
# search/tuning/checkpoints.py does, through the run's storage filesystem), with the rest of that trial's
# superseded checkpoints, and every other trial's, still there.
_KILLED_AS_TUNE_DELETES_A_CHECKPOINT = """
import os, runpy, signal, sys
from rundir.atomicfs import RunStorage
delete_dir = RunStorage.delete_dir
def delete_then_die(self, path):
    delete_dir(self, path)
    if os.path.basename(path).startswith("checkpoint_"):
        os.kill(os.getpid(), signal.SIGKILL)
RunStorage.delete_dir = delete_then_die
sys.argv[0] = "search.run"
runpy.run_module("search.run", run_name="__main__")
"""


def test_sigkill_as_tune_deletes_a_checkpoint_then_resume_continues_every_trial(tiny_model_dir, tmp_path, uninterrupted):
    run_dir = tmp_path / "killed"
    args = _args(tiny_model_dir, tmp_path, "killed")
    process = subprocess.Popen([sys.executable, "-c", _KILLED_AS_TUNE_DELETES_A_CHECKPOINT, *args], cwd=ROOT,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    log, _ = process.communicate(timeout=600)
    assert process.returncode == -signal.SIGKILL, log[-3000:]

    resumed = _cli(["--resume", *args])
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    trials = pd.read_csv(run_dir / "trials.csv")
    assert (trials.status != "failed").all(), trials[["trial_id", "status", "error"]].to_string()
    key = ["origin", "module_set", "r", "alpha_ratio", "learning_rate", "seed", "step"]
    plain = pd.read_csv(uninterrupted / "trials.csv")
    assert sorted(map(tuple, trials[key].round(12).values)) == sorted(map(tuple, plain[key].round(12).values))
    for trial in (run_dir / "tune").glob("trial_*"):  # what Tune meant to delete is gone by the end
        assert len(list(trial.glob("checkpoint_*"))) == 1, sorted(p.name for p in trial.iterdir())


def test_sigterm_stops_gracefully_and_the_run_resumes(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "termed"
    process = _cli(_args(tiny_model_dir, tmp_path, "termed"))
    deadline = time.monotonic() + 300
    while _ended_trials(run_dir) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    log, _ = process.communicate(timeout=120)
    assert process.returncode == 143, log[-3000:]
    assert "stopped by SIGTERM: the run so far is saved in" in log and "--resume" in log and "Traceback" not in log
    resumed = _cli(["--resume", *_args(tiny_model_dir, tmp_path, "termed")])
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log[-3000:]
    trials = pd.read_csv(run_dir / "trials.csv")
    assert trials.origin.isin(["search", "prior"]).sum() == 6


def test_resume_with_a_different_config_is_refused_naming_the_keys(tiny_model_dir, uninterrupted):
    args = _args(tiny_model_dir, uninterrupted.parent, "plain") + ["--set", "search.ranks=[2,4]", "--set", "seed=3"]
    process = _cli(["--resume", *args])
    log, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert "search.ranks" in log and "seed" in log and "Traceback" not in log
