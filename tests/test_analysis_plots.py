"""The report's figures and tables cannot mislead: every curve shows its points, a promoted pick's
curve starts where its parent's did, the pick is marked on every figure of trials, numbers are
plain, importance counts configurations (not runs) and needs enough of them, and the tables say
the whole story with no empty column. Run directories are written by the tests (tests/helpers.py);
figures are read back from their matplotlib objects."""

import json
from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from analysis.config import SelectionConfig
from analysis.pipeline import analyse
from analysis.plots import (
    MIN_CONFIGURATIONS_FOR_IMPORTANCE,
    by_rank_figure,
    configurations,
    importance_skip_reason,
    learning_curves_figure,
    module_set_colors,
    pick_position,
)
from analysis.select import Comparison, finished_trials, pick
from helpers import MAX_STEPS, add_trial, load_curves, load_lora_configs, load_trials, write_run_config

SELECTION = SelectionConfig(metric="eval_loss", mode="auto")


def _keep_last_report(trial_dir: Path) -> None:
    """Leave only the last row of result.json: a promoted trial reports only the steps after its
    parent's checkpoint (one row, where its parent stopped one eval round before the end)."""
    result = trial_dir / "result.json"
    result.write_text(result.read_text().splitlines()[-1] + "\n")


def _promoted_pick_run(run_dir: Path) -> Path:
    """A run whose pick was promoted: prior aaaa0002 (r=4) was stopped at step 75 and continued as
    aaaa0003, which finished at 0.51, within 0.50 / 0.95 of the best aaaa0001 (r=16) at a quarter
    of its parameters. Its learning rate 1e-4 sits at the bottom of the range [1e-4, 1e-3]."""
    write_run_config(run_dir)
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, r=16, learning_rate=3e-4)
    add_trial(run_dir, "aaaa0002", eval_loss=0.53, r=4, last_step=75, origin="prior", learning_rate=1e-4)
    _keep_last_report(add_trial(run_dir, "aaaa0003", eval_loss=0.51, r=4, origin="promoted", parent="aaaa0002",
                                learning_rate=1e-4))
    add_trial(run_dir, "aaaa0004", eval_loss=0.60, module_set="mlp", r=8, learning_rate=3e-4)
    return run_dir


@pytest.fixture(scope="module")
def promoted(tmp_path_factory):
    run_dir = _promoted_pick_run(tmp_path_factory.mktemp("promoted") / "run")
    trials, curves = load_trials(run_dir), load_curves(run_dir)
    chosen = pick(trials, Comparison.of(SELECTION, MAX_STEPS), load_lora_configs(run_dir))
    assert chosen.trial_id == "aaaa0003"  # the premise: the pick is the promoted trial
    return run_dir, trials, curves, chosen


def _lines(figure) -> dict:
    return {line.get_gid(): line for line in figure.axes[0].lines if line.get_gid()}


def _pick_marks(figure) -> list[tuple[float, float]]:
    return [tuple(point) for collection in figure.axes[0].collections if collection.get_gid() == "pick"
            for point in collection.get_offsets().tolist()]


def test_every_learning_curve_has_markers_so_a_curve_of_one_report_shows(promoted):
    _, trials, curves, chosen = promoted
    figure = learning_curves_figure(curves, trials, "eval_loss", module_set_colors(trials["module_set"]), chosen)

    lines = _lines(figure)
    assert set(lines) == set(trials["trial_id"])
    assert all(line.get_marker() == "o" for line in lines.values())


def test_a_promoted_pick_s_curve_is_joined_to_its_parent_s_and_ends_in_the_pick_s_star(promoted):
    _, trials, curves, chosen = promoted
    figure = learning_curves_figure(curves, trials, "eval_loss", module_set_colors(trials["module_set"]), chosen)

    # the parent reported 25, 50, 75 (0.53 at 75, each round 0.25 worse before); the promotion 100 only
    line = _lines(figure)["aaaa0003"]
    assert list(line.get_xdata()) == [25, 50, 75, 100]
    assert list(line.get_ydata()) == pytest.approx([1.03, 0.78, 0.53, 0.51])
    assert _pick_marks(figure) == [(100, 0.51)]


