"""The search's wall time, what a search with more trials would take, and how long the run took to
start training, from the clock readings every trial report carries (`rundir.report.TrialReport`:
`called_at`, when Tune called the trial function, `busy_from`, since when the trial only trained
and evaluated, and `busy_to`, when the trial made that report; epoch seconds)."""

from __future__ import annotations

from dataclasses import dataclass

from analysis.results import TrialFiles


@dataclass(frozen=True)
class RunClock:
    """How long the search's trials ran, measured by their own clock readings."""

    wall_seconds: float      # the time during which at least one trial ran: the union of the trials' spans
    trial_seconds: float     # every trial's own span, summed (a resumed trial's sessions each counted)
    proposed: int            # trials the searcher proposed (priors included): what budget.num_samples counts
    proposed_seconds: float  # their spans, summed
    # from the command's start to the first training step of any trial; None where the run did not
    # record its start or its trials their first steps
    first_step_seconds: float | None

    @property
    def concurrency(self) -> float:
        """Trials running at once, on average over the wall time."""
        return self.trial_seconds / self.wall_seconds

    @property
    def seconds_per_proposed(self) -> float:
        return self.proposed_seconds / self.proposed

    def estimate(self, factor: int) -> float:
        """Wall seconds of the same search with `factor` times as many proposed trials: each one
        added costs what the proposed trials cost on average (ASHA stops the same share of them
        at each rung, whatever their number) and runs as many at a time as these did; the
        stages' trials (promotions, confirmations, reruns) stay as measured."""
        return self.wall_seconds + (factor - 1) * self.proposed_seconds / self.concurrency


def run_clock(trials: list[TrialFiles], started_at: float | None) -> RunClock | None:
    """`RunClock` of `trials` (`analysis.results.read_trial_files`) of a run whose command started
    at `started_at` (`RunConfig.started_at`); None where no proposed trial reported a clock
    reading. A trial's span is the union of [called_at, busy_to] over its reports: the reports of
    one call share `called_at`, and a trial resumed after an interruption has one such interval
    per call, with the time it stood still left out."""
    spans = {trial.trial_id: _union([(row["called_at"], row["busy_to"]) for row in trial.rows
                                     if "called_at" in row and "busy_to" in row])
             for trial in trials}
    proposed = [trial.trial_id for trial in trials if trial.params.origin.proposed and spans[trial.trial_id]]
    if not proposed:
        return None
    wall = _union([interval for intervals in spans.values() for interval in intervals])
    return RunClock(wall_seconds=_length(wall), trial_seconds=sum(_length(s) for s in spans.values()),
                    proposed=len(proposed), proposed_seconds=sum(_length(spans[t]) for t in proposed),
                    first_step_seconds=None if started_at is None else first_step_seconds(trials, started_at))


def first_step_seconds(trials: list[TrialFiles], started_at: float) -> float | None:
    """Seconds from `started_at` (epoch) until the first training step of any of `trials` began:
    the earliest `busy_from`, a trial's first report's, when its setup ended. None before any report."""
    steps_from = [row["busy_from"] for trial in trials for row in trial.rows if "busy_from" in row]
    return min(steps_from) - started_at if steps_from else None


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """`intervals` merged where they overlap, in order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def duration(seconds: float) -> str:
    """'45 s', '12 min', '1 h 05 min'."""
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"
