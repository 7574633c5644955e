"""The landscape's format and the simulator that replays the product's own search on it
(analysis/landscape.py, search/tuning/simulate.py), on small landscapes written here whose true
pick is known by construction: real Optuna samplers, real ASHA, the real stages and pick,
without Ray running."""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from analysis import landscape as format_
from analysis.landscape import POINT_KEYS, Header, LandscapeError, Point
from search.tuning.simulate import Truth, hand_grid, policy_config, simulate, summary

ROOT = Path(__file__).resolve().parent.parent
STEPS = [10, 20, 30]
GRID = {"module_set": ["attention_qv", "mlp", "all_linear"], "r": [4, 16], "alpha_ratio": [1.0],
        "lora_dropout": [0.0], "use_rslora": [False], "use_dora": [False], "learning_rate": [2e-4, 2e-3]}
WIDTH = {"attention_qv": 100, "mlp": 300, "all_linear": 600}  # trainable parameters per unit of rank
# Final eval loss by construction: all_linear at the higher rate is best (0.50); the bar is 0.50 / 0.95 = 0.526,
# which nothing else reaches, so the true pick is its cheaper rank, all_linear r4 lr 2e-3.
FINAL = {"attention_qv": 1.0, "mlp": 0.60, "all_linear": 0.50}
TRUE_PICK = Point("all_linear", 4, 1.0, 0.0, False, False, 2e-3)


def final_loss(point: Point, seed: int, noisy: bool) -> float:
    loss = FINAL[point.module_set] + (0.3 if point.learning_rate < 1e-3 else 0.0)
    if noisy and point == TRUE_PICK:  # out of the tolerance with seed 0, the best with seed 1: its mean 0.52 is in
        loss += 0.10 if seed == 0 else -0.06
    return loss


def rows_of(noisy: bool = False) -> list[dict]:
    rows = []
    for values in itertools.product(*(GRID[key] for key in POINT_KEYS)):
        point = Point(*values)
        params = WIDTH[point.module_set] * point.r
        for seed, step in itertools.product((0, 1), STEPS):
            rows.append({**{key: getattr(point, key) for key in POINT_KEYS}, "seed": seed, "step": step,
                         "eval_loss": final_loss(point, seed, noisy) + 0.5 * (30 - step) / 30,
                         "eval_accuracy": 0.5, "eval_row_loss": [0.1, 0.2, 0.3],
                         "trainable_params": params, "train_seconds": step * (1 + params / 1000),
                         "eval_seconds": step / 10 * 0.5, "peak_memory_gb": 1.0})
    return rows


def header(**changes) -> Header:
    values = dict(format=1, metric="eval_loss", mode="min", max_steps=30, steps=STEPS, seeds=[0, 1], grid=GRID,
                  slots=2, search_train_rows=500, task_kind="domain", source="written by tests/test_simulate.py")
    return Header(**(values | changes))


def write_landscape(directory: Path, rows: list[dict] | None = None, noisy: bool = False) -> Path:
    return format_.write(directory, header(), rows_of(noisy) if rows is None else rows)


def test_a_landscape_written_loads_with_every_configuration_seed_and_eval_round(tmp_path):
    landscape = format_.load(write_landscape(tmp_path))
    assert len(landscape.curves) == 12 * 2
    assert [row["step"] for row in landscape.curves[TRUE_PICK, 1]] == STEPS
    assert landscape.mean(TRUE_PICK, "eval_loss") == pytest.approx(0.50)


def test_a_missing_configuration_is_refused_naming_it(tmp_path):
    rows = [row for row in rows_of() if not (row["module_set"] == "mlp" and row["r"] == 16)]
    with pytest.raises(LandscapeError, match=r"no row for module_set=mlp r=16 .* seed=0 step=10"):
        format_.load(write_landscape(tmp_path, rows))


def test_a_missing_seed_is_refused_naming_the_row(tmp_path):
    rows = [row for row in rows_of() if not (row["seed"] == 1 and row["module_set"] == "attention_qv"
                                              and row["r"] == 4 and row["learning_rate"] == 2e-4)]
    with pytest.raises(LandscapeError, match=r"no row for module_set=attention_qv r=4 .*learning_rate=0.0002 seed=1"):
        format_.load(write_landscape(tmp_path, rows))


