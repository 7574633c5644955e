"""A trial's report: `TrialReport` is what both trainers hand Tune, its field names the keys of
result.json and trials.csv."""

import json

import pytest

from rundir.report import ROW_COLUMNS, TABLE_COLUMNS, TrialReport

REQUIRED = {"step": 6, "eval_loss": 1.5, "eval_loss_se": 0.1, "eval_accuracy": 0.5, "eval_accuracy_se": 0.05,
            "train_loss": 1.4, "trainable_params": 1024, "trainable_pct": 0.1, "train_seconds": 2.0, "eval_seconds": 0.5,
            "eval_generate_seconds": 0.0, "tokens_per_second": 100.0, "peak_memory_gb": 1.0, "peak_allocated_gb": 0.5,
            "step_mode": "eager", "eval_row_loss": [1.0, 2.0], "eval_row_accuracy": [0.5, 0.5], "busy_from": 1.0,
            "busy_to": 2.0, "called_at": 0.5, "entered_at": 0.75, "worker_started_at": 0.25}


def test_a_report_survives_tunes_json_with_the_users_metric_under_its_own_name():
    report = TrialReport.from_dict({**REQUIRED, "eval_exact_match": 0.5, "eval_exact_match_se": 0.5,
                                    "eval_row_exact_match": [0.0, 1.0], "mymetric:score": 0.25})

    row = json.loads(json.dumps(report.to_dict()))

    assert row["mymetric:score"] == 0.25 and "user_metrics" not in row
    assert TrialReport.from_dict(row) == report


def test_a_per_process_trials_report_has_no_key_of_the_shared_trainer_or_of_answers_it_did_not_generate():
    keys = set(TrialReport.from_dict(REQUIRED).to_dict())

    assert keys == set(REQUIRED)
    assert not keys & {"pack_size", "trainer_pid", "eval_exact_match", "eval_row_exact_match"}


def test_a_report_without_a_key_or_with_an_unknown_one_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"lacks \['eval_loss'\]"):
        TrialReport.from_dict({key: value for key, value in REQUIRED.items() if key != "eval_loss"})
    with pytest.raises(ValueError, match=r"unknown keys \['eval_los'\]"):
        TrialReport.from_dict({**REQUIRED, "eval_los": 1.0})


def test_the_tables_columns_are_the_reports_fields():
    assert set(TABLE_COLUMNS) | set(ROW_COLUMNS) <= set(TrialReport.from_dict(REQUIRED).to_dict()) | {
        "eval_exact_match", "eval_exact_match_se", "eval_row_exact_match"}
    assert ROW_COLUMNS == ("eval_row_loss", "eval_row_accuracy", "eval_row_exact_match")
