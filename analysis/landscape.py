"""A landscape: every configuration of a grid over the space, trained to the full budget with
several seeds, each eval round's metrics and costs. The simulator (`search.tuning.simulate`)
replays the search on it; a grid run (`search.algorithm: grid`) builds one, and this module's
command turns that run into one:

    python -m analysis.landscape runs/<name> --out bench/landscapes/<name>

A landscape is a directory of two files (docs/landscape.md says every field):
- `landscape.json`, the header (`Header`): the metric and its direction, the full budget and the
  eval rounds, the seeds, the grid (each configuration key with its values: the grid is their
  cross product), the trials that ran at once where it was measured, and where it came from;
- `landscape.jsonl` (or gzipped, `landscape.jsonl.gz`), one JSON object a line for each configuration, seed and eval round: the
  configuration's keys (`POINT_KEYS`), `seed`, `step`, the header's metric and any other
  `eval_*` value, per-row values as lists (`eval_row_loss`), `trainable_params`,
  `train_seconds` and `eval_seconds` (cumulative from the trial's start to this report, as a
  trial reports them) and `peak_memory_gb`.

`load` refuses a landscape with a broken header or row, a configuration of the grid, a seed or
an eval round missing, or a row twice, naming the line or the missing row (`LandscapeError`).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from analysis.config import SelectionConfig
from analysis.results import ROW_COLUMNS, read_run_config, read_trial_files, trial_status
from rundir.files import write_json_atomic, write_text_atomic

FORMAT = 1
HEADER_FILE, ROWS_FILE = "landscape.json", "landscape.jsonl"
# A configuration's keys, as the space names them (search.tuning.space.PRIOR_KEYS less LoRA+, which a grid keeps at 1)
POINT_KEYS = ("module_set", "r", "alpha_ratio", "lora_dropout", "use_rslora", "use_dora", "learning_rate")
_POINT_TYPES = {"module_set": str, "r": int, "alpha_ratio": float, "lora_dropout": float, "use_rslora": bool,
                "use_dora": bool, "learning_rate": float}
COST_KEYS = ("trainable_params", "train_seconds", "eval_seconds", "peak_memory_gb")


class LandscapeError(ValueError):
    """A landscape that cannot be used, saying where: the CLI's one `error:` line, exit 2."""


@dataclass(frozen=True)
class Point:
    """One configuration of the grid."""

    module_set: str
    r: int
    alpha_ratio: float
    lora_dropout: float
    use_rslora: bool
    use_dora: bool
    learning_rate: float

    def label(self) -> str:
        return " ".join(f"{key}={getattr(self, key)}" for key in POINT_KEYS)

    def as_dict(self) -> dict:
        return {key: getattr(self, key) for key in POINT_KEYS}


@dataclass(frozen=True)
class Header:
    """`landscape.json`."""

    format: int
    metric: str             # the selection metric every row carries
    mode: str               # min or max: the direction in which it improves
    max_steps: int          # the full budget
    steps: list[int]        # the eval rounds, ascending, the last max_steps
    seeds: list[int]        # every configuration ran once with each
    grid: dict[str, list]   # POINT_KEYS -> values; the grid is their cross product
    slots: int              # trials that ran at once where the seconds were measured
    search_train_rows: int  # rows the trials trained on (the priors' rule of thumb reads it)
    task_kind: str          # the run's task.kind (the priors read it)
    source: str             # what made it: the command, the model, the data

    def points(self) -> list[Point]:
        """Every configuration of the grid, in the grid's order."""
        return [Point(*values) for values in itertools.product(*(self.grid[key] for key in POINT_KEYS))]


