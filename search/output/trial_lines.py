"""The search's progress as a person reads it, printed through Ray Tune's own hooks: a
`Callback` prints one line per trial event (started, with its configuration in short;
finished; stopped by ASHA; failed, with its one-line reason; retried), a `ProgressReporter`
the status line (trials done out of those planned, running, the best so far, time left).

They stand in for Tune's tables and print what the console (search/output/console.py) of the
process that runs Tune asks for: everything by default, the failures with `--quiet`, nothing
with `--verbose`, which shows Tune's own display instead. Tune pickles both into the
experiment, so a resume prints with the console of the command that resumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from ray.tune.experiment import Trial

from analysis.candidates import leader
from analysis.config import SelectionConfig
from analysis.results import TrialFiles, error_summary
from rundir.params import Origin, TrialParams
from search.config import Config
from search.output.console import say
from search.tuning.space import GRID, grid_points

# A status line at least this often when no trial ends: a long trial shows the run is alive,
# without a line a minute in a log that runs for hours.
HEARTBEAT_S = 300.0
_ENDED = (Trial.TERMINATED, Trial.ERROR)
_STAGES = (Origin.PROMOTED, Origin.CONFIRM, Origin.CHEAPER, Origin.RERUN)  # trials the search adds to those Optuna proposes


def progress_callbacks(config: Config) -> list[tune.Callback]:
    """The callbacks that print a run's trial events."""
    return [TrialEvents(config.selection.metric, config.budget.max_steps)]


def status_reporter(config: Config, num_samples: int) -> StatusLine:
    """The reporter that prints a run's status line; `num_samples` is the experiment's, -1 for
    the search (budget.num_samples trials proposed, then the stages' trials: those the selection
    asks for in any case expected from the start, the rest as they come; a grid's every point
    with every seed, all known from the start)."""
    grid = num_samples < 0 and config.search.algorithm == GRID
    expected = 0
    if grid:
        planned = len(grid_points(config.search)) * config.budget.landscape_seeds
    elif num_samples < 0:
        planned = config.budget.num_samples
        selection = config.selection
        # the final leaders' extra seeds and the pick's cheaper neighbours: the time left counts
        # the minutes they train before they are handed out
        expected = selection.confirm_top_k * selection.confirm_seeds + selection.cheaper
    else:
        planned = num_samples
    return StatusLine(config.selection, config.budget.max_steps, planned, stages_planned=grid,
                      stages_expected=expected)


class TrialEvents(tune.Callback):
    """One line per trial event. `metric` is the one the pick uses; a trial that ends below
    `max_steps` was stopped by ASHA (the stages' trials always train to the full budget)."""

    def __init__(self, metric: str, max_steps: int) -> None:
        self.metric, self.max_steps = metric, max_steps

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        params = TrialParams.from_config(trial.config)
        step = trial.last_result.get("step")
        what = f"resumed at step {step}" if step else "started"
        origin = _ORIGIN.get(params.origin, "").format(parent=params.parent, seed=params.seed)
        say(f"trial {trial.trial_id} {what}: {describe(params)}{f' ({origin})' if origin else ''}")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        step = trial.last_result.get("step")
        if step is None:
            say(f"trial {trial.trial_id} ended before its first report")
            return
        how = "finished" if step >= self.max_steps else "stopped by ASHA"
        say(f"trial {trial.trial_id} {how} at step {step}: {self._value(trial)}")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        say(f"trial {trial.trial_id} failed{_at_step(trial)}: {_reason(trial)}", quiet_too=True)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        say(f"trial {trial.trial_id} failed{_at_step(trial)}: {_reason(trial)}; it continues from its last "
            f"checkpoint (failure {trial.run_metadata.num_failures} of {trial.max_failures} allowed)")

    def _value(self, trial: Trial) -> str:
        value = trial.last_result.get(self.metric)
        return f"{self.metric} {value:.4g}" if isinstance(value, (int, float)) else f"no {self.metric}"


class StatusLine(tune.ProgressReporter):
    """The status line, printed when trials have ended since the last one (the first time on a
    resume, which starts with trials done), and at least every HEARTBEAT_S: trials done out of
    those planned (`planned` proposed, plus the stages' trials unless `stages_planned`: `planned`
    counts them already; until the run is done, at least `stages_expected` of them), running, the
    best configuration at the full budget (`max_steps`) by `selection`'s metric, as the report
    names it (`best_configuration`), and the time left at the pace trials have ended since Tune
    started."""

    def __init__(self, selection: SelectionConfig, max_steps: int, planned: int, stages_planned: bool = False,
                 stages_expected: int = 0) -> None:
        self.selection, self.max_steps, self.planned = selection, max_steps, planned
        self.stages_planned, self.stages_expected = stages_planned, stages_expected
        self.setup()

    def setup(self, start_time: float | None = None, total_samples: int | None = None, metric: str | None = None,
              mode: str | None = None, **kwargs) -> None:
        self._started = time.monotonic()
        self._ended_before: int | None = None  # ended when Tune started: a resume's finished trials
        self._ended_said = self._planned_said = 0
        self._said_at = self._started

    def should_report(self, trials: list[Trial], done: bool = False) -> bool:
        ended = sum(trial.status in _ENDED for trial in trials)
        if self._ended_before is None:
            self._ended_before = ended
        # a search that ended with fewer stage trials than planned says so; a stopped one, whose
        # planned trials did not all end, says nothing more
        return (ended != self._ended_said or time.monotonic() - self._said_at >= HEARTBEAT_S
                or (done and ended == self._planned(trials, done) != self._planned_said))

    def report(self, trials: list[Trial], done: bool, *sys_info: str) -> None:
        ended = sum(trial.status in _ENDED for trial in trials)
        planned = self._planned(trials, done)
        running = sum(trial.status == Trial.RUNNING for trial in trials)
        now = time.monotonic()
        left = time_left_s(ended - (self._ended_before or 0), planned - ended, now - self._started)
        best = best_configuration(trials, self.selection, self.max_steps)
        say(status_text(ended, planned, running, self.selection.metric, best, left))
        self._ended_said, self._planned_said, self._said_at = ended, planned, now

    def _planned(self, trials: list[Trial], done: bool) -> int:
        stages = 0 if self.stages_planned else sum(Origin(trial.config["origin"]) in _STAGES for trial in trials)
        return self.planned + (stages if done else max(stages, self.stages_expected))


