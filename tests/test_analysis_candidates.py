"""Promotion and confirmation: early stopping must not hide the cheapest good configuration,
and one lucky seed must not win."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from analysis.candidates import confirmation_candidates, decide, promotion_candidates
from analysis.config import SelectionConfig
from analysis.results import TrialFiles
from analysis.select import Comparison, NoCandidate, pick
from helpers import MAX_STEPS, configs, table
from rundir.params import Origin, TrialParams

RULE = ("eval_loss", "min", 0.95, "trainable_params")


def curves(*points: tuple[str, int, float]) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": t, "step": s, "eval_loss": v, "eval_accuracy": 0.5, "train_loss": v}
                         for t, s, v in points])


def test_a_cheap_trial_stopped_within_tolerance_of_its_rung_is_promoted():
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"status": "stopped", "step": 10, "trainable_params": 1000, "eval_loss": 0.82})
    rungs = curves(("t0", 10, 0.80), ("t1", 10, 0.82), ("t0", MAX_STEPS, 0.50))
    assert promotion_candidates(trials, rungs, Comparison(*RULE, MAX_STEPS), pick_cost=5000) == ["t1"]


def test_a_stopped_trial_outside_tolerance_or_not_cheaper_is_not_promoted():
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"status": "stopped", "step": 10, "trainable_params": 1000, "eval_loss": 0.90},
                   {"status": "stopped", "step": 10, "trainable_params": 9000, "eval_loss": 0.80})
    rungs = curves(("t0", 10, 0.80), ("t1", 10, 0.90), ("t2", 10, 0.80))
    assert promotion_candidates(trials, rungs, Comparison(*RULE, MAX_STEPS), pick_cost=5000) == []


def test_everything_stopped_within_tolerance_is_promoted_when_nothing_finished():
    trials = table({"status": "stopped", "step": 10, "eval_loss": 0.80, "trainable_params": 2000},
                   {"status": "stopped", "step": 10, "eval_loss": 0.81, "trainable_params": 1000})
    rungs = curves(("t0", 10, 0.80), ("t1", 10, 0.81))
    with pytest.raises(NoCandidate):
        pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert promotion_candidates(trials, rungs, Comparison(*RULE, MAX_STEPS), math.inf) == ["t1", "t0"]


def test_confirmation_takes_the_pick_order_cheapest_within_tolerance_first():
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"trainable_params": 1000, "eval_loss": 0.52},
                   {"trainable_params": 500, "eval_loss": 0.90})
    assert confirmation_candidates(trials, Comparison(*RULE, MAX_STEPS), top_k=2) == ["t1", "t0"]


def test_confirmation_follows_the_pick_where_a_mean_only_ranking_would_not():
    # t0 is the best (bar 0.50 / 0.95 = 0.5263); t1 is cheap and past the bar by its mean (0.55), but its
    # interval (0.55 - 1.28 * 0.03 = 0.5116) reaches it: the pick cannot tell it apart from t0. t2 is better
    # than t1 by its mean (0.54) but certain (no standard error), so outside. Ranked by means alone, the
    # second leader would be t2; the pick's own comparison puts t1 there.
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"trainable_params": 1000, "eval_loss": 0.55, "eval_loss_se": 0.03},
                   {"trainable_params": 9000, "eval_loss": 0.54})
    comparison = Comparison(*RULE, MAX_STEPS)
    chosen = pick(trials, comparison, configs(trials))

    assert (chosen.trial_id, chosen.undecided_with) == ("t0", "t1")
    assert confirmation_candidates(trials, comparison, top_k=2) == [chosen.trial_id, chosen.undecided_with]
    assert confirmation_candidates(trials, comparison, top_k=3) == ["t0", "t1", "t2"]


def test_a_lucky_single_run_loses_once_its_other_seed_is_in():
    trials = table({"trainable_params": 1000, "eval_loss": 0.50},
                   {"trainable_params": 5000, "eval_loss": 0.55},
                   {"trainable_params": 1000, "eval_loss": 0.70, "origin": "confirm", "parent": "t0", "seed": 1},
                   {"trainable_params": 5000, "eval_loss": 0.56, "origin": "confirm", "parent": "t1", "seed": 1})
    trials = pd.concat([trials, table(*({"trainable_params": 1000, "eval_loss": 0.70, "origin": "confirm", "parent": "t0",
                                         "seed": seed} for seed in (2, 3, 4)))]).reset_index(drop=True)
    trials["trial_id"] = [f"t{i}" for i in range(len(trials))]
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert chosen.trial_id == "t1" and chosen.seeds == 2
    assert chosen.value == 0.555 and abs(chosen.spread - 0.005) < 1e-12
    assert pick(trials.iloc[:2], Comparison(*RULE, MAX_STEPS), configs(trials)).trial_id == "t0"  # without the other seeds


def test_a_promoted_trial_competes_for_its_stopped_parent():
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"status": "stopped", "step": 10, "trainable_params": 1000, "eval_loss": 0.82},
                   {"trainable_params": 1000, "eval_loss": 0.51, "origin": "promoted", "parent": "t1"})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert chosen.trial_id == "t2" and chosen.cost == 1000


def reports(trial_id: str, params: int, *losses: float, origin: Origin = Origin.SEARCH, parent: str | None = None,
            seed: int = 0, se: float | None = None, row_losses: list[float] | None = None) -> TrialFiles:
    """A trial as the search's stages know it: its contract and its reports every 10 steps
    (with `se` as each report's eval_loss_se, and `row_losses` as its eval_row_loss, where given)."""
    lora_config = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj"], "use_rslora": False,
                   "use_dora": False}
    trial = TrialParams(lora_config, "attention_qv", 2.0, 2e-4, 1.0, seed, origin, parent)
    rows = [{"step": 10 * (i + 1), "eval_loss": loss, "trainable_params": params, "train_seconds": 1.0,
             **({"eval_loss_se": se} if se is not None else {}),
             **({"eval_row_loss": row_losses} if row_losses is not None else {})} for i, loss in enumerate(losses)]
    return TrialFiles(trial_id, trial, rows, "", None)