@dataclass(frozen=True)
class Landscape:
    """A loaded landscape: its header, and each configuration's curve for each seed (rows by step)."""

    header: Header
    curves: dict[tuple[Point, int], list[dict]]

    def final(self, point: Point, seed: int) -> dict:
        """The row of `point` and `seed` at the full budget."""
        return self.curves[point, seed][-1]

    def mean(self, point: Point, key: str) -> float:
        """`key` at the full budget, the mean over the seeds: the configuration's true value."""
        return sum(self.final(point, seed)[key] for seed in self.header.seeds) / len(self.header.seeds)

    def seconds(self, point: Point, seed: int) -> float:
        """Train and eval seconds of `point` with `seed` to the full budget."""
        return row_seconds(self.final(point, seed))

    def eval_rows(self, metric: str) -> int:
        """How many eval rows every row's per-row values of `metric` hold (`eval_row_loss` for
        eval_loss); LandscapeError where a row lacks them or two rows hold different numbers."""
        column = ROW_COLUMNS.get(metric)
        counts = {len(row[column]) if column in row else 0 for curve in self.curves.values() for row in curve}
        if column is None or counts != {max(counts)} or not max(counts):
            raise LandscapeError(f"the landscape's rows do not all hold the same number of per-row values of "
                                 f"{metric} ({column or 'none kept for it'}; found {sorted(counts)} per row), "
                                 f"so its eval rows cannot be sub-sampled")
        return max(counts)


def row_seconds(row: dict) -> float:
    """A row's train and eval seconds, from the trial's start."""
    return row["train_seconds"] + row["eval_seconds"]


