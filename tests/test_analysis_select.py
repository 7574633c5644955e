"""The pick and the Pareto front, on hand-made trial tables with known answers."""

import math

import pandas as pd
import pytest

from analysis.select import Comparison, NoCandidate, pareto_front, pick, within_bar
from helpers import MAX_STEPS, configs, table


def pick_from(trials: pd.DataFrame, metric="eval_loss", mode="min", tolerance=0.95, cost="trainable_params"):
    return pick(trials, Comparison(metric, mode, tolerance, cost, MAX_STEPS), configs(trials))


def test_minimising_picks_the_cheapest_trial_within_tolerance():
    trials = table(
        {"eval_loss": 0.50, "trainable_params": 8000},
        {"eval_loss": 0.52, "trainable_params": 2000},
        {"eval_loss": 0.51, "trainable_params": 4000},
        {"eval_loss": 0.60, "trainable_params": 1000},  # cheapest, but 0.60 > 0.50 / 0.95
    )

    chosen = pick_from(trials)

    assert (chosen.trial_id, chosen.value, chosen.best_value, chosen.best_trial_id) == ("t1", 0.52, 0.50, "t0")
    assert (chosen.cost_name, chosen.cost, chosen.step, chosen.candidates) == ("trainable_params", 2000, MAX_STEPS, 3)


def test_maximising_picks_the_cheapest_trial_within_tolerance():
    trials = table(
        {"eval_accuracy": 0.90, "trainable_params": 8000},
        {"eval_accuracy": 0.86, "trainable_params": 2000},
        {"eval_accuracy": 0.85, "trainable_params": 1000},  # below 0.95 * 0.90 = 0.855
    )

    chosen = pick_from(trials, metric="eval_accuracy", mode="max")

    assert (chosen.trial_id, chosen.best_value, chosen.mode) == ("t1", 0.90, "max")


def test_maximising_keeps_a_trial_exactly_at_the_bar_and_drops_one_just_below():
    # In floating point 0.9 * 0.2 is 0.18000000000000002, above the 0.18 on paper.
    at_bar = table({"eval_accuracy": 0.2, "trainable_params": 8000}, {"eval_accuracy": 0.18, "trainable_params": 1000})
    below = table({"eval_accuracy": 0.2, "trainable_params": 8000}, {"eval_accuracy": 0.1799, "trainable_params": 1000})

    assert pick_from(at_bar, metric="eval_accuracy", mode="max", tolerance=0.9).trial_id == "t1"
    assert pick_from(below, metric="eval_accuracy", mode="max", tolerance=0.9).trial_id == "t0"


def test_minimising_keeps_a_trial_exactly_at_the_bar_and_drops_one_just_above():
    # In floating point 0.18 / 0.9 is 0.19999999999999998, below the 0.2 on paper.
    at_bar = table({"eval_loss": 0.18, "trainable_params": 8000}, {"eval_loss": 0.2, "trainable_params": 1000})
    above = table({"eval_loss": 0.18, "trainable_params": 8000}, {"eval_loss": 0.2001, "trainable_params": 1000})

    assert pick_from(at_bar, tolerance=0.9).trial_id == "t1"
    assert pick_from(above, tolerance=0.9).trial_id == "t0"


@pytest.mark.parametrize("value, bar, mode, within", [
    (0.18, 0.9 * 0.2, "max", True), (0.1799, 0.18, "max", False), (0.5, 0.18, "max", True),
    (0.2, 0.18 / 0.9, "min", True), (0.2001, 0.2, "min", False), (0.1, 0.2, "min", True),
])
def test_within_bar_counts_values_at_the_bar_or_better_in_the_metrics_direction(value, bar, mode, within):
    assert within_bar(value, bar, mode) is within


def test_tolerance_one_picks_the_best_trial():
    trials = table({"eval_loss": 0.50, "trainable_params": 8000}, {"eval_loss": 0.501, "trainable_params": 10})

    assert pick_from(trials, tolerance=1.0).trial_id == "t0"


def test_pick_ignores_a_better_trial_stopped_before_the_full_budget():
    trials = table(
        {"eval_loss": 0.50, "trainable_params": 8000},
        {"eval_loss": 0.10, "trainable_params": 100, "status": "stopped", "step": 50},
    )

    chosen = pick_from(trials)

    assert (chosen.trial_id, chosen.best_value, chosen.candidates) == ("t0", 0.50, 1)


def test_pick_ignores_failed_trials_and_trials_with_a_nan_metric():
    trials = table(
        {"eval_loss": 0.50, "trainable_params": 8000},
        {"eval_loss": 0.10, "trainable_params": 100, "status": "failed", "error": "TrialDiverged: nan"},
        {"eval_loss": math.nan, "trainable_params": 100},
        {"eval_loss": math.inf, "trainable_params": 100},
    )

    assert pick_from(trials).trial_id == "t0"


