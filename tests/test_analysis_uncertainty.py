"""The pick judges "within tolerance" with each configuration's standard error: a one-sided
90% interval that reaches the bar (analysis/select.py's docstring), its rows' part paired with
the best's rows where both reported per-row values."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest

from analysis.select import Comparison, Z, against_bar, by_configuration, pick, without_pick
from helpers import MAX_STEPS, configs, table

RULE = ("eval_loss", "min", 0.95, "trainable_params")


def test_two_configurations_whose_intervals_overlap_are_both_inside_the_band():
    # bar 0.50 / 0.95 = 0.526; the cheaper one's mean is past it, its interval (0.54 - 1.28 * 0.02) is not
    trials = table({"eval_loss": 0.50, "eval_loss_se": 0.01, "trainable_params": 8000},
                   {"eval_loss": 0.54, "eval_loss_se": 0.02, "trainable_params": 2000})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert chosen.candidates == 2 and chosen.trial_id == "t0" and chosen.se == 0.01  # the tolerance keeps its meaning
    assert chosen.undecided_with == "t1"  # in the band by its interval only: both are given


def test_a_cheaper_configuration_whose_interval_is_entirely_above_the_band_is_not_picked():
    trials = table({"eval_loss": 0.50, "eval_loss_se": 0.01, "trainable_params": 8000},
                   {"eval_loss": 0.60, "eval_loss_se": 0.01, "trainable_params": 1000})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert chosen.trial_id == "t0" and chosen.candidates == 1 and chosen.undecided_with is None


def test_a_pick_whose_mean_is_within_the_band_is_decided():
    trials = table({"eval_loss": 0.50, "eval_loss_se": 0.05, "trainable_params": 8000},
                   {"eval_loss": 0.52, "eval_loss_se": 0.05, "trainable_params": 2000})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert chosen.trial_id == "t1" and chosen.undecided_with is None


def test_seeds_combine_with_the_rows_standard_error():
    # same eval rows for both seeds: the rows' part stays, the seeds' part shrinks with their count
    trials = table({"eval_loss": 0.50, "eval_loss_se": 0.03},
                   {"eval_loss": 0.60, "eval_loss_se": 0.01, "origin": "confirm", "parent": "t0", "seed": 1})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    seed_sd = math.sqrt(2 * 0.05**2)  # sample standard deviation of 0.50 and 0.60
    assert chosen.seeds == 2 and chosen.se == pytest.approx(math.sqrt(0.02**2 + seed_sd**2 / 2))


def test_the_bests_own_seeds_spread_moves_the_bar_and_widens_every_comparison_with_it():
    # the best's two seeds (0.45, 0.55) put its mean, and so the bar (0.50 / 0.95), within sd/sqrt(2) = 0.05
    # of where it is: t1's 0.54 is past the bar by 0.0137, inside 1.28 * 0.05 / 0.95
    best = [{"eval_loss": 0.45, "eval_loss_se": 0.001, "trainable_params": 8000},
            {"eval_loss": 0.55, "eval_loss_se": 0.001, "trainable_params": 8000, "origin": "confirm", "parent": "t0",
             "seed": 1}]
    trials = table(*best, {"eval_loss": 0.54, "eval_loss_se": 0.001, "trainable_params": 2000})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert chosen.trial_id == "t0" and chosen.undecided_with == "t2"
    compared = against_bar(by_configuration(trials, trials, "eval_loss"), "t0", "min", 0.95).set_index("trial_id")
    best_seeds_se = statistics.stdev([0.45, 0.55]) / math.sqrt(2)
    assert compared.loc["t2", "gap_se"] == pytest.approx(math.hypot(0.001, best_seeds_se / 0.95))
    single = table(best[0], {"eval_loss": 0.54, "eval_loss_se": 0.001, "trainable_params": 2000})
    assert pick(single, Comparison(*RULE, MAX_STEPS), configs(single)).undecided_with is None  # a best of one run: no bar part


def confirmed(*losses: float, row_se: float = 0.005):
    """t0 the best (0.50, bar 0.5263) and t1 a cheaper configuration run with one seed per loss."""
    runs = [{"eval_loss": loss, "eval_loss_se": row_se, "trainable_params": 2000,
             **({"origin": "confirm", "parent": "t1", "seed": i} if i else {})} for i, loss in enumerate(losses)]
    return table({"eval_loss": 0.50, "eval_loss_se": 0.01, "trainable_params": 8000}, *runs)


def test_agreeing_seeds_settle_a_case_whose_gap_to_the_bar_is_more_than_the_rows_part():
    # 0.535 is past the bar by 0.0087, more than 1.28 * 0.005: only the seeds' part reaches the bar
    two = confirmed(0.53, 0.54)
    assert pick(two, Comparison(*RULE, MAX_STEPS), configs(two)).undecided_with == "t1"
    four = confirmed(0.53, 0.54, 0.535, 0.535)
    chosen = pick(four, Comparison(*RULE, MAX_STEPS), configs(four))
    assert chosen.trial_id == "t0" and chosen.undecided_with is None


def test_no_number_of_seeds_settles_a_case_whose_gap_to_the_bar_is_within_the_rows_part():
    # 0.53 is past the bar by 0.0037, less than 1.28 * 0.005: the same eval rows keep it in the band
    trials = confirmed(*[0.53] * 8)
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert chosen.trial_id == "t0" and chosen.undecided_with == "t1"


# Paired rows: every configuration is scored on the same eval rows, so the rows' part of a comparison
# with the best is the standard error of their per-row differences (analysis/select.py's docstring).
N_ROWS = 32


def difficulty(low: float, high: float, seed: int = 0) -> np.ndarray:
    """Per-row losses of N_ROWS eval rows spread over [low, high], shifted to a mean of exactly 0.50."""
    rows = np.random.default_rng(seed).uniform(low, high, N_ROWS)
    return rows - rows.mean() + 0.50


def scored(rows: np.ndarray, **trial) -> dict:
    """A finished trial whose eval loss, its standard error and its per-row losses are those of `rows`."""
    return {"eval_loss": float(np.mean(rows)), "eval_loss_se": statistics.stdev(rows) / math.sqrt(len(rows)),
            "eval_row_loss": [float(value) for value in rows], **trial}


def with_rows(*trials: dict, column: str = "eval_row_loss") -> pd.DataFrame:
    """`table` of `trials`, with the per-row values in `column` where a trial has them (None where not)."""
    rows = [trial.get(column) for trial in trials]
    others = ({key: value for key, value in trial.items() if key != column} for trial in trials)
    return table(*others).assign(**{column: rows})


def paired_se(rows: np.ndarray, best_rows: np.ndarray, scale: float) -> float:
    """By hand: the standard error of the mean of rows_i - scale * best_i."""
    return statistics.stdev(rows - scale * best_rows) / math.sqrt(len(rows))


def test_paired_rows_tell_apart_a_cheaper_configuration_that_its_own_standard_error_cannot():
    best_rows = difficulty(0.1, 0.9)  # hard and easy rows: each configuration's own standard error is large
    cheap_rows = best_rows + 0.04 + np.random.default_rng(1).normal(0, 0.002, N_ROWS)  # 0.04 worse on every row
    trials = with_rows(scored(best_rows, trainable_params=8000), scored(cheap_rows, trainable_params=2000))
    gap = cheap_rows.mean() - 0.50 / 0.95
    assert gap > Z * paired_se(cheap_rows, best_rows, 1 / 0.95) and gap < Z * trials["eval_loss_se"][1]

    paired = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    unpaired = pick(trials.drop(columns="eval_row_loss"), Comparison(*RULE, MAX_STEPS), configs(trials))

    assert (paired.trial_id, paired.undecided_with, paired.compared, paired.paired) == ("t0", None, 1, 1)
    assert (unpaired.trial_id, unpaired.undecided_with, unpaired.compared, unpaired.paired) == ("t0", "t1", 1, 0)
    assert "paired with the best over the same eval rows" in paired.rule
    assert "no per-row values to pair with the best's were reported" in unpaired.rule


def test_paired_rows_keep_a_cheaper_configuration_undecided_where_the_differences_vary_more_than_its_own_rows():
    cheap_rows = 0.54 + np.random.default_rng(1).normal(0, 0.005, N_ROWS)  # every row alike: a small own error
    best_rows = 0.50 + 0.3 * np.resize([1.0, -1.0], N_ROWS)  # rows the best gets right or badly wrong
    trials = with_rows(scored(best_rows, trainable_params=8000), scored(cheap_rows, trainable_params=2000))
    gap = cheap_rows.mean() - 0.50 / 0.95
    assert gap < Z * paired_se(cheap_rows, best_rows, 1 / 0.95) and gap > Z * trials["eval_loss_se"][1]

    paired = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    unpaired = pick(trials.drop(columns="eval_row_loss"), Comparison(*RULE, MAX_STEPS), configs(trials))

    assert (paired.trial_id, paired.undecided_with) == ("t0", "t1")
    assert "`t1` only by the standard error of its distance to the bar paired with the best" in paired.undecided
    assert (unpaired.trial_id, unpaired.undecided_with) == ("t0", None)


def test_a_configuration_without_row_values_keeps_its_own_standard_error_beside_one_that_pairs():
    # t1 as in test_two_configurations_whose_intervals_overlap_are_both_inside_the_band: in by its own interval
    best_rows = difficulty(0.1, 0.9)
    trials = with_rows(scored(best_rows, trainable_params=8000),
                       {"eval_loss": 0.54, "eval_loss_se": 0.02, "trainable_params": 2000},
                       scored(best_rows + 0.06, trainable_params=1000))  # 0.56, out by its paired interval

    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))

    assert (chosen.trial_id, chosen.undecided_with, chosen.compared, chosen.paired) == ("t0", "t1", 2, 1)
    assert "for 1 of the 2 configurations compared with the best" in chosen.rule
    assert "`t1` by its standard error only" in chosen.undecided


def test_a_configurations_rows_are_averaged_over_its_seeds_before_they_are_paired():
    best_rows = difficulty(0.1, 0.9)
    noise = np.random.default_rng(2).normal(0, 0.01, (2, N_ROWS))
    first, second = best_rows + 0.02 + noise[0], best_rows + 0.05 + noise[1]
    trials = with_rows(scored(best_rows, trainable_params=8000), scored(first, trainable_params=2000),
                       scored(second, trainable_params=2000, origin="confirm", parent="t1", seed=1))
    eligible = by_configuration(trials, trials, "eval_loss")

    compared = against_bar(eligible, "t0", "min", 0.95).set_index("trial_id")

    rows_part = paired_se((first + second) / 2, best_rows, 1 / 0.95)
    seeds_part = statistics.stdev([first.mean(), second.mean()]) / math.sqrt(2)
    assert compared.loc["t1", "paired"] and not compared.loc["t0", "paired"]  # the best is not compared with itself
    assert compared.loc["t1", "gap_row_se"] == pytest.approx(rows_part, rel=1e-9)
    assert compared.loc["t1", "gap_se"] == pytest.approx(math.hypot(rows_part, seeds_part), rel=1e-9)
    assert compared.loc["t0", "gap_se"] == pytest.approx(trials["eval_loss_se"][0], rel=1e-9)


def test_a_configuration_whose_seeds_did_not_all_report_row_values_is_not_paired():
    best_rows = difficulty(0.1, 0.9)
    trials = with_rows(scored(best_rows, trainable_params=8000), scored(best_rows + 0.02, trainable_params=2000),
                       {"eval_loss": 0.53, "eval_loss_se": 0.04, "origin": "confirm", "parent": "t1", "seed": 1})

    compared = against_bar(by_configuration(trials, trials, "eval_loss"), "t0", "min", 0.95).set_index("trial_id")

    assert not compared.loc["t1", "paired"]
    assert compared.loc["t1", "gap_row_se"] == pytest.approx((trials["eval_loss_se"][1] + 0.04) / 2, rel=1e-9)


def test_when_maximising_the_best_rows_are_scaled_as_the_bar_is():
    rng = np.random.default_rng(3)
    best_rows, other_rows = rng.uniform(0.5, 1.0, N_ROWS), rng.uniform(0.4, 1.0, N_ROWS)
    trials = with_rows({"eval_accuracy": 0.9, "eval_row_accuracy": list(best_rows)},
                       {"eval_accuracy": 0.8, "eval_row_accuracy": list(other_rows)}, column="eval_row_accuracy")

    compared = against_bar(by_configuration(trials, trials, "eval_accuracy"), "t0", "max", 0.9).set_index("trial_id")

    assert compared.loc["t1", "gap_row_se"] == pytest.approx(paired_se(other_rows, best_rows, 0.9), rel=1e-9)


# Without the pick: whether the pick's module set and rank rest on its one configuration (WithoutPick).
def test_a_pick_whose_module_set_and_rank_only_its_own_configuration_found_is_uncertain():
    # without t0 and its confirming run t1, mlp r8 (t2) wins: t3 is past the bar it sets, 0.70 / 0.95
    trials = table({"eval_loss": 0.50, "module_set": "all_linear", "r": 32, "trainable_params": 9000},
                   {"eval_loss": 0.52, "module_set": "all_linear", "r": 32, "trainable_params": 9000,
                    "origin": "confirm", "parent": "t0", "seed": 1},
                   {"eval_loss": 0.70, "module_set": "mlp", "r": 8, "trainable_params": 2000},
                   {"eval_loss": 0.75, "module_set": "all_linear", "r": 4, "trainable_params": 1000})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert chosen.trial_id == "t0"
    standing = without_pick(trials, chosen, MAX_STEPS, configs(trials))
    assert (standing.trial_id, standing.module_set, standing.r, standing.value) == ("t2", "mlp", 8, 0.70)
    assert (standing.same, standing.as_good, standing.uncertain, standing.left_out) == (False, False, True, 2)
    assert standing.sentence.startswith("**The pick is uncertain**: without its configuration (`t0` and its 1 other run)")


def test_a_pick_whose_place_another_module_set_takes_within_the_tolerance_is_not_uncertain():
    # without t0 (0.50), mlp r8 wins at 0.52, within the tolerance of t0's value (0.50 / 0.95 = 0.526)
    trials = table({"eval_loss": 0.50, "module_set": "all_linear", "r": 32, "trainable_params": 9000},
                   {"eval_loss": 0.52, "module_set": "mlp", "r": 8, "trainable_params": 9500},
                   {"eval_loss": 0.60, "module_set": "all_linear", "r": 4, "trainable_params": 1000})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    standing = without_pick(trials, chosen, MAX_STEPS, configs(trials))
    assert (chosen.trial_id, standing.trial_id, standing.same, standing.as_good, standing.uncertain) == (
        "t0", "t1", False, True, False)
    assert "uncertain" not in standing.sentence


def test_a_pick_whose_module_set_and_rank_another_configuration_also_wins_with_is_not_uncertain():
    # t1 is the same module set and rank at another learning rate: without t0 it wins, as t2 is past 0.55 / 0.95
    trials = table({"eval_loss": 0.50, "module_set": "all_linear", "r": 32, "learning_rate": 2e-3},
                   {"eval_loss": 0.55, "module_set": "all_linear", "r": 32, "learning_rate": 1e-3},
                   {"eval_loss": 0.70, "module_set": "mlp", "r": 8, "trainable_params": 10})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    standing = without_pick(trials, chosen, MAX_STEPS, configs(trials))
    assert (chosen.trial_id, standing.trial_id, standing.same, standing.uncertain, standing.left_out) == (
        "t0", "t1", True, False, 1)
    assert "uncertain" not in standing.sentence


def test_a_pick_that_is_the_only_configuration_to_finish_is_uncertain():
    trials = table({"eval_loss": 0.50}, {"eval_loss": 0.40, "status": "stopped", "step": MAX_STEPS // 2})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    standing = without_pick(trials, chosen, MAX_STEPS, configs(trials))
    assert (standing.trial_id, standing.same, standing.uncertain) == (None, False, True)
    assert standing.sentence.startswith("**The pick is uncertain**: no other configuration finished")
