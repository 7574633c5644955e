"""Mixtures of experts and hybrids: their module sets resolve from the model's own layers and expert
weights (3-D parameters, which PEFT adapts through `target_parameters`), the counts equal PEFT's,
the space never samples what PEFT refuses on expert weights, and no two sets of a space are one."""

from __future__ import annotations

import json

import optuna
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer, ParamWrapper

from search.config import load as load_config
from search.inputs.dryrun import dry_run_rows, format_table
from search.inputs.modules import adapter_param_count, meta_model, resolve
from search.inputs.prepare import prepare_model
from search.run import main
from search.tuning.prior import prior_points
from search.tuning.searcher import StudySearcher
from search.tuning.space import MODULE_SETS, LoraSpace, lora_config
from test_modules import Unknown

IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
# Every matrix at least 32 wide, so the default ranks (up to 32) fit every set.
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **IDS)
# Tiny random-init models from each family's config class: 2 blocks, 4 experts of which 2 route.
CONFIGS = {
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**SMALL, intermediate_size=64, moe_intermediate_size=32,
                                                     num_experts=4, num_experts_per_tok=2, head_dim=16),
    "mixtral": lambda: transformers.MixtralConfig(**SMALL, intermediate_size=64, num_local_experts=4,
                                                  num_experts_per_tok=2),
    "olmoe": lambda: transformers.OlmoeConfig(**SMALL, intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "gpt_oss": lambda: transformers.GptOssConfig(**SMALL, intermediate_size=32, head_dim=16, num_local_experts=4,
                                                 num_experts_per_tok=2,
                                                 layer_types=["sliding_attention", "full_attention"]),
    # a dense first block and a shared expert beside the routed ones; latent attention (MLA)
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**SMALL, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=32, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=32,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
}
# Attention, state-space (mamba) and MLP layers; Jamba's second block routes to experts.
HYBRIDS = {
    "jamba": lambda: transformers.JambaConfig(**SMALL, intermediate_size=64, attn_layer_period=2, attn_layer_offset=1,
                                              expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                                              mamba_d_state=8, mamba_dt_rank=32),
    "bamba": lambda: transformers.BambaConfig(**SMALL, intermediate_size=64, attn_layer_indices=[1], mamba_n_heads=4,
                                              mamba_d_head=32, mamba_d_state=8, mamba_n_groups=1, mamba_expand=2),
}


def falcon_h1() -> transformers.PretrainedConfig:
    """A hybrid whose Mamba mixers' out_proj PEFT refuses; only all_linear takes it."""
    return transformers.FalconH1Config(**SMALL, intermediate_size=64, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                       mamba_d_state=8, mamba_n_groups=1, mamba_expand=1)


EXPERT_WEIGHTS = ["experts.down_proj", "experts.gate_up_proj"]


def tiny(make) -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(make())


def adapted_by_peft(model) -> tuple[set[str], set[str]]:
    """(layers, parameters) PEFT wrapped, by their full names in the base model."""
    layers, parameters = set(), set()
    for name, module in model.base_model.model.named_modules():
        plain = name.replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            parameters.add(f"{plain}.{module.parameter_name}")
        elif isinstance(module, LoraLayer):
            layers.add(plain)
    return layers, parameters


