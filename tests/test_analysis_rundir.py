"""Reading a run directory, written by tests/helpers.py in the layout Ray 2.60 was seen to write.

Layout, as seen with a real `Tuner` (see analysis/results.py):
`<run>/<experiment>/trial_<trial id>/` (the driver's names; Ray's default is
`<trainable>_<trial id>_<index>_<tag>_<date>`) with `params.json`, `result.json` (JSON lines,
Ray's keys added, the config repeated) and `error.txt` when the trial raised.
"""

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from analysis.results import (
    COLUMNS,
    CURVE_COLUMNS,
    ROW_COLUMNS,
    error_summary,
    read_run_config,
    write_trials_csv,
)
from helpers import MAX_STEPS, add_trial, load_curves, load_lora_configs, load_trials, ray_traceback, write_run_config

ACTOR_DIED = """Failure # 1 (occurred at 2026-11-23_09-42-12)
The actor died unexpectedly before finishing this task.
\tclass_name: ImplicitFunc
\tactor_id: e9ad2462d803c52a17152f1a01000000
\tpid: 5507
The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR
"""


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return write_run_config(tmp_path / "run")


def test_load_trials_has_one_row_per_trial_with_the_design_columns_in_order(run_dir):
    add_trial(run_dir, "aaaa0001")
    add_trial(run_dir, "aaaa0002", last_step=50)

    trials = load_trials(run_dir)

    assert tuple(trials.columns) == (*COLUMNS, "eval_row_loss", "eval_row_accuracy", "eval_row_exact_match")
    assert list(trials["trial_id"]) == ["aaaa0001", "aaaa0002"]


def test_per_row_values_come_from_the_last_report_as_lists_and_stay_out_of_trials_csv(run_dir):
    add_trial(run_dir, "aaaa0001", eval_row_loss=[0.25, 1.5, 0.75])
    add_trial(run_dir, "aaaa0002")  # reported none, as trials before per-row values did

    trials = load_trials(run_dir)
    write_trials_csv(trials, run_dir / "trials.csv")

    assert trials["eval_row_loss"].tolist() == [[0.25, 1.5, 0.75], None]
    assert trials["eval_row_accuracy"].tolist() == [None, None]
    assert not set(ROW_COLUMNS.values()) & set(pd.read_csv(run_dir / "trials.csv").columns)


def test_trial_reaching_max_steps_is_finished_and_one_cut_short_is_stopped(run_dir):
    add_trial(run_dir, "aaaa0001", last_step=MAX_STEPS)
    add_trial(run_dir, "aaaa0002", last_step=50)

    trials = load_trials(run_dir).set_index("trial_id")

    assert trials.at["aaaa0001", "status"] == "finished"
    assert trials.at["aaaa0002", "status"] == "stopped"
    assert trials.at["aaaa0002", "step"] == 50


