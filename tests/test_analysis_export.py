"""The exported adapter_config.json is PEFT's own: it loads, and it applies to the base model."""

import json

import pytest
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from analysis.export import export_adapter_config

PICKED = {"r": 4, "lora_alpha": 8.0, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
          "use_rslora": True, "use_dora": False, "fan_in_fan_out": False, "bias": "none", "task_type": "CAUSAL_LM"}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_exported_adapter_config_loads_and_applies_to_the_base_model(tiny_llama_dir, tmp_path):
    written = export_adapter_config(PICKED, str(tiny_llama_dir), tmp_path / "adapter")

    loaded = LoraConfig.from_pretrained(tmp_path / "adapter")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(loaded.base_model_name_or_path), loaded)

    assert written == tmp_path / "adapter" / "adapter_config.json"
    assert (loaded.r, loaded.lora_alpha, loaded.use_rslora, set(loaded.target_modules)) == (4, 8.0, True, {"q_proj", "v_proj"})
    trainable, _ = model.get_nb_trainable_parameters()
    # Per layer: q_proj 64 -> 64 and v_proj 64 -> 32 (2 key-value heads of 16): r * (d_in + d_out) each.
    assert trainable == 2 * 4 * ((64 + 64) + (64 + 32))


def test_export_replaces_the_config_and_leaves_adapter_weights_alone(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    export_adapter_config({**PICKED, "r": 16}, "/models/tiny", adapter)

    export_adapter_config(PICKED, "/models/tiny", adapter)

    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
