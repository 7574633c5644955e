"""The contract of a trial's report: what a trial hands `tune.report` at each evaluation, which
Tune writes as a row of the trial's `result.json` (with keys of its own added) and the analysis
reads back into trials.csv.

Both trainers build a `TrialReport`; it enters Tune through `to_dict` only, and its field names
are the report's keys. The analysis takes its column names from here (`TABLE_COLUMNS`,
`ROW_COLUMNS`), never lists them again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

# A field's role in the trial table: a column of trials.csv, or per-row values (one per eval row,
# in the eval split's order) that the trial table carries but trials.csv leaves out.
_COLUMN = {"table": "column"}
_ROWS = {"table": "rows"}


@dataclass(frozen=True, kw_only=True)
class TrialReport:
    """One report of a trial at `step`. `<metric>_se` is the standard error of that mean over the
    eval rows; `eval_row_<metric>` that metric's value per eval row. The exact-match fields are
    None where the trial generated no answers this round; `pack_size` and `trainer_pid` are the
    shared trainer's alone (the trials its last packed step trained, and its process).
    `user_metrics` is the user's metric function's value under its `module:function` name.
    Clock readings (`busy_from` ... `worker_started_at`) are epoch seconds."""

    step: int = field(metadata=_COLUMN)
    eval_loss: float = field(metadata=_COLUMN)
    eval_loss_se: float = field(metadata=_COLUMN)
    eval_accuracy: float = field(metadata=_COLUMN)
    eval_accuracy_se: float = field(metadata=_COLUMN)
    eval_exact_match: float | None = field(default=None, metadata=_COLUMN)
    eval_exact_match_se: float | None = field(default=None, metadata=_COLUMN)
    train_loss: float = field(metadata=_COLUMN)
    trainable_params: int = field(metadata=_COLUMN)
    trainable_pct: float = field(metadata=_COLUMN)
    train_seconds: float = field(metadata=_COLUMN)
    eval_seconds: float = field(metadata=_COLUMN)
    eval_generate_seconds: float = field(metadata=_COLUMN)
    tokens_per_second: float = field(metadata=_COLUMN)
    peak_memory_gb: float = field(metadata=_COLUMN)
    peak_allocated_gb: float = field(metadata=_COLUMN)
    step_mode: str = field(metadata=_COLUMN)
    eval_row_loss: list[float] = field(metadata=_ROWS)
    eval_row_accuracy: list[float] = field(metadata=_ROWS)
    eval_row_exact_match: list[float] | None = field(default=None, metadata=_ROWS)
    busy_from: float      # since when the trial did nothing but train and evaluate
    busy_to: float        # when it made this report
    called_at: float      # when Tune called the trial function
    entered_at: float     # when the trial had imported its libraries
    worker_started_at: float
    pack_size: int | None = None
    trainer_pid: int | None = None
    user_metrics: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The report as `tune.report` takes it: a key per field, none for an optional field that
        is None, and the user's metric under its own name."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "user_metrics"}
        optional = {f.name for f in dataclasses.fields(self) if f.default is None}
        return {**{key: value for key, value in values.items() if not (key in optional and value is None)},
                **self.user_metrics}

    @classmethod
    def from_dict(cls, values: Mapping) -> TrialReport:
        """The report from `to_dict`'s keys: a key with a ':' is the user's metric; ValueError
        naming every missing or unknown key."""
        names = {f.name for f in dataclasses.fields(cls)} - {"user_metrics"}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown = sorted(key for key in values if key not in names and ":" not in key)
        missing = sorted(required - set(values))
        if unknown or missing:
            raise ValueError(f"a trial report {'lacks ' + str(missing) if missing else ''}"
                             f"{' and ' if unknown and missing else ''}"
                             f"{'has unknown keys ' + str(unknown) if unknown else ''}; its keys are "
                             f"{sorted(names)} and the user's metric as `module:function`")
        return cls(**{key: value for key, value in values.items() if key in names},
                   user_metrics={key: value for key, value in values.items() if ":" in key})


def _columns(role: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(TrialReport) if f.metadata.get("table") == role)


TABLE_COLUMNS = _columns("column")  # what trials.csv takes from a trial's last report
ROW_COLUMNS = _columns("rows")      # the per-row values, `eval_row_<metric>` of `eval_<metric>`