def test_metrics_and_config_come_from_the_last_report_and_params_json(run_dir):
    add_trial(run_dir, "aaaa0001", eval_loss=0.42, module_set="attention", r=16, alpha_ratio=0.5, origin="prior")

    row = load_trials(run_dir).iloc[0]

    assert (row["eval_loss"], row["step"], row["trainable_params"]) == (0.42, MAX_STEPS, 16 * 1_000 * 4)
    assert (row["module_set"], row["r"], row["lora_alpha"], row["origin"]) == ("attention", 16, 8.0, "prior")
    assert json.loads(row["target_modules"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert row["error"] == ""


def test_failed_trial_keeps_its_config_and_a_one_line_error_without_the_module_path(run_dir):
    add_trial(run_dir, "aaaa0001", last_step=50, error="trainables.train.TrialDiverged: loss became nan at step 12")

    row = load_trials(run_dir).iloc[0]

    assert row["status"] == "failed"
    assert row["error"] == "TrialDiverged: loss became nan at step 12"
    assert row["r"] == 8


def test_a_trial_that_tune_retried_to_the_end_is_finished_despite_its_error_file(run_dir):
    # aaaa0001 failed once, before its reports (which all carry the helper's date, 09:37:09), and
    # Tune's retry trained it to the end; aaaa0002 failed after its last report.
    retried = ray_traceback("builtins.RuntimeError: worker lost").replace("occurred at 2026-11-23_09-37-09",
                                                                          "occurred at 2026-11-23_09-30-00")
    add_trial(run_dir, "aaaa0001", error_text=retried)
    add_trial(run_dir, "aaaa0002", last_step=50, error="torch.OutOfMemoryError: CUDA out of memory.")

    trials = load_trials(run_dir).set_index("trial_id")

    assert (trials.at["aaaa0001", "status"], trials.at["aaaa0001", "error"]) == ("finished", "")
    assert trials.at["aaaa0002", "status"] == "failed"


def test_a_failure_newer_than_tunes_last_snapshot_is_still_a_failure(run_dir):
    # the trial raised after its last report, then the driver died before Tune recorded anything
    add_trial(run_dir, "aaaa0001", last_step=50, error="trainables.trial.TrialDiverged: loss became nan at step 52")

    row = load_trials(run_dir).iloc[0]

    assert (row["status"], row["error"]) == ("failed", "TrialDiverged: loss became nan at step 52")


def test_trial_that_failed_before_its_first_report_still_gets_a_row(run_dir):
    add_trial(run_dir, "aaaa0001", last_step=None, error="torch.OutOfMemoryError: CUDA out of memory.")

    row = load_trials(run_dir).iloc[0]

    assert (row["trial_id"], row["status"], row["error"]) == ("aaaa0001", "failed", "OutOfMemoryError: CUDA out of memory.")
    assert pd.isna(row["step"]) and math.isnan(row["eval_loss"])


@pytest.mark.parametrize("dir_name, trial_id", [
    ("train_lora_711d0_00001_1_kind=fail,x=1.0000_2026-11-23_09-37-06", "711d0_00001"),  # Ray's default, no searcher
    ("train_lora_19095ad2_2_lora_alpha=8,r=4_2026-11-23_09-38-36", "19095ad2"),  # Ray's default, with a searcher
    ("trial_19095ad2", "19095ad2"),  # the driver's trial_dirname
])
def test_a_trial_that_never_reported_gets_its_id_from_the_directory_name(run_dir, dir_name, trial_id):
    add_trial(run_dir, trial_id, last_step=None, error="RuntimeError: boom", dir_name=dir_name)

    assert load_trials(run_dir)["trial_id"].tolist() == [trial_id]


def test_every_stage_of_the_search_competes_and_retraining_is_not_a_trial(run_dir):
    add_trial(run_dir, "cccc0001", origin="confirm")
    add_trial(run_dir, "eeee0001", experiment="retrain", origin="retrain")
    add_trial(run_dir, "bbbb0001", origin="promoted")
    add_trial(run_dir, "aaaa0001")

    trials = load_trials(run_dir)

    assert trials["trial_id"].tolist() == ["aaaa0001", "bbbb0001", "cccc0001"]
    assert trials["origin"].tolist() == ["search", "promoted", "confirm"]


def test_a_params_file_without_a_field_of_the_trial_contract_is_named(run_dir):
    trial_dir = add_trial(run_dir, "aaaa0001")
    params = json.loads((trial_dir / "params.json").read_text())
    del params["full_data"]
    (trial_dir / "params.json").write_text(json.dumps(params))

    with pytest.raises(ValueError, match="lacks \\['full_data'\\]"):
        load_trials(run_dir)


def test_error_summary_of_a_worker_that_died_is_the_first_line_of_the_failure():
    assert error_summary(ACTOR_DIED) == "The actor died unexpectedly before finishing this task."


def test_error_summary_reads_only_the_last_failure():
    text = ray_traceback("ValueError: first") + ray_traceback("KeyError: 'second'").replace("# 1", "# 2")

    assert error_summary(text) == "KeyError: 'second'"


def test_a_cut_short_last_line_of_result_json_is_ignored(run_dir):
    trial_dir = add_trial(run_dir, "aaaa0001", last_step=50)
    with open(trial_dir / "result.json", "a") as result:
        result.write('{"step": 75, "eval_lo')

    assert load_trials(run_dir).iloc[0]["step"] == 50


def test_a_broken_line_inside_result_json_is_a_clear_error(run_dir):
    trial_dir = add_trial(run_dir, "aaaa0001", last_step=50)
    result = trial_dir / "result.json"
    result.write_text("not json\n" + result.read_text())

    with pytest.raises(ValueError, match="line 1 is not JSON"):
        load_trials(run_dir)


def test_load_curves_lists_every_reported_step_and_a_repeated_step_keeps_the_later_report(run_dir):
    trial_dir = add_trial(run_dir, "aaaa0001", last_step=50, eval_loss=0.5)
    add_trial(run_dir, "aaaa0002", last_step=25, eval_loss=0.9)
    with open(trial_dir / "result.json", "a") as result:  # a restored trial reports step 50 again
        restored = {"step": 50, "eval_loss": 0.4, "eval_accuracy": 0.9, "train_loss": 0.3, "trial_id": "aaaa0001"}
        result.write(json.dumps(restored) + "\n")

    curves = load_curves(run_dir)

    assert tuple(curves.columns) == CURVE_COLUMNS
    assert curves[["trial_id", "step"]].values.tolist() == [["aaaa0001", 25], ["aaaa0001", 50], ["aaaa0002", 25]]
    assert curves["eval_loss"].tolist() == [0.75, 0.4, 0.9]


def test_load_lora_configs_gives_each_trials_exact_peft_arguments(run_dir):
    add_trial(run_dir, "aaaa0001", r=4, alpha_ratio=1.0)

    assert load_lora_configs(run_dir) == {"aaaa0001": {
        "r": 4, "lora_alpha": 4.0, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM"}}


def test_write_trials_csv_round_trips_and_leaves_no_temporary_file(run_dir):
    add_trial(run_dir, "aaaa0001")
    add_trial(run_dir, "aaaa0002", last_step=None, error="RuntimeError: boom")
    trials = load_trials(run_dir)

    path = write_trials_csv(trials, run_dir / "trials.csv")

    again = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert list(again.columns) == list(COLUMNS)
    assert again["status"].tolist() == ["finished", "failed"]
    assert again["error"].fillna("").tolist() == ["", "RuntimeError: boom"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["run_config.json", "trials.csv", "tune"]


def test_a_run_without_a_tune_directory_has_no_trials(run_dir):
    trials = load_trials(run_dir)

    assert trials.empty and tuple(trials.columns) == (*COLUMNS, *ROW_COLUMNS.values())


def test_a_directory_without_run_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="run_config.json' is missing"):
        read_run_config(tmp_path)


def test_a_run_config_lacking_keys_lists_them_all(tmp_path):
    (tmp_path / "run_config.json").write_text(json.dumps({"name": "x", "seed": 0}))

    with pytest.raises(ValueError, match=r"lacks \['output', 'model', 'data', 'task', 'search', 'budget', 'resources', "
                                         r"'selection', 'tracking', 'base_model', 'data_info', 'module_sets', 'created_by'\]"):
        read_run_config(tmp_path)