@pytest.mark.parametrize("broken, message", [
    ({"eval_loss": "low"}, r"line 5: eval_loss is 'low'; allowed: a finite number"),
    ({"r": 8}, r"line 5: r is 8, not in the header's grid; allowed: \[4, 16\]"),
    ({"step": 15}, r"line 5: step is 15; allowed: one of the header's steps"),
    ({"eval_row_loss": [0.1, None]}, r"line 5: eval_row_loss is not a list of finite numbers"),
    ({"train_seconds": None}, r"line 5: train_seconds is None"),
])
def test_a_broken_row_is_refused_naming_its_line(tmp_path, broken, message):
    rows = rows_of()
    rows[4] = rows[4] | broken
    with pytest.raises(LandscapeError, match=message):
        format_.load(write_landscape(tmp_path, rows))


def test_a_row_twice_and_a_line_that_is_not_json_are_refused(tmp_path):
    rows = rows_of()
    with pytest.raises(LandscapeError, match=r"line 25: a second row for"):
        format_.load(write_landscape(tmp_path, [*rows[:24], rows[0], *rows[24:]]))
    path = write_landscape(tmp_path)
    (path / "landscape.jsonl").write_text((path / "landscape.jsonl").read_text() + "{not json\n")
    with pytest.raises(LandscapeError, match=r"line 73 is not JSON"):
        format_.load(path)


