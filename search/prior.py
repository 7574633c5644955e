"""The rule of thumb, as the search's first trial: so the search can never end worse than it.

From the training set's size and the kind of task: rank bounded by the data (at most 8
under 1,000 examples, 8 to 16 up to 10,000, 16 to 32 up to 100,000), feed-forward
modules for knowledge-heavy tasks, RSLoRA from r=16, alpha = 2r, dropout 0.05, lr 2e-4.
Every value is snapped to the nearest choice the configured space allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from search.space import SpaceConfig, module_set_key

TASK_KINDS = ("format", "instruction", "domain", "code")

# Module sets in order of preference: format tasks change how the model answers
# (attention); knowledge-heavy tasks need the feed-forward layers, where facts live.
_MODULE_PREFERENCE = {
    "format": ["attention", "attention_qv", "attention_mlp", "all_linear", "mlp"],
    "instruction": ["attention_mlp", "all_linear", "attention", "mlp", "attention_qv"],
    "domain": ["all_linear", "attention_mlp", "mlp", "attention", "attention_qv"],
    "code": ["all_linear", "attention_mlp", "mlp", "attention", "attention_qv"],
}
_KNOWLEDGE_HEAVY = ("domain", "code")


@dataclass
class TaskConfig:
    kind: str = field(default="domain", metadata={"help": f"one of {', '.join(TASK_KINDS)}: shapes the rule-of-thumb first trial"})

    def problems(self) -> list[str]:
        if self.kind not in TASK_KINDS:
            return [f"task.kind is {self.kind!r}; allowed: {', '.join(TASK_KINDS)}"]
        return []


def rule_of_thumb_rank(train_rows: int, kind: str) -> int:
    """The rank the data can support: the upper end of each band for knowledge-heavy tasks."""
    heavy = kind in _KNOWLEDGE_HEAVY
    if train_rows < 1_000:
        return 8 if heavy else 4
    if train_rows <= 10_000:
        return 16 if heavy else 8
    if train_rows <= 100_000:
        return 32 if heavy else 16
    return 64 if heavy else 32


def prior_point(space: SpaceConfig, train_rows: int, kind: str) -> dict:
    """The rule-of-thumb configuration as Optuna parameters of `LoraSpace` (for
    `OptunaSearch(points_to_evaluate=[...])`), each snapped into the space."""
    keys = [module_set_key(s) for s in space.module_sets]
    module_set = next((m for m in _MODULE_PREFERENCE[kind] if m in keys), keys[0])
    target = rule_of_thumb_rank(train_rows, kind)
    r = min(space.ranks, key=lambda x: (abs(x - target), x))
    point = {
        "module_set": module_set,
        "r": r,
        "alpha_ratio": min(space.alpha_ratios, key=lambda a: abs(a - 2.0)),
        "use_rslora": (r >= 16) if (r >= 16) in space.use_rslora else space.use_rslora[0],
        "use_dora": False if False in space.use_dora else space.use_dora[0],
        "loraplus_lr_ratio": min(space.loraplus_lr_ratio),
    }
    low, high = space.dropout
    if high > low:
        point["lora_dropout"] = min(max(0.05, low), high)
    low, high = space.learning_rate
    if high > low:
        point["learning_rate"] = min(max(2e-4, low), high)
    return point
