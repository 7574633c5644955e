"""The trial contract: what enters Tune's config is exactly what the trial and the analysis read back."""

import json

import pytest

from rundir.params import Origin, TrialParams

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM"}


def params(**changes) -> TrialParams:
    return TrialParams(**{"lora_config": LORA, "module_set": "attention_qv", "alpha_ratio": 2.0, "learning_rate": 2e-4,
                          "loraplus_lr_ratio": 1.0, "seed": 0, **changes})


def test_a_trial_survives_tunes_json_and_ignores_what_optuna_merged_in():
    trial = params(origin=Origin.PRIOR)
    stored = json.loads(json.dumps({"r": 8, "use_rslora": False, **trial.to_config()}))  # params.json, as Ray writes it

    assert stored["origin"] == "prior"
    assert TrialParams.from_config(stored) == trial


def test_a_repeat_keeps_the_configuration_and_resets_what_belongs_to_one_run():
    promoted = params().repeat(Origin.PROMOTED, "abc", start_from="/runs/x/tune/trial_abc/checkpoint_000001")
    retrained = promoted.repeat(Origin.RETRAIN, "abc", seed=7, full_data=True)

    assert (promoted.origin, promoted.parent, promoted.start_from) == (Origin.PROMOTED, "abc",
                                                                      "/runs/x/tune/trial_abc/checkpoint_000001")
    assert retrained.lora_config == LORA and retrained.seed == 7 and retrained.full_data
    assert retrained.start_from is None  # the retrain starts from scratch, on all the data


def test_only_the_searchers_own_trials_are_proposed():
    assert {origin for origin in Origin if origin.proposed} == {Origin.PRIOR, Origin.SEARCH}


def test_a_config_without_a_field_of_the_contract_names_it():
    config = params().to_config()
    del config["seed"]
    with pytest.raises(KeyError, match="seed"):
        TrialParams.from_config(config)


def test_a_reruns_gpu_share_travels_in_the_contract_and_a_later_repeat_takes_the_runs_own():
    rerun = params().repeat(Origin.RERUN, "abc", gpu_share=0.5)
    stored = json.loads(json.dumps(rerun.to_config()))

    assert TrialParams.from_config(stored).gpu_share == 0.5
    assert rerun.repeat(Origin.CONFIRM, "abc", seed=1).gpu_share is None