def test_a_gzipped_landscape_loads_as_the_plain_one_and_a_broken_gzip_is_refused_naming_the_file(tmp_path):
    import gzip

    plain = format_.load(write_landscape(tmp_path / "plain"))
    zipped = write_landscape(tmp_path / "zipped", noisy=False)
    rows = zipped / "landscape.jsonl"
    (zipped / "landscape.jsonl.gz").write_bytes(gzip.compress(rows.read_bytes()))
    rows.unlink()
    assert format_.load(zipped).curves == plain.curves
    (zipped / "landscape.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(LandscapeError, match=r"landscape.jsonl.gz cannot be read .*gzipped where it ends .gz"):
        format_.load(zipped)


def test_the_simulator_cli_exits_2_with_one_error_line_naming_the_row(tmp_path):
    rows = [row for row in rows_of() if row["seed"] == 0]
    done = subprocess.run([sys.executable, "bench/simulate.py", "--landscape", str(write_landscape(tmp_path, rows)),
                           "--seeds", "1", "--out", str(tmp_path / "out.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "seed=1 step=10" in done.stderr
    assert not (tmp_path / "out.json").exists()


def test_the_truth_is_the_rule_applied_to_the_tables_means(tmp_path):
    landscape = format_.load(write_landscape(tmp_path, noisy=True))
    truth = Truth.of(landscape, policy_config(landscape))
    assert truth.pick == TRUE_PICK  # mean 0.52 within 0.50 / 0.95, and the cheapest within it
    assert truth.best == pytest.approx(0.50)


def test_the_grid_replayed_without_noise_finds_the_true_pick_every_time(tmp_path):
    landscape = format_.load(write_landscape(tmp_path))
    config = policy_config(landscape, ["search.algorithm=grid", "budget.landscape_seeds=1"])
    searches = simulate(landscape, config, seeds=5)
    assert [search.pick for search in searches] == [TRUE_PICK] * 5
    assert all(search.trials == 12 for search in searches)


def test_the_grid_with_one_seed_finds_the_true_pick_when_it_draws_its_good_seed_half_the_time(tmp_path):
    landscape = format_.load(write_landscape(tmp_path, noisy=True))
    config = policy_config(landscape, ["search.algorithm=grid", "budget.landscape_seeds=1"])
    figures = summary(simulate(landscape, config, seeds=24), Truth.of(landscape, config), landscape)
    # the true pick wins when it drew seed 1 (probability 1/2); with seed 0 all_linear r16 does, within tolerance
    assert 0.25 <= figures["true_pick"] <= 0.75
    assert figures["within_tolerance"] == 1.0
    assert figures["pick_or_at_most_2x_cost"] == figures["true_pick"]  # r16 costs 4x the true pick


def test_the_grid_with_both_seeds_picks_on_the_means_and_finds_the_true_pick(tmp_path):
    landscape = format_.load(write_landscape(tmp_path, noisy=True))
    config = policy_config(landscape, ["search.algorithm=grid", "budget.landscape_seeds=2"])
    searches = simulate(landscape, config, seeds=3)
    assert [search.pick for search in searches] == [TRUE_PICK] * 3
    whole = sum(landscape.seconds(point, seed) for point, seed in landscape.curves)
    assert [search.gpu_seconds for search in searches] == [pytest.approx(whole)] * 3


def test_one_trial_at_a_time_takes_as_long_as_its_trials_and_two_at_once_less(tmp_path):
    landscape = format_.load(write_landscape(tmp_path))
    figures = {}
    for slots in (1, 2):
        config = policy_config(landscape, [f"resources.max_concurrent_trials={slots}"])
        figures[slots] = summary(simulate(landscape, config, seeds=6), Truth.of(landscape, config), landscape)
    serial, paired = figures[1]["per_search"], figures[2]["per_search"]
    assert [s["wall_seconds"] for s in serial] == pytest.approx([s["gpu_seconds"] for s in serial], abs=0.1)
    assert all(s["wall_seconds"] < s["gpu_seconds"] for s in paired)
    walls = sorted(s["wall_seconds"] for s in paired)
    assert walls[len(walls) // 2] <= figures[2]["wall_seconds_p90"] <= walls[-1]


def test_the_default_search_replayed_tries_its_budget_and_always_picks(tmp_path):
    landscape = format_.load(write_landscape(tmp_path))
    config = policy_config(landscape)
    searches = simulate(landscape, config, seeds=4)
    assert all(search.pick is not None for search in searches)
    # the budget's proposals, then the stages' confirmations of the leaders (confirm_top_k of them at least)
    least = config.budget.num_samples + config.selection.confirm_top_k * config.selection.confirm_seeds
    assert all(search.trials >= least for search in searches)


def test_asha_s_reduction_factor_changes_the_simulated_searches(tmp_path):
    landscape = format_.load(write_landscape(tmp_path))
    by_factor = {}
    for factor in (2, 4):
        config = policy_config(landscape, [f"budget.reduction_factor={factor}", "budget.num_samples=8"])
        by_factor[factor] = [(search.gpu_seconds, search.trials) for search in simulate(landscape, config, seeds=4)]
    assert by_factor[2] != by_factor[4]


def test_the_grace_period_changes_the_simulated_searches(tmp_path):
    landscape = format_.load(write_landscape(tmp_path))
    spent = {}
    for grace in (10, 30):  # 30: ASHA stops nothing before the full budget
        config = policy_config(landscape, [f"budget.grace_period={grace}", "budget.num_samples=8"])
        spent[grace] = [search.gpu_seconds for search in simulate(landscape, config, seeds=4)]
    assert sum(spent[10]) < sum(spent[30])


def test_a_narrower_module_set_list_is_all_the_simulated_search_tries(tmp_path):
    landscape = format_.load(write_landscape(tmp_path))
    config = policy_config(landscape, ["search.module_sets=[attention_qv,mlp]", "budget.num_samples=6",
                                       "search.priors=none"])
    picks = {search.pick.module_set for search in simulate(landscape, config, seeds=4)}
    # all_linear, the best module set, is out of the space: mlp (0.60 at the higher rate) wins every time
    assert picks == {"mlp"}


def test_the_hand_grid_is_its_points_snapped_to_the_grid_and_picked_by_the_rule(tmp_path):
    landscape = format_.load(write_landscape(tmp_path))
    config = policy_config(landscape)
    points = [{"module_set": "attention_qv", "r": 8, "alpha_ratio": 2.0, "lora_dropout": 0.0, "use_rslora": False,
               "use_dora": False, "learning_rate": 2e-4},
              {"module_set": "all_linear", "r": 16, "alpha_ratio": 1.0, "lora_dropout": 0.0, "use_rslora": True,
               "use_dora": False, "learning_rate": 2e-4}]
    search = hand_grid(landscape, config, points, np.random.default_rng(0))
    # snapped: r8 to r4 (the nearer of 4 and 16), RSLoRA to the grid's only value; all_linear r16 lr 2e-4 (0.80) wins
    assert search.pick == Point("all_linear", 16, 1.0, 0.0, False, False, 2e-4)
    assert search.trials == 2


def point(module_set: str, r: int, learning_rate: float) -> dict:
    return {"module_set": module_set, "r": r, "alpha_ratio": 1.0, "lora_dropout": 0.0, "use_rslora": False,
            "use_dora": False, "learning_rate": learning_rate}


def test_a_simulated_pick_is_called_uncertain_as_the_report_would_and_the_shares_right_are_split_by_it(tmp_path):
    landscape = format_.load(write_landscape(tmp_path))
    config = policy_config(landscape)
    truth = Truth.of(landscape, config)
    searches = [hand_grid(landscape, config, points, np.random.default_rng(0)) for points in (
        # the true pick, and nothing else within the tolerance: without it the rule picks past it
        [point("all_linear", 4, 2e-3), point("attention_qv", 4, 2e-3)],
        # two ranks of the best module set: without the cheaper, the other wins within the tolerance
        [point("all_linear", 4, 2e-3), point("all_linear", 16, 2e-3)],
        # mlp at the lower rate (0.90) beats attention_qv (1.00) past the tolerance, and is far from the best (0.50)
        [point("mlp", 4, 2e-4), point("attention_qv", 4, 2e-3)])]
    assert [search.uncertain for search in searches] == [True, False, True]
    assert [truth.within(search.pick) for search in searches] == [True, True, False]
    figures = summary(searches, truth, landscape)
    assert figures["uncertain"] == pytest.approx(2 / 3)
    assert figures["within_tolerance_if_uncertain"] == pytest.approx(0.5)
    assert figures["within_tolerance_if_certain"] == 1.0
    assert [(search["uncertain"], search["within"]) for search in figures["per_search"]] == [
        (True, True), (False, True), (True, False)]
    assert figures["per_search"][0]["pick"] == TRUE_PICK.label()


def test_the_trials_at_once_are_the_most_windows_that_overlap():
    from analysis.landscape import most_at_once

    # two at once from 1 to 2 and from 3 to 4; one that ends as another starts does not overlap it
    assert most_at_once([(0, 2), (1, 3), (3, 4), (3.5, 5)]) == 2
    assert most_at_once([(0, 1), (1, 2)]) == 1


# Eval rows of uneven difficulty: row i shifts every configuration's loss alike, by up to 0.3 either way (mean 0).
DIFFICULTY = [0.3 * math.sin(1.7 * index) for index in range(32)]
DIFFICULTY = [shift - sum(DIFFICULTY) / 32 for shift in DIFFICULTY]


def rows_with_difficulty() -> list[dict]:
    """`rows_of()` with 32 eval rows per report: the row's loss plus each row's difficulty."""
    return [row | {"eval_row_loss": [row["eval_loss"] + shift for shift in DIFFICULTY]} for row in rows_of()]


def test_a_report_scored_on_a_subset_of_rows_has_their_mean_their_standard_error_and_their_share_of_eval_time():
    from search.tuning.simulate import Subset, scored

    row = {"eval_loss": 0.9, "eval_loss_se": 0.01, "eval_row_loss": [0.1, 0.2, 0.3, 0.7],
           "eval_row_exact_match": [1.0, 0.0], "train_seconds": 10.0, "eval_seconds": 2.0}
    out = scored(row, Subset(np.array([1, 3]), 4))
    assert out["eval_row_loss"] == [0.2, 0.7]
    assert out["eval_loss"] == pytest.approx(0.45)
    assert out["eval_loss_se"] == pytest.approx(0.25)  # sample sd of 0.2 and 0.7 (0.3536) over sqrt(2)
    assert out["eval_seconds"] == pytest.approx(1.0) and out["train_seconds"] == 10.0
    assert out["eval_row_exact_match"] == [1.0, 0.0]  # another number of rows: left as it is


def test_every_trial_of_a_search_scores_the_same_rows_so_hard_rows_shift_all_alike_and_the_pick_holds(tmp_path):
    landscape = format_.load(format_.write(tmp_path, header(), rows_with_difficulty()))
    config = policy_config(landscape, ["search.algorithm=grid", "budget.landscape_seeds=1"])
    searches = simulate(landscape, config, seeds=6, eval_rows=4)
    # four rows' shifts move every configuration's mean by the same amount, far less than the gaps between them;
    # rows drawn trial by trial would shift all_linear r4 and r16 apart by ~0.17 and often past the bar
    assert [search.pick for search in searches] == [TRUE_PICK] * 6
    whole = sum(landscape.seconds(point, seed) for point, seed in landscape.curves if seed == 0)
    eval_whole = 12 * 1.5  # each configuration's eval seconds at step 30: 30 / 10 * 0.5
    assert searches[0].gpu_seconds == pytest.approx(whole - eval_whole * (1 - 4 / 32))


def test_the_simulator_cli_refuses_more_eval_rows_than_the_landscape_kept(tmp_path):
    path = format_.write(tmp_path / "landscape", header(), rows_with_difficulty())
    done = subprocess.run([sys.executable, "bench/simulate.py", "--landscape", str(path), "--seeds", "1",
                           "--eval-rows", "33", "--out", str(tmp_path / "out.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "(--eval-rows) is 33; allowed: an integer from 2" in done.stderr and "to 32" in done.stderr
    assert not (tmp_path / "out.json").exists()


def test_fewer_than_two_eval_rows_and_a_landscape_without_per_row_values_are_refused(tmp_path):
    from search.tuning.simulate import eval_subset

    landscape = format_.load(format_.write(tmp_path / "rows", header(), rows_with_difficulty()))
    with pytest.raises(ValueError, match=r"is 1; allowed: an integer from 2"):
        eval_subset(landscape, "eval_loss", 1, np.random.default_rng(0))
    bare = format_.load(format_.write(tmp_path / "bare", header(),
                                      [{k: v for k, v in row.items() if k != "eval_row_loss"} for row in rows_of()]))
    with pytest.raises(LandscapeError, match=r"per-row values of eval_loss \(eval_row_loss; found \[0\] per row\)"):
        eval_subset(bare, "eval_loss", 2, np.random.default_rng(0))


def test_a_sweep_writes_its_json_and_a_png_with_a_point_per_value_on_every_policy_s_line(tmp_path, capsys):
    from bench.simulate import main, sweep_figure

    out = tmp_path / "results" / "sweep.json"
    landscape = write_landscape(tmp_path / "landscape")
    assert main(["--landscape", str(landscape), "--seeds", "2", "--sweep", "budget.num_samples=2,6",
                 "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["sweep"] == {"key": "budget.num_samples", "values": ["2", "6"]}
    lines = written["lines"]
    assert list(lines) == ["search", "random_asha", "hand_grid"]
    for line in lines.values():
        assert [len(line[key]) for key in ("values", "gpu_seconds_median", "within_tolerance",
                                           "pick_or_at_most_2x_cost")] == [2, 2, 2, 2]
    trials = [run["policies"]["search"]["trials_median"] for run in written["runs"]]
    assert trials[0] < trials[1]  # six proposals and their stages are more trials than two: the value reached it
    assert len(set(lines["hand_grid"]["gpu_seconds_median"])) == 1  # the hand grid has no num_samples
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = sweep_figure(lines, "budget.num_samples", "landscape", 2)
    for axes in figure.axes:
        assert axes.get_xlabel() == "simulated GPU-seconds per search (median)"
        assert [len(line.get_xdata()) for line in axes.get_lines()] == [2, 2, 2]


@pytest.mark.parametrize("sweep, message", [
    ("budget.num_samples=8", r"--sweep is 'budget.num_samples=8'; allowed: KEY=V1,V2,..."),
    ("eval_rows=4,64", r"eval rows \(--eval-rows\) is 64; allowed: an integer from 2"),
    ("budget.num_samples=8,lots", r"budget.num_samples"),
    ("budget.max_steps=10,30", r"budget.max_steps is 10; allowed: 30, the landscape's own"),
    ("search.module_sets=[mlp],[attention_mlp]", r"search.module_sets holds \['attention_mlp'\]; allowed: module sets"),
    ("selection.metric=eval_loss,train_loss", r"selection.metric is 'train_loss'; allowed: a metric every row"),
])
def test_a_sweep_that_cannot_run_is_refused_before_any_search(tmp_path, capsys, sweep, message):
    from bench.simulate import main

    out = tmp_path / "sweep.json"
    path = format_.write(tmp_path / "landscape", header(), rows_with_difficulty())
    assert main(["--landscape", str(path), "--seeds", "1", "--sweep", sweep, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and len(captured.err.strip().splitlines()) == 1
    assert re.search(message, captured.err) and captured.out == ""
    assert not out.exists()


def test_a_sweep_of_eval_rows_scores_fewer_rows_for_less_eval_time(tmp_path, capsys):
    from bench.simulate import main

    out = tmp_path / "sweep.json"
    path = format_.write(tmp_path / "landscape", header(), rows_with_difficulty())
    assert main(["--landscape", str(path), "--seeds", "2", "--sweep", "eval_rows=4,32", "--policy", "hand_grid",
                 "--out", str(out)]) == 0
    spent = json.loads(out.read_text())["lines"]["hand_grid"]["gpu_seconds_median"]
    # bench/grid.py's configurations in this grid are two once snapped (attention_qv r4, all_linear r16; its
    # attention ones are left out), each 1.5 eval seconds at all 32 rows; 4 rows take an eighth of that
    assert spent[1] - spent[0] == pytest.approx(2 * 1.5 * (1 - 4 / 32))
