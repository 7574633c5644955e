"""run_config.json's record: what the driver writes reads back equal, an older file without the
optional fields gets their defaults, and a wrong type or an unknown key is refused by name."""

import json

import pytest

from rundir.runconfig import RunConfig
from test_analysis_rundir import write_run_config


@pytest.fixture
def recorded(tmp_path) -> dict:
    """run_config.json as the driver writes it, as JSON values."""
    return json.loads((write_run_config(tmp_path) / "run_config.json").read_text())


def test_the_record_reads_back_what_it_writes_field_for_field_and_in_order(recorded):
    record = RunConfig.from_json(recorded)

    assert record.to_json() == recorded and list(record.to_json()) == list(recorded)
    assert RunConfig.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert (record.budget.max_steps, record.data_info.train.rows, record.resources.gpus_per_trial) == (100, 400, 0.0)


def test_a_file_without_the_optional_fields_gets_their_defaults(recorded):
    for key in ("packing", "packing_reason", "pack_compile_layers", "memory_probe"):
        del recorded["resources"][key]
    del recorded["budget"]["landscape_seeds"]
    del recorded["started_at"]

    record = RunConfig.from_json(recorded)

    assert (record.resources.packing, record.resources.memory_probe) == ("processes", None)
    assert record.resources.pack_compile_layers is False
    assert record.budget.landscape_seeds == 1 and record.started_at is None


@pytest.mark.parametrize("section, key, value, message", [
    ("budget", "max_steps", "100", r"budget.max_steps is '100'; allowed: a whole number"),
    ("resources", "cuda_graphs", "yes", r"resources.cuda_graphs is 'yes'; allowed: true or false"),
    ("resources", "gpus_per_trial", "auto", r"resources.gpus_per_trial is 'auto'; allowed: a number"),
    ("base_model", "total_params", True, r"base_model.total_params is True; allowed: a whole number"),
])
def test_a_value_of_the_wrong_type_is_refused_naming_its_key(recorded, section, key, value, message):
    recorded[section][key] = value

    with pytest.raises(ValueError, match=message):
        RunConfig.from_json(recorded)


def test_a_wrong_type_deep_inside_is_refused_naming_its_whole_key(recorded):
    recorded["data_info"]["eval"]["rows"] = 1.5

    with pytest.raises(ValueError, match=r"data_info.eval.rows is 1.5; allowed: a whole number"):
        RunConfig.from_json(recorded)


@pytest.mark.parametrize("section", [None, "resources", "data_info"])
def test_an_unknown_key_is_refused_naming_it(recorded, section):
    (recorded[section] if section else recorded)["gpu_count"] = 2
    key = f"{section}.gpu_count" if section else "gpu_count"

    with pytest.raises(ValueError, match=rf"unknown key {key} \(= 2\); the known keys are \["):
        RunConfig.from_json(recorded)


def test_the_run_config_record_has_a_field_for_every_budget_and_resources_setting():
    """A setting added to the config and not to the record fails every run as it writes
    run_config.json (the whole search otherwise runs only in the slow tier)."""
    from dataclasses import fields

    from rundir.runconfig import Budget, Resources
    from search.config import BudgetConfig, ResourcesConfig

    for settings, record in ((BudgetConfig, Budget), (ResourcesConfig, Resources)):
        missing = {f.name for f in fields(settings)} - {f.name for f in fields(record)}
        assert not missing, f"{record.__name__} lacks {sorted(missing)}"
