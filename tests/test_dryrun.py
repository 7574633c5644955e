"""The dry run's rows and table: exact counts per module set, rank and DoRA choice, from shapes alone."""

from __future__ import annotations

import pytest
import transformers

from search.inputs.dryrun import dry_run_rows, format_table
from search.inputs.modules import adapter_param_count, base_param_count, meta_model, resolve


@pytest.fixture(scope="module")
def llama_2_7b():
    return meta_model(transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                               num_attention_heads=32, vocab_size=32000))


@pytest.fixture(scope="module")
def gpt2():
    return meta_model(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                                              bos_token_id=1, eos_token_id=2))


def test_one_row_per_module_set_rank_and_dora_choice_in_the_order_given(llama_2_7b):
    rows = dry_run_rows(llama_2_7b, ["mlp", "attention_qv"], [16, 4], [False, True])
    assert [(row["module_set"], row["r"], row["use_dora"]) for row in rows] == [
        ("mlp", 16, False), ("mlp", 16, True), ("mlp", 4, False), ("mlp", 4, True),
        ("attention_qv", 16, False), ("attention_qv", 16, True), ("attention_qv", 4, False), ("attention_qv", 4, True)]


def test_no_dora_rows_unless_true_is_among_the_choices(llama_2_7b):
    rows = dry_run_rows(llama_2_7b, ["attention"], [8], [False, False])
    assert [row["use_dora"] for row in rows] == [False]


def test_row_holds_exact_count_share_of_base_and_fp32_mebibytes(llama_2_7b):
    (row,) = dry_run_rows(llama_2_7b, ["attention_qv"], [4], [True])
    resolved = resolve(llama_2_7b, "attention_qv")
    trainable = adapter_param_count(llama_2_7b, resolved, 4, use_dora=True)
    assert row == {
        "module_set": "attention_qv", "target_modules": ["q_proj", "v_proj"], "layers": 64, "r": 4, "use_dora": True,
        "trainable_params": trainable, "trainable_pct": 100 * trainable / base_param_count(llama_2_7b),
        "adapter_mb": trainable * 4 / 2**20, "flag": "below 0.05%", "note": "",
    }


@pytest.mark.parametrize(("module_set", "r", "flag"), [
    ("attention_qv", 1, "below 0.05%"),  # 0.008% of 6.7B
    ("attention_qv", 8, ""),             # 0.062%
    ("all_linear", 64, "above 1%"),      # 2.4%
])
def test_flag_marks_shares_outside_the_usual_lora_range(llama_2_7b, module_set, r, flag):
    (row,) = dry_run_rows(llama_2_7b, [module_set], [r], [False])
    assert row["flag"] == flag


def test_explicit_list_row_is_named_by_its_joined_names(llama_2_7b):
    (row,) = dry_run_rows(llama_2_7b, [["q_proj", "k_proj"]], [8], [False])
    assert (row["module_set"], row["target_modules"], row["layers"]) == ("q_proj+k_proj", ["k_proj", "q_proj"], 64)


def test_table_shows_each_module_sets_target_modules_once_above_the_rows(llama_2_7b):
    table = format_table(dry_run_rows(llama_2_7b, ["attention_qv", "mlp"], [4, 8], [False]), "llama-2-7b")
    lines = table.splitlines()
    assert lines[:5] == ["LoRA dry run for llama-2-7b", "", "Module sets:",
                         "  attention_qv: q_proj, v_proj (64 layers)",
                         "  mlp: down_proj, gate_proj, up_proj (96 layers)"]
    assert table.count("q_proj") == 1 and len(lines) == 5 + 2 + 4


def test_table_row_shows_count_share_size_and_flag(llama_2_7b):
    table = format_table(dry_run_rows(llama_2_7b, ["attention_qv"], [4], [False]), "llama-2-7b")
    assert table.splitlines()[-1].split() == ["attention_qv", "4", "no", "2,097,152", "0.031", "8.00", "below", "0.05%"]


def test_table_shows_the_resolution_note_under_its_module_set(gpt2):
    table = format_table(dry_run_rows(gpt2, ["mlp"], [4], [False]), "gpt2")
    assert table.splitlines()[3:5] == ["  mlp: c_fc, mlp.c_proj (4 layers)",
                                       "    note: 'c_proj' also names layers outside this set, so target_modules says "
                                       "'mlp.c_proj' (PEFT matches it as a suffix of the full name)"]
