"""The config is checked once, at the edge: every problem named, with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.config import ConfigError, load

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    load(path)


def test_default_config_is_the_embedded_default():
    config = load()
    assert config.model.path == "smollm2"
    assert config.data.train == "builtin:atlas"


def test_overrides_are_read_as_yaml():
    config = load(None, ["search.ranks=[8,16]", "search.module_sets=[attention,[q_proj,v_proj]]",
                         "search.learning_rate=[1e-4,1e-3]", "budget.num_samples=3"])
    assert config.search.ranks == [8, 16]
    assert config.search.module_sets == ["attention", ["q_proj", "v_proj"]]
    assert config.search.learning_rate == [1e-4, 1e-3]  # YAML 1.1 reads 1e-4 as a string; coerced
    assert config.budget.num_samples == 3


def test_a_mapping_key_is_read_as_a_mapping_of_strings():
    config = load(None, ["data.columns={prompt: question, completion: answer}"])
    assert config.data.columns == {"prompt": "question", "completion": "answer"}


def test_data_settings_take_their_documented_forms():
    config = load(None, ["data.eval_examples=all", "data.roles={bot: assistant}", "data.train_turns=last",
                         "data.separator=' => '"])
    assert (config.data.eval_examples, config.data.roles, config.data.train_turns, config.data.separator) == (
        "all", {"bot": "assistant"}, "last", " => ")
    assert load(None, []).data.separator == "\n"


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load(None, ["search.ranks=[0,8]", "selection.tolerance=1.5", "budget.max_steps=abc"])
    message = str(e.value)
    assert "search.ranks contains 0" in message
    assert "selection.tolerance" in message
    assert "budget.max_steps is 'abc'; allowed: an integer" in message


@pytest.mark.parametrize("override, expected", [
    ("budget.nm_samples=3", "unknown key budget.nm_samples"),
    ("colour=red", "unknown key colour"),
    ("search.ranks=8", "search.ranks is 8; allowed: a list of an integer"),
    ("search.ranks=[8.5]", "search.ranks[0] is 8.5"),
    ("search.ranks=[true]", "search.ranks[0] is True"),
    ("search.ranks=[-4]", "search.ranks contains -4; allowed: positive integers"),
    ("search.ranks=[]", "search.ranks is empty"),
    ("search.alpha_ratios=[0]", "search.alpha_ratios contains 0.0; allowed: positive numbers"),
    ("search.dropout=[0.2,1.0]", "search.dropout is [0.2, 1.0]; allowed: [low, high] with 0 <= low <= high < 1"),
    ("search.dropout=[0.3,0.1]", "search.dropout is [0.3, 0.1]"),
    ("search.learning_rate=[0,1e-3]", "search.learning_rate is [0.0, 0.001]"),
    ("search.learning_rate=fast", "search.learning_rate is 'fast'; allowed: a list of a number or a number"),
    ("search.module_sets=[]", "search.module_sets is empty"),
    ("search.module_sets=[attn]", "search.module_sets[0] is 'attn'; allowed: attention_qv"),
    ("search.module_sets=[[]]", "search.module_sets[0] is an empty list"),
    ("search.use_dora=[maybe]", "search.use_dora[0] is 'maybe'; allowed: true or false"),
    ("selection.tolerance=0", "selection.tolerance"),
    ("selection.mode=up", "selection.mode"),
    ("selection.metric=bleu", "selection.metric"),
    ("budget.grace_period=100", "budget.grace_period is 100, above budget.max_steps="),
    ("budget.reduction_factor=1", "budget.reduction_factor is 1; allowed: an integer >= 2"),
    ("budget.batch_size=0", "budget.batch_size is 0; allowed: an integer >= 1"),
    ("resources.gpus_per_trial=1.5", "resources.gpus_per_trial is 1.5"),
    ("resources.gpus_per_trial=lots", "resources.gpus_per_trial is 'lots'"),
    ("resources.compile=sometimes", "resources.compile is 'sometimes'; allowed: auto, true or false"),
    ("model.quantization=8bit", "model.quantization is '8bit'; allowed: none, 4bit"),
    ("model.dtype=fp8", "model.dtype is 'fp8'"),
    ("data.search_fraction=0", "data.search_fraction is 0.0; allowed: a number in (0, 1]"),
    ("data.eval_fraction=1", "data.eval_fraction is 1.0; allowed: a number in (0, 1)"),
    ("data.template=chatml", "data.template is 'chatml'; allowed: auto, chat, plain"),
    ("data.columns=[question]", "data.columns is ['question']; allowed: a mapping of a string to a string"),
    ("data.columns={question: q}", "data.columns names ['question']; allowed keys: messages, prompt, completion"),
    ("data.columns={prompt: [q]}", "data.columns.prompt is ['q']; allowed: a string"),
    ("data.eval_examples=0", "data.eval_examples is 0; allowed: an integer >= 1, or all (every eval row)"),
    ("data.eval_examples=most", "data.eval_examples is 'most'; allowed: an integer >= 1, or all"),
    ("data.train_turns=first", "data.train_turns is 'first'; allowed: all, last"),
    ("data.roles={bot: robot}", ("data.roles maps {'bot': 'robot'}; allowed: the data's role names, each mapped to "
                                 "system, user, assistant")),
    ("data.keep_empty_answers=sometimes", "data.keep_empty_answers is 'sometimes'; allowed: true or false"),
    ("name=../escape", "name is '../escape'"),
    ("budget", "--set 'budget' is not KEY=VALUE"),
])
def test_bad_values_are_named_with_what_is_allowed(override, expected):
    with pytest.raises(ConfigError) as e:
        load(None, [override])
    assert expected in str(e.value)


def test_a_config_that_is_not_yaml_is_an_input_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(bad)


def test_a_missing_config_file_is_an_input_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        load(tmp_path / "nope.yaml")



def test_auto_gpu_share_packs_small_models_and_gives_large_ones_a_whole_gpu():
    from search.config import ResourcesConfig

    auto = ResourcesConfig()
    assert auto.gpus(cuda=False, total_params=135e6) == 0.0  # CPU: no GPU request at all
    shares = [auto.gpus(cuda=True, total_params=n) for n in (135e6, 0.7e9, 1.1e9, 8e9)]
    assert shares == sorted(shares) and shares[0] == 0.125 and shares[-1] == 1.0
    assert ResourcesConfig(gpus_per_trial=0.5).gpus(cuda=True, total_params=135e6) == 0.5  # explicit wins


def test_auto_gpu_share_grows_until_a_trial_fits_the_gpus_memory():
    from search.config import ResourcesConfig, trial_memory_gb

    auto = ResourcesConfig()
    assert auto.gpus(cuda=True, total_params=135e6, gpu_memory_gb=80) == 0.125  # the H100: 8 SmolLM2 trials
    small_gpu = auto.gpus(cuda=True, total_params=135e6, gpu_memory_gb=16)
    assert small_gpu == 0.25 and small_gpu * 16 >= trial_memory_gb(135e6, 2.0) > 0.125 * 16
    assert auto.gpus(cuda=True, total_params=3e9, gpu_memory_gb=24) == 1.0  # a 3B bf16 trial needs the whole card
    # 4-bit weights take a quarter of bf16's: the same model packs tighter
    assert auto.gpus(cuda=True, total_params=3e9, gpu_memory_gb=24, bytes_per_param=0.5) == 0.5
    assert auto.gpus(cuda=True, total_params=8e9, gpu_memory_gb=8) == 1.0  # never more than one GPU by itself


def test_auto_compile_is_for_gpu_trials_of_large_models_that_train_long_enough():
    """resources.compile: auto compiles where bench/results/step_modes.json measured it paying
    (1.1B, 26 s of compiling against 262 ms saved a step) and nowhere else; true and false win."""
    from search.config import COMPILE_FROM_PARAMS, COMPILE_FROM_STEPS, ResourcesConfig

    auto = ResourcesConfig()
    big, long = COMPILE_FROM_PARAMS, COMPILE_FROM_STEPS
    assert auto.compiled(0.5, big, long, True)
    assert not auto.compiled(0.0, big, long, True)  # CPU trials
    assert not auto.compiled(0.125, 135e6, 10_000, True)  # SmolLM2: the CUDA graph serves it
    assert not auto.compiled(0.5, big, long - 1, True)  # too short to pay for the compile
    assert not auto.compiled(0.5, big, long, False)  # 4-bit or gradient checkpointing: not measured
    # a shared trainer compiles once for all its trials: on a GPU, a plain bf16 model of any size
    assert auto.compiled(0.125, 135e6, 10, True, shared=True)
    assert not auto.compiled(0.0, 135e6, 10, True, shared=True)  # a CPU trainer
    assert not auto.compiled(0.125, 135e6, 10, False, shared=True)  # 4-bit or gradient checkpointing
    assert not ResourcesConfig(compile=False).compiled(0.125, 135e6, 10, True, shared=True)
    assert ResourcesConfig(compile=True).compiled(0.125, 135e6, 10, False)
    assert not ResourcesConfig(compile=False).compiled(1.0, 8e9, 10_000, True)


def test_a_shared_trainer_compiles_its_layers_wherever_it_compiles_its_step_unless_told_not_to():
    from search.config import ResourcesConfig

    for given in (True, "auto"):
        resources = ResourcesConfig(pack_compile_layers=given)
        assert resources.layers_compiled(shared=True, compiled=True)
        assert not resources.layers_compiled(shared=False, compiled=True)  # a process's compile is its own
        assert not resources.layers_compiled(shared=True, compiled=False)  # a CPU trainer, or compile resolved off
    assert ResourcesConfig().pack_compile_layers == "auto"
    assert not ResourcesConfig(pack_compile_layers=False).layers_compiled(shared=True, compiled=True)


def test_compiled_layers_without_a_compiled_step_are_refused_naming_both_keys():
    with pytest.raises(ConfigError, match=r"resources.pack_compile_layers is true but resources.compile is false"):
        load(None, ["resources.pack_compile_layers=true", "resources.compile=false"])
    assert load(None, ["resources.pack_compile_layers=true"]).resources.pack_compile_layers is True
    # auto follows the step: nothing to refuse
    assert load(None, ["resources.compile=false"]).resources.pack_compile_layers == "auto"


def test_pack_compile_layers_other_than_auto_true_or_false_is_refused_naming_what_is_allowed():
    with pytest.raises(ConfigError, match=r"resources.pack_compile_layers is 'sometimes'; allowed: auto, true or false"):
        load(None, ["resources.pack_compile_layers=sometimes"])


def test_the_embedded_default_yaml_and_the_dataclass_defaults_agree():
    """A user's partial --config file gets the dataclass defaults for the keys it leaves out; the
    default run gets configs/default.yaml. Both must be the same configuration (they once
    disagreed on resources.cuda_graphs, and a benchmark ran eager without anyone asking)."""
    from dataclasses import asdict

    from search.config import Config, load

    assert asdict(load()) == asdict(Config())


def _default_yaml() -> str:
    from importlib import resources

    return (resources.files("configs") / "default.yaml").read_text()


def _dotted(mapping: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in mapping.items():
        # {} is a setting (data.columns), not a section
        out += _dotted(value, f"{prefix}{key}.") if isinstance(value, dict) and value else [prefix + key]
    return out


def test_the_embedded_default_yaml_lists_every_key_and_no_other():
    import yaml

    from search.config import Config, leaves

    listed = _dotted(yaml.safe_load(_default_yaml()))
    keys = [key for key, _, _ in leaves(Config())]
    assert not set(keys) - set(listed), f"configs/default.yaml lacks {sorted(set(keys) - set(listed))}"
    assert not set(listed) - set(keys), f"configs/default.yaml has keys no config reads: {sorted(set(listed) - set(keys))}"


def test_every_key_in_the_embedded_default_yaml_has_a_comment():
    import re

    leaf = re.compile(r"^\s*(\w+):\s*\S")  # a key with a value on its line; a section's line has none
    bare = [line for line in _default_yaml().splitlines() if leaf.match(line) and " #" not in line]
    assert not bare, f"configs/default.yaml: keys without a comment: {bare}"


def test_a_range_key_given_one_value_is_that_value_fixed(tmp_path):
    from search.config import to_yaml

    config = load(None, ["search.learning_rate=1e-4", "search.dropout=0"])
    assert config.search.learning_rate == [1e-4, 1e-4] and config.search.dropout == [0.0, 0.0]
    (tmp_path / "fixed.yaml").write_text(to_yaml(config))
    assert load(tmp_path / "fixed.yaml").search == config.search
