"""Module sets resolve to the right layers of every supported family, name them so PEFT adapts
exactly those, and the parameter counts equal PEFT's own."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULT_TARGETS
from torch import nn

from search.inputs.modules import (
    MODULE_SETS,
    adapter_param_count,
    base_param_count,
    load_model_config,
    max_rank,
    meta_model,
    resolve,
)

# Token ids inside the tiny vocabularies, so transformers does not warn about them.
IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128, **IDS)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE),
    "gemma": lambda: transformers.GemmaConfig(**LLAMA_LIKE, head_dim=16),
    "phi3": lambda: transformers.Phi3Config(**LLAMA_LIKE),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, vocab_size=128, **IDS),
    "falcon": lambda: transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                vocab_size=128, **IDS),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128, **IDS),
    "opt": lambda: transformers.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                                          word_embed_proj_dim=64, vocab_size=128, **IDS),
}
# Per family: the decoder blocks' path, and each part's layers (name inside a block) with the
# target_modules expected for it.
LLAMA_PARTS = {
    "attention_qv": (["self_attn.q_proj", "self_attn.v_proj"], ["q_proj", "v_proj"]),
    "attention": (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
                  ["k_proj", "o_proj", "q_proj", "v_proj"]),
    "mlp": (["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], ["down_proj", "gate_proj", "up_proj"]),
}
EXPECTED = {
    "llama": ("model.layers", LLAMA_PARTS),
    "mistral": ("model.layers", LLAMA_PARTS),
    "qwen2": ("model.layers", LLAMA_PARTS),
    "gemma": ("model.layers", LLAMA_PARTS),
    "phi3": ("model.layers", {
        "attention_qv": (["self_attn.qkv_proj"], ["qkv_proj"]),
        "attention": (["self_attn.o_proj", "self_attn.qkv_proj"], ["o_proj", "qkv_proj"]),
        "mlp": (["mlp.gate_up_proj", "mlp.down_proj"], ["down_proj", "gate_up_proj"]),
    }),
    "gpt_neox": ("gpt_neox.layers", {
        "attention_qv": (["attention.query_key_value"], ["query_key_value"]),
        "attention": (["attention.query_key_value", "attention.dense"], ["dense", "query_key_value"]),
        "mlp": (["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"], ["dense_4h_to_h", "dense_h_to_4h"]),
    }),
    "falcon": ("transformer.h", {
        "attention_qv": (["self_attention.query_key_value"], ["query_key_value"]),
        "attention": (["self_attention.query_key_value", "self_attention.dense"], ["dense", "query_key_value"]),
        "mlp": (["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"], ["dense_4h_to_h", "dense_h_to_4h"]),
    }),
    "gpt2": ("transformer.h", {
        "attention_qv": (["attn.c_attn"], ["c_attn"]),
        "attention": (["attn.c_attn", "attn.c_proj"], ["attn.c_proj", "c_attn"]),
        "mlp": (["mlp.c_fc", "mlp.c_proj"], ["c_fc", "mlp.c_proj"]),
    }),
    "opt": ("model.decoder.layers", {
        "attention_qv": (["self_attn.q_proj", "self_attn.v_proj"], ["q_proj", "v_proj"]),
        "attention": (["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj"],
                      ["k_proj", "out_proj", "q_proj", "v_proj"]),
        "mlp": (["fc1", "fc2"], ["fc1", "fc2"]),
    }),
}
# The sets a dense model has: `experts` needs expert weights (tests/test_moe.py)
DENSE_SETS = [name for name in MODULE_SETS if name != "experts"]
LLAMA_2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  vocab_size=32000)


def expected(family: str, module_set: str) -> tuple[set[str], list[str]]:
    """(full layer names, target_modules) the family's model should resolve `module_set` to."""
    blocks, parts = EXPECTED[family]
    if module_set in parts:
        rels, targets = parts[module_set]
    else:  # attention_mlp and all_linear: every layer of both parts
        rels = parts["attention"][0] + parts["mlp"][0]
        targets = sorted({rel.rsplit(".", 1)[-1] for rel in rels})
    return {f"{blocks}.{i}.{rel}" for i in range(2) for rel in rels}, targets


def tiny(family: str) -> nn.Module:
    """A random-init CPU model of `family`, 2 blocks, hidden size 64."""
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[family]())


@pytest.fixture(scope="module")
def meta_models() -> dict[str, nn.Module]:
    return {family: meta_model(make()) for family, make in CONFIGS.items()}


@pytest.fixture(scope="module")
def llama_2_7b() -> nn.Module:
    return meta_model(transformers.LlamaConfig(**LLAMA_2_7B))


