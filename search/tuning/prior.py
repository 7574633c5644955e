"""The known-good configurations, as the search's first trials: so the search can never end
worse than the configurations the field already trusts.

With `search.priors: auto` (`prior_points`), in this order:
- the rule of thumb, from the training set's size and the kind of task: rank bounded by the
  data (at most 8 under 1,000 examples, 8 to 16 up to 10,000, 16 to 32 up to 100,000),
  feed-forward modules for knowledge-heavy tasks, RSLoRA from r=16, alpha = 2r, dropout 0.05,
  lr 2e-4;
- "LoRA Without Regret" (Thinking Machines, 2025): every linear layer, alpha 32 (their fixed
  choice) at r 32, no RSLoRA, no dropout, and a learning rate 10x what full fine-tuning would use;
- the seed ablation's strongest row: every linear layer, r 32, RSLoRA, alpha = r, lr 2e-4.
Every value is snapped to the nearest choice the configured space allows; a point that snaps
onto an earlier one is dropped. `search.priors` may instead list points of its own (checked
against the space by `SpaceConfig.problems`), or be `none`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from search.tuning.space import GRID, SpaceConfig, module_set_key

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
# Every linear layer first, then the sets closest to it.
_ALL_LINEAR = ["all_linear", "attention_mlp", "mlp", "attention", "attention_qv"]
# "LoRA Without Regret" found LoRA's best learning rate about 10x full fine-tuning's. Full
# fine-tuning of a small instruct model such as SmolLM2 runs at about 2e-5, so LoRA at about
# 2e-4; the space's rate nearest that is used.
FULL_FINE_TUNING_LR = 2e-5
LORA_OVER_FULL_LR = 10


@dataclass
class TaskConfig:
    kind: str = field(
        default="domain",
        metadata={"help": f"one of {', '.join(TASK_KINDS)}: shapes the rule-of-thumb first trial"})

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


def prior_points(space: SpaceConfig, train_rows: int, kind: str, num_samples: int) -> list[dict]:
    """The first trials as Optuna parameters of `LoraSpace` (for `StudySearcher(points_to_evaluate=...)`):
    `space.priors` resolved (auto: the known-good configurations snapped into the space; a
    list: its points, checked already; none: none), duplicates dropped, at most `num_samples`
    (they count in the budget)."""
    if space.priors == "none" or space.algorithm == GRID:  # a grid runs every point anyway
        return []
    if space.priors == "auto":
        lwr_rank = _nearest_rank(space, 32)
        points = [
            prior_point(space, train_rows, kind),
            _snap(space, _ALL_LINEAR, lwr_rank, alpha_ratio=32 / lwr_rank, use_rslora=False, dropout=0.0,
                  learning_rate=LORA_OVER_FULL_LR * FULL_FINE_TUNING_LR),
            _snap(space, _ALL_LINEAR, _nearest_rank(space, 32), alpha_ratio=1.0, use_rslora=True, dropout=0.05,
                  learning_rate=2e-4),
        ]
    else:
        points = [_sampled_only(space, point) for point in space.priors]
    unique = []
    for point in points:
        if point not in unique:
            unique.append(point)
    return unique[:num_samples]


def prior_point(space: SpaceConfig, train_rows: int, kind: str) -> dict:
    """The rule-of-thumb configuration as Optuna parameters of `LoraSpace`, each snapped into the space."""
    r = _nearest_rank(space, rule_of_thumb_rank(train_rows, kind))
    return _snap(space, _MODULE_PREFERENCE[kind], r, alpha_ratio=2.0, use_rslora=r >= 16, dropout=0.05,
                 learning_rate=2e-4)


def _nearest_rank(space: SpaceConfig, target: int) -> int:
    return min(space.ranks, key=lambda x: (abs(x - target), x))


def _snap(space: SpaceConfig, module_sets: list[str], r: int, alpha_ratio: float, use_rslora: bool, dropout: float,
          learning_rate: float) -> dict:
    """A configuration as Optuna parameters of `LoraSpace`: the first of `module_sets` the space
    has (else its first set), `r` as given (a rank of the space), every other choice the
    space's nearest, a range value clamped into its range; a fixed range is no parameter."""
    keys = [module_set_key(s) for s in space.module_sets]
    point = {
        "module_set": next((m for m in module_sets if m in keys), keys[0]),
        "r": r,
        "alpha_ratio": min(space.alpha_ratios, key=lambda a: abs(a - alpha_ratio)),
        "use_rslora": use_rslora if use_rslora in space.use_rslora else space.use_rslora[0],
        "use_dora": False if False in space.use_dora else space.use_dora[0],
        "loraplus_lr_ratio": min(space.loraplus_lr_ratio),
    }
    low, high = space.dropout
    if high > low:
        point["lora_dropout"] = min(max(dropout, low), high)
    low, high = space.learning_rate
    if high > low:
        point["learning_rate"] = min(max(learning_rate, low), high)
    return point


def _sampled_only(space: SpaceConfig, point: dict) -> dict:
    """A listed point without the values of fixed ranges, which are no Optuna parameters."""
    fixed = {key for key, (low, high) in (("lora_dropout", space.dropout), ("learning_rate", space.learning_rate))
             if low == high}
    return {key: value for key, value in point.items() if key not in fixed}