def test_equal_cost_goes_to_fewer_trainable_params_then_to_the_better_metric():
    trials = table(
        {"eval_loss": 0.50, "train_seconds": 10.0, "trainable_params": 9000},
        {"eval_loss": 0.51, "train_seconds": 10.0, "trainable_params": 2000},
        {"eval_loss": 0.50, "train_seconds": 10.0, "trainable_params": 2000},
    )

    assert pick_from(trials, cost="train_seconds").trial_id == "t2"


def test_a_complete_tie_goes_to_the_smaller_trial_id_whatever_the_row_order():
    trials = table({"eval_loss": 0.5}, {"eval_loss": 0.5})

    assert pick_from(trials.iloc[::-1]).trial_id == "t0"


def test_pick_returns_the_lora_config_the_trial_trained_with_and_a_rule_sentence():
    trials = table({"r": 4, "eval_loss": 0.5})

    chosen = pick_from(trials)

    assert chosen.lora_config == {"r": 4, "lora_alpha": 8}
    assert chosen.rule.startswith("Cheapest by trainable_params among the 1 configurations") and chosen.rule.endswith(".")


def test_no_trial_at_the_full_budget_raises_no_candidate_with_the_counts():
    trials = table({"status": "stopped", "step": 50}, {"status": "failed", "step": 25, "error": "boom"})

    with pytest.raises(NoCandidate, match=r"No trial reached step 100.*0 finished, 1 stopped, 1 failed"):
        pick_from(trials)


def test_no_trial_at_the_full_budget_and_none_failed_says_to_resume_not_to_read_errors():
    trials = table({"status": "stopped", "step": 50}, {"status": "stopped", "step": 25})

    with pytest.raises(NoCandidate, match=r"none failed: the run was interrupted.*Fix: resume the run") as raised:
        pick_from(trials)
    assert "read the errors" not in str(raised.value)


def test_a_metric_no_trial_reported_raises_no_candidate():
    trials = table({"eval_accuracy": math.nan})

    with pytest.raises(NoCandidate, match="No finished trial reported a finite eval_accuracy"):
        pick_from(trials, metric="eval_accuracy", mode="max")


def test_an_empty_run_raises_no_candidate():
    with pytest.raises(NoCandidate, match="no trials yet"):
        pick_from(table())


def test_pareto_front_keeps_only_finished_trials_no_other_beats_on_both_cost_and_metric():
    trials = table(
        {"eval_loss": 0.50, "trainable_params": 8000},  # front: the best
        {"eval_loss": 0.55, "trainable_params": 2000},  # front
        {"eval_loss": 0.56, "trainable_params": 4000},  # dominated by t1
        {"eval_loss": 0.70, "trainable_params": 1000},  # front: the cheapest
        {"eval_loss": 0.55, "trainable_params": 2000},  # equal to t1: t1 stays
        {"eval_loss": 0.10, "trainable_params": 100, "status": "stopped", "step": 50},
    )

    assert pareto_front(trials, "eval_loss", "min", "trainable_params")["trial_id"].tolist() == ["t3", "t1", "t0"]


def test_pareto_front_when_maximising():
    trials = table(
        {"eval_accuracy": 0.9, "trainable_params": 8000},
        {"eval_accuracy": 0.8, "trainable_params": 9000},
        {"eval_accuracy": 0.7, "trainable_params": 1000},
    )

    assert pareto_front(trials, "eval_accuracy", "max", "trainable_params")["trial_id"].tolist() == ["t2", "t0"]


@pytest.mark.parametrize("keys, ascending", [
    (["cost", "params", "metric", "trial_id"], [True, True, False, True]),
    (["metric", "trial_id"], [True, True]),
    (["params", "cost"], [False, True]),
])
def test_sort_rows_orders_as_pandas_stable_sort_with_missing_values_last(keys, ascending):
    from analysis.select import sort_rows

    frame = pd.DataFrame({
        "cost": [2.0, 1.0, math.nan, 1.0, 2.0, 1.0, 3.0],
        "params": pd.array([10, 20, None, 20, 10, 5, None], dtype="Int64"),
        "metric": [0.5, 0.4, 0.4, 0.4, math.nan, 0.7, 0.1],
        "trial_id": ["t6", "t5", "t4", "t3", "t2", "t1", "t0"],
    }, index=[10, 11, 12, 13, 14, 15, 16])
    expected = frame.sort_values(keys, ascending=ascending, kind="stable")
    assert list(sort_rows(frame, keys, ascending).index) == list(expected.index)