def peft_model(model: nn.Module, resolved, r: int = 4, use_dora: bool = False):
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=resolved.target_modules,
                        fan_in_fan_out=resolved.fan_in_fan_out, use_dora=use_dora, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@pytest.mark.parametrize("module_set", DENSE_SETS)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_family_resolves_each_module_set_to_its_layers(meta_models, family, module_set):
    resolved = resolve(meta_models[family], module_set)
    layers, targets = expected(family, module_set)
    assert (resolved.name, set(resolved.layers), resolved.target_modules) == (module_set, layers, targets)


@pytest.mark.parametrize("module_set", DENSE_SETS)
@pytest.mark.parametrize("family", list(CONFIGS))
def test_peft_adapts_exactly_the_resolved_layers(family, module_set):
    model = tiny(family)
    resolved = resolve(model, module_set)
    wrapped = peft_model(model, resolved)
    adapted = [name.removeprefix("base_model.model.") for name, m in wrapped.named_modules()
               if isinstance(m, LoraLayer)]
    assert adapted == resolved.layers


@pytest.mark.parametrize(("module_set", "r", "use_dora"), [
    ("attention_qv", 4, False), ("attention", 1, False), ("mlp", 8, False), ("all_linear", 16, False),
    ("attention_qv", 4, True), ("all_linear", 8, True),
])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_adapter_param_count_equals_peft_count(family, module_set, r, use_dora):
    model = tiny(family)
    resolved = resolve(model, module_set)
    count = adapter_param_count(model, resolved, r, use_dora)
    assert count == peft_model(model, resolved, r, use_dora).get_nb_trainable_parameters()[0]


def test_llama_2_7b_query_and_value_at_rank_4_train_2097152_parameters(llama_2_7b):
    assert adapter_param_count(llama_2_7b, resolve(llama_2_7b, "attention_qv"), r=4) == 2_097_152


def test_llama_2_7b_built_from_config_alone_has_its_known_parameter_count(llama_2_7b):
    assert base_param_count(llama_2_7b) == 6_738_415_616


def test_meta_model_holds_no_weights(llama_2_7b):
    assert {p.device.type for p in llama_2_7b.parameters()} == {"meta"}


@pytest.mark.parametrize("family", ["gemma", "llama"])
def test_base_param_count_counts_tied_embeddings_once(meta_models, family):
    model = meta_models[family]
    embeddings = model.get_input_embeddings().weight.numel()
    tied = model.config.tie_word_embeddings
    everything = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert base_param_count(model) == everything - (embeddings if tied else 0) == model.num_parameters()


def test_max_rank_is_the_smallest_dimension_among_adapted_layers(meta_models):
    model = meta_models["llama"]  # k_proj and v_proj: 64 -> 32 (2 kv heads of 16); MLP: 64 <-> 128
    assert (max_rank(model, resolve(model, "attention")), max_rank(model, resolve(model, "mlp"))) == (32, 64)


def test_gpt2_attention_set_sets_fan_in_fan_out(meta_models):
    assert resolve(meta_models["gpt2"], "attention").fan_in_fan_out


@pytest.mark.parametrize("family", [f for f in CONFIGS if f != "gpt2"])
def test_linear_layers_do_not_set_fan_in_fan_out(meta_models, family):
    assert not resolve(meta_models[family], "all_linear").fan_in_fan_out


def test_gpt2_attention_names_c_proj_with_its_parent_and_says_why(meta_models):
    resolved = resolve(meta_models["gpt2"], "attention")
    assert "attn.c_proj" in resolved.target_modules and "'c_proj' also names layers outside this set" in resolved.note


@pytest.mark.parametrize(("family", "fused"), [("phi3", "qkv_proj"), ("gpt_neox", "query_key_value"),
                                               ("falcon", "query_key_value"), ("gpt2", "c_attn")])
def test_attention_qv_with_fused_qkv_adapts_the_fused_layer_and_says_so(meta_models, family, fused):
    note = resolve(meta_models[family], "attention_qv").note
    assert note.startswith(f"attention_qv is not expressible with q, k and v fused in {fused}")


@pytest.mark.parametrize("family", list(CONFIGS))
def test_known_families_resolve_without_inference_notes(meta_models, family):
    assert resolve(meta_models[family], "attention_mlp").note is None


@pytest.mark.parametrize("family", [f for f in CONFIGS if f in PEFT_DEFAULT_TARGETS])
def test_attention_qv_is_what_peft_adapts_by_default(meta_models, family):
    assert resolve(meta_models[family], "attention_qv").target_modules == sorted(PEFT_DEFAULT_TARGETS[family])


def test_explicit_names_resolve_to_the_layers_they_match(meta_models):
    model = meta_models["llama"]
    resolved = resolve(model, ["v_proj", "q_proj"])
    assert (resolved.name, resolved.target_modules, resolved.layers, resolved.note) == (
        "custom", ["q_proj", "v_proj"], resolve(model, "attention_qv").layers, None)


