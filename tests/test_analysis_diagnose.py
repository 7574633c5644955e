"""Curve diagnostics in the report: divergence, overfitting, an early plateau."""

from __future__ import annotations

import pandas as pd

from analysis.diagnose import curve_diagnosis, diagnose


def test_eval_loss_rising_while_train_loss_falls_is_overfitting():
    assert curve_diagnosis([10, 20, 30, 40], [1.0, 0.8, 0.85, 0.9], [1.0, 0.7, 0.5, 0.3]) == "overfitting"


def test_eval_loss_rising_with_train_loss_rising_is_not_overfitting():
    assert curve_diagnosis([10, 20, 30, 40], [1.0, 0.8, 0.85, 0.9], [1.0, 0.7, 0.8, 0.9]) != "overfitting"


def test_no_gain_in_the_second_half_is_an_early_plateau():
    assert curve_diagnosis([10, 20, 30, 40], [1.0, 0.600, 0.599, 0.598], [1.0, 0.6, 0.6, 0.6]) == "plateaued early"


def test_a_curve_still_improving_is_healthy():
    assert curve_diagnosis([10, 20, 30, 40], [1.0, 0.8, 0.6, 0.4], [1.0, 0.8, 0.6, 0.4]) == ""


def test_two_points_are_too_few_to_say_anything():
    assert curve_diagnosis([10, 20], [1.0, 1.5], [1.0, 0.5]) == ""


def test_a_trial_failed_by_divergence_is_diverged_and_other_failures_are_not():
    trials = pd.DataFrame([{"trial_id": "a", "status": "failed", "error": "TrialDiverged: train loss became nan by step 3"},
                           {"trial_id": "b", "status": "failed", "error": "OutOfMemoryError: CUDA out of memory"}])
    curves = pd.DataFrame(columns=["trial_id", "step", "eval_loss", "train_loss"])
    assert diagnose(trials, curves) == {"a": "diverged", "b": ""}
