"""Kill anywhere, lose nothing: a small search is SIGKILLed at 20 moments (seeded; half of them
the moment Tune begins to sync the run, which is when a sync was seen to leave empty
files) and resumed after each. Every file stays valid JSON, and the run ends with every trial
accounted for and no configuration trained twice."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import time
from pathlib import Path

import pandas as pd

from helpers import INTERRUPTED_TRIALS, interrupted_search_args, start_cli

KILLS = 20


def _written(run_dir: Path) -> dict[str, int]:
    """The modification time of each file of the search's experiment: a change means Tune is syncing.
    A file or folder Tune removes while it is listed (its temporary markers) counts as gone:
    os.walk skips a folder that vanished, and a file's stat may still miss."""
    times = {}
    for folder, _, names in os.walk(run_dir / "tune"):
        for name in names:
            try:
                times[os.path.join(folder, name)] = os.stat(os.path.join(folder, name)).st_mtime_ns
            except FileNotFoundError:
                continue
    return times


def _invalid_json(run_dir: Path) -> list[str]:
    """Every file of the run named *.json that does not parse. Tune's searcher state is a pickle
    under that name (`search_gen_state-*.json`): it must unpickle."""
    bad = []
    for path in run_dir.rglob("*.json"):
        if path.name.startswith("."):
            continue
        if path.name.startswith("search_gen_state-"):
            try:
                pickle.loads(path.read_bytes())
            except Exception as error:  # noqa: BLE001 - any failure to unpickle is the finding
                bad.append(f"{path.relative_to(run_dir)}: {type(error).__name__} ({path.stat().st_size} bytes)")
            continue
        text = path.read_text()
        try:
            if path.name == "result.json":  # one JSON object per line
                for line in text.splitlines():
                    json.loads(line)
            else:
                json.loads(text)
        except json.JSONDecodeError as error:
            bad.append(f"{path.relative_to(run_dir)}: {error.msg} ({len(text)} bytes)")
    return bad


def test_a_search_killed_at_twenty_moments_ends_with_every_trial_once_and_valid_files(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "killed"
    rng = random.Random(20)
    args = interrupted_search_args(tiny_model_dir, tmp_path, "killed")
    kills = 0
    last_log = ""  # the console of the run that ended by itself: what a short table of trials needs to be read
    for attempt in range(KILLS):
        process = start_cli(["--resume", *args] if run_dir.joinpath("run_config.json").exists() else args)
        started = time.monotonic()
        at_sync = attempt % 2 == 1
        delay = rng.uniform(1.0, 12.0)
        before = _written(run_dir)
        while process.poll() is None and time.monotonic() - started < 120:
            if not at_sync and time.monotonic() - started > delay:
                break
            if at_sync and time.monotonic() - started > 3:
                now = _written(run_dir)
                if now != before:  # a sync has begun: kill within its first milliseconds
                    time.sleep(rng.uniform(0.0, 0.02))
                    break
                before = now
            time.sleep(0.005 if at_sync else 0.1)
        if process.poll() is not None:  # the search finished before this kill
            log, _ = process.communicate()
            last_log = f"attempt {attempt} (after {kills} kills):\n{log[-4000:]}"
            assert process.returncode == 0, log[-3000:]
            break
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        assert not _invalid_json(run_dir), f"after kill {kills}: {_invalid_json(run_dir)}"

    if not (run_dir / "trials.csv").exists():
        resumed = start_cli(["--resume", *args])
        log, _ = resumed.communicate(timeout=900)
        last_log = f"the resume after {kills} kills:\n{log[-4000:]}"
        assert resumed.returncode == 0, log[-3000:]

    assert kills >= KILLS // 2, f"only {kills} kills landed before the search finished: lengthen it"
    assert not _invalid_json(run_dir)
    trials = pd.read_csv(run_dir / "trials.csv")
    searched = trials[trials.origin.isin(["search", "prior"])]
    assert len(searched) == INTERRUPTED_TRIALS, f"{trials[['trial_id', 'origin', 'status']].to_string()}\n{last_log}"
    assert trials.trial_id.is_unique
    assert (trials.status != "failed").all(), trials[["trial_id", "status", "error"]].to_string()
    configuration = ["module_set", "r", "alpha_ratio", "learning_rate"]
    assert not searched.duplicated(configuration).any(), "a configuration was proposed and trained twice"
    assert (run_dir / "pick.json").is_file()
    for trial in run_dir.glob("*/trial_*"):  # what Tune replaced is gone, what a killed driver left included
        assert len(list(trial.glob("checkpoint_*"))) <= 1, sorted(path.name for path in trial.iterdir())