def describe(params: TrialParams) -> str:
    """A trial's configuration in short: `all_linear r16 a32 lr 2.1e-3`, then the dropout,
    `rslora`, `dora` and LoRA+'s ratio where they apply."""
    lora = params.lora_config
    words = [params.module_set, f"r{lora['r']}", f"a{lora['lora_alpha']:g}", f"lr {short_float(params.learning_rate)}"]
    if lora.get("lora_dropout"):
        words.append(f"dropout {lora['lora_dropout']:.2g}")
    if lora.get("use_rslora"):
        words.append("rslora")
    if lora.get("use_dora"):
        words.append("dora")
    if params.loraplus_lr_ratio != 1:
        words.append(f"lora+ {params.loraplus_lr_ratio:g}")
    return " ".join(words)


_ORIGIN = {
    Origin.PRIOR: "a known-good configuration, tried first",
    Origin.PROMOTED: "promoted: continues trial {parent} to the full budget",
    Origin.CONFIRM: "confirms trial {parent} with seed {seed}",
    Origin.CHEAPER: "cheaper than the pick, trial {parent}, and next to it",
    Origin.RERUN: "trial {parent} again, from its last checkpoint with a larger GPU share",
    Origin.RETRAIN: "the pick, trial {parent}, retrained on all the data",
}


@dataclass(frozen=True)
class Best:
    """The status line's best configuration: the id the report gives it, its value (the mean over
    its `runs`), its parameters."""

    trial_id: str
    value: float
    runs: int
    params: TrialParams


def best_configuration(trials: list[Trial], selection: SelectionConfig, max_steps: int) -> Best | None:
    """The best configuration among the trials that ended at the full budget, as the analysis and
    the report name it (`analysis.candidates.leader`): a configuration's runs with other seeds
    count by their mean, under its first run's id, so a lucky confirmation is not named instead."""
    ended = [trial for trial in trials if trial.status in _ENDED]
    reports = [TrialFiles(trial.trial_id, TrialParams.from_config(trial.config),
                          [trial.last_result] if "step" in trial.last_result else [],
                          "failed" if trial.status == Trial.ERROR else "", None) for trial in ended]
    row = leader(reports, selection, max_steps)
    if row is None:
        return None
    params = next(report.params for report in reports if report.trial_id == row["trial_id"])
    return Best(row["trial_id"], float(row[selection.metric]), int(row["seeds"]), params)


def status_text(ended: int, planned: int, running: int, metric: str, best: Best | None, left_s: float | None) -> str:
    """The status line: `3/8 trials done, 2 running; best eval_loss 0.4123 (trial ...: ...); about 2m 10s left`."""
    parts = [f"{ended}/{planned} trials done, {running} running"]
    if best is None:
        parts.append("no trial at the full budget yet")
    else:
        runs = f", mean of {best.runs} runs" if best.runs > 1 else ""
        parts.append(f"best {metric} {best.value:.4g} (trial {best.trial_id}: {describe(best.params)}{runs})")
    if left_s is not None and ended < planned:
        parts.append(f"about {duration(left_s)} left")
    return "; ".join(parts)


def time_left_s(ended: int, remaining: int, seconds: float) -> float | None:
    """About how long the `remaining` trials take, at the pace at which `ended` trials ended in
    `seconds`; None until one has ended."""
    if ended <= 0 or seconds <= 0:
        return None
    return remaining * seconds / ended


def duration(seconds: float) -> str:
    """`45s`, `3m 05s`, `2h 10m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def short_float(value: float) -> str:
    """Two significant digits, and an exponent without Python's padding: 2.1e-3, not 2.1e-03."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _at_step(trial: Trial) -> str:
    step = trial.last_result.get("step")
    return f" at step {step}" if step is not None else " before its first report"


def _reason(trial: Trial) -> str:
    """The one line that says why the trial failed, from the error file Tune wrote for it."""
    unknown = "see error.txt in its trial directory"
    if trial.error_file is None:
        return unknown
    try:
        return error_summary(Path(trial.error_file).read_text(encoding="utf-8"))
    except OSError:
        return unknown