def test_decide_promotes_a_cheap_stopped_trial_and_confirms_the_leaders_from_raw_reports():
    selection = SelectionConfig(confirm_top_k=1, confirm_seeds=1)
    trials = [reports("big", 5000, 0.80, 0.50), reports("cheap", 1000, 0.82), reports("weak", 500, 0.95)]

    decision = decide(trials, selection, max_steps=20)

    assert decision.pick == "big"
    assert decision.promote == ["cheap"]  # 0.82 is within 95% of the rung's best 0.80; 0.95 is not
    assert decision.confirm == ["big"]


def test_decide_neither_promotes_nor_picks_a_trial_that_still_runs():
    trials = [reports("big", 5000, 0.80, 0.50), reports("cheap", 1000, 0.82), reports("late", 100, 0.49, 0.40)]

    decision = decide(trials, SelectionConfig(), max_steps=20, running={"cheap", "late"})

    assert decision.promote == [] and decision.pick == "big"


def test_decide_asks_for_nothing_that_the_selection_turned_off():
    trials = [reports("big", 5000, 0.80, 0.50), reports("cheap", 1000, 0.82)]

    decision = decide(trials, SelectionConfig(promote=False, confirm_top_k=0), max_steps=20)

    assert (decision.promote, decision.confirm, decision.pick) == ([], [], "big")


# The leaders of the tests below: "big" is the best (0.50), so the bar is 0.50 / 0.95 = 0.5263; "cheap"
# first ran 0.53, past the bar, but its interval (0.53 - 1.28 * 0.005 = 0.5236) reaches it: undecided.
LEADERS = [reports("big", 5000, 0.50, se=0.01), reports("cheap", 1000, 0.53, se=0.005)]
SEEDS = SelectionConfig(confirm_top_k=1, confirm_seeds=1, confirm_max_seeds=3)


def seed_of(parent: str, params: int, loss: float, seed: int) -> TrialFiles:
    return reports(f"{parent}-{seed}", params, loss, origin=Origin.CONFIRM, parent=parent, seed=seed, se=0.005)


def test_more_seeds_are_asked_for_both_leaders_while_their_intervals_overlap():
    decision = decide(LEADERS, SEEDS, max_steps=10)

    assert decision.pick == "big" and decision.confirm == ["big"]
    assert decision.more_seeds == {"cheap": 1, "big": 1}  # one run with another seed each


