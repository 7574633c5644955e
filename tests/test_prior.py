"""The rule-of-thumb first trial: bounded by the data, shaped by the task, inside the space."""

from __future__ import annotations

import pytest

from search.config import load
from search.prior import prior_point, rule_of_thumb_rank


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
