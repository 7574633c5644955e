"""The command line of the analysis: re-analyse a finished or interrupted run without training.

    python -m analysis.report RUN_DIR [--tolerance T] [--cost C] [--metric M] [--mode MODE]

Writes trials.csv, pick.json, adapter/adapter_config.json, plots/ and report.md into RUN_DIR
(`analysis.pipeline.analyse`). Exit 0 with a pick, 1 when no trial is eligible (report.md and
trials.csv still say why), 2 on bad input.
"""

from dataclasses import fields

from analysis.config import COSTS, METRIC_MODES, MODES, SelectionConfig, is_user_metric
from analysis.pipeline import analyse, analyse_at_uri
from analysis.results import read_run_config
from rundir.cli import ArgumentParser, print_errors
from rundir.files import is_uri

_FIELD_HELP = {f.name: f.metadata["help"] for f in fields(SelectionConfig)}
_OPTIONS = ("metric", "mode", "tolerance", "cost")


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status (0 picked, 1 nothing eligible, 2 bad input)."""
    parser = ArgumentParser(
        prog="python -m analysis.report",
        description="Re-analyse a LoRA search run without training. Writes trials.csv, pick.json, "
        "adapter/adapter_config.json, plots/ and report.md into RUN_DIR. Options override the "
        "selection settings the run was started with.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="A run directory (holds run_config.json and tune/), or its storage URI (s3://..., gs://...).")
    parser.add_argument("--tolerance", type=float, help=_FIELD_HELP["tolerance"])
    parser.add_argument("--cost", choices=COSTS, help=_FIELD_HELP["cost"])
    parser.add_argument("--metric", help=_FIELD_HELP["metric"])
    parser.add_argument("--mode", choices=MODES,
                        help=f"{_FIELD_HELP['mode']}. Default: the run's own; auto where --metric changes the metric")
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage and what was wrong, or --help
        return stop.code
    overrides = {
        name: getattr(arguments, name)
        for name in _OPTIONS
        if getattr(arguments, name) is not None
    }
    try:
        if is_uri(arguments.run_dir):
            return analyse_at_uri(arguments.run_dir, overrides)
        recorded = SelectionConfig.recorded(read_run_config(arguments.run_dir).selection)
        selection = recorded.with_options(**overrides)
        problems = _problems(selection, recorded)
        if problems:
            raise ValueError(" ".join(problems))
        return analyse(arguments.run_dir, selection)
    except ValueError as error:
        return print_errors(str(error))


def _problems(selection: SelectionConfig, recorded: SelectionConfig) -> list[str]:
    """What is wrong with `selection`, each setting named as this command takes it: an option, or
    a key of the run's run_config.json. A function of the user's counts only where the run's
    trials computed it: they compute the one the search's selection.metric named, and no other."""
    if is_user_metric(selection.metric) and selection.metric != recorded.metric:
        reported = [*METRIC_MODES, *([recorded.metric] if is_user_metric(recorded.metric) else [])]
        return [f"--metric={selection.metric!r}: this run's trials did not compute it (they compute a function of "
                f"yours only where the search's selection.metric named it; this run's is {recorded.metric!r}). "
                f"Fix: use one of {reported}."]
    return selection.problems(lambda name: f"--{name}" if name in _OPTIONS else f"selection.{name} (run_config.json)")


if __name__ == "__main__":
    raise SystemExit(main())