def model_dir(tmp_path, family: str, make) -> str:
    directory = tmp_path / family
    make().save_pretrained(directory)  # config.json: what the dry run needs
    return str(directory)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_dry_run_of_the_default_space_exits_0_and_shows_the_experts_and_what_they_hold_fixed(tmp_path, capsys, family):
    code = main(["--dry-run", "--set", f"model.path={model_dir(tmp_path, family, CONFIGS[family])}",
                 "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    assert "experts.gate_up_proj" in out and "lora_dropout held at 0 and use_dora at false" in out
    assert not (tmp_path / "out").exists()


def test_dry_run_says_which_layers_attention_qv_takes_in_latent_attention(tmp_path, capsys):
    assert main(["--dry-run", "--set", f"model.path={model_dir(tmp_path, 'ds', CONFIGS['deepseek_v3'])}"]) == 0
    out = capsys.readouterr().out
    assert "attention_qv: kv_b_proj, q_b_proj (4 layers)" in out
    assert "attention_qv on latent attention (MLA): adapted q_b_proj, kv_b_proj" in out


@pytest.mark.parametrize("r", [4, 16])
@pytest.mark.parametrize(("family", "module_set"), [(family, name) for family in [*CONFIGS, *HYBRIDS]
                                                    for name in MODULE_SETS if (family, name) != ("bamba", "experts")])
def test_counts_equal_peft_s_and_peft_adapts_exactly_the_resolved_layers_and_experts(family, module_set, r):
    model = tiny({**CONFIGS, **HYBRIDS}[family])
    resolved = resolve(model, module_set)
    expected = adapter_param_count(model, resolved, r)
    peft = get_peft_model(model, LoraConfig(**lora_config(resolved, r, 2.0, 0.0, False, False)))
    assert peft.get_nb_trainable_parameters()[0] == expected
    assert adapted_by_peft(peft) == (set(resolved.layers), set(resolved.parameters))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_the_experts_set_is_the_routed_experts_only_and_mlp_and_all_linear_include_them(family):
    model = meta_model(CONFIGS[family]())
    experts = resolve(model, "experts")
    assert (experts.target_modules, experts.target_parameters) == ([], EXPERT_WEIGHTS)
    routed = {name for name, p in model.named_parameters() if name.endswith(tuple(EXPERT_WEIGHTS))}
    assert set(experts.parameters) == routed and len(routed) == 2 * (1 if family == "deepseek_v3" else 2)
    for name in ("mlp", "attention_mlp", "all_linear"):
        assert set(resolve(model, name).parameters) >= routed
    for name in ("attention", "attention_qv"):
        assert resolve(model, name).parameters == []


def test_an_experts_lora_has_rank_times_experts_pairs():
    model = meta_model(CONFIGS["mixtral"]())
    # per block: gate_up_proj 4 experts x (64 + 128), down_proj 4 x (64 + 64); 2 blocks
    assert adapter_param_count(model, resolve(model, "experts"), 8) == 2 * 8 * 4 * ((64 + 128) + (64 + 64))


def test_deepseek_mlp_takes_the_dense_block_the_shared_expert_and_the_routed_experts_but_not_the_router():
    model = meta_model(CONFIGS["deepseek_v3"]())
    mlp = resolve(model, "mlp")
    dense = [f"model.layers.0.mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")]
    shared = [f"model.layers.1.mlp.shared_experts.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")]
    routed = ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    assert set(mlp.parameters) == set(dense + shared + routed) and mlp.layers == []
    assert not any("gate.weight" in name for name in resolve(model, "all_linear").parameters)


def test_peft_moves_mlp_layer_names_of_a_mixture_of_experts_onto_its_experts_so_they_are_named_by_weight():
    """The premise: PEFT takes target_modules 'gate_proj', 'up_proj', 'down_proj' of DeepSeek-V3 for
    experts of transformers 4 and adapts the fused expert weights instead (gate_up_proj at twice the
    rank), leaving the dense and shared-expert MLP layers alone."""
    peft = get_peft_model(tiny(CONFIGS["deepseek_v3"]), LoraConfig(r=4, target_modules=["gate_proj", "up_proj",
                                                                                         "down_proj"]))
    layers, parameters = adapted_by_peft(peft)
    assert layers == set() and parameters == {"model.layers.1.mlp.experts.gate_up_proj",
                                              "model.layers.1.mlp.experts.down_proj"}
    resolved = resolve(meta_model(CONFIGS["deepseek_v3"]()), ["gate_proj", "up_proj", "down_proj"])
    assert resolved.target_modules == [] and resolved.target_parameters == ["down_proj.weight", "gate_proj.weight",
                                                                            "up_proj.weight"]


