"""The search space: exact LoraConfig arguments, inside the configured ranges, seeded."""

from __future__ import annotations

from dataclasses import replace

import optuna
import pytest
from optuna.trial import FixedTrial

from rundir.params import TrialParams
from search.config import load
from search.inputs import modules
from search.tuning.space import LoraSpace, module_set_key

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def space_setup(tiny_model_dir):
    config = load(None, ["search.module_sets=[attention_qv,mlp,all_linear,[q_proj,o_proj]]",
                         "search.ranks=[2,4,8]", "search.alpha_ratios=[0.5,1,2,4]",
                         "search.dropout=[0.0,0.2]", "search.use_dora=[false,true]",
                         "search.learning_rate=[1e-4,1e-2]", "search.loraplus_lr_ratio=[1,16]"])
    model = modules.meta_model(modules.load_model_config(str(tiny_model_dir)))
    resolved = {module_set_key(s): modules.resolve(model, s) for s in config.search.module_sets}
    return config, resolved


def _proposals(config, resolved, seed: int, n: int) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
    define = LoraSpace(config.search, resolved, seed)
    out = []
    for _ in range(n):
        trial = study.ask()
        constants = define(trial)
        out.append({**trial.params, **constants})
        study.tell(trial, 1.0)
    return out


def test_lora_alpha_is_always_alpha_ratio_times_r_and_values_stay_in_range(space_setup):
    config, resolved = space_setup
    for p in _proposals(config, resolved, seed=1, n=60):
        lc = p["lora_config"]
        assert lc["lora_alpha"] == p["alpha_ratio"] * p["r"]
        assert lc["r"] == p["r"] and p["r"] in config.search.ranks
        assert 0.0 <= lc["lora_dropout"] <= 0.2 and lc["lora_dropout"] == p["lora_dropout"]
        assert 1e-4 <= p["learning_rate"] <= 1e-2
        assert p["loraplus_lr_ratio"] in (1, 16)
        assert lc["use_dora"] == p["use_dora"] and lc["use_rslora"] == p["use_rslora"]
        assert lc["target_modules"] == resolved[p["module_set"]].target_modules


def test_explicit_module_lists_are_searched_beside_named_sets(space_setup):
    config, resolved = space_setup
    seen = {p["module_set"] for p in _proposals(config, resolved, seed=2, n=40)}
    assert "q_proj+o_proj" in seen and "mlp" in seen


def test_same_seed_gives_same_first_proposals(space_setup):
    config, resolved = space_setup
    assert _proposals(config, resolved, seed=7, n=5) == _proposals(config, resolved, seed=7, n=5)
    assert _proposals(config, resolved, seed=7, n=5) != _proposals(config, resolved, seed=8, n=5)


def test_fixed_dropout_and_learning_rate_are_constants(space_setup):
    config, resolved = space_setup
    config = replace(config, search=replace(config.search, dropout=[0.05, 0.05], learning_rate=[3e-4, 3e-4]))
    p = _proposals(config, resolved, seed=0, n=1)[0]
    assert "lora_dropout" not in p  # nothing sampled: no Optuna parameter of that name
    assert p["lora_config"]["lora_dropout"] == 0.05 and p["learning_rate"] == 3e-4


def test_the_grid_is_every_choice_crossed_with_the_grids_learning_rates_and_dropouts():
    from search.tuning.space import grid_points

    config = load(None, ["search.algorithm=grid", "search.module_sets=[mlp,all_linear]", "search.ranks=[4,16]",
                         "search.alpha_ratios=[1.0]", "search.use_rslora=[false,true]",
                         "search.grid.learning_rates=[7.7e-4,3.0e-3]", "search.grid.lora_dropouts=[0.0,0.1]"])
    points = grid_points(config.search)
    assert len(points) == 2 * 2 * 1 * 2 * 1 * 1 * 2 * 2
    assert len({tuple(sorted(point.items())) for point in points}) == len(points)
    assert {point["learning_rate"] for point in points} == {7.7e-4, 3e-3}
    assert {point["lora_dropout"] for point in points} == {0.0, 0.1}
    # a fixed range is no parameter of the space, so no key of the grid
    fixed = load(None, ["search.algorithm=grid", "search.learning_rate=1e-3", "search.grid.learning_rates=[1e-3]"])
    assert all("learning_rate" not in point for point in grid_points(fixed.search))


def test_a_grid_value_outside_its_range_and_an_unknown_algorithm_are_refused_by_name():
    from search.config import ConfigError

    with pytest.raises(ConfigError, match=r"search.grid.learning_rates has \[0.01\] outside search.learning_rate"):
        load(None, ["search.algorithm=grid", "search.grid.learning_rates=[7.7e-4,1.0e-2]"])
    with pytest.raises(ConfigError, match=r"search.algorithm is 'bohb'; allowed: tpe, random, grid"):
        load(None, ["search.algorithm=bohb"])
    with pytest.raises(ConfigError, match=r"budget.landscape_seeds is 0; allowed: an integer >= 1"):
        load(None, ["budget.landscape_seeds=0"])


def test_the_cheaper_neighbours_are_the_next_smaller_rank_then_the_module_sets_inside_its_own(space_setup):
    config, resolved = space_setup
    space = LoraSpace(config.search, resolved, 0)
    pick = TrialParams.from_config(LoraSpace(config.search, resolved, 0)(FixedTrial(
        {"module_set": "all_linear", "r": 8, "alpha_ratio": 2, "lora_dropout": 0.1, "use_rslora": True, "use_dora": False,
         "learning_rate": 3e-3, "loraplus_lr_ratio": 16})))
    neighbours = space.cheaper(pick)
    # r 8 -> 4 first; then mlp (3 layers a block), attention_qv (2); q_proj+o_proj (2) is inside all_linear too
    assert [(n.module_set, n.lora_config["r"]) for n in neighbours] == [
        ("all_linear", 4), ("mlp", 8), ("attention_qv", 8), ("q_proj+o_proj", 8)]
    for n in neighbours:
        assert n.lora_config["lora_alpha"] == 2 * n.lora_config["r"]
        assert (n.learning_rate, n.loraplus_lr_ratio, n.lora_config["lora_dropout"], n.lora_config["use_rslora"]) == (
            3e-3, 16, 0.1, True)
        assert n.lora_config["target_modules"] == resolved[n.module_set].target_modules
    smallest = replace(pick, module_set="attention_qv", lora_config={**pick.lora_config, "r": 2})
    assert space.cheaper(smallest) == []  # no smaller rank, no set inside q and v