@pytest.mark.parametrize("column, value", [("eval_loss", 0.51), ("train_seconds", 0.1 * MAX_STEPS * 4)])
def test_the_by_rank_figures_mark_the_pick(promoted, column, value):
    _, trials, _, chosen = promoted
    finished = finished_trials(trials, "eval_loss", "trainable_params")
    figure = by_rank_figure(finished, column, "min", module_set_colors(trials["module_set"]),
                            pick_position(chosen, trials, "value" if column == "eval_loss" else column))

    assert _pick_marks(figure) == [(4, pytest.approx(value))]


def test_tick_labels_are_plain_numbers_without_an_offset(tmp_path):
    run_dir = write_run_config(tmp_path / "run")
    for n, loss in enumerate([10.5640, 10.5644, 10.5648]):  # matplotlib writes +1.056e1 above such ticks
        add_trial(run_dir, f"aaaa000{n}", eval_loss=loss, r=(4, 8, 16)[n])
    trials = load_trials(run_dir)
    figure = by_rank_figure(finished_trials(trials, "eval_loss", "trainable_params"), "eval_loss", "min",
                            module_set_colors(trials["module_set"]))
    FigureCanvasAgg(figure).draw()

    axes = figure.axes[0]
    assert axes.yaxis.get_offset_text().get_text() == ""
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert labels and all(label.startswith("10.56") for label in labels), labels


def test_importance_counts_configurations_not_runs_of_them(tmp_path):
    # 4 finished runs: 2 configurations with 2 seeds each (a confirmation repeats its parent)
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, r=16, lora_dropout=0.0)
    add_trial(run_dir, "aaaa0002", eval_loss=0.54, r=16, lora_dropout=0.0, origin="confirm", parent="aaaa0001", seed=1)
    add_trial(run_dir, "aaaa0003", eval_loss=0.60, r=4, lora_dropout=0.1)
    add_trial(run_dir, "aaaa0004", eval_loss=0.62, r=4, lora_dropout=0.1, origin="confirm", parent="aaaa0003", seed=1)

    table = configurations(load_trials(run_dir), SELECTION)
    assert sorted(zip(table["trial_id"], table["eval_loss"].round(6))) == [("aaaa0001", 0.52), ("aaaa0003", 0.61)]
    assert importance_skip_reason(table).startswith("only 2 configuration(s) finished the full budget")
    assert analyse(run_dir) == 0
    assert not (run_dir / "plots" / "importance.png").exists()
    assert "`plots/importance.png` not drawn: only 2 configuration(s)" in (run_dir / "report.md").read_text()


def test_importance_is_drawn_from_enough_configurations(tmp_path):
    run_dir = write_run_config(tmp_path / "run")
    for n in range(MIN_CONFIGURATIONS_FOR_IMPORTANCE):
        add_trial(run_dir, f"bbbb{n:04d}", eval_loss=0.5 + n / 100, r=(4, 8, 16)[n % 3],
                  learning_rate=1e-4 * (1 + n / 4), lora_dropout=n / 200)

    assert importance_skip_reason(configurations(load_trials(run_dir), SELECTION)) is None
    assert analyse(run_dir) == 0
    assert (run_dir / "plots" / "importance.png").is_file()


def _section(run_dir: Path, title: str) -> str:
    return (run_dir / "report.md").read_text().split(f"## {title}")[1].split("\n## ")[0]


def test_the_prior_table_says_a_stopped_prior_was_promoted_and_picked(tmp_path):
    run_dir = _promoted_pick_run(tmp_path / "run")
    assert analyse(run_dir) == 0

    section = _section(run_dir, "Against the known-good configurations")
    row = next(line for line in section.splitlines() if line.startswith("| `aaaa0002`"))
    assert "below its rung's cut" not in row
    assert "| its configuration is the pick (`aaaa0003`) |" in row
    assert "promoted as `aaaa0003`, finished at step 100 with eval_loss 0.51" in row