def test_explicit_names_may_list_expert_weights_and_the_router_and_count_as_peft_does():
    model = tiny(CONFIGS["mixtral"])
    resolved = resolve(model, ["q_proj", "experts.down_proj", "mlp.gate.weight"])
    assert (resolved.target_modules, resolved.target_parameters) == (["q_proj"], ["experts.down_proj", "mlp.gate.weight"])
    expected = adapter_param_count(model, resolved, 4)
    peft = get_peft_model(model, LoraConfig(**lora_config(resolved, 4, 2.0, 0.0, False, False)))
    assert peft.get_nb_trainable_parameters()[0] == expected
    assert adapted_by_peft(peft) == (set(resolved.layers), set(resolved.parameters))


def test_an_explicit_name_that_is_neither_layer_nor_expert_weight_is_refused_with_the_listing():
    with pytest.raises(ValueError, match=r"'experts\.up' matches no layer or expert weight.*expert weights: "
                                         r"experts\.gate_up_proj \(2\), experts\.down_proj \(2\)"):
        resolve(meta_model(CONFIGS["qwen3_moe"]()), ["q_proj", "experts.up"])


def test_experts_on_a_dense_model_is_refused():
    with pytest.raises(ValueError, match="module set 'experts' matches nothing in LlamaForCausalLM"):
        resolve(meta_model(transformers.LlamaConfig(**SMALL, intermediate_size=64)), "experts")


def test_peft_refuses_dropout_and_dora_on_expert_weights_so_lora_config_refuses_them_too():
    """The premise of holding them fixed, then the guard."""
    model = tiny(CONFIGS["qwen3_moe"])
    resolved = resolve(model, "experts")
    for refused in ({"lora_dropout": 0.1}, {"use_dora": True}):
        with pytest.raises(ValueError, match="does not work with"):
            get_peft_model(tiny(CONFIGS["qwen3_moe"]), LoraConfig(r=4, target_modules=[],
                                                                  target_parameters=EXPERT_WEIGHTS, **refused))
    with pytest.raises(ValueError, match="lora_dropout held at 0"):
        lora_config(resolved, 4, 2.0, 0.1, False, False)


def sampled(family: str, module_sets: list[str], trials: int) -> list[dict]:
    """`trials` configurations from the real space and searcher (TPE as the tuner makes it, the auto
    priors first), each told a value so TPE models the space after its startup trials."""
    config = load_config(None, [f"search.module_sets={json.dumps(module_sets)}", "search.use_dora=[false,true]",
                                "search.dropout=[0.0,0.2]"])
    space = config.search
    model = meta_model(CONFIGS[family]())
    resolved = {name: resolve(model, name) for name in module_sets}
    priors = prior_points(space, 500, "domain", trials)
    sampler = optuna.samplers.TPESampler(seed=0, constant_liar=True, n_startup_trials=10)
    searcher = StudySearcher(LoraSpace(space, resolved, seed=0, priors=len(priors)), metric="eval_loss", mode="min",
                             sampler=sampler, max_steps=10, points_to_evaluate=priors)
    configs = []
    for n in range(trials):
        configs.append(searcher.suggest(f"t{n}"))
        searcher.on_trial_complete(f"t{n}", {"eval_loss": (n * 7919 % 97) / 97, "step": 10})
    return configs


def test_no_sampled_configuration_has_dropout_or_dora_on_expert_weights():
    configs = sampled("deepseek_v3", ["attention_qv", "attention", "mlp", "experts", "all_linear"], 120)
    with_experts = [c["lora_config"] for c in configs if c["lora_config"].get("target_parameters")]
    without = [c["lora_config"] for c in configs if not c["lora_config"].get("target_parameters")]
    assert with_experts and without
    assert all(lora["lora_dropout"] == 0 and not lora["use_dora"] for lora in with_experts)
    # the space still searches both where PEFT allows them
    assert any(lora["lora_dropout"] > 0 for lora in without) and any(lora["use_dora"] for lora in without)


