"""Trackers: a small search, SIGKILLed once and resumed, logs each trial once to a real MLflow
(a file store) under the search's run, which gets the pick's files; W&B in offline mode
writes each trial's run files into the run; Ray's TensorBoard files are in each trial's
directory; the Optuna study is a journal in the run that holds each search trial once. A
tracker configured but not installed is bad input."""

from __future__ import annotations

import json
import pickle
import re
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import add_trial, run_cli, start_cli, trial_reports, write_run_config
from search.config import ConfigError, load
from search.run import main

ROOT = Path(__file__).resolve().parent.parent
NAME = "tracked"
STATES = {"finished": "COMPLETE", "stopped": "PRUNED", "failed": "FAIL"}
# steps a trial trains: enough that Tune saves its experiment state while the second trial runs
# (the kill needs a trial that crosses it), however fast the tiny model's steps become
STEPS = 96


@pytest.fixture(scope="module")
def tracked(tiny_model_dir, tmp_path_factory):
    """The run directory, an MlflowClient on its store, the trial that ran across the kill, and the
    resumed run's console (stdout and stderr): a search with MLflow and W&B (offline) on, killed once
    the run directory holds its second trial's first report (`_saved`), then resumed to the end."""
    from mlflow import MlflowClient

    environment = pytest.MonkeyPatch()
    environment.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind it
    output = tmp_path_factory.mktemp("runs")
    uri = (output / "mlruns").as_uri()
    client = MlflowClient(uri)
    # as a team's server would hold it: artifacts beside the store, not in the working directory
    client.create_experiment("sweeps", artifact_location=str(output / "artifacts"))
    sets = [f"model.path={tiny_model_dir}", "search.module_sets=[attention_qv,mlp]", "search.ranks=[2,4]",
            "search.learning_rate=[1e-3,2e-2]", "budget.num_samples=3", f"budget.max_steps={STEPS}", "budget.eval_every=12",
            f"budget.grace_period={STEPS}", "budget.batch_size=4", "data.eval_examples=8", "data.eval_generate_examples=0",
            "resources.max_concurrent_trials=1", "selection.promote=false", "selection.confirm_top_k=0", "selection.cheaper=0",
            "selection.retrain=true", "tracking.mlflow.enabled=true", f"tracking.mlflow.tracking_uri={uri}",
            "tracking.mlflow.experiment=sweeps", "tracking.wandb.enabled=true", "tracking.wandb.mode=offline"]
    args = ["--output", str(output), "--name", NAME, *[x for s in sets for x in ("--set", s)]]
    run_dir = output / NAME

    process = start_cli(args)
    deadline = time.monotonic() + 300
    while len(_saved(run_dir)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    log, _ = process.communicate()
    assert not (run_dir / "trials.csv").exists(), "the run finished before it could be killed:\n" + log[-3000:]
    (crossing,) = [trial_id for trial_id, step in _saved(run_dir).items() if step < STEPS]

    resumed = start_cli(["--resume", *args])
    log, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, log[-3000:]
    yield run_dir, client, crossing, log
    environment.undo()


def _saved(run_dir: Path) -> dict[str, int]:
    """The last reported step of each trial whose report is both in Tune's newest saved experiment
    state, with a checkpoint, and in its result.json. The kill waits for all three: Tune uploads
    them in one copy, in no set order, and saves the state on its own clock, so it may hold a
    report before the checkpoint that came with it; a trial that the state saw checkpoint nothing
    restarts from scratch, whose new result.json then replaces the old one, as does one whose
    result.json had not arrived. The state keeps a trial's checkpoints in a pickle, hex-encoded:
    this test's premise reads it, the product never does."""
    states = sorted((run_dir / "tune").glob("experiment_state-*.json"))
    try:
        trials = json.loads(states[-1].read_text())["trial_data"] if states else []
    except (OSError, ValueError):  # replaced while read: the next poll reads the new one
        return {}
    reported = trial_reports(run_dir)
    steps = {}
    for config, runtime in trials:
        runtime = json.loads(runtime)
        trial_id, step = json.loads(config)["trial_id"], (runtime.get("last_result") or {}).get("step")
        checkpointed = b"checkpoint_0".hex() in str(runtime.get("checkpoint_manager"))  # a directory checkpoint_000000
        if step is not None and checkpointed and step in {row["step"] for row in reported.get(trial_id, [])}:
            steps[trial_id] = step
    return steps


def _trial_id(run) -> str:
    return run.data.tags["trial_name"].rsplit("_", 1)[1]  # Ray names a trial's run TRAINABLE_TRIALID


def _trials(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "trials.csv")


def test_mlflow_holds_one_run_per_trial_with_its_parameters_and_reports_under_the_searchs_run(tracked):
    run_dir, client, crossing, _ = tracked
    experiment = client.get_experiment_by_name("sweeps").experiment_id
    parent = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    reported = trial_reports(run_dir)
    assert len(reported) == 4  # three searched, one retrained
    assert sorted(_trial_id(run) for run in children) == sorted(reported)  # one run each, the crossing trial's too
    assert len({row["worker_started_at"] for row in reported[crossing]}) == 2  # it reported before and after the kill
    for run in children:
        rows = reported[_trial_id(run)]
        config = rows[0]["config"]
        assert run.info.status == "FINISHED"
        assert run.data.params["origin"] == config["origin"]
        assert run.data.params["lora_config/r"] == str(config["lora_config"]["r"])
        assert run.data.params["learning_rate"] == str(config["learning_rate"])
        history = client.get_metric_history(run.info.run_id, "eval_loss")
        assert sorted({m.step for m in history}) == sorted({row["step"] for row in rows})  # at optimizer steps
        assert max(history, key=lambda m: m.step).value == pytest.approx(rows[-1]["eval_loss"])


def test_the_searchs_mlflow_run_holds_the_pick_report_plots_and_adapter(tracked, tmp_path):
    run_dir, client, _, _ = tracked
    parent = client.get_run(json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == NAME
    names = {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    assert {"pick.json", "report.md", "trials.csv", "run_config.json", "plots", "adapter"} <= names
    adapter = {artifact.path for artifact in client.list_artifacts(parent.info.run_id, "adapter")}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= adapter  # the retrained weights
    assert client.list_artifacts(parent.info.run_id, "plots")
    pick = client.download_artifacts(parent.info.run_id, "pick.json", str(tmp_path))
    assert Path(pick).read_text() == (run_dir / "pick.json").read_text()


def test_wandb_offline_writes_each_trials_run_files_into_the_run_directory(tracked):
    run_dir, _, _, _ = tracked
    for trial_id in trial_reports(run_dir):
        runs = list((run_dir / "wandb").glob(f"offline-run-*-{trial_id}"))
        assert runs, f"no W&B run files for {trial_id}"
        assert all((run / f"run-{trial_id}.wandb").stat().st_size > 0 for run in runs)


# A line of Ray's C++ core as it prints one: [date time,ms LEVEL pid tid] file.cc:line: ...
RAY_CORE_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] \w+\.cc:\d+:", re.MULTILINE)


def test_ray_s_own_lines_stay_off_the_console_and_are_in_the_runs_logs(tracked):
    run_dir, _, _, console = tracked
    assert not RAY_CORE_LINE.search(console), console
    assert "(raylet)" not in console and "core_worker" not in console
    # Ray's core warns of each W&B logging actor it starts (max_restarts with arguments in the object store)
    core = (run_dir / "logs" / "ray_core.log").read_text()
    assert RAY_CORE_LINE.search(core) and "_WandbLoggingActor" in core


def test_tensorboard_event_files_are_in_each_trials_directory(tracked):
    run_dir, _, _, _ = tracked
    trial_dirs = list((run_dir / "tune").glob("trial_*"))
    assert len(trial_dirs) == 3
    for trial_dir in trial_dirs:
        assert list(trial_dir.glob("events.out.tfevents.*")), f"{trial_dir.name} has no TensorBoard events"


def test_the_optuna_journal_in_the_run_holds_one_study_with_each_search_trial_once(tracked):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    run_dir, _, _, _ = tracked
    storage = JournalStorage(JournalFileBackend(str(run_dir / "optuna_study.log")))
    assert optuna.get_all_study_names(storage) == [NAME]
    trials = optuna.load_study(study_name=NAME, storage=storage).trials
    # a trial asked after Tune's last save before the kill failed, and was proposed again
    lost = [t for t in trials if t.state.name == "FAIL" and any(later.params == t.params for later in trials[t.number + 1:])]
    kept = [t for t in trials if t not in lost]
    searched = _trials(run_dir).query("origin in ['search', 'prior']")
    assert sorted(t.state.name for t in kept) == sorted(STATES[status] for status in searched.status)
    proposed = sorted((t.params["module_set"], t.params["r"], round(t.params["learning_rate"], 12)) for t in kept)
    assert proposed == sorted(zip(searched.module_set, searched.r, searched.learning_rate.round(12)))


def test_a_file_store_without_mlflows_opt_in_exits_2_naming_the_variable_and_sqlite(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()
    assert main(["--dry-run", "--output", str(tmp_path), "--set", "tracking.mlflow.enabled=true",
                 "--set", f"tracking.mlflow.tracking_uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert f"tracking.mlflow.tracking_uri '{uri}': MLflow refuses a file store" in err
    assert "MLFLOW_ALLOW_FILE_STORE=true" in err and "sqlite:///" in err and "Traceback" not in err


@pytest.mark.parametrize("key, package", [("tracking.mlflow.enabled", "mlflow"), ("tracking.wandb.enabled", "wandb")])
def test_a_tracker_configured_but_not_installed_exits_2_naming_the_key_and_the_install(key, package, monkeypatch,
                                                                                      capsys):
    import search.output.tracking

    monkeypatch.setattr(search.output.tracking, "find_spec", lambda name: None if name == package else object())
    with pytest.raises(ConfigError):
        load(None, [f"{key}=true"])
    assert main(["--set", f"{key}=true", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{key} is true, but {package} is not installed" in err
    assert f'Fix: pip install -e ".[{package}]"' in err and "Traceback" not in err


def test_trackers_that_are_off_need_nothing_installed(monkeypatch):
    import search.output.tracking

    monkeypatch.setattr(search.output.tracking, "find_spec", lambda name: None)
    assert load(None, []).tracking.mlflow.enabled is False


# The searcher against a study that outlives it: what a resume finds after a kill that came
# after Tune's last copy of the searcher (Tune saves it at most every second).

def _space(trial) -> dict:
    return {"x": trial.suggest_float("x", 0.0, 1.0)}


def _searcher(storage, points=None):
    import optuna

    from search.tuning.searcher import StudySearcher

    sampler = optuna.samplers.TPESampler(seed=0, constant_liar=True, n_startup_trials=1)  # as build_tuner's, TPE at once
    return StudySearcher(_space, metric="loss", mode="min", sampler=sampler, storage=storage, study_name="s",
                         points_to_evaluate=points, max_steps=4)


@pytest.fixture
def journal(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(tmp_path / "optuna.log")))


def _resumed(at_start: bytes, saved: Path):
    """The searcher as Tune's restore makes it: the copy pickled when the Tuner was made, then its saved state."""
    searcher = pickle.loads(at_start)
    searcher.restore(str(saved))
    return searcher


def test_a_trial_asked_after_tunes_copy_fails_and_its_proposal_comes_again(journal, tmp_path):
    searcher = _searcher(journal)
    at_start = pickle.dumps(searcher)
    searcher.suggest("a")
    searcher.on_trial_complete("a", {"loss": 0.6, "step": 4})
    searcher.save(str(tmp_path / "saved.pkl"))
    lost = searcher.suggest("b")  # TPE's proposal, then the driver was killed before Tune saved again

    resumed = _resumed(at_start, tmp_path / "saved.pkl")
    assert resumed.suggest("b2") == lost  # what an uninterrupted search runs: TPE saw the same trials
    resumed.on_trial_complete("b2", {"loss": 0.5, "step": 4})
    assert [t.state.name for t in resumed.study.trials] == ["COMPLETE", "FAIL", "COMPLETE"]


def test_a_trial_the_study_ended_after_tunes_copy_is_not_told_again(journal, tmp_path):
    searcher = _searcher(journal)
    at_start = pickle.dumps(searcher)
    searcher.suggest("a")
    searcher.save(str(tmp_path / "saved.pkl"))
    searcher.on_trial_complete("a", {"loss": 0.5, "step": 4})  # told, then killed before Tune saved

    resumed = _resumed(at_start, tmp_path / "saved.pkl")  # Tune resumes "a" from its last checkpoint
    resumed.on_trial_result("a", {"loss": 0.4, "step": 4})
    resumed.on_trial_complete("a", {"loss": 0.4, "step": 4})
    (trial,) = resumed.study.trials
    assert trial.state.name == "COMPLETE" and trial.value == 0.5


def test_a_second_start_on_the_runs_study_queues_the_first_point_once(journal):
    _searcher(journal, points=[{"x": 0.25}])
    again = _searcher(journal, points=[{"x": 0.25}])  # killed before Tune saved anything: built anew
    assert again.suggest("a") == {"x": 0.25}
    assert again.suggest("b") != {"x": 0.25}
    assert len(again.study.trials) == 2


def test_a_first_point_asked_before_tune_saved_anything_is_queued_again(journal):
    _searcher(journal, points=[{"x": 0.25}]).suggest("a")  # the prior, then killed
    again = _searcher(journal, points=[{"x": 0.25}])
    assert again.suggest("a2") == {"x": 0.25}
    assert [t.state.name for t in again.study.trials] == ["FAIL", "RUNNING"]


def test_an_mlflow_store_that_does_not_answer_exits_2_before_ray_starts_or_anything_is_written(tiny_model_dir, tmp_path,
                                                                                              capsys):
    import socket

    import ray

    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    initialized = ray.is_initialized()
    code = main(["--output", str(tmp_path), "--name", "unreachable", "--set", f"model.path={tiny_model_dir}",
                 "--set", "search.ranks=[2,4]",
                 "--set", "tracking.mlflow.enabled=true", "--set", f"tracking.mlflow.tracking_uri=http://127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"tracking.mlflow.tracking_uri 'http://127.0.0.1:{port}': the MLflow store does not answer" in err
    assert "Traceback" not in err and not (tmp_path / "unreachable").exists()
    assert ray.is_initialized() == initialized  # no Ray was started for it


def test_the_searchs_mlflow_run_is_made_once_and_gets_the_picks_files_when_it_is_finished(tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    from search.output.tracker_callbacks import log_pick, search_run_id

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind it
    uri = (tmp_path / "mlruns").as_uri()
    client = MlflowClient(uri)
    experiment = client.create_experiment("sweeps", artifact_location=str(tmp_path / "artifacts"))
    run_dir = tmp_path / "run"
    add_trial(run_dir, "t0")
    (run_dir / "plots").mkdir(parents=True)
    (run_dir / "plots" / "cost_vs_metric.png").write_bytes(b"png")
    (run_dir / "pick.json").write_text(json.dumps({"trial_id": "t0", "value": 1.0, "se": 0.01}))

    run_id = search_run_id(client, experiment, "demo", run_dir)

    assert search_run_id(client, experiment, "demo", run_dir) == run_id  # recorded in the run: a resume finds it
    assert log_pick(uri, run_dir)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {artifact.path for artifact in client.list_artifacts(run_id)} == {"pick.json", "plots"}
    assert f"the search's run {run_id} holds the pick's files" in capsys.readouterr().out


# MLflow's runs as the tracker callback writes them, driven with Tune's own Trial objects against a
# real SQLite store: what each trial's run holds, and how the search's run shows the pick.

def _mlflow(tmp_path: Path):
    """An MLflow SQLite store in `tmp_path` with the experiment `sweeps` (artifacts beside it), and its client."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("sweeps", artifact_location=str(tmp_path / "artifacts"))
    return uri, client


def _report(trial_id: str, step: int, eval_loss: float, config: dict) -> dict:
    """A report as Tune hands it to a logger callback: the trial's own keys, then those Ray adds."""
    from rundir.report import TrialReport

    report = TrialReport(
        step=step, eval_loss=eval_loss, eval_loss_se=0.1, eval_accuracy=0.5, eval_accuracy_se=0.05, train_loss=1.0,
        trainable_params=1000, trainable_pct=0.1, train_seconds=1.5, eval_seconds=0.5, eval_generate_seconds=0.0,
        tokens_per_second=100.0, peak_memory_gb=0.5, peak_allocated_gb=0.4, step_mode="eager",
        eval_row_loss=[1.0, 2.0], eval_row_accuracy=[0.0, 1.0], busy_from=1.0, busy_to=2.0, called_at=0.5,
        entered_at=0.7, worker_started_at=0.1, user_metrics={"mymetric:score": 0.25})
    return {**report.to_dict(), "timestamp": 1795426629, "checkpoint_dir_name": None, "done": False,
            "training_iteration": 1, "trial_id": trial_id, "date": "2026-11-23_09-37-09", "time_this_iter_s": 0.1,
            "time_total_s": 0.1, "pid": 3122, "hostname": "vm", "node_ip": "192.0.2.2", "config": config,
            "time_since_restore": 0.1, "iterations_since_restore": 1}


def _log_trial(callback, trial_id: str, config: dict, reports: list[dict]) -> None:
    from ray.tune.experiment import Trial

    trial = Trial("train_lora", config=config, trial_id=trial_id, stub=True)
    callback.log_trial_start(trial)
    for n, report in enumerate(reports, 1):
        callback.log_trial_result(n, trial, report)
    callback.log_trial_end(trial)


def test_every_trials_mlflow_run_holds_the_same_configuration_params_and_only_its_own_metrics(tmp_path):
    from rundir.params import Origin, TrialParams
    from search.output.tracker_callbacks import MLflowTrialRuns

    uri, client = _mlflow(tmp_path)
    lora_config = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                   "use_rslora": True, "use_dora": False, "bias": "none", "task_type": "CAUSAL_LM"}
    searched = TrialParams(lora_config=lora_config, module_set="attention_qv", alpha_ratio=2.0, learning_rate=2e-4,
                           loraplus_lr_ratio=1.0, seed=0)
    confirming = searched.repeat(Origin.CONFIRM, parent="abc12_00000", seed=1)
    # Optuna's searcher merges the values it sampled into a searched trial's config; a confirmation has none
    sampled = {"r": 4, "use_rslora": True, "use_dora": False, "lora_dropout": 0.05, "alpha_ratio": 2.0}
    configs = {"abc12_00000": {**sampled, **searched.to_config()}, "abc12_00001": confirming.to_config()}
    callback = MLflowTrialRuns(uri, "sweeps", "demo", tmp_path / "run")
    (tmp_path / "run").mkdir()
    callback.setup()
    for trial_id, config in configs.items():
        _log_trial(callback, trial_id, config, [_report(trial_id, 3, 2.0, config), _report(trial_id, 6, 1.5, config)])

    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id],
                              filter_string="tags.`mlflow.parentRunId` != ''")
    assert len(runs) == 2
    expected_params = {"module_set", "alpha_ratio", "learning_rate", "loraplus_lr_ratio", "seed", "origin", "parent",
                       "start_from", "full_data", "gpu_share", *(f"lora_config/{key}" for key in lora_config)}
    expected_metrics = {"eval_loss", "eval_loss_se", "eval_accuracy", "eval_accuracy_se", "train_loss",
                        "trainable_params", "trainable_pct", "train_seconds", "eval_seconds", "eval_generate_seconds",
                        "tokens_per_second", "peak_memory_gb", "peak_allocated_gb", "mymetric:score"}
    for run in runs:
        assert set(run.data.params) == expected_params, run.data.tags["trial_name"]
        assert set(run.data.metrics) == expected_metrics, run.data.tags["trial_name"]
        assert run.data.params["lora_config/r"] == "4" and run.data.params["lora_config/use_rslora"] == "True"
        history = client.get_metric_history(run.info.run_id, "eval_loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(3, 2.0), (6, 1.5)]
    origins = sorted((run.data.tags["trial_id"], run.data.params["origin"]) for run in runs)
    assert origins == [("abc12_00000", "search"), ("abc12_00001", "confirm")]


def test_the_searchs_mlflow_run_carries_the_picks_configuration_and_metrics_and_tags_its_trials_run(tmp_path):
    from search.output.tracker_callbacks import MLflowTrialRuns, log_pick

    uri, client = _mlflow(tmp_path)
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "t0", eval_loss=1.2, r=8)
    add_trial(run_dir, "t1", eval_loss=1.0, r=4, learning_rate=1e-3, module_set="mlp")
    callback = MLflowTrialRuns(uri, "sweeps", "demo", run_dir)
    callback.setup()
    for trial_id in ("t0", "t1"):
        rows = [json.loads(line) for line in (run_dir / "tune" / f"trial_{trial_id}" / "result.json").read_text().splitlines()]
        _log_trial(callback, trial_id, json.loads((run_dir / "tune" / f"trial_{trial_id}" / "params.json").read_text()), rows)
    parent_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    children = {run.data.tags["trial_id"]: run for run in
                client.search_runs([client.get_experiment_by_name("sweeps").experiment_id],
                                   filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")}

    (run_dir / "pick.json").write_text(json.dumps({"trial_id": "t1", "value": 1.0, "se": 0.02}))
    assert log_pick(uri, run_dir)
    parent = client.get_run(parent_id)
    assert parent.data.params["lora_config/r"] == "4" and parent.data.params["module_set"] == "mlp"
    assert parent.data.params["learning_rate"] == "0.001"
    assert parent.data.metrics["eval_loss"] == pytest.approx(1.0)  # t1's last report, at the full budget
    assert parent.data.metrics["pick_value"] == pytest.approx(1.0) and parent.data.metrics["pick_se"] == 0.02
    assert parent.data.tags["pick.trial_id"] == "t1" and parent.data.tags["pick.run_id"] == children["t1"].info.run_id
    assert client.get_run(children["t1"].info.run_id).data.tags["picked"] == "true"
    assert "picked" not in client.get_run(children["t0"].info.run_id).data.tags

    (run_dir / "pick.json").write_text(json.dumps({"trial_id": "t0", "value": 1.2, "se": 0.03}))  # a later analysis
    assert log_pick(uri, run_dir)
    assert client.get_run(parent_id).data.tags["pick.trial_id"] == "t0"
    assert client.get_run(children["t0"].info.run_id).data.tags["picked"] == "true"
    assert client.get_run(children["t1"].info.run_id).data.tags["picked"] == "false"


def test_a_dry_run_with_mlflow_on_creates_no_database_and_prints_nothing_of_mlflow(tiny_model_dir, tmp_path):
    database = tmp_path / "mlflow.db"
    code, out, err, _ = run_cli("--dry-run", "--set", f"model.path={tiny_model_dir}", "--set", "search.ranks=[2,4]",
                                "--set", "tracking.mlflow.enabled=true",
                                "--set", f"tracking.mlflow.tracking_uri=sqlite:///{database}", cwd=tmp_path)
    assert code == 0, err
    assert not database.exists() and list(tmp_path.iterdir()) == []
    assert "mlflow" not in (out + err).lower()
