"""End to end: a tiny grid run (search.algorithm: grid) trains every point with every seed,
becomes a landscape, and the simulator replays the search on it. Real Ray, Optuna and PEFT on a
tiny model (the slow tier)."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis import landscape as format_
from helpers import load_trials
from search.run import main
from search.tuning.simulate import Truth, policy_config, simulate, summary


@pytest.fixture(scope="module")
def grid_run(tiny_model_dir, local_ray, tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    code = main([
        "--output", str(output), "--name", "grid",
        "--set", f"model.path={tiny_model_dir}",
        "--set", "search.algorithm=grid",
        "--set", "search.module_sets=[attention_qv,mlp]",
        "--set", "search.ranks=[2,4]",
        "--set", "search.alpha_ratios=[1.0]",
        "--set", "search.use_rslora=[false]",
        "--set", "search.learning_rate=[1e-3,2e-2]",
        "--set", "search.grid.learning_rates=[1e-2]",
        "--set", "budget.landscape_seeds=2",
        "--set", "budget.max_steps=4",
        "--set", "budget.eval_every=2",
        "--set", "budget.grace_period=2",
        "--set", "budget.batch_size=4",
        "--set", "data.eval_examples=8",
        "--set", "data.eval_generate_examples=2",
    ])
    return code, output / "grid"


def test_a_grid_run_trains_every_point_with_every_seed_to_the_full_budget(grid_run):
    code, run_dir = grid_run
    assert code == 0
    trials = load_trials(run_dir)
    assert (trials["status"] == "finished").all()
    runs = trials.groupby(["module_set", "r"])["seed"].apply(sorted)
    assert runs.to_dict() == {(m, r): [0, 1] for m in ("attention_qv", "mlp") for r in (2, 4)}
    assert sorted(trials["origin"]) == ["confirm"] * 4 + ["search"] * 4
    assert set(trials["learning_rate"]) == {1e-2} and set(trials["lora_dropout"]) == {0.0}


def test_the_grid_run_becomes_a_landscape_that_the_simulator_replays(grid_run, tmp_path):
    _, run_dir = grid_run
    assert format_.main([str(run_dir), "--out", str(tmp_path / "tiny")]) == 0
    landscape = format_.load(tmp_path / "tiny")
    assert landscape.header.steps == [2, 4] and landscape.header.seeds == [0, 1]
    assert len(landscape.curves) == 4 * 2
    final = pd.DataFrame([landscape.final(point, seed) for point, seed in landscape.curves])
    assert final["eval_row_loss"].map(len).eq(8).all()  # every eval row's loss, for the pick's pairing
    config = policy_config(landscape, ["budget.num_samples=3"])
    searches = simulate(landscape, config, seeds=2)
    assert all(search.pick in landscape.header.points() for search in searches)
    assert 0 <= summary(searches, Truth.of(landscape, config), landscape)["within_tolerance"] <= 1
    assert landscape.eval_rows("eval_loss") == 8  # every report kept all its rows: fewer can be simulated
    fewer = simulate(landscape, config, seeds=2, eval_rows=4)
    assert all(search.pick in landscape.header.points() for search in fewer)
    assert sum(search.gpu_seconds for search in fewer) > 0


def test_a_run_that_is_not_a_grid_is_refused_as_a_landscape(tmp_path, capsys):
    from helpers import write_run_config

    assert format_.main([str(write_run_config(tmp_path / "run")), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "search.algorithm='tpe'" in error
    assert not (tmp_path / "out").exists()