def load(directory: str | Path) -> Landscape:
    """The landscape in `directory`, checked (the module's docstring); LandscapeError says what is wrong and where."""
    directory = Path(directory)
    header = _header(directory / HEADER_FILE)
    path = directory / ROWS_FILE
    if not path.is_file():
        path = directory / f"{ROWS_FILE}.gz"
    if not path.is_file():
        raise LandscapeError(f"{directory / ROWS_FILE} is missing; a landscape is {HEADER_FILE} and {ROWS_FILE} (or "
                             f"{ROWS_FILE}.gz; docs/landscape.md)")
    try:
        text = gzip.decompress(path.read_bytes()).decode("utf-8") if path.suffix == ".gz" else path.read_text("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LandscapeError(f"{path} cannot be read ({e}); allowed: UTF-8 JSON lines, gzipped where it ends .gz") from None
    grid = {key: set(values) for key, values in header.grid.items()}
    curves: dict[tuple[Point, int], dict[int, dict]] = defaultdict(dict)
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        row = _row(line, where, header, grid)
        point, seed, step = Point(*(row[key] for key in POINT_KEYS)), row["seed"], row["step"]
        if step in curves[point, seed]:
            raise LandscapeError(f"{where}: a second row for {point.label()} seed={seed} step={step}")
        curves[point, seed][step] = row
    missing = [(point, seed, step) for point in header.points() for seed in header.seeds for step in header.steps
               if step not in curves.get((point, seed), {})]
    if missing:
        point, seed, step = missing[0]
        raise LandscapeError(f"{path} has no row for {point.label()} seed={seed} step={step}"
                             f"{f' (and {len(missing) - 1} more rows are missing)' if len(missing) > 1 else ''}; "
                             "every configuration of the grid needs every seed at every eval round")
    ordered = {key: [by_step[step] for step in header.steps] for key, by_step in curves.items()}
    for (point, seed), rows in ordered.items():
        for key in ("train_seconds", "eval_seconds"):
            if any(later[key] < earlier[key] for earlier, later in itertools.pairwise(rows)):
                raise LandscapeError(f"{path}: {key} of {point.label()} seed={seed} falls from one eval round to the "
                                     f"next; allowed: cumulative seconds from the trial's start")
    return Landscape(header, ordered)


def write(directory: str | Path, header: Header, rows: list[dict]) -> Path:
    """Write a landscape (atomically, file by file) into `directory`; `rows` as `load` reads them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / HEADER_FILE, asdict(header))
    write_text_atomic(directory / ROWS_FILE, "".join(json.dumps(row) + "\n" for row in rows))
    return directory


def of_run(run_dir: str | Path) -> tuple[Header, list[dict]]:
    """The landscape a finished grid run (`search.algorithm: grid`) measured: every trial that
    reached the full budget, each of its eval rounds a row. `load` then checks that the grid is whole."""
    record = read_run_config(run_dir)
    search, budget = record.search, record.budget
    algorithm = search["algorithm"] if "algorithm" in search else "tpe"  # a run recorded before grids was TPE's
    if algorithm != "grid":
        raise LandscapeError(f"{run_dir} is a run of search.algorithm={algorithm!r}; a landscape comes from a run "
                             "of search.algorithm=grid, where every configuration ran with every seed")
    selection = SelectionConfig.recorded(record.selection)
    rows, steps, seeds, windows = [], set(), set(), []
    for trial in read_trial_files(run_dir):
        by_step = {row["step"]: row for row in trial.rows}  # a step reported again after a resume: the later
        if trial_status(max(by_step, default=math.nan), trial.error, budget.max_steps) != "finished":
            continue
        params, lora = trial.params, trial.params.lora_config
        point = {"module_set": params.module_set, "r": lora["r"], "alpha_ratio": params.alpha_ratio,
                 "lora_dropout": lora["lora_dropout"], "use_rslora": lora["use_rslora"],
                 "use_dora": lora["use_dora"], "learning_rate": params.learning_rate}
        seeds.add(params.seed)
        windows.append((trial.rows[0]["called_at"], trial.rows[-1]["busy_to"]))
        for step in sorted(by_step):
            reported = by_step[step]
            steps.add(step)
            rows.append({**point, "seed": params.seed, "step": step,
                         **{key: value for key, value in reported.items()
                            if key.startswith("eval_") and isinstance(value, (int, float, list))
                            and not isinstance(value, bool)},
                         **{key: reported[key] for key in COST_KEYS}})
    grid = {"module_set": list(record.module_sets), "r": search["ranks"], "alpha_ratio": search["alpha_ratios"],
            "lora_dropout": search["grid"]["lora_dropouts"], "use_rslora": search["use_rslora"],
            "use_dora": search["use_dora"], "learning_rate": search["grid"]["learning_rates"]}
    header = Header(FORMAT, selection.metric, selection.direction, budget.max_steps, sorted(steps), sorted(seeds), grid,
                    most_at_once(windows), record.data_info.search_train_rows, record.task["kind"],
                    f"python -m analysis.landscape {run_dir}: model {record.base_model.name}, data {record.data['train']}")
    return header, rows


def most_at_once(windows: list[tuple[float, float]]) -> int:
    """The most of the (start, end) windows that overlap at one moment: the trials the run had at
    once (resources.max_concurrent_trials 0 records no number; the cluster's slots decided it)."""
    ends = sorted((moment, change) for start, end in windows for moment, change in ((start, 1), (end, -1)))
    return max(itertools.accumulate(change for _, change in ends), default=1)


def _header(path: Path) -> Header:
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise LandscapeError(f"{path} is missing; a landscape is {HEADER_FILE} and {ROWS_FILE} (docs/landscape.md)") from None
    except json.JSONDecodeError as error:
        raise LandscapeError(f"{path} is not JSON ({error.msg} at line {error.lineno})") from None
    names = [f.name for f in fields(Header)]
    if not isinstance(values, dict) or sorted(values) != sorted(names):
        have = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise LandscapeError(f"{path} has the keys {have}; allowed: exactly {names} (docs/landscape.md)")
    header = Header(**values)
    problems = []
    if header.format != FORMAT:
        problems.append(f"format is {header.format!r}; allowed: {FORMAT}")
    if header.mode not in ("min", "max"):
        problems.append(f"mode is {header.mode!r}; allowed: min or max")
    if (not isinstance(header.steps, list) or not header.steps or header.steps != sorted(set(header.steps))
            or header.steps[-1] != header.max_steps):
        problems.append(f"steps is {header.steps!r}; allowed: the eval rounds, ascending, the last max_steps "
                        f"({header.max_steps})")
    if not isinstance(header.seeds, list) or not header.seeds or len(set(header.seeds)) != len(header.seeds):
        problems.append(f"seeds is {header.seeds!r}; allowed: a list of distinct integers")
    if not isinstance(header.grid, dict) or sorted(header.grid) != sorted(POINT_KEYS):
        problems.append(f"grid has the keys {sorted(header.grid) if isinstance(header.grid, dict) else header.grid!r}; "
                        f"allowed: exactly {list(POINT_KEYS)}")
    else:
        for key in POINT_KEYS:
            values = header.grid[key]
            if not isinstance(values, list) or not values or not all(_typed(v, _POINT_TYPES[key]) for v in values):
                problems.append(f"grid.{key} is {values!r}; allowed: a non-empty list of {_POINT_TYPES[key].__name__}")
    if not isinstance(header.slots, int) or header.slots < 1:
        problems.append(f"slots is {header.slots!r}; allowed: an integer >= 1")
    if problems:
        raise LandscapeError(f"{path}: " + "; ".join(problems))
    return header


def _row(line: str, where: str, header: Header, grid: dict[str, set]) -> dict:
    """One line of the rows file, checked against the header."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise LandscapeError(f"{where} is not JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise LandscapeError(f"{where} is {type(row).__name__}; allowed: a JSON object")
    required = {**_POINT_TYPES, "seed": int, "step": int, header.metric: float, "trainable_params": int,
                "train_seconds": float, "eval_seconds": float, "peak_memory_gb": float}
    missing = [key for key in required if key not in row]
    if missing:
        raise LandscapeError(f"{where} lacks {missing}")
    for key, kind in required.items():
        value = row[key]
        if not _typed(value, kind) or (kind is float and not math.isfinite(value)):
            raise LandscapeError(f"{where}: {key} is {value!r}; allowed: {'a finite number' if kind is float else kind.__name__}")
    for key in POINT_KEYS:
        if row[key] not in grid[key]:
            raise LandscapeError(f"{where}: {key} is {row[key]!r}, not in the header's grid; allowed: {header.grid[key]}")
    if row["seed"] not in header.seeds:
        raise LandscapeError(f"{where}: seed is {row['seed']!r}; allowed: one of the header's seeds {header.seeds}")
    if row["step"] not in header.steps:
        raise LandscapeError(f"{where}: step is {row['step']!r}; allowed: one of the header's steps {header.steps}")
    for key, value in row.items():
        if key.startswith("eval_row_") and not (isinstance(value, list) and value
                                                and all(_typed(v, float) and math.isfinite(v) for v in value)):
            raise LandscapeError(f"{where}: {key} is not a list of finite numbers; allowed: one value per eval row")
    return row


def _typed(value, kind: type) -> bool:
    """Whether a JSON value is of `kind`: an int counts as a float, a bool as neither."""
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def main(argv: list[str] | None = None) -> int:
    """Turn a finished grid run into a landscape; exit 0, or 2 with one `error:` line."""
    parser = argparse.ArgumentParser(prog="python -m analysis.landscape",
                                     description="Write the landscape a finished grid run (search.algorithm: grid) "
                                                 "measured: landscape.json and landscape.jsonl (docs/landscape.md).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory of a grid run, such as runs/<name>")
    parser.add_argument("--out", required=True, help="the landscape's directory, such as bench/landscapes/<name>")
    arguments = parser.parse_args(argv)
    try:
        header, rows = of_run(arguments.run_dir)
        with tempfile.TemporaryDirectory() as checked:  # an incomplete grid is refused before anything is written
            load(write(checked, header, rows))
        landscape = load(write(arguments.out, header, rows))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{arguments.out}: {len(header.points())} configurations x {len(header.seeds)} seeds x "
          f"{len(header.steps)} eval rounds ({sum(len(rows) for rows in landscape.curves.values())} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
