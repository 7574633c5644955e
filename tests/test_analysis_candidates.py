"""Promotion and confirmation: early stopping must not hide the cheapest good configuration,
and one lucky seed must not win."""

from __future__ import annotations

import math

import pandas as pd

from analysis.candidates import confirmation_candidates, current_pick_cost, promotion_candidates
from analysis.select import pick
from test_analysis_select import MAX_STEPS, configs, table

RULE = ("eval_loss", "min", 0.95, "trainable_params")


def curves(*points: tuple[str, int, float]) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": t, "step": s, "eval_loss": v, "eval_accuracy": 0.5, "train_loss": v}
                         for t, s, v in points])


def test_a_cheap_trial_stopped_within_tolerance_of_its_rung_is_promoted():
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"status": "stopped", "step": 10, "trainable_params": 1000, "eval_loss": 0.82})
    rungs = curves(("t0", 10, 0.80), ("t1", 10, 0.82), ("t0", MAX_STEPS, 0.50))
    pick_cost = current_pick_cost(trials, *RULE, MAX_STEPS)
    assert pick_cost == 5000
    assert promotion_candidates(trials, rungs, *RULE, MAX_STEPS, pick_cost) == ["t1"]


def test_a_stopped_trial_outside_tolerance_or_not_cheaper_is_not_promoted():
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"status": "stopped", "step": 10, "trainable_params": 1000, "eval_loss": 0.90},
                   {"status": "stopped", "step": 10, "trainable_params": 9000, "eval_loss": 0.80})
    rungs = curves(("t0", 10, 0.80), ("t1", 10, 0.90), ("t2", 10, 0.80))
    assert promotion_candidates(trials, rungs, *RULE, MAX_STEPS, current_pick_cost(trials, *RULE, MAX_STEPS)) == []


def test_everything_stopped_within_tolerance_is_promoted_when_nothing_finished():
    trials = table({"status": "stopped", "step": 10, "eval_loss": 0.80, "trainable_params": 2000},
                   {"status": "stopped", "step": 10, "eval_loss": 0.81, "trainable_params": 1000})
    rungs = curves(("t0", 10, 0.80), ("t1", 10, 0.81))
    assert current_pick_cost(trials, *RULE, MAX_STEPS) == math.inf
    assert promotion_candidates(trials, rungs, *RULE, MAX_STEPS, math.inf) == ["t1", "t0"]


def test_confirmation_takes_the_pick_order_cheapest_within_tolerance_first():
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"trainable_params": 1000, "eval_loss": 0.52},
                   {"trainable_params": 500, "eval_loss": 0.90})
    assert confirmation_candidates(trials, *RULE, MAX_STEPS, top_k=2) == ["t1", "t0"]


def test_a_lucky_single_run_loses_once_its_other_seed_is_in():
    trials = table({"trainable_params": 1000, "eval_loss": 0.50},
                   {"trainable_params": 5000, "eval_loss": 0.55},
                   {"trainable_params": 1000, "eval_loss": 0.70, "origin": "confirm", "parent": "t0", "seed": 1},
                   {"trainable_params": 5000, "eval_loss": 0.56, "origin": "confirm", "parent": "t1", "seed": 1})
    chosen = pick(trials, *RULE, MAX_STEPS, configs(trials))
    assert chosen.trial_id == "t1" and chosen.seeds == 2
    assert chosen.value == 0.555 and abs(chosen.spread - 0.005) < 1e-12
    assert pick(trials.iloc[:2], *RULE, MAX_STEPS, configs(trials)).trial_id == "t0"  # without the second seed


def test_a_promoted_trial_competes_for_its_stopped_parent():
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"status": "stopped", "step": 10, "trainable_params": 1000, "eval_loss": 0.82},
                   {"trainable_params": 1000, "eval_loss": 0.51, "origin": "promoted", "parent": "t1"})
    chosen = pick(trials, *RULE, MAX_STEPS, configs(trials))
    assert chosen.trial_id == "t2" and chosen.cost == 1000