def test_explicit_dotted_name_matches_as_a_suffix_like_peft(meta_models):
    resolved = resolve(meta_models["gpt2"], ["attn.c_proj"])
    assert resolved.layers == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]


def test_explicit_name_the_model_lacks_raises_listing_its_layer_names(meta_models):
    with pytest.raises(ValueError, match=r"'query' matches no layer") as error:
        resolve(meta_models["llama"], ["query"])
    listing = "q_proj (2 layers), k_proj (2), v_proj (2), o_proj (2), gate_proj (2), up_proj (2), down_proj (2)"
    assert listing in str(error.value)
    assert str(error.value).splitlines()[-1].startswith("Fix:")


def test_explicit_list_with_one_wrong_name_is_rejected_although_peft_accepts_it(meta_models):
    with pytest.raises(ValueError, match=r"'qproj' matches no layer"):
        resolve(meta_models["llama"], ["q_proj", "qproj"])


def test_gpt2_layer_listing_names_each_c_proj_by_its_parent(meta_models):
    with pytest.raises(ValueError, match=r"c_attn \(2 layers\), attn\.c_proj \(2\), c_fc \(2\), mlp\.c_proj \(2\)"):
        resolve(meta_models["gpt2"], ["c_atn"])


@pytest.mark.parametrize("name", ["mlp", "lm_head", "embed_tokens"])
def test_explicit_name_of_a_module_outside_the_block_layers_is_rejected(meta_models, name):
    with pytest.raises(ValueError, match=rf"'{name}' names .*not a Linear/Conv1D layer inside the decoder blocks"):
        resolve(meta_models["llama"], [name])


def test_empty_explicit_list_is_rejected(meta_models):
    with pytest.raises(ValueError, match="target_modules is an empty list"):
        resolve(meta_models["llama"], [])


def test_unknown_module_set_is_rejected_naming_the_allowed_sets(meta_models):
    with pytest.raises(ValueError, match="module set 'attn' is unknown; allowed: attention_qv, attention, mlp"):
        resolve(meta_models["llama"], "attn")


def test_rank_below_one_is_rejected(meta_models):
    model = meta_models["llama"]
    with pytest.raises(ValueError, match="r is 0; allowed: positive integers"):
        adapter_param_count(model, resolve(model, "attention"), r=0)


class Block(nn.Module):
    """A decoder block of an architecture no table knows: attention under `attn` with unfamiliar
    layer names, and MLP layers sitting directly in the block."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.wa, self.attn.wb = nn.Linear(8, 24), nn.Linear(8, 8)
        self.w_in, self.w_out = nn.Linear(8, 32), nn.Linear(32, 8)


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(8, 16)


def test_unknown_architecture_places_layers_by_parent_name_then_position_and_says_so():
    resolved = resolve(Unknown(), "mlp")
    assert resolved.layers == ["blocks.0.w_in", "blocks.0.w_out", "blocks.1.w_in", "blocks.1.w_out"]
    assert resolved.note == ("architecture 'Unknown' unknown: classified layers by parent module name: "
                             "attn.wa -> attention, attn.wb -> attention; by position: w_in -> mlp, w_out -> mlp")


def test_attention_qv_without_recognisable_query_and_value_uses_attention_and_says_so():
    resolved = resolve(Unknown(), "attention_qv")
    assert resolved.target_modules == ["wa", "wb"]
    assert resolved.note.endswith("no query or value projection recognised among the attention layers "
                                  "(attn.wa, attn.wb); used attention (nearest)")


def test_model_without_block_layers_is_rejected():
    with pytest.raises(ValueError, match="has no Linear or Conv1D layers inside a list of decoder blocks"):
        resolve(nn.Sequential(nn.Linear(4, 4)), "all_linear")


def test_architecture_without_attention_or_mlp_hints_rejects_part_sets_but_takes_all_linear():
    model = Unknown()
    del model.blocks[0].attn, model.blocks[1].attn
    assert resolve(model, "all_linear").target_modules == ["w_in", "w_out"]
    with pytest.raises(ValueError, match="Fix: use all_linear, or name the layers to adapt"):
        resolve(model, "attention")


def test_directory_holding_only_config_json_resolves(tmp_path):
    transformers.LlamaConfig(**LLAMA_LIKE).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    model = meta_model(load_model_config(str(tmp_path)))
    assert resolve(model, "attention_qv").target_modules == ["q_proj", "v_proj"]


def test_directory_without_config_json_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="holds no config.json"):
        load_model_config(str(tmp_path))


def test_unreadable_config_json_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json cannot be read"):
        load_model_config(str(tmp_path))


def test_model_without_a_causal_lm_class_is_rejected():
    with pytest.raises(ValueError, match="model_type 'vit' .* has no causal language model"):
        meta_model(transformers.ViTConfig())
