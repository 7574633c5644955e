"""The command line of the analysis: re-analyse a finished or interrupted run without training.

    python -m analysis.report RUN_DIR [--tolerance T] [--cost C] [--metric M --mode MODE]

Writes trials.csv, pick.json, adapter/adapter_config.json, plots/ and report.md into RUN_DIR
(`analysis.pipeline.analyse`). Exit 0 with a pick, 1 when no trial is eligible (report.md and
trials.csv still say why), 2 on bad input.
"""

from dataclasses import fields, replace

from analysis.config import COSTS, METRIC_MODES, MODES, SelectionConfig
from analysis.pipeline import analyse, analyse_at_uri
from analysis.results import read_run_config
from rundir.cli import ArgumentParser, print_errors
from rundir.files import is_uri

_FIELD_HELP = {f.name: f.metadata["help"] for f in fields(SelectionConfig)}


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
    parser.add_argument("--metric", choices=list(METRIC_MODES), help=_FIELD_HELP["metric"])
    parser.add_argument("--mode", choices=MODES, help=_FIELD_HELP["mode"])
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has printed the usage and what was wrong, or --help
        return stop.code
    overrides = {
        name: getattr(arguments, name)
        for name in ("metric", "mode", "tolerance", "cost")
        if getattr(arguments, name) is not None
    }
    try:
        if is_uri(arguments.run_dir):
            return analyse_at_uri(arguments.run_dir, overrides)
        selection = replace(SelectionConfig.recorded(read_run_config(arguments.run_dir).selection), **overrides)
        return analyse(arguments.run_dir, selection)
    except ValueError as error:
        return print_errors(str(error))


if __name__ == "__main__":
    raise SystemExit(main())