def test_more_seeds_stop_for_a_leader_whose_rows_part_outweighs_its_seeds_part():
    # cheap: 0.53 and 0.55, mean 0.54, se sqrt(0.005^2 + 0.01414^2 / 2) = 0.0112: still undecided,
    # and its seeds' part (0.01) outweighs the rows' (0.005); big: two seeds at 0.50, no seeds' part left
    trials = LEADERS + [seed_of("big", 5000, 0.50, 1), seed_of("cheap", 1000, 0.55, 1)]

    decision = decide(trials, SEEDS, max_steps=10)

    assert decision.pick == "big" and decision.more_seeds == {"cheap": 2}


def test_no_more_seeds_once_the_leaders_are_told_apart():
    # cheap: 0.53, 0.55, 0.54: mean 0.54, se sqrt(0.005^2 + 0.01^2 / 3) = 0.0076, interval 0.5302 past the bar
    trials = LEADERS + [seed_of("big", 5000, 0.50, 1), seed_of("cheap", 1000, 0.55, 1), seed_of("cheap", 1000, 0.54, 2)]

    decision = decide(trials, SEEDS, max_steps=10)

    assert decision.pick == "big" and decision.more_seeds == {}


def test_no_more_seeds_at_confirm_max_seeds():
    trials = LEADERS + [seed_of("big", 5000, 0.50, 1), seed_of("cheap", 1000, 0.55, 1)]

    decision = decide(trials, SelectionConfig(confirm_top_k=1, confirm_seeds=1, confirm_max_seeds=2), max_steps=10)

    assert decision.pick == "big" and decision.more_seeds == {}  # undecided, but both have their 2 runs


def test_confirm_max_seeds_zero_asks_for_no_seed_past_the_confirmation_whatever_confirm_seeds_is():
    undecided = SelectionConfig(confirm_top_k=1, confirm_seeds=2, confirm_max_seeds=0)
    assert undecided.problems() == []

    decision = decide(LEADERS, undecided, max_steps=10)

    assert decision.pick == "big" and decision.confirm == ["big"]  # still confirmed with its 2 seeds
    assert decision.more_seeds == {}  # though the two leaders' intervals overlap (the first test above)


def test_with_paired_rows_seeds_go_on_while_they_outweigh_the_paired_rows_part():
    # The same hard and easy rows for every run: each run's own row standard error (about 0.04) outweighs
    # cheap's seeds' part (0.52 and 0.56: 0.02), but the rows' part of its difference from big's rows is
    # about 0.002. cheap's mean 0.54 is past the bar (0.5263), its interval 0.54 - 1.28 * 0.02 is not: undecided.
    hardness = np.random.default_rng(0).uniform(0.1, 0.9, 32)
    hardness += 0.50 - hardness.mean()
    own_se = statistics.stdev(hardness) / math.sqrt(len(hardness))

    def run(trial_id, params, shift, **kwargs):
        return reports(trial_id, params, 0.50 + shift, se=own_se, row_losses=list(hardness + shift), **kwargs)

    leaders = [run("big", 5000, 0.0), run("big-1", 5000, 0.0, origin=Origin.CONFIRM, parent="big", seed=1),
               run("cheap", 1000, 0.02), run("cheap-1", 1000, 0.06, origin=Origin.CONFIRM, parent="cheap", seed=1)]
    unpaired = [replace(trial, rows=[{k: v for k, v in row.items() if k != "eval_row_loss"} for row in trial.rows])
                for trial in leaders]
    assert own_se > 0.02

    assert decide(leaders, SEEDS, max_steps=10).more_seeds == {"cheap": 2}
    assert decide(unpaired, SEEDS, max_steps=10).more_seeds == {}  # undecided, but no seed can narrow it


def test_a_cheaper_neighbour_of_the_pick_is_a_configuration_of_its_own_not_a_run_of_its_parent():
    """The neighbour names the pick it is next to as its parent; its loss must not join the pick's
    mean (as a confirming run's does), and it wins on its own where it is within tolerance."""
    trials = table({"trainable_params": 5000, "eval_loss": 0.50},
                   {"trainable_params": 2500, "eval_loss": 0.51, "r": 4, "origin": "cheaper", "parent": "t0"},
                   {"trainable_params": 5000, "eval_loss": 0.52, "origin": "confirm", "parent": "t0", "seed": 1})
    chosen = pick(trials, Comparison(*RULE, MAX_STEPS), configs(trials))
    assert chosen.trial_id == "t1"
    assert chosen.best_value == pytest.approx(0.51)  # t0's two runs average 0.51; t1 alone is 0.51
    assert chosen.seeds == 1