def test_no_two_module_sets_of_the_space_resolve_to_the_same_layers(tmp_path, capsys):
    every = json.dumps(list(MODULE_SETS))
    config = load_config(None, [f"model.path={model_dir(tmp_path, 'mixtral', CONFIGS['mixtral'])}",
                                f"search.module_sets={every}"])
    prepared = prepare_model(config)
    out = capsys.readouterr().out
    adapted = [(tuple(res.layers), tuple(res.parameters)) for res in prepared.resolved.values()]
    assert len(set(adapted)) == len(adapted)
    assert list(prepared.resolved) == ["attention_qv", "attention", "mlp", "attention_mlp"]
    assert out.count("left out of the space") == 2
    assert ("module set 'experts' adapts the same layers as 'mlp' on MixtralForCausalLM: left out of the space"
            in out)
    assert prepared.space(config.search).module_sets == ["attention_qv", "attention", "mlp", "attention_mlp"]


def test_a_listed_prior_on_a_set_left_out_of_the_space_takes_the_kept_set_that_adapts_the_same_layers(tmp_path):
    config = load_config(None, [f"model.path={model_dir(tmp_path, 'mixtral', CONFIGS['mixtral'])}",
                                "search.module_sets=[attention, mlp, experts]",
                                "search.priors=[{module_set: experts, r: 4}, {module_set: attention, r: 8}]"])
    space = prepare_model(config).space(config.search)
    assert space.priors == [{"module_set": "mlp", "r": 4}, {"module_set": "attention", "r": 8}]
    assert space.problems() == []


def test_latent_attention_s_attention_qv_is_not_its_attention():
    model = meta_model(CONFIGS["deepseek_v3"]())
    assert set(resolve(model, "attention_qv").layers) < set(resolve(model, "attention").layers)


def test_an_unknown_architecture_s_note_is_printed_once():
    model = Unknown()
    sets = ["attention_qv", "attention", "mlp", "all_linear"]
    rows = dry_run_rows(model, sets, [2], [False])
    architecture = resolve(model, "mlp").architecture_note
    table = format_table(rows, "unknown", architecture)
    assert table.count("architecture 'Unknown' unknown") == 1


