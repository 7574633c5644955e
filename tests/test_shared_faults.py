"""The shared trainers as Ray actors, started as a run starts them (search/resources/trainers.py), on the
session's local Ray: what a client reads of their free slots, a resume stopping the trainer that
a killed driver left, and a trainer that cannot start ending the run with its reason. Tiny
random-init Llama (tests/conftest.py) and tests/test_shared_trainer.py's data, on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
import ray

from helpers import alive, run_cli, shared_trial
from search.cluster.resume import record_ray_session, stop_leftover_workers
from search.config import ResourcesConfig
from search.resources.trainers import shared_trainers
from trainables.client import _free_slots
from trainables.host import TrainerArgs


@pytest.fixture
def trainers(local_ray, trial_setup):
    with shared_trainers(TrainerArgs(trial_setup, 2, 1.0), ResourcesConfig().cpus_per_trial) as handles:
        yield handles


def test_a_client_reads_each_trainers_free_slots(trainers):
    (trainer,) = trainers
    assert ray.get(trainer.open.remote("a", shared_trial(), None))
    assert _free_slots(trainers) == ([(1, 0)], 0)


def test_a_resume_stops_the_shared_trainer_that_trained_the_killed_drivers_trials(trainers, tmp_path):
    (trainer,) = trainers
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record_ray_session(run_dir)  # as the driver does before its trials start
    pid = ray.get(trainer.__ray_call__.remote(lambda _: os.getpid()))  # the trainer's process, asked of it
    assert ray.get(trainer.open.remote("a", shared_trial(), None))
    report = ray.get(trainer.next_report.remote("a"))
    result = run_dir / "tune" / "trial_a" / "result.json"
    result.parent.mkdir(parents=True)
    result.write_text(json.dumps(report.report.to_dict()) + "\n")  # the trial's row, as its client reported it to Tune

    assert stop_leftover_workers(run_dir, grace_seconds=5) == [pid]
    deadline = time.monotonic() + 10
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_a_trainer_that_cannot_load_the_model_ends_the_run_with_exit_1_and_its_reason_in_one_line(tiny_model_dir,
                                                                                                 tmp_path):
    weightless = tmp_path / "weightless"  # the driver reads the config and tokenizer; only the trainer loads weights
    shutil.copytree(tiny_model_dir, weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    code, out, err, _ = run_cli("--output", str(tmp_path), "--name", "run", "--set", f"model.path={weightless}",
                             "--set", "search.ranks=[2,4]", "--set", "resources.packing=shared")
    assert code == 1, out + err
    assert err.startswith("error: the search failed: TrainerNotStarted: shared trainer 0 could not start: OSError: ")
    assert f"model.safetensors found in directory {weightless}" in err and "\n" not in err.strip()
