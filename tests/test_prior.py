"""The rule-of-thumb first trial: bounded by the data, shaped by the task, inside the space."""

from __future__ import annotations

import pytest

from search.config import ConfigError, load
from search.tuning.prior import prior_point, prior_points, rule_of_thumb_rank


@pytest.mark.parametrize("rows, kind, rank", [
    (999, "domain", 8), (999, "format", 4), (1_000, "domain", 16), (10_000, "instruction", 8),
    (10_001, "domain", 32), (100_000, "code", 32), (100_001, "format", 32),
])
def test_rank_is_bounded_by_dataset_size(rows, kind, rank):
    assert rule_of_thumb_rank(rows, kind) == rank


def test_knowledge_heavy_task_gets_feed_forward_modules_and_rslora_from_r16():
    space = load(None, ["search.module_sets=[attention_qv,attention,mlp,all_linear]", "search.ranks=[4,8,16,32]"]).search
    point = prior_point(space, train_rows=5_000, kind="domain")
    assert point["module_set"] == "all_linear" and point["r"] == 16 and point["use_rslora"] is True


def test_format_task_adapts_attention_without_rslora_at_small_rank():
    space = load(None, ["search.module_sets=[attention_qv,attention,mlp,all_linear]", "search.ranks=[4,8,16,32]"]).search
    point = prior_point(space, train_rows=5_000, kind="format")
    assert point["module_set"] == "attention" and point["r"] == 8 and point["use_rslora"] is False


def test_every_value_is_snapped_into_the_space():
    space = load(None, ["search.module_sets=[attention_qv]", "search.ranks=[2,64]", "search.alpha_ratios=[0.25,3]",
                        "search.use_rslora=[true]", "search.dropout=[0.1,0.2]", "search.learning_rate=[1e-3,1e-2]"]).search
    point = prior_point(space, train_rows=500, kind="domain")
    assert point == {"module_set": "attention_qv", "r": 2, "alpha_ratio": 3.0, "use_rslora": True, "use_dora": False,
                     "loraplus_lr_ratio": 1.0, "lora_dropout": 0.1, "learning_rate": 1e-3}


def test_auto_priors_are_the_rule_of_thumb_all_linear_at_ten_times_full_fine_tuning_and_r32_rslora():
    space = load(None, ["search.ranks=[4,8,16,32]", "search.learning_rate=[1e-4,3e-3]"]).search
    points = prior_points(space, train_rows=5_000, kind="domain", num_samples=8)
    assert points == [
        {"module_set": "all_linear", "r": 16, "alpha_ratio": 2.0, "use_rslora": True, "use_dora": False,
         "loraplus_lr_ratio": 1.0, "lora_dropout": 0.05, "learning_rate": 2e-4},
        {"module_set": "all_linear", "r": 32, "alpha_ratio": 1.0, "use_rslora": False, "use_dora": False,
         "loraplus_lr_ratio": 1.0, "lora_dropout": 0.0, "learning_rate": pytest.approx(2e-4)},
        {"module_set": "all_linear", "r": 32, "alpha_ratio": 1.0, "use_rslora": True, "use_dora": False,
         "loraplus_lr_ratio": 1.0, "lora_dropout": 0.05, "learning_rate": 2e-4},
    ]


def test_auto_priors_are_snapped_into_a_narrow_space_and_duplicates_dropped():
    space = load(None, ["search.module_sets=[attention_qv]", "search.ranks=[2]", "search.alpha_ratios=[4]",
                        "search.use_rslora=[true]", "search.dropout=0.1", "search.learning_rate=[1e-3,1e-2]"]).search
    points = prior_points(space, train_rows=5_000, kind="domain", num_samples=8)
    assert points == [{"module_set": "attention_qv", "r": 2, "alpha_ratio": 4.0, "use_rslora": True, "use_dora": False,
                       "loraplus_lr_ratio": 1.0, "learning_rate": 1e-3}]


def test_priors_count_in_the_budget():
    space = load(None).search
    assert len(prior_points(space, train_rows=5_000, kind="domain", num_samples=2)) == 2


def test_priors_none_gives_none():
    space = load(None, ["search.priors=none"]).search
    assert prior_points(space, train_rows=5_000, kind="domain", num_samples=8) == []


def test_listed_priors_are_used_as_given_without_fixed_values_and_without_duplicates():
    space = load(None, ["search.learning_rate=3e-4",
                        "search.priors=[{module_set: mlp, r: 8, learning_rate: 3e-4}, {module_set: mlp, r: 8}]"]).search
    assert prior_points(space, train_rows=5_000, kind="domain", num_samples=8) == [{"module_set": "mlp", "r": 8}]


@pytest.mark.parametrize("priors, message", [
    ("[{r: 8, rank: 8}]", r"search.priors\[0\] has the unknown key 'rank'; allowed: module_set, r,"),
    ("[{r: 5}]", r"search.priors\[0\].r is 5, not in the space; allowed: one of search.ranks \[4, 8, 16, 32\]"),
    ("[{r: 8}, {learning_rate: 1e-2}]", r"search.priors\[1\].learning_rate is 0.01, outside the space"),
    ("[{use_rslora: 1}]", r"search.priors\[0\].use_rslora is 1, not in the space"),
    ("[{module_set: attention_mlp}]", r"search.priors\[0\].module_set is 'attention_mlp', not in the space"),
    ("sometimes", "search.priors is 'sometimes'; allowed: auto, none, or a list"),
])
def test_a_listed_prior_outside_the_space_is_a_config_error_naming_it(priors, message):
    with pytest.raises(ConfigError, match=message):
        load(None, [f"search.priors={priors}"])


def test_a_real_optuna_search_proposes_the_priors_first_and_marks_them(tiny_model_dir):
    import optuna

    from rundir.params import Origin, TrialParams
    from search.inputs import modules
    from search.tuning.searcher import StudySearcher
    from search.tuning.space import LoraSpace, module_set_key

    config = load(None, ["search.module_sets=[attention_qv,mlp,all_linear]", "search.ranks=[4,8,32]"])
    model = modules.meta_model(modules.load_model_config(str(tiny_model_dir)))
    resolved = {module_set_key(s): modules.resolve(model, s) for s in config.search.module_sets}
    priors = prior_points(config.search, train_rows=5_000, kind="domain", num_samples=8)
    searcher = StudySearcher(LoraSpace(config.search, resolved, seed=0, priors=len(priors)), metric="eval_loss",
                             mode="min", sampler=optuna.samplers.TPESampler(seed=0), max_steps=config.budget.max_steps,
                             points_to_evaluate=priors)
    proposals = [searcher.suggest(f"t{i}") for i in range(len(priors) + 1)]

    for prior, proposal in zip(priors, proposals):
        assert {key: proposal[key] for key in prior} == prior
        assert TrialParams.from_config(proposal).origin is Origin.PRIOR
    assert TrialParams.from_config(proposals[-1]).origin is Origin.SEARCH


def test_a_grid_has_no_priors_since_it_runs_every_point():
    from search.config import load

    config = load(None, ["search.algorithm=grid"])
    assert prior_points(config.search, train_rows=5_000, kind="domain", num_samples=8) == []
