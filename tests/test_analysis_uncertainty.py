"""The pick judges "within tolerance" with each configuration's standard error: a one-sided
90% interval that reaches the bar (analysis/select.py's docstring)."""

from __future__ import annotations

import math

import pytest

from analysis.select import pick
from test_analysis_select import MAX_STEPS, configs, table

RULE = ("eval_loss", "min", 0.95, "trainable_params")


def test_two_configurations_whose_intervals_overlap_are_both_inside_the_band():
    # bar 0.50 / 0.95 = 0.526; the cheaper one's mean is past it, its interval (0.54 - 1.28 * 0.02) is not
    trials = table({"eval_loss": 0.50, "eval_loss_se": 0.01, "trainable_params": 8000},
                   {"eval_loss": 0.54, "eval_loss_se": 0.02, "trainable_params": 2000})
    chosen = pick(trials, *RULE, MAX_STEPS, configs(trials))
    assert chosen.candidates == 2 and chosen.trial_id == "t0" and chosen.se == 0.01  # the tolerance keeps its meaning
    assert chosen.undecided_with == "t1"  # in the band by its interval only: both are given


def test_a_cheaper_configuration_whose_interval_is_entirely_above_the_band_is_not_picked():
    trials = table({"eval_loss": 0.50, "eval_loss_se": 0.01, "trainable_params": 8000},
                   {"eval_loss": 0.60, "eval_loss_se": 0.01, "trainable_params": 1000})
    chosen = pick(trials, *RULE, MAX_STEPS, configs(trials))
    assert chosen.trial_id == "t0" and chosen.candidates == 1 and chosen.undecided_with is None


def test_a_pick_whose_mean_is_within_the_band_is_decided():
    trials = table({"eval_loss": 0.50, "eval_loss_se": 0.05, "trainable_params": 8000},
                   {"eval_loss": 0.52, "eval_loss_se": 0.05, "trainable_params": 2000})
    chosen = pick(trials, *RULE, MAX_STEPS, configs(trials))
    assert chosen.trial_id == "t1" and chosen.undecided_with is None


def test_seeds_combine_with_the_rows_standard_error():
    # same eval rows for both seeds: the rows' part stays, the seeds' part shrinks with their count
    trials = table({"eval_loss": 0.50, "eval_loss_se": 0.03},
                   {"eval_loss": 0.60, "eval_loss_se": 0.01, "origin": "confirm", "parent": "t0", "seed": 1})
    chosen = pick(trials, *RULE, MAX_STEPS, configs(trials))
    seed_sd = math.sqrt(2 * 0.05**2)  # sample standard deviation of 0.50 and 0.60
    assert chosen.seeds == 2 and chosen.se == pytest.approx(math.sqrt(0.02**2 + seed_sd**2 / 2))


def confirmed(*losses: float, row_se: float = 0.005):
    """t0 the best (0.50, bar 0.5263) and t1 a cheaper configuration run with one seed per loss."""
    runs = [{"eval_loss": loss, "eval_loss_se": row_se, "trainable_params": 2000,
             **({"origin": "confirm", "parent": "t1", "seed": i} if i else {})} for i, loss in enumerate(losses)]
    return table({"eval_loss": 0.50, "eval_loss_se": 0.01, "trainable_params": 8000}, *runs)


def test_agreeing_seeds_settle_a_case_whose_gap_to_the_bar_is_more_than_the_rows_part():
    # 0.535 is past the bar by 0.0087, more than 1.28 * 0.005: only the seeds' part reaches the bar
    two = confirmed(0.53, 0.54)
    assert pick(two, *RULE, MAX_STEPS, configs(two)).undecided_with == "t1"
    four = confirmed(0.53, 0.54, 0.535, 0.535)
    chosen = pick(four, *RULE, MAX_STEPS, configs(four))
    assert chosen.trial_id == "t0" and chosen.undecided_with is None


def test_no_number_of_seeds_settles_a_case_whose_gap_to_the_bar_is_within_the_rows_part():
    # 0.53 is past the bar by 0.0037, less than 1.28 * 0.005: the same eval rows keep it in the band
    trials = confirmed(*[0.53] * 8)
    chosen = pick(trials, *RULE, MAX_STEPS, configs(trials))
    assert chosen.trial_id == "t0" and chosen.undecided_with == "t1"