def test_4bit_on_a_mixture_of_experts_is_refused_with_one_line_naming_the_limit(tmp_path, capsys):
    code = main(["--dry-run", "--set", f"model.path={model_dir(tmp_path, 'olmoe', CONFIGS['olmoe'])}",
                 "--set", "model.quantization=4bit"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: model.quantization is '4bit' but OlmoeForCausalLM is a mixture of experts")
    assert "bitsandbytes 4-bit quantizes Linear layers only" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("family", list(HYBRIDS))
def test_a_hybrid_s_state_space_layers_are_all_linear_s_only_and_said_once(family):
    model = meta_model(HYBRIDS[family]())
    mamba = {name for name in resolve(model, "all_linear").layers if ".mamba." in name}
    assert mamba
    for name in ("attention_qv", "attention", "mlp", "attention_mlp"):
        resolved = resolve(model, name)
        assert not mamba & set(resolved.layers)
        assert resolved.architecture_note.startswith("state-space layers (mamba.in_proj")
    assert {name.split(".")[-1] for name in resolve(model, "attention").layers} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_jamba_s_mlp_takes_its_dense_mlp_and_its_routed_experts(tmp_path, capsys):
    model = meta_model(HYBRIDS["jamba"]())
    mlp = resolve(model, "mlp")
    assert mlp.target_parameters == ["down_proj.weight", "experts.down_proj", "experts.gate_up_proj",
                                     "gate_proj.weight", "up_proj.weight"]
    assert mlp.parameters == [*(f"model.layers.{i}.feed_forward.{name}.weight" for i in (0,)
                                for name in ("gate_proj", "up_proj", "down_proj")),
                              "model.layers.1.feed_forward.experts.gate_up_proj",
                              "model.layers.1.feed_forward.experts.down_proj"]
    assert main(["--dry-run", "--set", f"model.path={model_dir(tmp_path, 'jamba', HYBRIDS['jamba'])}"]) == 0
    assert capsys.readouterr().out.count("state-space layers (") == 1


def test_the_adapter_comes_off_expert_weights_so_a_worker_reuses_its_base_model():
    model = tiny(CONFIGS["qwen3_moe"])
    before = {name: p.clone() for name, p in model.named_parameters()}
    ids = torch.randint(3, 128, (2, 8))
    resolved = resolve(model, "all_linear")
    for _ in range(2):
        peft = get_peft_model(model, LoraConfig(**lora_config(resolved, 4, 2.0, 0.0, True, False)))
        peft(input_ids=ids, labels=ids).loss.backward()
        model = peft.unload()
        after = dict(model.named_parameters())
        assert after.keys() == before.keys()
        assert all(torch.equal(after[name], before[name]) for name in before)


def test_the_probe_trains_an_expert_set_without_dropout_or_dora():
    from search.resources.memory import heaviest_lora_config

    model = meta_model(CONFIGS["qwen3_moe"]())
    resolved = {name: resolve(model, name) for name in ("attention", "all_linear")}
    lora = heaviest_lora_config(resolved, [4, 16], [False, True], [0.0, 0.1])
    assert lora["target_parameters"] == EXPERT_WEIGHTS and lora["lora_dropout"] == 0 and not lora["use_dora"]


def test_a_shared_run_trains_an_expert_trial_in_its_own_process():
    from rundir.params import TrialParams
    from trainables.placement import in_own_process

    model = meta_model(CONFIGS["olmoe"]())

    def trial(name: str) -> dict:
        return TrialParams(lora_config=lora_config(resolve(model, name), 4, 2.0, 0.0, False, False), module_set=name,
                           alpha_ratio=2.0, learning_rate=1e-3, loraplus_lr_ratio=1.0, seed=0).to_config()
    assert in_own_process(trial("experts")) and not in_own_process(trial("attention"))



def test_a_hybrid_set_that_peft_refuses_exits_2_naming_what_it_cannot_adapt(tmp_path, capsys):
    path = model_dir(tmp_path, "falcon_h1", falcon_h1)
    code = main(["--dry-run", "--set", f"model.path={path}"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("error: search.module_sets has 'all_linear', which PEFT cannot adapt on FalconH1ForCausalLM")
    assert "'out_proj' is incompatible with Mamba-based models" in err
    assert main(["--dry-run", "--set", f"model.path={path}", "--set", "search.module_sets=[attention_qv,attention,mlp]"]) == 0


def test_a_shared_trainer_prepares_the_layers_of_the_sets_it_packs_and_none_of_a_set_that_adapts_expert_weights(tmp_path):
    """The trainer makes the layers of the space's module sets before its first trial
    (`TrialSetup.module_sets`, `Pack.prepare`); a set that adapts expert weights trains beside it."""
    from dataclasses import replace
    from types import SimpleNamespace

    from rundir.location import locate
    from search.recipe import trial_setup
    from trainables.config import cache_root

    config = load_config(None, [f"model.path={model_dir(tmp_path, 'mixtral', CONFIGS['mixtral'])}",
                                "search.module_sets=[attention_qv, attention, experts]"])
    prepared = prepare_model(config)
    config = replace(config, search=prepared.space(config.search))
    plan = SimpleNamespace(gpus_per_trial=1.0, compiled=True, layers_compiled=False)
    setup = trial_setup(config, plan, prepared, locate(str(tmp_path), "run", cache_root()),
                        SimpleNamespace(pad_token_id=0))
    assert setup.module_sets == (("q_proj", "v_proj"), ("k_proj", "o_proj", "q_proj", "v_proj"))
