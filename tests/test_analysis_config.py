"""SelectionConfig: which settings the pick accepts, and what it says about the others."""

import math

import pytest

from analysis.config import SelectionConfig


def test_default_selection_has_no_problems():
    assert SelectionConfig().problems() == []


@pytest.mark.parametrize("metric, mode", [("eval_loss", "min"), ("train_loss", "min"), ("eval_accuracy", "max")])
def test_every_metric_with_its_own_direction_is_accepted(metric, mode):
    assert SelectionConfig(metric=metric, mode=mode).problems() == []


def test_an_unknown_metric_is_named_with_the_allowed_ones():
    (problem,) = SelectionConfig(metric="bleu").problems()

    assert "selection.metric='bleu'" in problem and "eval_accuracy" in problem


def test_a_mode_against_the_metrics_direction_is_a_problem_with_a_fix():
    (problem,) = SelectionConfig(metric="eval_accuracy", mode="min").problems()

    assert "Fix: set selection.mode to 'max'" in problem


@pytest.mark.parametrize("tolerance", [0, -0.5, 1.5, math.nan, "0.9", True])
def test_tolerance_must_be_a_number_in_zero_to_one(tolerance):
    (problem,) = SelectionConfig(tolerance=tolerance).problems()

    assert "selection.tolerance" in problem


def test_tolerance_one_is_allowed():
    assert SelectionConfig(tolerance=1).problems() == []


def test_an_unknown_cost_is_named_with_the_allowed_ones():
    (problem,) = SelectionConfig(cost="dollars").problems()

    assert "selection.cost='dollars'" in problem and "train_seconds" in problem


def test_every_problem_is_reported_at_once():
    assert len(SelectionConfig(metric="bleu", mode="up", tolerance=2, cost="dollars").problems()) == 4


@pytest.mark.parametrize("metric, direction", [("eval_loss", "min"), ("train_loss", "min"), ("eval_accuracy", "max"),
                                               ("eval_exact_match", "max")])
def test_mode_auto_becomes_the_metrics_own_direction_and_stays_auto_as_written(metric, direction):
    selection = SelectionConfig(metric=metric, mode="auto")

    assert selection.direction == direction and selection.problems() == []
    assert selection.mode == "auto"


def test_another_metric_comes_with_its_own_direction_unless_a_mode_is_given():
    loss = SelectionConfig(metric="eval_loss", mode="min")

    assert loss.with_options(metric="eval_accuracy").direction == "max"
    assert loss.with_options(tolerance=0.9).mode == "min"
    assert loss.with_options(metric="eval_accuracy", mode="min").problems() != []


def test_a_metric_function_without_trust_metric_code_is_a_problem_naming_both_keys():
    (problem,) = SelectionConfig(metric="mymod:score", mode="max").problems()

    assert "selection.metric='mymod:score'" in problem and "selection.trust_metric_code" in problem
    assert "Fix: set selection.trust_metric_code to true" in problem


def test_a_trusted_metric_function_with_a_direction_is_accepted():
    assert SelectionConfig(metric="my.pkg.metrics:score", mode="max", trust_metric_code=True).problems() == []


def test_a_metric_function_needs_its_direction_given():
    (problem,) = SelectionConfig(metric="mymod:score", trust_metric_code=True).problems()

    assert "selection.mode is 'auto'" in problem and "Fix: set selection.mode to 'max'" in problem


@pytest.mark.parametrize("metric", ["mymod:", ":score", "my mod:score", "mymod:score:x"])
def test_a_malformed_function_name_is_an_unknown_metric(metric):
    (problem,) = SelectionConfig(metric=metric, mode="max", trust_metric_code=True).problems()

    assert f"selection.metric={metric!r} is not a metric the trials report" in problem and "module:function" in problem


def test_confirm_max_seeds_below_confirm_seeds_plus_one_names_both_keys():
    (problem,) = SelectionConfig(confirm_seeds=3, confirm_max_seeds=3).problems()

    assert "selection.confirm_max_seeds=3" in problem and "selection.confirm_seeds + 1 = 4" in problem
    assert SelectionConfig(confirm_seeds=3, confirm_max_seeds=4).problems() == []