def test_the_prior_table_gives_a_confirmed_prior_s_later_runs_and_their_mean(tmp_path):
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, r=16, origin="prior")
    add_trial(run_dir, "aaaa0002", eval_loss=0.56, r=16, origin="confirm", parent="aaaa0001", seed=1)
    add_trial(run_dir, "aaaa0003", eval_loss=0.52, r=4)
    assert analyse(run_dir) == 0

    section = _section(run_dir, "Against the known-good configurations")
    row = next(line for line in section.splitlines() if line.startswith("| `aaaa0001`"))
    assert "repeated with another seed as `aaaa0002`, finished at step 100 with eval_loss 0.56" in row
    assert "mean of its 2 finished runs 0.53" in row
    assert "eval_loss 2% more than the pick's" in row  # the configuration's mean, 0.53, against 0.52


def test_the_edge_note_is_left_out_where_a_prior_put_the_pick_at_the_edge(tmp_path):
    prior = _promoted_pick_run(tmp_path / "prior")  # the pick's learning rate 1e-4 came with the prior
    searched = write_run_config(tmp_path / "searched")
    add_trial(searched, "aaaa0001", eval_loss=0.50, r=16, learning_rate=3e-4)
    add_trial(searched, "aaaa0002", eval_loss=0.53, r=4, last_step=75, learning_rate=1e-4)
    _keep_last_report(add_trial(searched, "aaaa0003", eval_loss=0.51, r=4, origin="promoted", parent="aaaa0002",
                                learning_rate=1e-4))
    assert analyse(prior) == 0 and analyse(searched) == 0

    assert "At the edge of the space" not in _section(prior, "The pick")
    assert "its learning rate 0.0001 lies in the bottom tenth" in _section(searched, "The pick")


def _top_table(run_dir: Path) -> list[list[str]]:
    lines = [line for line in _section(run_dir, "Top trials").splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_the_top_trials_table_has_no_empty_column_and_no_unnamed_header(tmp_path):
    run_dir = _promoted_pick_run(tmp_path / "run")  # two evaluations at most per trial: no curve to diagnose
    assert analyse(run_dir) == 0

    header, _, *rows = _top_table(run_dir)
    assert all(header) and "curve" not in header
    for column, name in enumerate(header):
        assert any(row[column] for row in rows), name
    marks = {row[0]: row[header.index("pick or best")] for row in rows}
    assert (marks["`aaaa0003`"], marks["`aaaa0001`"]) == ("pick", "best")


def test_the_top_trials_table_shows_the_curve_column_where_a_curve_has_a_diagnosis(tmp_path):
    run_dir = write_run_config(tmp_path / "run")
    trial = add_trial(run_dir, "aaaa0001", eval_loss=0.50, r=16)
    add_trial(run_dir, "aaaa0002", eval_loss=0.70, r=4)
    rows = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    for row, loss in zip(rows, [0.8, 0.45, 0.47, 0.50]):  # eval loss rises again while train loss falls
        row["eval_loss"] = loss
    (trial / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert analyse(run_dir) == 0

    header, _, *table = _top_table(run_dir)
    assert "curve" in header
    assert {row[0]: row[header.index("curve")] for row in table}["`aaaa0001`"] == "overfitting"


def test_the_top_trials_table_marks_every_run_of_the_best_configuration_not_only_its_first(tmp_path):
    # the confirmation aaaa0002 is the best run (0.44), but its configuration (mean 0.47) is named by aaaa0001
    run_dir = write_run_config(tmp_path / "run")
    add_trial(run_dir, "aaaa0001", eval_loss=0.50, r=16)
    add_trial(run_dir, "aaaa0002", eval_loss=0.44, r=16, origin="confirm", parent="aaaa0001", seed=1)
    add_trial(run_dir, "aaaa0003", eval_loss=0.48, r=4)
    assert analyse(run_dir) == 0

    header, _, *rows = _top_table(run_dir)
    marks = {row[0]: row[header.index("pick or best")] for row in rows}
    assert marks == {"`aaaa0002`": "best (another run)", "`aaaa0003`": "pick", "`aaaa0001`": "best"}
    assert "each of them is marked" in _section(run_dir, "Top trials")
